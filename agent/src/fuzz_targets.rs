//! Bodies of the fuzz targets over the agent's inputs: its secrets file and the lease data it
//! renders (`fuzz/` runs them under libFuzzer; `hsm-tests/tests/fuzz_corpus.rs` replays the
//! committed corpora through them on stable). Arbitrary bytes in, never a panic; a broken
//! invariant panics so the fuzzer reports it.

use std::collections::HashMap;
use std::path::{Component, PathBuf};

use prost::Message as _;

use crate::config::{self, Format, SecretSpec, DEFAULT_MODE};
use crate::files;
use crate::template::Template;

/// A secrets YAML file: parsed and validated; an accepted list writes only relative files
/// without `..`, each once, with a mode the owner can read.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(specs) = config::parse_file(text, "fuzz.yaml") else {
        return;
    };
    if config::validate(&specs).is_err() {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for s in &specs {
        assert!(s
            .file
            .components()
            .all(|c| matches!(c, Component::Normal(_))));
        assert!(seen.insert(s.file.clone()), "file written twice");
        assert!(s.mode & 0o400 != 0 && s.mode <= 0o777);
    }
}

/// Template of the `agent_render` target: every key and value, each value once.
const TEMPLATE: &str = "{{ path }}\n{% for k in data %}{{ k }}={{ data[k] }}\n{% endfor %}";

/// A wire-format `LeaseResponse` rendered in each output format: raw is the key's bytes;
/// JSON and dotenv are UTF-8 with one line per key for dotenv (values escaped, so no value
/// can add a line or a variable); a template renders (values taken as data, never
/// evaluated) or fails without a panic.
pub fn agent_render(data: &[u8]) {
    let Ok(resp) = keyhaven_proto::broker::v1::LeaseResponse::decode(data) else {
        return;
    };
    let map: HashMap<String, Vec<u8>> = resp.data.into_iter().collect();
    let first = map.keys().min().cloned();
    let Ok(template) = Template::compile(TEMPLATE) else {
        panic!("the fuzz template does not compile");
    };
    for (format, key) in [
        (Format::Raw, None),
        (Format::Raw, first.clone()),
        (Format::Json, None),
        (Format::Dotenv, None),
        (Format::Template, None),
    ] {
        let spec = SecretSpec {
            path: "fuzz/secret".into(),
            file: PathBuf::from("out"),
            format,
            key: key.clone(),
            mode: DEFAULT_MODE,
            ttl: None,
            template: (format == Format::Template).then(|| template.clone()),
        };
        let Ok(out) = files::render(&spec, &map) else {
            continue;
        };
        match format {
            Format::Raw => {
                let k = key.or_else(|| map.keys().next().cloned());
                assert_eq!(
                    Some(&out[..]),
                    k.and_then(|k| map.get(&k)).map(Vec::as_slice)
                );
            }
            Format::Json => {
                let text = std::str::from_utf8(&out);
                assert!(text.is_ok_and(|t| t.starts_with('{') && t.ends_with("}\n")));
            }
            Format::Template => {
                let text = std::str::from_utf8(&out).unwrap_or_else(|_| panic!("not UTF-8"));
                assert!(text.starts_with("fuzz/secret\n"), "{text:?}");
                assert!(text.matches('\n').count() > map.len(), "{text:?}");
            }
            Format::Dotenv => {
                let text = std::str::from_utf8(&out).unwrap_or_else(|_| panic!("not UTF-8"));
                assert_eq!(text.lines().count(), map.len(), "one line per key");
                for line in text.lines() {
                    let (name, value) = line.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                    assert!(
                        name.bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                        "{name:?}"
                    );
                    assert!(
                        value.starts_with('"') && value.ends_with('"') && value.len() >= 2,
                        "{line:?}"
                    );
                }
            }
        }
    }
}
