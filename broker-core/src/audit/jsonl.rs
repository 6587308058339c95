//! The JSON-lines file sink, and verification of such a file.

use super::*;

/// Appends records to a JSON-lines file, one line per record, each write followed by an fsync.
/// The file is created with mode 0600 (an existing file keeps its mode). Does not check that
/// appended records chain: the caller appends the records it stored, in order.
#[derive(Debug)]
pub struct JsonlSink {
    file: File,
    path: PathBuf,
}

impl JsonlSink {
    /// Opens `path` for appending, creating it (mode 0600, and the directory entry synced)
    /// if missing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<JsonlSink> {
        let path = path.as_ref().to_path_buf();
        let mut opts = OpenOptions::new();
        opts.append(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = match opts.open(&path) {
            Ok(f) => {
                // Make the new file's directory entry durable too.
                if let Some(dir) = path.parent() {
                    let dir = if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    };
                    File::open(dir)?.sync_all()?;
                }
                f
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                OpenOptions::new().append(true).open(&path)?
            }
            Err(e) => return Err(e),
        };
        Ok(JsonlSink { file, path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record` as one line and syncs it to disk before returning.
    pub fn append(&mut self, record: &AuditRecord) -> io::Result<()> {
        let mut line = record.to_json_line();
        line.push('\n');
        // One write of the whole line: with O_APPEND it lands contiguously at the end.
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()
    }
}

/// Verifies a JSON-lines audit file from genesis.
pub fn verify_jsonl(path: impl AsRef<Path>) -> Result<VerifyReport, VerifyError> {
    verify_jsonl_window(path, &Checkpoint::genesis(), None)
}

/// Verifies a JSON-lines audit file whose first line follows `start` (a file started when
/// the database already held records), optionally up to `anchor`.
pub fn verify_jsonl_window(
    path: impl AsRef<Path>,
    start: &Checkpoint,
    anchor: Option<&Checkpoint>,
) -> Result<VerifyReport, VerifyError> {
    let path = path.as_ref();
    let io_err = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut v = ChainVerifier::after(start.clone());
    if let Some(a) = anchor {
        v = v.with_anchor(a.clone());
    }
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_err)?;
        let record =
            AuditRecord::from_json_line(&line).map_err(|source| VerifyError::Malformed {
                line: i as u64 + 1,
                source,
            })?;
        v.push(&record)?;
    }
    v.finish()
}
