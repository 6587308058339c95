//! The databases dynamic credentials are made in: a small pool per connection, the statements
//! of a role definition, and the reconciler's listing of the roles the broker made.
//!
//! Errors never carry the database's own message (it can quote a statement, and a creation
//! statement holds a password): callers get [`TargetError`], whose text is fixed, and the
//! SQLSTATE where there is one.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use zeroize::Zeroizing;

/// Every role the broker creates gets the comment `ROLE_COMMENT <installation id>` ([`marker`]):
/// with the `kh_` prefix, the reconciler's marker of what it may drop. A role whose comment is
/// `ROLE_COMMENT` alone was made before installations had ids, and is taken as this one's.
pub const ROLE_COMMENT: &str = "keyhaven dynamic credential";

/// The comment of the roles installation `id` creates.
pub fn marker(id: &str) -> String {
    format!("{ROLE_COMMENT} {id}")
}

/// A failure talking to a target database.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    /// The URL does not parse.
    #[error("the connection URL is not a valid postgres:// URL")]
    BadUrl,
    /// Cannot connect (down, refused, timed out).
    #[error("cannot connect to the database{}", sqlstate(.0))]
    Unavailable(Option<String>),
    /// The TLS handshake failed: no TLS, or a certificate that does not verify.
    #[error("cannot connect to the database: TLS handshake or certificate verification failed")]
    Tls,
    /// A statement failed.
    #[error("a {what} statement failed{}", sqlstate(.code))]
    Statement {
        /// `creation`, `renewal`, `revocation`, `check`.
        what: &'static str,
        /// SQLSTATE.
        code: Option<String>,
    },
    /// The admin role cannot create roles.
    #[error("the connection's role has neither CREATEROLE nor SUPERUSER")]
    NotCreateRole,
}

fn sqlstate(code: &Option<String>) -> String {
    code.as_ref()
        .map(|c| format!(" (SQLSTATE {c})"))
        .unwrap_or_default()
}

impl TargetError {
    fn from_sqlx(what: &'static str, e: &sqlx::Error) -> TargetError {
        match e {
            sqlx::Error::Database(d) => TargetError::Statement {
                what,
                code: d.code().map(|c| c.into_owned()),
            },
            // rustls reports a refused certificate through the stream as InvalidData.
            sqlx::Error::Tls(_) => TargetError::Tls,
            sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => TargetError::Tls,
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Protocol(_) => TargetError::Unavailable(None),
            _ => TargetError::Statement { what, code: None },
        }
    }

    /// Whether trying again later can help (the database is down), as opposed to a statement
    /// the database refuses.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TargetError::Unavailable(_) | TargetError::Tls)
    }

    /// Whether the database refused the login itself (wrong password or no such role).
    pub fn is_login_refused(&self) -> bool {
        matches!(self, TargetError::Statement { code: Some(c), .. }
            if c == "28P01" || c == "28000")
    }
}

/// What a libpq URI part may hold unescaped: RFC 3986's unreserved characters.
const URI_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Where a credential connects: from the connection URL, without its user and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name, address, or Unix socket directory.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database.
    pub database: String,
    /// The connection URL's `sslmode` when it asks for TLS (`require`, `verify-ca`,
    /// `verify-full`): a workload's DSN keeps it unless its role says otherwise.
    pub ssl_mode: Option<&'static str>,
}

