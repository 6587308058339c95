//! The pod's `keyhaven.io/` annotations: which pods opt in, and what they ask for.
//!
//! Every annotation under the prefix must be one we know with a valid value; anything else
//! refuses the pod with a message naming the annotation and listing the valid ones — a typo
//! is never silently ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::quantity::Quantity;

/// The annotation (and label) prefix.
pub const PREFIX: &str = "keyhaven.io/";
/// `inject`: `"true"` opts a pod in (as a label, which the webhook's objectSelector matches,
/// or as an annotation); `"false"` opts it out.
pub const INJECT: &str = "keyhaven.io/inject";
/// Set by the injector on a pod it changed; such a pod is left as it is.
pub const STATUS: &str = "keyhaven.io/status";
/// The value of [`STATUS`].
pub const INJECTED: &str = "injected";

/// Per-file annotations: `<prefix><kind>-<file>`.
const PER_FILE: [&str; 4] = ["secret-", "format-", "key-", "template-"];
/// Pod-wide annotations (without the prefix).
const POD_WIDE: [&str; 14] = [
    "inject",
    "status",
    "mode",
    "ttl",
    "on-expiry",
    "on-revoked",
    "file-mode",
    "cpu-request",
    "cpu-limit",
    "memory-request",
    "memory-limit",
    "broker-addr",
    "agent-port",
    "mount-init-containers",
];

/// The valid annotations, for error messages.
pub fn valid_list() -> String {
    let mut v: Vec<String> = POD_WIDE.iter().map(|a| format!("{PREFIX}{a}")).collect();
    v.extend(PER_FILE.iter().map(|a| format!("{PREFIX}{a}<file>")));
    v.join(", ")
}

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A native sidecar that keeps the files fresh for the pod's life.
    Sidecar,
    /// An ordinary init container that writes the files once (`--once`).
    InitOnly,
    /// Both: the files are written once before anything else, then kept fresh.
    Both,
}

/// One file the agent writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRequest {
    /// File name under the secrets directory.
    pub file: String,
    /// Broker path.
    pub path: String,
    /// `raw`, `json`, `dotenv` or `template` (`None`: the agent guesses from the name).
    pub format: Option<String>,
    /// The key, for `raw`.
    pub key: Option<String>,
    /// The template text, for `template`.
    pub template: Option<String>,
}

/// What an opted-in pod asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The files, by name.
    pub files: Vec<FileRequest>,
    /// Sidecar, init-only or both.
    pub mode: Mode,
    /// Requested lease TTL.
    pub ttl: Option<Duration>,
    /// The agent's `--on-expiry`.
    pub on_expiry: Option<String>,
    /// The agent's `--on-revoked`.
    pub on_revoked: Option<String>,
    /// The files' mode (octal text).
    pub file_mode: Option<String>,
    /// Resource overrides.
    pub cpu_request: Option<Quantity>,
    /// Resource overrides.
    pub cpu_limit: Option<Quantity>,
    /// Resource overrides.
    pub memory_request: Option<Quantity>,
    /// Resource overrides.
    pub memory_limit: Option<Quantity>,
    /// Another broker (only where the injector allows it).
    pub broker_addr: Option<String>,
    /// Port of the agent's health and metrics listener.
    pub agent_port: Option<u16>,
    /// Init containers that get the secrets volume too.
    pub mount_init_containers: Vec<String>,
}

/// What the annotations say about a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not opted in: leave it alone.
    NotRequested,
    /// Already injected (a reinvocation, or a copy of an injected pod): leave it alone.
    AlreadyInjected,
    /// Inject this.
    Inject(Box<Request>),
}

