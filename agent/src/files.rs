//! Rendering a leased secret into file content (raw, JSON, dotenv, or a template through
//! `template`), and writing it
//! atomically: a temporary file in the same directory, created with the final mode, synced,
//! then renamed over the old one. Readers see the old file or the new one, never a part.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::config::{Format, SecretSpec};
use crate::template::TemplateError;

/// Why a secret could not be rendered. Never contains a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// `raw` needs one key, and the secret has several (or none).
    #[error("format raw needs `key:` (the secret has keys: {0})")]
    AmbiguousKey(String),
    /// The configured key is not in the secret.
    #[error("the secret has no key {0:?} (it has: {1})")]
    MissingKey(String, String),
    /// JSON, dotenv and templates need UTF-8 values.
    #[error("the value of key {0:?} is not UTF-8; use format raw for binary values")]
    NotUtf8(String),
    /// Two keys map to the same dotenv name.
    #[error("keys {0:?} and {1:?} both become {2} in dotenv")]
    DotenvClash(String, String, String),
    /// The template failed (its error never quotes a value).
    #[error("{0}")]
    Template(#[from] TemplateError),
    /// Format template, and the spec holds no template (`config::validate` refuses this).
    #[error("format template needs a template")]
    NoTemplate,
}

fn key_list(data: &HashMap<String, Vec<u8>>) -> String {
    let mut k: Vec<&str> = data.keys().map(String::as_str).collect();
    k.sort_unstable();
    k.join(", ")
}

/// The file content for `spec` from the leased `data`.
pub fn render(
    spec: &SecretSpec,
    data: &HashMap<String, Vec<u8>>,
) -> Result<Zeroizing<Vec<u8>>, RenderError> {
    match spec.format {
        Format::Raw => {
            let key = match &spec.key {
                Some(k) => k.clone(),
                None if data.len() == 1 => data.keys().next().cloned().unwrap_or_default(),
                None => return Err(RenderError::AmbiguousKey(key_list(data))),
            };
            let v = data
                .get(&key)
                .ok_or_else(|| RenderError::MissingKey(key.clone(), key_list(data)))?;
            Ok(Zeroizing::new(v.clone()))
        }
        Format::Json => {
            let mut keys: Vec<&String> = data.keys().collect();
            keys.sort_unstable();
            let mut out = Zeroizing::new(Vec::with_capacity(64));
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                let v = std::str::from_utf8(&data[*k])
                    .map_err(|_| RenderError::NotUtf8((*k).clone()))?;
                if i > 0 {
                    out.push(b',');
                }
                json_string(&mut out, k);
                out.push(b':');
                json_string(&mut out, v);
            }
            out.extend_from_slice(b"}\n");
            Ok(out)
        }
        Format::Dotenv => {
            let mut keys: Vec<&String> = data.keys().collect();
            keys.sort_unstable();
            let mut seen: HashMap<String, &String> = HashMap::new();
            let mut out = Zeroizing::new(Vec::with_capacity(64));
            for k in keys {
                let name = dotenv_name(k);
                if let Some(prev) = seen.insert(name.clone(), k) {
                    return Err(RenderError::DotenvClash(prev.clone(), k.clone(), name));
                }
                let v =
                    std::str::from_utf8(&data[k]).map_err(|_| RenderError::NotUtf8(k.clone()))?;
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"=\"");
                for c in v.chars() {
                    match c {
                        '\\' => out.extend_from_slice(b"\\\\"),
                        '"' => out.extend_from_slice(b"\\\""),
                        '$' => out.extend_from_slice(b"\\$"),
                        '`' => out.extend_from_slice(b"\\`"),
                        '\n' => out.extend_from_slice(b"\\n"),
                        '\r' => out.extend_from_slice(b"\\r"),
                        c => {
                            let mut b = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                        }
                    }
                }
                out.extend_from_slice(b"\"\n");
            }
            Ok(out)
        }
        Format::Template => match &spec.template {
            Some(t) => t.render(&spec.path, data),
            None => Err(RenderError::NoTemplate),
        },
    }
}

/// `db-password.v2` → `DB_PASSWORD_V2`; a leading digit gets a `_` in front.
pub fn dotenv_name(key: &str) -> String {
    let mut n: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if n.starts_with(|c: char| c.is_ascii_digit()) || n.is_empty() {
        n.insert(0, '_');
    }
    n
}

