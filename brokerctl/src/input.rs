//! Turning flags into requests: lease selectors, secret data from files / literals / JSON,
//! local checks of paths and policies before anything is sent.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

use keyhaven_proto::broker::v1::LeaseSelector;

use super::cli::{check_data_key, KeyFile, KeyLiteral, PutArgs, SelectorArgs};
use super::{CtlError, Usage};
use keyhaven_broker_core::policy::{validate_secret_path, PolicySet};

/// Largest value read from one `--from-file` (the broker's message limit is the real bound).
pub const MAX_VALUE_BYTES: u64 = 1024 * 1024;

/// Maps the selector flags to the wire selector: `None` means every lease; a namespace alone
/// means every lease in it.
pub fn lease_selector(s: &SelectorArgs) -> Result<Option<LeaseSelector>, Usage> {
    let nonempty = |flag: &str, v: &Option<String>| -> Result<Option<String>, Usage> {
        match v {
            Some(v) if v.is_empty() => Err(Usage(format!("{flag} must not be empty"))),
            other => Ok(other.clone()),
        }
    };
    let id = nonempty("--id", &s.id)?;
    let namespace = nonempty("--namespace", &s.namespace)?;
    let service_account = nonempty("--serviceaccount", &s.serviceaccount)?;
    let pod = nonempty("--pod", &s.pod)?;
    let prefix = nonempty("--prefix", &s.prefix)?;
    let sel = match (id, namespace, service_account, pod, prefix) {
        (None, None, None, None, None) => return Ok(None),
        (Some(lease_id), None, None, None, None) => LeaseSelector {
            lease_id,
            ..Default::default()
        },
        (None, Some(namespace), Some(service_account), None, None) => LeaseSelector {
            namespace,
            service_account,
            ..Default::default()
        },
        (None, Some(namespace), None, Some(pod), None) => LeaseSelector {
            namespace,
            pod,
            ..Default::default()
        },
        (None, None, None, None, Some(prefix)) => {
            let trimmed = prefix.trim_end_matches('/');
            validate_secret_path(trimmed)
                .map_err(|e| Usage(format!("--prefix {prefix:?}: {e}")))?;
            LeaseSelector {
                path_prefix: trimmed.to_owned(),
                ..Default::default()
            }
        }
        (None, Some(namespace), None, None, None) => LeaseSelector {
            namespace,
            ..Default::default()
        },
        _ => {
            return Err(Usage(
                "give one selector: --id, --namespace (alone, with --serviceaccount or with \
                 --pod), or --prefix"
                    .into(),
            ))
        }
    };
    Ok(Some(sel))
}

/// Checks a secret path locally, as the broker will.
pub fn secret_path(path: &str) -> Result<&str, Usage> {
    validate_secret_path(path).map_err(|e| Usage(format!("secret path {path:?} {e}")))?;
    Ok(path)
}

/// Key/value data for `secrets put`. Values are wiped when dropped; `Debug` shows keys only.
#[derive(Default)]
pub struct SecretValues(pub BTreeMap<String, Zeroizing<Vec<u8>>>);

impl fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValues")
            .field("keys", &self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretValues {
    fn insert(&mut self, key: &str, value: Zeroizing<Vec<u8>>) -> Result<(), Usage> {
        if self.0.insert(key.to_owned(), value).is_some() {
            return Err(Usage(format!("key `{key}` is given more than once")));
        }
        Ok(())
    }

    /// The wire form (the request owns copies; ours are wiped on drop).
    pub fn to_wire(&self) -> std::collections::HashMap<String, Vec<u8>> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), v.to_vec()))
            .collect()
    }
}

/// Gathers `--from-file`, `--from-literal` or `--from-json` into one map. Reading stdin for
/// `--from-json -` uses `stdin`.
pub fn secret_values(
    args: &PutArgs,
    stdin: &mut dyn std::io::Read,
) -> Result<SecretValues, CtlError> {
    let mut out = SecretValues::default();
    if let Some(json) = &args.from_json {
        return from_json(json, stdin);
    }
    for KeyFile { key, path } in &args.from_file {
        out.insert(key, read_value(path)?)?;
    }
    for KeyLiteral { key, value } in &args.from_literal {
        out.insert(key, Zeroizing::new(value.as_bytes().to_vec()))?;
    }
    if out.0.is_empty() {
        return Err(
            Usage("no data: give --from-file KEY=PATH (or --from-json FILE)".into()).into(),
        );
    }
    Ok(out)
}

