//! File templates (format `template`): a leased secret rendered through a
//! [minijinja](https://docs.rs/minijinja) template into the file's content.
//!
//! The template runs in a sandbox: no loader and no `include`/`import`/`extends` (the crate
//! is built without them), no access to the environment or the file system (minijinja has
//! none and we add none; its `debug()` global is removed), undefined variables are errors,
//! no auto-escaping (files are not HTML), a fuel budget that bounds the steps and the data a
//! render may make, a recursion limit, and a cap on the output size.
//!
//! A template is compiled once, when the configuration is loaded ([`Template::compile`];
//! [`check`] for callers that only want to refuse a bad one), so a syntax error is a
//! configuration error with its line. Values are inserted as data: a value that contains
//! `{{ … }}` is written as it is, never evaluated.
//!
//! Errors never contain a value: a render error is described by its kind and line (and the
//! template's variables the secret lacks), never by minijinja's detail, which may quote a
//! value (`{{ password | int }}`). Only syntax errors, found before any value exists, carry
//! the detail, which quotes the template alone.
//!
//! Not here: writing the file (`files`), reading a `template_file` (`config`).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use zeroize::{Zeroize as _, Zeroizing};

use crate::files::RenderError;

/// Largest template accepted, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 256 * 1024;
/// Largest rendered file, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Fuel of one render: about one per instruction and one per 64 bytes of data made or
/// processed. A 1 MiB output costs about 16 000; ordinary templates a few hundred.
pub const FUEL: u64 = 200_000;
/// Nesting depth a render may reach.
const RECURSION_LIMIT: usize = 64;
/// The name the template has inside its environment (error messages do not show it).
const NAME: &str = "template";
/// Context variables the agent sets besides the secret's keys.
const RESERVED: [&str; 2] = ["data", "path"];

/// Why a template cannot be compiled or rendered. Never contains a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse (found when the configuration is loaded).
    #[error("template syntax error at line {line}: {detail}")]
    Syntax {
        /// Line of the template (1-based).
        line: usize,
        /// What is wrong, as minijinja says it (it quotes only the template).
        detail: String,
    },
    /// The template is larger than [`MAX_TEMPLATE_BYTES`].
    #[error("the template is {0} bytes (at most {MAX_TEMPLATE_BYTES})")]
    TooBig(usize),
    /// An undefined value, and the template uses variables that are not keys of the secret.
    #[error("template error{}: undefined value: the template uses {}, which the secret does not have (it has keys: {keys})", at(*.line), names.join(", "))]
    MissingKey {
        /// Line of the template where rendering stopped.
        line: Option<usize>,
        /// The template's variables that the secret lacks.
        names: Vec<String>,
        /// The keys the secret has.
        keys: String,
    },
    /// Rendering failed; only the kind of failure is told, as the detail may quote a value.
    #[error("template error{}: {kind} ({}the secret has keys: {keys})", at(*.line), uses(.missing))]
    Render {
        /// Line of the template where rendering stopped.
        line: Option<usize>,
        /// minijinja's kind of error, e.g. `invalid operation`.
        kind: String,
        /// The template's variables that the secret lacks (maybe not the cause).
        missing: Vec<String>,
        /// The keys the secret has.
        keys: String,
    },
    /// The output would be larger than [`MAX_OUTPUT_BYTES`].
    #[error("template error: the output is larger than {MAX_OUTPUT_BYTES} bytes")]
    OutputTooLarge,
    /// The render used up its fuel (a loop too long for a file template).
    #[error("template error{}: the template takes too many steps (fuel {FUEL} used up)", at(*.line))]
    OutOfFuel {
        /// Line of the template where rendering stopped.
        line: Option<usize>,
    },
}