impl Endpoint {
    /// A libpq URL for `user` with `password`, with the role's `params` (and the connection's
    /// `sslmode` unless they set one).
    pub fn dsn(
        &self,
        user: &str,
        password: &str,
        params: &std::collections::BTreeMap<String, String>,
    ) -> Zeroizing<String> {
        let enc = |v: &str| percent_encoding::utf8_percent_encode(v, URI_COMPONENT).to_string();
        let mut query: Vec<String> = Vec::new();
        let (at, path) = if self.host.starts_with('/') {
            query.push(format!("host={}", enc(&self.host)));
            query.push(format!("port={}", self.port));
            (String::new(), enc(&self.database))
        } else {
            (format!("{}:{}", self.host, self.port), enc(&self.database))
        };
        if let (Some(mode), false) = (self.ssl_mode, params.contains_key("sslmode")) {
            query.push(format!("sslmode={mode}"));
        }
        query.extend(params.iter().map(|(k, v)| format!("{k}={}", enc(v))));
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        Zeroizing::new(format!(
            "postgresql://{}:{}@{at}/{path}{query}",
            enc(user),
            enc(password)
        ))
    }
}

/// How the broker logs in as a connection's admin: the URL the operator stored and, once the
/// broker has rotated it (`brokerctl db connection rotate-root`), the password that replaces
/// the URL's.
#[derive(Clone, Copy)]
pub struct AdminLogin<'a> {
    /// `postgres://` URL.
    pub url: &'a str,
    /// The broker's own password, when it has rotated the URL's.
    pub password: Option<&'a str>,
}

impl std::fmt::Debug for AdminLogin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL holds a password: neither is shown.
        f.debug_struct("AdminLogin").finish_non_exhaustive()
    }
}

/// A parsed admin URL.
pub fn parse_url(login: AdminLogin<'_>) -> Result<(PgConnectOptions, Endpoint), TargetError> {
    let url = login.url;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(TargetError::BadUrl);
    }
    let mut opts = PgConnectOptions::from_str(url)
        .map_err(|_| TargetError::BadUrl)?
        .application_name("keyhaven-broker");
    if let Some(p) = login.password {
        opts = opts.password(p);
    }
    let endpoint = Endpoint {
        // A Unix socket directory (`?host=/run/postgresql`) is where a credential connects.
        host: match opts.get_socket() {
            Some(dir) => dir.to_string_lossy().into_owned(),
            None => opts.get_host().to_owned(),
        },
        port: opts.get_port(),
        database: opts
            .get_database()
            .unwrap_or(opts.get_username())
            .to_owned(),
        ssl_mode: match opts.get_ssl_mode() {
            PgSslMode::Require => Some("require"),
            PgSslMode::VerifyCa => Some("verify-ca"),
            PgSslMode::VerifyFull => Some("verify-full"),
            _ => None,
        },
    };
    Ok((opts, endpoint))
}

/// One connection's pool, made from one version of its stored URL.
#[derive(Debug, Clone)]
pub struct Target {
    /// The stored URL's version this pool was made from.
    pub version: i64,
    /// The pool.
    pub pool: PgPool,
    /// Where credentials connect.
    pub endpoint: Endpoint,
    /// The comment marking the roles this installation creates.
    marker: Arc<str>,
}

/// The pools, by connection name; a pool is replaced when its URL gets a new version.
#[derive(Debug)]
pub struct Targets {
    pools: Mutex<HashMap<String, Target>>,
    marker: Arc<str>,
}

impl Targets {
    /// No pool yet; the roles made through them carry `marker` ([`marker`]).
    pub fn new(marker: String) -> Targets {
        Targets {
            pools: Mutex::default(),
            marker: marker.into(),
        }
    }

    /// The pool of `name` if it was made from `version`.
    pub fn get(&self, name: &str, version: i64) -> Option<Target> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.get(name).filter(|t| t.version == version).cloned()
    }

    /// Makes (lazily: nothing connects yet) and keeps the pool of `name` at `version`; when
    /// a concurrent call made it first, that pool. A pool of an older version is closed (its
    /// calls in flight fail and are retried by their clients).
    pub fn insert(
        &self,
        name: &str,
        version: i64,
        login: AdminLogin<'_>,
    ) -> Result<Target, TargetError> {
        let (opts, endpoint) = parse_url(login)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(opts);
        let t = Target {
            version,
            pool,
            endpoint,
            marker: self.marker.clone(),
        };
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        match pools.get(name) {
            Some(have) if have.version >= version => return Ok(have.clone()),
            _ => {}
        }
        if let Some(old) = pools.insert(name.to_owned(), t.clone()) {
            drop(old.pool.close());
        }
        Ok(t)
    }

    /// Forgets (and closes) the pool of `name`.
    pub fn remove(&self, name: &str) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = pools.remove(name) {
            drop(old.pool.close());
        }
    }
}