/// Reads one `--from-file` value as bytes, unchanged (a trailing newline is kept).
fn read_value(path: &Path) -> Result<Zeroizing<Vec<u8>>, CtlError> {
    let io = |source| CtlError::Io {
        what: format!("cannot read --from-file {}", path.display()),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut buf = Zeroizing::new(Vec::new());
    file.take(MAX_VALUE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() as u64 > MAX_VALUE_BYTES {
        return Err(CtlError::Input(format!(
            "--from-file {} is larger than {MAX_VALUE_BYTES} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

/// Reads a JSON object of string values (from a file, or stdin for `-`). Errors name keys
/// and positions, never values.
fn from_json(path: &Path, stdin: &mut dyn std::io::Read) -> Result<SecretValues, CtlError> {
    let name = if path == Path::new("-") {
        "stdin".to_owned()
    } else {
        path.display().to_string()
    };
    let mut text = Zeroizing::new(String::new());
    if path == Path::new("-") {
        stdin
            .read_to_string(&mut text)
            .map_err(|source| CtlError::Io {
                what: "cannot read --from-json from stdin".into(),
                source,
            })?;
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|source| CtlError::Io {
                what: format!("cannot read --from-json {name}"),
                source,
            })?;
    }
    // Only line and column of serde_json's error: its message may quote the text.
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
        CtlError::Input(format!(
            "--from-json {name}: expected a JSON object of string values (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let mut out = SecretValues::default();
    for (key, value) in map {
        check_data_key(&key).map_err(|e| Usage(format!("--from-json {name}: {e}")))?;
        match value {
            serde_json::Value::String(s) => {
                let s = Zeroizing::new(s);
                out.insert(&key, Zeroizing::new(s.as_bytes().to_vec()))?;
            }
            _ => {
                return Err(Usage(format!(
                    "--from-json {name}: the value of `{key}` must be a string"
                ))
                .into())
            }
        }
    }
    if out.0.is_empty() {
        return Err(Usage(format!("--from-json {name}: the object is empty")).into());
    }
    Ok(out)
}

/// Reads the policy document (a file, or stdin for `-`) and validates it as the broker will;
/// returns the text to send and how many policies it holds.
pub fn policy_document(
    path: &Path,
    max_ttl_cap: Duration,
    stdin: &mut dyn std::io::Read,
) -> Result<(String, usize), CtlError> {
    let (name, yaml) = if path == Path::new("-") {
        let mut s = String::new();
        stdin
            .read_to_string(&mut s)
            .map_err(|source| CtlError::Io {
                what: "cannot read the policy document from stdin".into(),
                source,
            })?;
        ("stdin".to_owned(), s)
    } else {
        let s = std::fs::read_to_string(path).map_err(|source| CtlError::Io {
            what: format!("cannot read policy file {}", path.display()),
            source,
        })?;
        (path.display().to_string(), s)
    };
    let set = PolicySet::from_yaml(&yaml, max_ttl_cap).map_err(|e| CtlError::Policy {
        name,
        source: Box::new(e),
    })?;
    Ok((yaml, set.policies().len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sel(f: impl FnOnce(&mut SelectorArgs)) -> Result<Option<LeaseSelector>, Usage> {
        let mut s = SelectorArgs::default();
        f(&mut s);
        lease_selector(&s)
    }

    #[test]
    fn selectors_map_to_exactly_one_wire_selector() {
        assert_eq!(sel(|_| {}).unwrap(), None);
        assert_eq!(
            sel(|s| s.id = Some("ns/sa/abc".into())).unwrap().unwrap(),
            LeaseSelector {
                lease_id: "ns/sa/abc".into(),
                ..Default::default()
            }
        );
        assert_eq!(
            sel(|s| {
                s.namespace = Some("team".into());
                s.serviceaccount = Some("app".into());
            })
            .unwrap()
            .unwrap(),
            LeaseSelector {
                namespace: "team".into(),
                service_account: "app".into(),
                ..Default::default()
            }
        );
        assert_eq!(
            sel(|s| {
                s.namespace = Some("team".into());
                s.pod = Some("app-7d9f".into());
            })
            .unwrap()
            .unwrap(),
            LeaseSelector {
                namespace: "team".into(),
                pod: "app-7d9f".into(),
                ..Default::default()
            }
        );
        assert_eq!(
            sel(|s| s.prefix = Some("team/app/".into()))
                .unwrap()
                .unwrap(),
            LeaseSelector {
                path_prefix: "team/app".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn bad_selectors_are_usage_errors() {
        let ns = sel(|s| s.namespace = Some("team".into())).unwrap().unwrap();
        assert_eq!(ns.namespace, "team");
        assert!(ns.service_account.is_empty() && ns.pod.is_empty());
        let e = sel(|s| s.namespace = Some(String::new())).unwrap_err();
        assert!(e.0.contains("--namespace"), "{e}");
        assert!(sel(|s| s.id = Some(String::new())).is_err());
        assert!(sel(|s| s.prefix = Some("/abs".into())).is_err());
        assert!(sel(|s| {
            s.id = Some("x".into());
            s.prefix = Some("a".into());
        })
        .is_err());
        assert!(sel(|s| {
            s.namespace = Some("n".into());
            s.serviceaccount = Some("s".into());
            s.pod = Some("p".into());
        })
        .is_err());
    }

    fn put(files: Vec<KeyFile>, literals: &[&str], json: Option<PathBuf>) -> PutArgs {
        PutArgs {
            path: "team/app/db".into(),
            from_file: files,
            from_literal: literals
                .iter()
                .map(|l| super::super::cli::parse_key_literal(l).unwrap())
                .collect(),
            from_json: json,
        }
    }

    #[test]
    fn from_file_and_from_literal_build_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, b"s3cr3t\n\xff").unwrap();
        let args = put(
            vec![KeyFile {
                key: "password".into(),
                path: pw.clone(),
            }],
            &["user=demo", "note="],
            None,
        );
        let v = secret_values(&args, &mut std::io::empty()).unwrap();
        assert_eq!(v.0["password"].as_slice(), b"s3cr3t\n\xff");
        assert_eq!(v.0["user"].as_slice(), b"demo");
        assert_eq!(v.0["note"].as_slice(), b"");
        assert!(!format!("{v:?}").contains("s3cr3t"));
        assert_eq!(v.to_wire()["password"], b"s3cr3t\n\xff".to_vec());

        let dup = put(
            vec![KeyFile {
                key: "user".into(),
                path: pw.clone(),
            }],
            &["user=demo"],
            None,
        );
        let e = secret_values(&dup, &mut std::io::empty()).unwrap_err();
        assert!(
            matches!(&e, CtlError::Usage(u) if u.0.contains("`user`")),
            "{e:?}"
        );

        let missing = put(
            vec![KeyFile {
                key: "k".into(),
                path: dir.path().join("nope"),
            }],
            &[],
            None,
        );
        let e = secret_values(&missing, &mut std::io::empty()).unwrap_err();
        assert!(matches!(e, CtlError::Io { .. }), "{e:?}");
        let e = e.describe();
        assert!(e.contains("nope") && e.contains("No such file"), "{e}");

        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_VALUE_BYTES as usize + 1]).unwrap();
        let e = secret_values(
            &put(
                vec![KeyFile {
                    key: "k".into(),
                    path: big,
                }],
                &[],
                None,
            ),
            &mut std::io::empty(),
        )
        .unwrap_err();
        assert!(matches!(e, CtlError::Input(_)), "{e:?}");
        assert!(e.to_string().contains("larger"), "{e}");
    }

    #[test]
    fn from_json_takes_string_values_and_errors_hide_values() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.json");
        std::fs::write(&f, r#"{"username": "app", "password": "s3cr3t"}"#).unwrap();
        let v = secret_values(&put(vec![], &[], Some(f.clone())), &mut std::io::empty()).unwrap();
        assert_eq!(v.0["password"].as_slice(), b"s3cr3t");
        assert_eq!(v.0.len(), 2);

        let mut stdin = &br#"{"k": "from-stdin"}"#[..];
        let v = secret_values(&put(vec![], &[], Some("-".into())), &mut stdin).unwrap();
        assert_eq!(v.0["k"].as_slice(), b"from-stdin");

        for (doc, want) in [
            (r#"{"password": 12345}"#, "must be a string"),
            (r#"{"bad/key": "s3cr3t"}"#, "bad/key"),
            (r#"["s3cr3t"]"#, "JSON object"),
            (r#"{"password": "s3cr3t""#, "JSON object"),
            ("{}", "empty"),
        ] {
            std::fs::write(&f, doc).unwrap();
            let e = secret_values(&put(vec![], &[], Some(f.clone())), &mut std::io::empty())
                .unwrap_err()
                .describe();
            assert!(e.contains(want), "{doc}: {e}");
            assert!(!e.contains("s3cr3t") && !e.contains("12345"), "{doc}: {e}");
        }
    }

    #[test]
    fn policy_documents_are_validated_locally() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        let good = "policies:\n  - name: app\n    subjects: [{namespace: team, serviceaccount: app}]\n    paths: [\"team/app/*\"]\n    capabilities: [read]\n    ttl: 5m\n    max_ttl: 1h\n";
        std::fs::write(&f, good).unwrap();
        let cap = keyhaven_broker_core::policy::DEFAULT_MAX_TTL_CAP;
        let (yaml, n) = policy_document(&f, cap, &mut std::io::empty()).unwrap();
        assert_eq!((yaml.as_str(), n), (good, 1));
        let (_, n) = policy_document(Path::new("-"), cap, &mut good.as_bytes()).unwrap();
        assert_eq!(n, 1);

        std::fs::write(&f, good.replace("max_ttl: 1h", "max_ttl: 48h")).unwrap();
        let e = policy_document(&f, cap, &mut std::io::empty()).unwrap_err();
        assert!(matches!(e, CtlError::Policy { .. }), "{e:?}");
        let e = e.describe();
        assert!(e.contains("p.yaml") && e.contains("app"), "{e}");
        policy_document(&f, Duration::from_secs(72 * 3600), &mut std::io::empty()).unwrap();

        std::fs::write(&f, good.replace("capabilities", "capabilitys")).unwrap();
        let e = policy_document(&f, cap, &mut std::io::empty())
            .unwrap_err()
            .describe();
        assert!(e.contains("capabilitys"), "{e}");
    }

    #[test]
    fn secret_paths_are_checked_locally() {
        assert!(secret_path("team/app/db").is_ok());
        for bad in ["", "/team", "team/", "team//db"] {
            assert!(secret_path(bad).is_err(), "{bad:?}");
        }
    }
}