/// Appends `s` as a JSON string literal (no intermediate `String`, so nothing unzeroized).
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// Writes `content` to `path` atomically with `mode`: a temporary file next to it (created
/// with `mode`, exclusive), fsync, rename, fsync of the directory. Parent directories are
/// created (0700) when missing.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    if !dir.as_os_str().is_empty() && !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".keyhaven-tmp-{}-{:016x}-{name}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content)?;
        // The umask may have narrowed the mode at creation; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `path`; a file already gone is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes temporary files a killed agent may have left in `dir` (never the real files).
pub fn clean_temporaries(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(".keyhaven-tmp-")
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::PathBuf;

    fn spec(format: Format, key: Option<&str>) -> SecretSpec {
        SecretSpec {
            path: "a/b".into(),
            file: PathBuf::from("f"),
            format,
            key: key.map(String::from),
            mode: 0o400,
            ttl: None,
            template: None,
        }
    }

    fn data(kv: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn raw_takes_the_only_key_or_the_named_one() {
        let one = data(&[("password", b"\x00\xffbin")]);
        assert_eq!(
            &*render(&spec(Format::Raw, None), &one).unwrap(),
            b"\x00\xffbin"
        );
        let two = data(&[("user", b"u"), ("password", b"p")]);
        assert_eq!(
            render(&spec(Format::Raw, None), &two).unwrap_err(),
            RenderError::AmbiguousKey("password, user".into())
        );
        assert_eq!(
            &*render(&spec(Format::Raw, Some("user")), &two).unwrap(),
            b"u"
        );
        let e = render(&spec(Format::Raw, Some("nope")), &two).unwrap_err();
        assert_eq!(
            e,
            RenderError::MissingKey("nope".into(), "password, user".into())
        );
    }

    #[test]
    fn json_is_valid_and_escaped() {
        let d = data(&[("b", b"line1\nq\"\\\x01"), ("a", "é".as_bytes())]);
        let out = render(&spec(Format::Json, None), &d).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["a"], "é");
        assert_eq!(v["b"], "line1\nq\"\\\x01");
        let bin = data(&[("k", b"\xff")]);
        assert_eq!(
            render(&spec(Format::Json, None), &bin).unwrap_err(),
            RenderError::NotUtf8("k".into())
        );
    }

    #[test]
    fn dotenv_names_and_quoting() {
        let d = data(&[("db-url", b"postgres://x"), ("2fa.key", b"a\"$b`\\\n")]);
        let out = render(&spec(Format::Dotenv, None), &d).unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            s,
            "_2FA_KEY=\"a\\\"\\$b\\`\\\\\\n\"\nDB_URL=\"postgres://x\"\n"
        );
        let clash = data(&[("a-b", b"1"), ("a.b", b"2")]);
        assert!(matches!(
            render(&spec(Format::Dotenv, None), &clash).unwrap_err(),
            RenderError::DotenvClash(..)
        ));
    }

    #[test]
    fn template_renders_through_the_spec() {
        let mut s = spec(Format::Template, None);
        assert_eq!(
            render(&s, &data(&[("k", b"v")])).unwrap_err(),
            RenderError::NoTemplate
        );
        s.template = Some(crate::template::Template::compile("{{ path }}:{{ k }}\n").unwrap());
        assert_eq!(&*render(&s, &data(&[("k", b"v")])).unwrap(), b"a/b:v\n");
        let e = render(&s, &data(&[("other", b"v")])).unwrap_err();
        assert!(e.to_string().contains("the template uses k, which"), "{e}");
        assert_eq!(
            render(&s, &data(&[("k", b"\xff")])).unwrap_err(),
            RenderError::NotUtf8("k".into())
        );
    }

    #[test]
    fn atomic_write_sets_the_mode_and_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/secret");
        write_atomic(&p, b"one", 0o400).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        // Replacing a read-only file works (rename, not open-for-write).
        write_atomic(&p, b"two", 0o440).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o440
        );
        // No temporary left behind.
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        std::fs::write(dir.path().join("sub/.keyhaven-tmp-1-x-secret"), b"x").unwrap();
        clean_temporaries(&dir.path().join("sub"));
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert!(!p.exists());
    }
}