fn at(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

fn uses(missing: &[String]) -> String {
    if missing.is_empty() {
        String::new()
    } else {
        format!(
            "the template uses {}, which the secret does not have; ",
            missing.join(", ")
        )
    }
}

/// Checks that `text` is a template the agent accepts (size, syntax), without rendering it.
/// The admission webhook calls this to refuse a bad template before the pod starts.
pub fn check(text: &str) -> Result<(), TemplateError> {
    Template::compile(text).map(|_| ())
}

/// A compiled template, cheap to clone.
#[derive(Clone)]
pub struct Template {
    inner: Arc<Inner>,
}

struct Inner {
    env: Environment<'static>,
    source: String,
    /// Top-level variables the template reads that the agent does not set itself: they
    /// should be keys of the secret.
    variables: BTreeSet<String>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("bytes", &self.inner.source.len())
            .field("variables", &self.inner.variables)
            .finish()
    }
}

impl PartialEq for Template {
    fn eq(&self, other: &Template) -> bool {
        self.inner.source == other.inner.source
    }
}

impl Eq for Template {}

/// The environment every template runs in (see the module documentation).
fn sandbox() -> Environment<'static> {
    let mut env = Environment::new();
    // It prints the whole context; a file template has no use for it.
    env.remove_global("debug");
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    // A file ends as its template does: keep the last newline (Jinja drops it by default).
    if let Ok(syntax) = env
        .syntax()
        .to_builder()
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env
}

impl Template {
    /// Parses and compiles `source`.
    pub fn compile(source: &str) -> Result<Template, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::TooBig(source.len()));
        }
        let mut env = sandbox();
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| TemplateError::Syntax {
                line: e.line().unwrap_or(0),
                // No value exists yet: the detail can only quote the template.
                detail: match e.detail() {
                    Some(d) => format!("{}: {d}", e.kind()),
                    None => e.kind().to_string(),
                },
            })?;
        let globals: BTreeSet<&str> = env.globals().map(|(k, _)| k).collect();
        let variables = env
            .get_template(NAME)
            .map(|t| t.undeclared_variables(false))
            .unwrap_or_default()
            .into_iter()
            .filter(|v| !RESERVED.contains(&v.as_str()) && !globals.contains(v.as_str()))
            .collect();
        Ok(Template {
            inner: Arc::new(Inner {
                env,
                source: source.to_owned(),
                variables,
            }),
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Renders the secret at broker path `path` with `data`. Each key is a top-level
    /// variable (`{{ password }}`), `data` maps every key (`{{ data["db-url"] }}`), `path`
    /// is the broker path; a key named `data` or `path` is only in `data`.
    pub fn render(
        &self,
        path: &str,
        data: &HashMap<String, Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, RenderError> {
        let mut keys: Vec<&String> = data.keys().collect();
        keys.sort_unstable();
        // Each value is copied once, into an `Arc<str>` the context shares; it is wiped after
        // the render. Strings a filter makes from a value are freed unwiped.
        let mut values = Wiped(Vec::with_capacity(keys.len()));
        for k in &keys {
            let v =
                std::str::from_utf8(&data[*k]).map_err(|_| RenderError::NotUtf8((*k).clone()))?;
            values.0.push((k.as_str(), Arc::from(v)));
        }
        self.render_values(path, &values.0).map_err(|e| {
            RenderError::Template(self.describe(&e.0, e.1, data.keys().map(String::as_str)))
        })
    }

    fn render_values(
        &self,
        path: &str,
        values: &[(&str, Arc<str>)],
    ) -> Result<Zeroizing<Vec<u8>>, (minijinja::Error, bool)> {
        let all = Value::from_pairs(values.iter().map(|(k, v)| (*k, Value::from(v.clone()))));
        let ctx = Value::from_pairs(
            values
                .iter()
                .filter(|(k, _)| !RESERVED.contains(k))
                .map(|(k, v)| (*k, Value::from(v.clone())))
                .chain([("data", all), ("path", Value::from(path))]),
        );
        let mut sink = Sink::new(self.inner.source.len() + 256);
        let t = self.inner.env.get_template(NAME).map_err(|e| (e, false))?;
        match t.render_captured_to(ctx, &mut sink) {
            Ok(captured) => {
                drop(captured);
                Ok(sink.buf)
            }
            Err(e) => Err((e, sink.over)),
        }
    }

    /// A value-free description of a render error.
    fn describe<'a>(
        &self,
        e: &minijinja::Error,
        over: bool,
        keys: impl Iterator<Item = &'a str>,
    ) -> TemplateError {
        let mut keys: Vec<&str> = keys.collect();
        keys.sort_unstable();
        let line = e.line().filter(|l| *l > 0);
        if over {
            return TemplateError::OutputTooLarge;
        }
        if e.kind() == ErrorKind::OutOfFuel {
            return TemplateError::OutOfFuel { line };
        }
        let missing: Vec<String> = self
            .inner
            .variables
            .iter()
            .filter(|v| keys.binary_search(&v.as_str()).is_err())
            .cloned()
            .collect();
        let keys = keys.join(", ");
        if !missing.is_empty() && e.kind() == ErrorKind::UndefinedError {
            return TemplateError::MissingKey {
                line,
                names: missing,
                keys,
            };
        }
        TemplateError::Render {
            line,
            kind: e.kind().to_string(),
            missing,
            keys,
        }
    }
}

/// The context's copies of the values, wiped when dropped (the render has dropped its
/// context by then, so each `Arc` is the only reference left).
struct Wiped<'a>(Vec<(&'a str, Arc<str>)>);

