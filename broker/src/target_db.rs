//! The databases dynamic credentials are made in: a small pool per connection, the statements
//! of a role definition, and the reconciler's listing of the roles the broker made.
//!
//! Errors never carry the database's own message (it can quote a statement, and a creation
//! statement holds a password): callers get [`TargetError`], whose text is fixed, and the
//! SQLSTATE where there is one.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use zeroize::Zeroizing;

/// Every role the broker creates gets this comment: with the `kh_` prefix, the reconciler's
/// marker of what it may drop.
pub const ROLE_COMMENT: &str = "keyhaven dynamic credential";

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
}

/// Where a credential connects: from the connection URL, without its user and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name, address, or Unix socket directory.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database.
    pub database: String,
}

impl Endpoint {
    /// A libpq URL for `user` with `password`.
    pub fn dsn(&self, user: &str, password: &str) -> Zeroizing<String> {
        Zeroizing::new(if self.host.starts_with('/') {
            format!(
                "postgresql://{user}:{password}@/{}?host={}&port={}",
                self.database, self.host, self.port
            )
        } else {
            format!(
                "postgresql://{user}:{password}@{}:{}/{}",
                self.host, self.port, self.database
            )
        })
    }
}

/// A parsed admin URL.
pub fn parse_url(url: &str) -> Result<(PgConnectOptions, Endpoint), TargetError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(TargetError::BadUrl);
    }
    let opts = PgConnectOptions::from_str(url)
        .map_err(|_| TargetError::BadUrl)?
        .application_name("keyhaven-broker");
    let endpoint = Endpoint {
        host: opts.get_host().to_owned(),
        port: opts.get_port(),
        database: opts
            .get_database()
            .unwrap_or(opts.get_username())
            .to_owned(),
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
}

/// The pools, by connection name; a pool is replaced when its URL gets a new version.
#[derive(Debug, Default)]
pub struct Targets {
    pools: Mutex<HashMap<String, Target>>,
}

impl Targets {
    /// The pool of `name` if it was made from `version`.
    pub fn get(&self, name: &str, version: i64) -> Option<Target> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.get(name).filter(|t| t.version == version).cloned()
    }

    /// Makes (lazily: nothing connects yet) and keeps the pool of `name` at `version`; when
    /// a concurrent call made it first, that pool. A pool of an older version is closed (its
    /// calls in flight fail and are retried by their clients).
    pub fn insert(&self, name: &str, version: i64, url: &str) -> Result<Target, TargetError> {
        let (opts, endpoint) = parse_url(url)?;
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
}

/// Logs in once with `url` (no pool, so the connection's own error is the answer) and checks
/// that its role may create roles.
pub async fn probe(url: &str) -> Result<(), TargetError> {
    use sqlx::{ConnectOptions, Connection};
    let (opts, _) = parse_url(url)?;
    let mut conn = tokio::time::timeout(Duration::from_secs(10), opts.connect())
        .await
        .map_err(|_| TargetError::Unavailable(None))?
        .map_err(|e| TargetError::from_sqlx("check", &e))?;
    let r = can_create_roles(&mut conn).await;
    let _ = conn.close().await;
    r
}

async fn can_create_roles(conn: &mut sqlx::PgConnection) -> Result<(), TargetError> {
    let can: Option<bool> = sqlx::query_scalar(
        "SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_optional(conn)
    .await
    .map_err(|e| TargetError::from_sqlx("check", &e))?;
    match can {
        Some(true) => Ok(()),
        _ => Err(TargetError::NotCreateRole),
    }
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
                keyhaven_broker_core::dbrole::quote_literal(ROLE_COMMENT)
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
             WHERE r.rolname LIKE 'kh\\_%' AND d.description = $1 ORDER BY 1",
        )
        .bind(ROLE_COMMENT)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| TargetError::from_sqlx("check", &e))
    }
}