/// A direct admin session (no pool, so the connection's own error is the answer): the check
/// of a connection and the rotation of its password.
pub struct AdminSession(sqlx::PgConnection);

impl std::fmt::Debug for AdminSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSession").finish_non_exhaustive()
    }
}

impl AdminSession {
    /// Logs in.
    pub async fn open(login: AdminLogin<'_>) -> Result<AdminSession, TargetError> {
        use sqlx::ConnectOptions;
        let (opts, _) = parse_url(login)?;
        let conn = tokio::time::timeout(Duration::from_secs(10), opts.connect())
            .await
            .map_err(|_| TargetError::Unavailable(None))?
            .map_err(|e| TargetError::from_sqlx("check", &e))?;
        Ok(AdminSession(conn))
    }

    /// Whether its role may create roles.
    pub async fn check_create_role(&mut self) -> Result<(), TargetError> {
        let can: Option<bool> = sqlx::query_scalar(
            "SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_optional(&mut self.0)
        .await
        .map_err(|e| TargetError::from_sqlx("check", &e))?;
        match can {
            Some(true) => Ok(()),
            _ => Err(TargetError::NotCreateRole),
        }
    }

    /// Opens a transaction that sets its own role's password to `new_password`, sent as a
    /// SCRAM-SHA-256 verifier (what `psql`'s `\password` sends), so the password itself never
    /// reaches the server or its statement log. Takes effect with [`AdminSession::commit`].
    pub async fn begin_password_change(&mut self, new_password: &str) -> Result<(), TargetError> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|_| TargetError::Statement {
            what: "password change",
            code: None,
        })?;
        let verifier = scram_sha256_verifier(new_password, &salt, SCRAM_ITERATIONS);
        let sql = Zeroizing::new(format!(
            "ALTER ROLE CURRENT_USER PASSWORD {}",
            keyhaven_broker_core::dbrole::quote_literal(&verifier)
        ));
        self.simple("BEGIN").await?;
        self.simple(&sql).await
    }

    /// Commits the open transaction.
    pub async fn commit(&mut self) -> Result<(), TargetError> {
        self.simple("COMMIT").await
    }

    /// One statement, unprepared.
    async fn simple(&mut self, sql: &str) -> Result<(), TargetError> {
        use sqlx::Executor as _;
        self.0
            .execute(sql)
            .await
            .map(|_| ())
            .map_err(|e| TargetError::from_sqlx("password change", &e))
    }

    /// Logs out (a transaction still open is rolled back).
    pub async fn close(self) {
        use sqlx::Connection;
        let _ = self.0.close().await;
    }
}

/// Iterations of a verifier the broker makes (PostgreSQL's default, `scram_iterations`).
const SCRAM_ITERATIONS: NonZeroU32 = NonZeroU32::MIN.saturating_add(4095);

/// A SCRAM-SHA-256 verifier as PostgreSQL stores it (RFC 5802, RFC 7677):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64.
pub fn scram_sha256_verifier(password: &str, salt: &[u8], iterations: NonZeroU32) -> String {
    use base64::Engine as _;
    use ring::{digest, hmac, pbkdf2};
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut salted = Zeroizing::new([0u8; 32]);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password.as_bytes(),
        &mut salted[..],
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted[..]);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key.as_ref()),
        b64.encode(server_key.as_ref())
    )
}

/// Logs in once and checks that the role may create roles.
pub async fn probe(login: AdminLogin<'_>) -> Result<(), TargetError> {
    let mut s = AdminSession::open(login).await?;
    let r = s.check_create_role().await;
    s.close().await;
    r
}