/// Reads the pod's labels and annotations. `Err` lists every problem found, each naming its
/// annotation.
pub fn decide(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<Decision, Vec<String>> {
    let opted_in = match (
        annotations.get(INJECT).map(String::as_str),
        labels.get(INJECT).map(String::as_str),
    ) {
        (Some("false"), _) => false,
        (Some("true"), _) | (None, Some("true")) => true,
        (Some(v), _) => {
            return Err(vec![format!(
                "{INJECT}: {} is not \"true\" or \"false\"",
                shown(v)
            )])
        }
        (None, _) => false,
    };
    if !opted_in {
        return Ok(Decision::NotRequested);
    }
    if let Some(v) = annotations.get(STATUS) {
        if v == INJECTED {
            return Ok(Decision::AlreadyInjected);
        }
        return Err(vec![format!(
            "{STATUS}: is set by the injector only (value {INJECTED:?}); remove it"
        )]);
    }
    parse_request(annotations).map(|r| Decision::Inject(Box::new(r)))
}

fn parse_request(annotations: &BTreeMap<String, String>) -> Result<Request, Vec<String>> {
    let mut errors = Vec::new();
    let mut files: BTreeMap<String, FileRequest> = BTreeMap::new();
    let mut per_file: Vec<(&str, &str, &String, &String)> = Vec::new();
    let mut r = Request {
        files: Vec::new(),
        mode: Mode::Sidecar,
        ttl: None,
        on_expiry: None,
        on_revoked: None,
        file_mode: None,
        cpu_request: None,
        cpu_limit: None,
        memory_request: None,
        memory_limit: None,
        broker_addr: None,
        agent_port: None,
        mount_init_containers: Vec::new(),
    };
    for (key, value) in annotations {
        let Some(name) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let mut fail = |m: String| errors.push(format!("{key}: {m}"));
        if let Some((kind, file)) = PER_FILE
            .iter()
            .find_map(|k| name.strip_prefix(k).map(|f| (*k, f)))
        {
            match check_file_name(file) {
                Ok(()) => per_file.push((kind, file, key, value)),
                Err(m) => fail(m),
            }
            continue;
        }
        match name {
            "inject" | "status" => {}
            "mode" => match value.as_str() {
                "sidecar" => r.mode = Mode::Sidecar,
                "init-only" => r.mode = Mode::InitOnly,
                "both" => r.mode = Mode::Both,
                v => fail(format!("{} is not sidecar, init-only or both", shown(v))),
            },
            "ttl" => match humantime::parse_duration(value) {
                Ok(d) if !d.is_zero() && d <= Duration::from_secs(31 * 24 * 3600) => {
                    r.ttl = Some(d)
                }
                _ => fail(format!(
                    "{} is not a duration between 1s and 31d (such as 15m)",
                    shown(value)
                )),
            },
            "on-expiry" => one_of(value, &["keep", "delete"], &mut r.on_expiry, &mut fail),
            "on-revoked" => one_of(
                value,
                &["lease-again", "delete"],
                &mut r.on_revoked,
                &mut fail,
            ),
            "file-mode" => match broker_agent::config::parse_mode(value) {
                Ok(_) => r.file_mode = Some(value.clone()),
                Err(m) => fail(m),
            },
            "cpu-request" => quantity(value, &mut r.cpu_request, &mut fail),
            "cpu-limit" => quantity(value, &mut r.cpu_limit, &mut fail),
            "memory-request" => quantity(value, &mut r.memory_request, &mut fail),
            "memory-limit" => quantity(value, &mut r.memory_limit, &mut fail),
            "broker-addr" => r.broker_addr = Some(value.clone()),
            "agent-port" => match value.parse::<u16>() {
                Ok(p) if p >= 1024 => r.agent_port = Some(p),
                _ => fail(format!("{} is not a port from 1024 to 65535", shown(value))),
            },
            "mount-init-containers" => {
                r.mount_init_containers = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
            }
            _ => fail(match suggestion(name) {
                Some(s) => format!("unknown annotation (did you mean {PREFIX}{s}?)"),
                None => format!("unknown annotation; the valid ones are {}", valid_list()),
            }),
        }
    }
    // Files first (`secret-`), then what refines them.
    for (kind, file, key, value) in &per_file {
        if *kind == "secret-" {
            match check_broker_path(value) {
                Ok(()) => {
                    files.insert(
                        (*file).to_owned(),
                        FileRequest {
                            file: (*file).to_owned(),
                            path: (*value).clone(),
                            format: None,
                            key: None,
                            template: None,
                        },
                    );
                }
                Err(m) => errors.push(format!("{key}: {m}")),
            }
        }
    }
    for (kind, file, key, value) in per_file {
        if kind == "secret-" {
            continue;
        }
        let Some(f) = files.get_mut(file) else {
            if !errors
                .iter()
                .any(|e| e.starts_with(&format!("{PREFIX}secret-{file}:")))
            {
                errors.push(format!(
                    "{key}: no {PREFIX}secret-{file} annotation names the secret for this file"
                ));
            }
            continue;
        };
        match kind {
            "format-" => match value.as_str() {
                "raw" | "json" | "dotenv" | "template" => f.format = Some(value.clone()),
                v => errors.push(format!(
                    "{key}: {} is not raw, json, dotenv or template",
                    shown(v)
                )),
            },
            "key-" => f.key = Some(value.clone()),
            _ => f.template = Some(value.clone()),
        }
    }
    for f in files.values() {
        let fmt = f.format.as_deref();
        if f.template.is_some() && fmt.is_some_and(|x| x != "template") {
            errors.push(format!(
                "{PREFIX}template-{0}: the file's {PREFIX}format-{0} is not template",
                f.file
            ));
        }
        if f.template.is_none() && fmt == Some("template") {
            errors.push(format!(
                "{PREFIX}format-{0}: format template needs {PREFIX}template-{0}",
                f.file
            ));
        }
        if f.key.is_some() && fmt.is_some_and(|x| x != "raw") {
            errors.push(format!(
                "{PREFIX}key-{0}: a key applies to format raw only",
                f.file
            ));
        }
        if let Some(t) = &f.template {
            if let Err(e) = broker_agent::template::check(t) {
                errors.push(format!("{PREFIX}template-{}: {e}", f.file));
            }
        }
    }
    if files.is_empty() && !errors.iter().any(|e| e.contains("secret-")) {
        errors.push(format!(
            "{INJECT} is \"true\" but no {PREFIX}secret-<file> annotation names a secret \
             (e.g. {PREFIX}secret-db.json: payments/db)"
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    r.files = files.into_values().collect();
    Ok(r)
}

/// The known annotation closest to a misspelt `name` (within two edits), with the file part
/// kept for per-file ones: `formt-db.json` → `format-db.json`.
fn suggestion(name: &str) -> Option<String> {
    let close = |a: &str, b: &str| edit_distance(a, b) <= 2;
    if let Some(p) = POD_WIDE.iter().find(|p| close(name, p)) {
        return Some((*p).to_owned());
    }
    let (kind, file) = name.split_once('-')?;
    PER_FILE
        .iter()
        .find(|k| close(&format!("{kind}-"), k))
        .map(|k| format!("{k}{file}"))
}

/// Levenshtein distance (annotation names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn one_of(value: &str, allowed: &[&str], slot: &mut Option<String>, fail: &mut impl FnMut(String)) {
    if allowed.contains(&value) {
        *slot = Some(value.to_owned());
    } else {
        fail(format!("{} is not {}", shown(value), allowed.join(" or ")));
    }
}

fn quantity(value: &str, slot: &mut Option<Quantity>, fail: &mut impl FnMut(String)) {
    match value.parse() {
        Ok(q) => *slot = Some(q),
        Err(e) => fail(format!("{e}")),
    }
}

/// A value in an error message: at most 64 characters, quoted and escaped.
pub fn shown(v: &str) -> String {
    let mut s: String = v.chars().take(64).collect();
    if s.len() < v.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// File names the agent writes: one path component the annotation key can carry.
fn check_file_name(file: &str) -> Result<(), String> {
    let ok = !file.is_empty()
        && file.len() <= 50
        && file.starts_with(|c: char| c.is_ascii_alphanumeric())
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "file name {} must start with a letter or digit and hold only letters, digits, \
             '.', '-' and '_' (at most 50)",
            shown(file)
        ))
    }
}

fn check_broker_path(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && path.len() <= 512
        && !path.starts_with('/')
        && !path.ends_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a broker path (such as payments/db)",
            shown(path)
        ))
    }
}
