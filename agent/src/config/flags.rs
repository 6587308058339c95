//! The secrets given by flags: `--secret PATH=FILE`, and what `--format`, `--key`,
//! `--template`, `--template-file FILE=…`, `--ttl` and `--file-mode` say of them.

use std::path::Path;

use super::{err, parse_secret_flag, read_template_file, Cli, ConfigError, Format, SecretSpec};
use crate::template::Template;

/// The `--secret` secrets with what `--format`, `--key`, `--template`, `--template-file`,
/// `--ttl` and `--file-mode` say of them. A `FILE=` that no `--secret` writes is an error.
pub fn flag_specs(cli: &Cli) -> Result<Vec<SecretSpec>, ConfigError> {
    let mut specs = cli
        .secrets
        .iter()
        .map(|s| parse_secret_flag(s))
        .collect::<Result<Vec<_>, _>>()?;
    for s in &mut specs {
        s.mode = cli.file_mode;
        s.ttl = cli.ttl;
    }
    let formats = per_file("--format", &cli.formats, &specs)?;
    let keys = per_file("--key", &cli.keys, &specs)?;
    let inline = per_file("--template", &cli.templates, &specs)?;
    let from_files = per_file("--template-file", &cli.template_files, &specs)?;
    for (i, s) in specs.iter_mut().enumerate() {
        let file = s.file.display().to_string();
        let format = formats[i]
            .map(|f| {
                f.parse::<Format>()
                    .map_err(|m| err(format!("--format {file}=…: {m}")))
            })
            .transpose()?;
        s.key = keys[i].map(str::to_owned);
        let (flag, text) = match (inline[i], from_files[i]) {
            (Some(_), Some(_)) => {
                return Err(err(format!(
                    "{file}: give --template or --template-file, not both"
                )))
            }
            (Some(t), None) => ("--template", Some(t.to_owned())),
            (None, Some(p)) => (
                "--template-file",
                Some(
                    read_template_file(Path::new(p))
                        .map_err(|m| err(format!("--template-file {file}=…: {m}")))?,
                ),
            ),
            (None, None) => ("", None),
        };
        match (text, format) {
            (Some(t), None | Some(Format::Template)) => {
                s.format = Format::Template;
                s.template = Some(
                    Template::compile(&t).map_err(|e| err(format!("{flag} {file}=…: {e}")))?,
                );
            }
            (Some(_), Some(f)) => {
                return Err(err(format!(
                    "{flag} {file}=… makes format template, but --format {file}={f} says otherwise",
                )))
            }
            (None, Some(Format::Template)) => {
                return Err(err(format!(
                    "--format {file}=template needs --template {file}=TEXT or --template-file {file}=PATH"
                )))
            }
            (None, Some(f)) => s.format = f,
            (None, None) => {}
        }
    }
    Ok(specs)
}

