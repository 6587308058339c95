//! Read-only access to the apiserver's etcd over its v3 gRPC API (`etcd-client`), with the
//! same TLS material the apiserver uses: a paginated, serializable scan of everything under
//! the apiserver's `--etcd-prefix`, and single-key reads.
//!
//! Memory stays bounded whatever the size of etcd: one page of keys and values at a time,
//! every page read at the revision of the first (a consistent snapshot), and a page that is
//! too large for one gRPC message is read again in halves.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

/// How to reach etcd (the flags mirror the apiserver's `--etcd-*` flags).
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated: `https://host:2379` (or `http://127.0.0.1:2379`
    /// for a loopback development etcd). Unset: no etcd access.
    #[arg(long, env = "KEYHAVEN_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's serving certificate.
    #[arg(long, env = "KEYHAVEN_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) etcd accepts, e.g. the apiserver's etcd client certificate.
    #[arg(long, env = "KEYHAVEN_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Key (PEM) of `--etcd-cert`.
    #[arg(long, env = "KEYHAVEN_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// The apiserver's `--etcd-prefix`.
    #[arg(long, env = "KEYHAVEN_ETCD_PREFIX", default_value = "/registry")]
    pub etcd_prefix: String,
    /// Keys read per page of a scan.
    #[arg(long, env = "KEYHAVEN_ETCD_PAGE_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub etcd_page_size: u32,
    /// Deadline of one etcd request (and of connecting).
    #[arg(long, env = "KEYHAVEN_ETCD_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub etcd_timeout: Duration,
}

impl EtcdArgs {
    /// Whether etcd access is configured.
    pub fn configured(&self) -> bool {
        !self.etcd_endpoints.is_empty()
    }

    /// The prefix with exactly one trailing slash stripped off.
    pub fn prefix(&self) -> &str {
        self.etcd_prefix.trim_end_matches('/')
    }
}

/// Why etcd could not be read. Messages name the endpoint and the file, never a value.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A TLS file could not be read.
    #[error("reading {what} {path}: {source}")]
    File {
        /// Which flag.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting or a request failed.
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        /// The endpoints asked.
        endpoints: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// An `https` endpoint without `--etcd-cacert`, or client certificates for `http`.
    #[error("{0}")]
    Config(String),
}

/// Largest gRPC message accepted from etcd: a page is re-read in halves past it.
const MAX_MESSAGE: usize = 32 << 20;

/// An open etcd connection.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    endpoints: String,
    prefix: String,
    page_size: u32,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Connects (and checks the connection with one read).
    pub async fn connect(args: &EtcdArgs) -> Result<Etcd, EtcdError> {
        let endpoints = args.etcd_endpoints.join(",");
        let tls = args
            .etcd_endpoints
            .iter()
            .any(|e| e.starts_with("https://"));
        let mut opts = ConnectOptions::new()
            .with_timeout(args.etcd_timeout)
            .with_connect_timeout(args.etcd_timeout);
        if tls {
            let read = |what, p: &PathBuf| {
                std::fs::read(p).map_err(|source| EtcdError::File {
                    what,
                    path: p.clone(),
                    source,
                })
            };
            let ca = args.etcd_cacert.as_ref().ok_or_else(|| {
                EtcdError::Config(format!(
                    "etcd at {endpoints} is https: give --etcd-cacert (and --etcd-cert/--etcd-key), \
                     the files the apiserver uses for etcd"
                ))
            })?;
            let mut t =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read("--etcd-cacert", ca)?));
            if let (Some(c), Some(k)) = (&args.etcd_cert, &args.etcd_key) {
                t = t.identity(Identity::from_pem(
                    read("--etcd-cert", c)?,
                    read("--etcd-key", k)?,
                ));
            }
            opts = opts.with_tls(t);
        } else if args.etcd_cert.is_some() {
            return Err(EtcdError::Config(format!(
                "--etcd-cert given but {endpoints} is not https://"
            )));
        }
        let err = |source| EtcdError::Etcd {
            endpoints: endpoints.clone(),
            source,
        };
        let client = Client::connect(&args.etcd_endpoints, Some(opts))
            .await
            .map_err(err)?;
        let etcd = Etcd {
            client,
            endpoints: endpoints.clone(),
            prefix: args.prefix().to_owned(),
            page_size: args.etcd_page_size,
        };
        // Connecting is lazy: one cheap read proves the endpoint, TLS and permissions.
        let mut kv = etcd.client.kv_client();
        kv.get(
            format!("{}/", etcd.prefix),
            Some(GetOptions::new().with_count_only().with_serializable()),
        )
        .await
        .map_err(err)?;
        Ok(etcd)
    }

    /// The apiserver's `--etcd-prefix`, without a trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn err(&self, source: etcd_client::Error) -> EtcdError {
        EtcdError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    /// The value of one key, if present (a serializable read).
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let mut r = kv
            .get(key, Some(GetOptions::new().with_serializable()))
            .await
            .map_err(|e| self.err(e))?;
        Ok(r.take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.value().to_vec()))
    }

    /// How many keys there are under `<prefix>/` (or `<prefix>/<sub>/`): one cheap request.
    pub async fn count(&self, sub: Option<&str>) -> Result<u64, EtcdError> {
        let start = self.range_start(sub);
        let mut kv = self.client.kv_client();
        let r = kv
            .get(
                start.clone(),
                Some(
                    GetOptions::new()
                        .with_range(prefix_end(start.as_bytes()))
                        .with_count_only()
                        .with_serializable(),
                ),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(u64::try_from(r.count()).unwrap_or(0))
    }

    fn range_start(&self, sub: Option<&str>) -> String {
        match sub {
            Some(s) => format!("{}/{}/", self.prefix, s.trim_matches('/')),
            None => format!("{}/", self.prefix),
        }
    }

    /// Calls `each(key, value)` for every key under `<prefix>/` (or under `<prefix>/<sub>/`),
    /// in key order, one page at a time, all pages at one revision.
    pub async fn scan(
        &self,
        sub: Option<&str>,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<ScanStats, EtcdError> {
        let start = self.range_start(sub);
        let end = prefix_end(start.as_bytes());
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let mut from = start.into_bytes();
        let mut revision = 0i64;
        let mut limit = i64::from(self.page_size);
        let mut stats = ScanStats::default();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(limit)
                .with_serializable();
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let mut r = match kv.get(from.clone(), Some(opts)).await {
                Ok(r) => r,
                Err(e) if limit > 1 && too_large(&e) => {
                    limit = (limit / 2).max(1);
                    continue;
                }
                Err(e) => return Err(self.err(e)),
            };
            if revision == 0 {
                revision = r.header().map(|h| h.revision()).unwrap_or(0);
                stats.revision = revision;
            }
            let more = r.more();
            let kvs = r.take_kvs();
            stats.pages += 1;
            for kv in &kvs {
                stats.keys += 1;
                stats.bytes += kv.value().len() as u64;
                each(kv.key(), kv.value());
            }
            match kvs.last() {
                Some(last) if more => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
            limit = i64::from(self.page_size);
        }
        Ok(stats)
    }
}

/// What one scan read.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ScanStats {
    /// Keys read.
    pub keys: u64,
    /// Bytes of values read.
    pub bytes: u64,
    /// Pages (range requests).
    pub pages: u64,
    /// The etcd revision the whole scan read at.
    pub revision: i64,
}

fn too_large(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::ResourceExhausted || s.message().contains("too large")
        }
        _ => false,
    }
}

/// The end of the range of keys that start with `prefix` (etcd's `prefix + 1`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/registry/"), b"/registry0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