impl Target {
    /// Runs rendered statements in one transaction (a multi-statement simple query is one
    /// implicit transaction); `mark` adds the reconciler's comment on `name` to it.
    pub async fn run(
        &self,
        what: &'static str,
        statements: &str,
        mark: Option<&str>,
    ) -> Result<(), TargetError> {
        let mut sql = Zeroizing::new(String::with_capacity(statements.len() + 96));
        sql.push_str(statements);
        if let Some(name) = mark {
            sql.push_str(&format!(
                "\n;COMMENT ON ROLE {} IS {};",
                keyhaven_broker_core::dbrole::quote_ident(name),
                keyhaven_broker_core::dbrole::quote_literal(&self.marker)
            ));
        }
        sqlx::raw_sql(&sql)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| TargetError::from_sqlx(what, &e))
    }

    /// Whether role `name` exists.
    pub async fn role_exists(&self, name: &str) -> Result<bool, TargetError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_roles WHERE rolname = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| TargetError::from_sqlx("check", &e))?;
        Ok(n > 0)
    }

    /// The roles the broker made (prefix and comment), sorted.
    pub async fn marked_roles(&self) -> Result<Vec<String>, TargetError> {
        sqlx::query_scalar(
            "SELECT r.rolname::text FROM pg_roles r \
             JOIN pg_shdescription d ON d.objoid = r.oid \
                  AND d.classoid = 'pg_authid'::regclass \
             WHERE r.rolname LIKE 'kh\\_%' AND d.description IN ($1, $2) ORDER BY 1",
        )
        .bind(&*self.marker)
        .bind(ROLE_COMMENT)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| TargetError::from_sqlx("check", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an independent implementation (Python's hashlib/hmac, RFC 5802's formulas).
    #[test]
    fn scram_verifier_matches_the_rfc_formulas() {
        assert_eq!(
            scram_sha256_verifier("pencil", b"0123456789abcdef", SCRAM_ITERATIONS),
            "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$\
             nQpbZ77WudtqufPwikHXGRt6g2QJ4zns8bZLw273DRM=:\
             jn2amWP1q1h+jgjy0YTO14S6/F02SV7taipOeB7ef20="
        );
    }

    #[test]
    fn a_dsn_keeps_the_connections_tls_and_adds_the_roles_params() {
        let login = |url| AdminLogin {
            url,
            password: None,
        };
        let (_, tls) = parse_url(login(
            "postgres://a:b@db.example:5433/app?sslmode=verify-full",
        ))
        .unwrap();
        let none = std::collections::BTreeMap::new();
        assert_eq!(
            *tls.dsn("kh_u_1", "pw", &none),
            "postgresql://kh_u_1:pw@db.example:5433/app?sslmode=verify-full"
        );
        let params: std::collections::BTreeMap<String, String> = [
            ("sslmode", "verify-ca"),
            ("sslrootcert", "/etc/db ca/ca.crt"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            *tls.dsn("kh_u_1", "pw", &params),
            "postgresql://kh_u_1:pw@db.example:5433/app?sslmode=verify-ca\
             &sslrootcert=%2Fetc%2Fdb%20ca%2Fca.crt"
        );
        // No TLS asked for: none added; a socket directory goes in the query.
        let (_, plain) = parse_url(login("postgres://a@localhost/my%20db?host=/run/pg")).unwrap();
        assert_eq!(
            *plain.dsn("kh_u_1", "p&w", &none),
            "postgresql://kh_u_1:p%26w@/my%20db?host=%2Frun%2Fpg&port=5432"
        );
        // What the workload's client makes of it.
        let back = PgConnectOptions::from_str(&tls.dsn("kh_u_1", "pw", &params)).unwrap();
        assert_eq!(back.get_host(), "db.example");
        assert!(matches!(back.get_ssl_mode(), PgSslMode::VerifyCa));
    }
}
