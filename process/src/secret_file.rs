//! Secrets read from files: a bearer token, a credential, a database URL. Errors name the file
//! and the problem, never a byte of the content; the content is zeroized when dropped.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// What a file must hold.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// What the file is, for errors (`token file`, `--database-url-file`).
    pub what: &'static str,
    /// Largest accepted file.
    pub max_bytes: u64,
    /// A bearer token or credential: printable ASCII, no whitespace inside. Otherwise any
    /// UTF-8 (a URL, a password) with only the line ending trimmed.
    pub bearer: bool,
}

impl Rules {
    /// A bearer token or one-line credential of at most 64 KiB.
    pub const fn bearer(what: &'static str) -> Rules {
        Rules {
            what,
            max_bytes: 64 << 10,
            bearer: true,
        }
    }

    /// Any one-line UTF-8 secret of at most 64 KiB (trailing newline removed).
    pub const fn text(what: &'static str) -> Rules {
        Rules {
            what,
            max_bytes: 64 << 10,
            bearer: false,
        }
    }
}

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// It could not be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Its content is not acceptable.
    #[error("{what} {path} {why}")]
    Invalid {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong, never the content.
        why: &'static str,
    },
}

/// Reads and checks a secret file.
pub fn read(path: &Path, rules: Rules) -> Result<Zeroizing<String>, SecretFileError> {
    use std::io::Read as _;
    let read_err = |source| SecretFileError::Read {
        what: rules.what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(256));
    file.take(rules.max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    check(path, &bytes, rules)
}

/// [`read`] on the async runtime's blocking pool.
pub async fn read_async(path: &Path, rules: Rules) -> Result<Zeroizing<String>, SecretFileError> {
    let p = path.to_path_buf();
    match tokio::task::spawn_blocking(move || read(&p, rules)).await {
        Ok(r) => r,
        Err(e) => Err(SecretFileError::Read {
            what: rules.what,
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        }),
    }
}

fn check(path: &Path, bytes: &[u8], rules: Rules) -> Result<Zeroizing<String>, SecretFileError> {
    let bad = |why| SecretFileError::Invalid {
        what: rules.what,
        path: path.to_path_buf(),
        why,
    };
    if bytes.len() as u64 > rules.max_bytes {
        return Err(bad("is too large"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| bad("is not UTF-8"))?;
    let value = if rules.bearer {
        text.trim()
    } else {
        text.trim_end_matches(['\n', '\r'])
    };
    if value.is_empty() {
        return Err(bad("is empty"));
    }
    if rules.bearer && !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "holds more than one line or characters not allowed in a token or credential \
             (whitespace, control or non-ASCII)",
        ));
    }
    if !rules.bearer && value.contains(['\n', '\r']) {
        return Err(bad("holds more than one line"));
    }
    Ok(Zeroizing::new(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, content).unwrap();
        (d, p)
    }

    #[test]
    fn bearer_files_are_trimmed_and_checked_without_echoing_them() {
        let (_d, p) = file(b"  abc.def-ghi\n");
        assert_eq!(
            read(&p, Rules::bearer("token file")).unwrap().as_str(),
            "abc.def-ghi"
        );
        for bad in [
            &b""[..],
            b"\n",
            b"two words",
            b"a\nb",
            b"\xff\xfe",
            "é".as_bytes(),
        ] {
            let (_d, p) = file(bad);
            let e = read(&p, Rules::bearer("token file")).unwrap_err();
            assert!(matches!(e, SecretFileError::Invalid { .. }), "{bad:?}: {e}");
        }
        let (_d, p) = file(b"s3cr3t-value with space");
        let e = read(&p, Rules::bearer("token file"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = read(Path::new("/nonexistent/x"), Rules::bearer("token file")).unwrap_err();
        assert!(matches!(e, SecretFileError::Read { .. }));
    }

    #[test]
    fn text_files_keep_inner_spaces_and_refuse_oversize() {
        let (_d, p) = file(b"postgres://u:p w@h/db\r\n");
        assert_eq!(
            read(&p, Rules::text("url file")).unwrap().as_str(),
            "postgres://u:p w@h/db"
        );
        let (_d, p) = file(&vec![b'a'; 70_000]);
        assert!(read(&p, Rules::text("url file")).is_err());
        let (_d, p) = file(b"a\nb\n");
        assert!(read(&p, Rules::text("url file")).is_err());
    }
}