impl Drop for Wiped<'_> {
    fn drop(&mut self) {
        for (_, v) in &mut self.0 {
            match Arc::get_mut(v) {
                Some(s) => s.zeroize(),
                #[cfg(test)]
                None => tests::NOT_WIPED.with(|n| n.set(n.get() + 1)),
                #[cfg(not(test))]
                None => {}
            }
        }
    }
}

/// The render's output: grows into wiped buffers (a plain `Vec` would leave copies behind
/// when it reallocates) and refuses to pass [`MAX_OUTPUT_BYTES`].
struct Sink {
    buf: Zeroizing<Vec<u8>>,
    over: bool,
}

impl Sink {
    fn new(capacity: usize) -> Sink {
        Sink {
            buf: Zeroizing::new(Vec::with_capacity(capacity.min(MAX_OUTPUT_BYTES))),
            over: false,
        }
    }
}

impl io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let need = self.buf.len() + b.len();
        if need > MAX_OUTPUT_BYTES {
            self.over = true;
            return Err(io::Error::other("template output limit"));
        }
        if need > self.buf.capacity() {
            let cap = need.max(self.buf.capacity() * 2).min(MAX_OUTPUT_BYTES);
            let mut bigger = Zeroizing::new(Vec::with_capacity(cap));
            bigger.extend_from_slice(&self.buf);
            // The old buffer is wiped as it drops.
            self.buf = bigger;
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PASSWORD: &str = "s3cr3t-Pa55";

    thread_local! {
        /// Values `Wiped` could not wipe (a reference was still held) on this thread.
        pub(super) static NOT_WIPED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn data(kv: &[(&str, &str)]) -> HashMap<String, Vec<u8>> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn render(t: &str, kv: &[(&str, &str)]) -> Result<String, RenderError> {
        let out = Template::compile(t).unwrap().render("shop/db", &data(kv))?;
        Ok(String::from_utf8(out.to_vec()).unwrap())
    }

    fn template_err(t: &str, kv: &[(&str, &str)]) -> TemplateError {
        match render(t, kv).unwrap_err() {
            RenderError::Template(e) => e,
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn renders_keys_data_and_path() {
        let kv = [
            ("username", "app"),
            ("password", PASSWORD),
            ("db-url", "pg://x"),
        ];
        assert_eq!(
            render("host=db user={{ username }} password={{ password }}\n", &kv).unwrap(),
            format!("host=db user=app password={PASSWORD}\n")
        );
        assert_eq!(
            render(
                "{{ data[\"db-url\"] }} {{ path }} {{ username | upper }}",
                &kv
            )
            .unwrap(),
            "pg://x shop/db APP"
        );
        // Loops, conditions and the `is defined` test work; nothing is HTML-escaped.
        assert_eq!(
            render(
                "{% for k in data %}{{ k }};{% endfor %}{% if tls is defined %}tls{% else %}<&>{% endif %}",
                &kv
            )
            .unwrap(),
            "db-url;password;username;<&>"
        );
        // Keys named like the reserved variables are in `data` only.
        assert_eq!(
            render("{{ path }} {{ data.path }}", &[("path", "p")]).unwrap(),
            "shop/db p"
        );
    }

    #[test]
    fn the_values_copies_are_wiped_after_a_render_or_an_error() {
        let kv = [("username", "app"), ("password", PASSWORD)];
        for t in [
            "{{ username }} {{ password | upper }} {% set p = password %}{{ p }}",
            "{% for k in data %}{{ data[k] }}{% endfor %}{{ path }}",
            "{{ password | int }}",
            "{{ nope }}",
        ] {
            NOT_WIPED.with(|n| n.set(0));
            let _ = render(t, &kv);
            assert_eq!(NOT_WIPED.with(|n| n.get()), 0, "{t}");
        }
    }

    #[test]
    fn a_value_with_template_syntax_is_written_literally() {
        let tricky = "{{ username }}{% for i in range(9) %}x{% endfor %}{# c #}";
        let out = render(
            "[{{ password }}]",
            &[("password", tricky), ("username", "app")],
        );
        assert_eq!(out.unwrap(), format!("[{tricky}]"));
    }

    #[test]
    fn a_syntax_error_is_found_at_compile_time_with_its_line() {
        let e = Template::compile("line one\nuser={{ username }\n").unwrap_err();
        match &e {
            TemplateError::Syntax { line, detail } => {
                assert_eq!(*line, 2, "{e}");
                assert!(detail.starts_with("syntax error"), "{e}");
            }
            e => panic!("{e:?}"),
        }
        assert!(e.to_string().contains("at line 2"), "{e}");
        assert!(matches!(
            check("{% for x in y %}"),
            Err(TemplateError::Syntax { .. })
        ));
        assert!(matches!(
            check("{% endif %}"),
            Err(TemplateError::Syntax { line: 1, .. })
        ));
        check("user={{ username }}").unwrap();
        let big = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        assert_eq!(check(&big), Err(TemplateError::TooBig(big.len())));
    }

    #[test]
    fn a_missing_key_is_an_error_naming_the_variable() {
        let e = template_err(
            "line 1\nuser={{ username }} password={{ pasword }}",
            &[("username", "app"), ("password", PASSWORD)],
        );
        assert_eq!(
            e,
            TemplateError::MissingKey {
                line: Some(2),
                names: vec!["pasword".into()],
                keys: "password, username".into(),
            }
        );
        assert_eq!(
            e.to_string(),
            "template error at line 2: undefined value: the template uses pasword, which the \
             secret does not have (it has keys: password, username)"
        );
        // Also through a filter or an operator, and a missing `data[...]` entry.
        let e = template_err("{{ pasword | upper }}", &[("password", PASSWORD)]);
        assert!(matches!(e, TemplateError::MissingKey { .. }), "{e:?}");
        let e = template_err("{{ pasword + 1 }}", &[("password", PASSWORD)]);
        assert_eq!(
            e.to_string(),
            "template error at line 1: invalid operation (the template uses pasword, which \
             the secret does not have; the secret has keys: password)"
        );
        let e = template_err("{{ data['nope'] }}", &[("password", PASSWORD)]);
        assert!(
            matches!(&e, TemplateError::Render { kind, .. } if kind == "undefined value"),
            "{e:?}"
        );
    }

    #[test]
    fn errors_never_quote_a_value() {
        let kv = [("password", PASSWORD), ("port", "not-a-number")];
        for t in [
            "{{ password | int }}",
            "{{ password + 1 }}",
            "{{ password.nope() }}",
            "{{ password[99] }}",
            "{{ password | round }}",
            "{{ port * password }}",
            "{{ data[password] }}",
            "{% for x in password %}{{ x.y }}{% endfor %}",
            "{{ password | join(1, 2) }}",
            "{{ password | indent(password) }}",
            "{{ password | nosuchfilter }}",
            // A filter or test named by a value: minijinja's detail would quote it.
            "{{ [1] | map(password) | list }}",
            "{{ [1] | select(password) | list }}",
        ] {
            let e = match render(t, &kv) {
                Err(RenderError::Template(e)) => e,
                other => panic!("{t}: {other:?}"),
            };
            let text = format!("{e} {e:?}");
            for secret in [PASSWORD, "s3cr3t", "not-a-number"] {
                assert!(!text.contains(secret), "{t}: {text}");
            }
        }
        let e = template_err("{{ password | int }}", &kv);
        assert!(
            matches!(&e, TemplateError::Render { line: Some(1), kind, .. } if kind == "invalid operation"),
            "{e:?}"
        );
    }

    #[test]
    fn no_environment_file_or_include_access() {
        let kv = [("password", PASSWORD)];
        for t in [
            "{{ env }}",
            "{{ env.HOME }}",
            "{{ environ['HOME'] }}",
            "{{ getenv('HOME') }}",
            "{{ lookup('env', 'HOME') }}",
            "{{ open('/etc/passwd') }}",
            "{{ read_file('/etc/passwd') }}",
            "{{ debug() }}",
            "{{ self }}",
        ] {
            let e = render(t, &kv);
            assert!(matches!(e, Err(RenderError::Template(_))), "{t}: {e:?}");
        }
        for t in [
            "{% include '/etc/passwd' %}",
            "{% import '/etc/passwd' as x %}",
            "{% extends '/etc/passwd' %}",
            "{% from '/etc/passwd' import x %}",
            "{% macro m() %}{% endmacro %}",
        ] {
            assert!(
                matches!(check(t), Err(TemplateError::Syntax { .. })),
                "{t} accepted"
            );
        }
    }

    #[test]
    fn loops_and_output_are_bounded() {
        let kv = [("password", PASSWORD)];
        let started = std::time::Instant::now();
        let e = template_err(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            &kv,
        );
        assert!(matches!(e, TemplateError::OutOfFuel { .. }), "{e:?}");
        let e = template_err("{{ password * 1000000 }}", &kv);
        assert!(
            matches!(
                e,
                TemplateError::OutOfFuel { .. } | TemplateError::OutputTooLarge
            ),
            "{e:?}"
        );
        // Within the fuel, but past the output cap.
        let e = template_err("{% for i in range(20) %}{{ 'x' * 60000 }}{% endfor %}", &kv);
        assert_eq!(e, TemplateError::OutputTooLarge);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // Just under the cap is fine.
        let out = render("{% for i in range(16) %}{{ 'x' * 65536 }}{% endfor %}", &kv);
        assert_eq!(out.unwrap().len(), MAX_OUTPUT_BYTES);
    }

    #[test]
    fn binary_values_are_refused_and_debug_shows_no_text() {
        let t = Template::compile("{{ k }}").unwrap();
        let bin: HashMap<String, Vec<u8>> = [("k".to_string(), vec![0xff])].into();
        assert_eq!(
            t.render("a", &bin).unwrap_err(),
            RenderError::NotUtf8("k".into())
        );
        let dbg = format!(
            "{:?}",
            Template::compile("password={{ password }}").unwrap()
        );
        assert_eq!(dbg, "Template { bytes: 23, variables: {\"password\"} }");
        assert_eq!(
            Template::compile("a").unwrap(),
            Template::compile("a").unwrap()
        );
    }
}