/// Splits each `FILE=VALUE` of `flag` and places it by the `--secret` that writes FILE.
fn per_file<'a>(
    flag: &str,
    values: &'a [String],
    specs: &[SecretSpec],
) -> Result<Vec<Option<&'a str>>, ConfigError> {
    let mut out = vec![None; specs.len()];
    for v in values {
        let (file, value) = v
            .split_once('=')
            .ok_or_else(|| err(format!("{flag}: expected FILE=…")))?;
        let i = specs
            .iter()
            .position(|s| s.file == Path::new(file))
            .ok_or_else(|| {
                err(format!(
                    "{flag} {file}=…: no --secret writes {file:?} (it applies to --secret PATH=FILE; \
                     in the config file, set it on the entry)"
                ))
            })?;
        if out[i].replace(value).is_some() {
            return Err(err(format!("{flag} {file}=… is given twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;
    use std::time::Duration;

    use clap::Parser as _;

    use super::*;
    use crate::config::{load, validate, DEFAULT_MODE};
    use crate::files::{render, RenderError};

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["broker-agent", "--broker-addr", "https://localhost:1"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap()
    }

    fn specs(args: &[&str]) -> Result<Vec<SecretSpec>, String> {
        let specs = flag_specs(&cli(args)).map_err(|e| e.0)?;
        validate(&specs).map_err(|e| e.0)?;
        Ok(specs)
    }

    #[test]
    fn template_format_key_ttl_and_mode_apply_to_their_files() {
        let s = specs(&[
            "--secret",
            "shop/db=db.conf",
            "--template",
            "db.conf=host=db user={{ username }} password={{ password }}",
            "--secret",
            "shop/api=api.txt",
            "--format",
            "api.txt=json",
            "--secret",
            "shop/db=password",
            "--key",
            "password=password",
            "--ttl",
            "5m",
            "--file-mode",
            "0440",
        ])
        .unwrap();
        assert_eq!(s[0].format, Format::Template);
        assert_eq!(s[1].format, Format::Json);
        assert_eq!(
            (s[2].format, s[2].key.as_deref()),
            (Format::Raw, Some("password"))
        );
        for x in &s {
            assert_eq!(x.mode, 0o440);
            assert_eq!(x.ttl, Some(Duration::from_secs(300)));
        }
        assert!(s[1].template.is_none());
        let data: HashMap<String, Vec<u8>> = [
            ("username".to_string(), b"app".to_vec()),
            ("password".to_string(), b"{{ username }}".to_vec()),
        ]
        .into();
        assert_eq!(
            &*render(&s[0], &data).unwrap(),
            b"host=db user=app password={{ username }}"
        );
        // Defaults: mode 0400, the policy's TTL, the guessed format.
        let d = specs(&["--secret", "shop/db=db.json"]).unwrap();
        assert_eq!(
            (d[0].mode, d[0].ttl, d[0].format),
            (DEFAULT_MODE, None, Format::Json)
        );
        // An explicit `--format FILE=template` with the template is fine.
        let t = specs(&[
            "--secret",
            "shop/db=db.conf",
            "--format",
            "db.conf=template",
            "--template",
            "db.conf={{ username }}",
        ])
        .unwrap();
        assert_eq!(t[0].format, Format::Template);
    }

    #[test]
    fn a_template_file_is_read_once_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db.tmpl");
        std::fs::write(&p, "user={{ username }}\n").unwrap();
        let arg = format!("db.conf={}", p.display());
        let s = specs(&["--secret", "shop/db=db.conf", "--template-file", &arg]).unwrap();
        std::fs::remove_file(&p).unwrap();
        let data: HashMap<String, Vec<u8>> = [("username".to_string(), b"app".to_vec())].into();
        assert_eq!(&*render(&s[0], &data).unwrap(), b"user=app\n");
        let missing = specs(&["--secret", "shop/db=db.conf", "--template-file", &arg]);
        assert!(missing.unwrap_err().contains("cannot read the template"));
        let not_regular = specs(&[
            "--secret",
            "shop/db=db.conf",
            "--template-file",
            &format!("db.conf={}", dir.path().display()),
        ]);
        assert!(not_regular.unwrap_err().contains("not a regular file"));
    }

    #[test]
    fn flag_errors_name_the_flag_and_file() {
        let one = ["--secret", "shop/db=db.conf"];
        let cases: &[(&[&str], &str)] = &[
            (
                &["--format", "other.conf=json"],
                "no --secret writes \"other.conf\"",
            ),
            (&["--key", "other.conf=k"], "--key other.conf"),
            (
                &["--template", "other.conf={{ x }}"],
                "--template other.conf",
            ),
            (
                &["--template-file", "other.conf=/x"],
                "--template-file other.conf",
            ),
            (&["--format", "db.conf=xml"], "unknown format \"xml\""),
            (&["--format", "db.conf"], "expected FILE="),
            (
                &["--format", "db.conf=json", "--format", "db.conf=raw"],
                "given twice",
            ),
            (
                &["--template", "db.conf={{ a }}", "--format", "db.conf=json"],
                "--format db.conf=json says otherwise",
            ),
            (
                &["--format", "db.conf=template"],
                "needs --template db.conf=TEXT",
            ),
            (
                &["--template", "db.conf=a", "--template-file", "db.conf=/x"],
                "not both",
            ),
            (
                &["--template", "db.conf=line 1\n{% if x %}"],
                "--template db.conf=…: template syntax error at line 2",
            ),
            (
                &["--key", "db.conf=k", "--format", "db.conf=json"],
                "only applies to format raw",
            ),
        ];
        for (extra, want) in cases {
            let mut args = one.to_vec();
            args.extend_from_slice(extra);
            let e = specs(&args).unwrap_err();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        // A FILE written by the config file, not by a flag, is not one of the flags'.
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.yaml");
        std::fs::write(&cfg, "secrets:\n- {path: shop/db, file: db.conf}\n").unwrap();
        let c = cli(&[
            "--config",
            cfg.to_str().unwrap(),
            "--format",
            "db.conf=json",
        ]);
        assert!(load(&c).unwrap_err().0.contains("no --secret writes"));
        // The mode is checked as the YAML `mode` is.
        let bad = Cli::try_parse_from([
            "broker-agent",
            "--broker-addr",
            "https://localhost:1",
            "--file-mode",
            "0200",
        ]);
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("owner must be able to read"));
        // A value that fails the template is a render error that names no value.
        let s = specs(&[
            "--secret",
            "shop/db=db.conf",
            "--template",
            "db.conf={{ pw | int }}",
        ])
        .unwrap();
        let data: HashMap<String, Vec<u8>> = [("pw".to_string(), b"hunter2".to_vec())].into();
        let e = render(&s[0], &data).unwrap_err();
        assert!(matches!(e, RenderError::Template(_)), "{e:?}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
