//! Dynamic PostgreSQL credentials as the bench uses them:
//!
//! - the operator's setup through the Admin API with the bootstrap credential: a policy, the
//!   connection (the credentials' database, as its superuser over loopback, trust auth: the URL
//!   has no password) and a role definition with the broker's default statements;
//! - `Lease` of [`PATH`] as async workers over TLS, every answer checked (the lease id names
//!   the caller and the path; a `kh_` user name and a password of the broker's shape);
//! - the issue of a fixed number of credentials that all expire at one moment;
//! - the raw baseline: the broker's own creation statement (`CREATE ROLE … LOGIN PASSWORD …
//!   VALID UNTIL …`, rendered from the same template) then `DROP ROLE`, through sqlx straight
//!   to the same PostgreSQL;
//! - the count of the roles the broker made (name prefix `kh_`) in that cluster.
//!
//! Passwords are checked for shape and dropped; they are never printed, and a failed statement
//! is reported by its SQLSTATE only (a database message can quote the statement).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use keyhaven_broker_core::dbrole;
use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::leases_client::LeasesClient;
use keyhaven_proto::broker::v1::{
    ApplyPoliciesRequest, DbStatusRequest, LeaseRequest, LeaseSelector, PutDbConnectionRequest,
    PutDbRoleRequest, RevokeLeasesRequest,
};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::leases::{self, authed, bearer, status_text, ClientId};
use crate::load::{self, Summary, Window, Worker, CALL_TIMEOUT};

/// The connection's name (`brokerctl db connection put bench`).
pub const CONNECTION: &str = "bench";
/// The role definition's name.
pub const ROLE: &str = "load";
/// What the clients lease: `db/CONNECTION/ROLE`.
pub const PATH: &str = "db/bench/load";
/// TTL of the load cells' credentials (the role's and the policy's default): far longer than
/// a run, so none expires while a cell runs.
pub const LEASE_TTL: Duration = Duration::from_secs(3600);

/// The policy of the run: read on the role for any service account of a `bench-*` namespace.
pub const POLICY_YAML: &str = r#"
policies:
- name: bench-db
  subjects: [{namespace: "bench-*", serviceaccount: "*"}]
  paths: ["db/bench/*"]
  capabilities: [read]
  ttl: 1h
  max_ttl: 24h
"#;

/// The role: the broker's default creation, renewal and revocation statements, caps far above
/// what one run makes.
pub const ROLE_YAML: &str =
    "ttl: 1h\nmax_ttl: 24h\nmax_per_identity: 1000000\nmax_total: 1000000\n";

/// A password the broker generates: 24 random bytes in hex.
const PASSWORD_LEN: usize = 48;

/// The operator's setup: the policy, the connection to `target_url`, the role.
pub async fn setup(
    ep: &Endpoint,
    bootstrap: &SecretString,
    target_url: &str,
) -> anyhow::Result<()> {
    let auth = bearer(bootstrap.expose_secret())?;
    let mut admin = AdminClient::new(ep.connect().await.context("connect to the broker")?);
    admin
        .apply_policies(authed(
            ApplyPoliciesRequest {
                yaml: POLICY_YAML.to_owned(),
                ..Default::default()
            },
            &auth,
        ))
        .await
        .map_err(|s| anyhow::anyhow!("ApplyPolicies: {}", status_text(&s)))?;
    admin
        .put_db_connection(authed(
            PutDbConnectionRequest {
                name: CONNECTION.to_owned(),
                url: target_url.as_bytes().to_vec(),
            },
            &auth,
        ))
        .await
        .map_err(|s| anyhow::anyhow!("PutDbConnection: {}", status_text(&s)))?;
    admin
        .put_db_role(authed(
            PutDbRoleRequest {
                connection: CONNECTION.to_owned(),
                role: ROLE.to_owned(),
                yaml: ROLE_YAML.to_owned(),
            },
            &auth,
        ))
        .await
        .map_err(|s| anyhow::anyhow!("PutDbRole: {}", status_text(&s)))?;
    Ok(())
}

/// One Lease of [`PATH`] for `ttl_seconds` (0: the default), checked: the lease id names this
/// caller and the path, the TTL is the one asked for, the data has a `kh_` user name and a
/// password of the broker's shape. Returns the granted TTL.
async fn lease_checked(
    client: &mut LeasesClient<Channel>,
    auth: &MetadataValue<Ascii>,
    prefix: &str,
    ttl_seconds: u64,
) -> Result<Duration, String> {
    let r = client
        .lease(authed(
            LeaseRequest {
                path: PATH.to_owned(),
                ttl_seconds,
            },
            auth,
        ))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let id_ok = r
        .lease_id
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(PATH))
        .is_some_and(|rest| rest.len() > 1);
    let user_ok = r.data.get("username").is_some_and(|u| {
        u.starts_with(dbrole::ROLE_PREFIX.as_bytes()) && u.len() <= dbrole::MAX_IDENT_BYTES
    });
    let password_ok = r
        .data
        .get("password")
        .is_some_and(|p| p.len() == PASSWORD_LEN && p.iter().all(u8::is_ascii_hexdigit));
    let want_ttl = if ttl_seconds == 0 {
        LEASE_TTL.as_secs()
    } else {
        ttl_seconds
    };
    if !id_ok || !user_ok || !password_ok || r.ttl_seconds != want_ttl {
        return Err(format!(
            "Lease {PATH} answered lease {:?}, ttl {} s (asked {want_ttl} s), keys {:?}{}{}",
            r.lease_id,
            r.ttl_seconds,
            r.data.keys().collect::<Vec<_>>(),
            if user_ok { "" } else { ", no kh_ username" },
            if password_ok {
                ""
            } else {
                ", no password of the broker's shape"
            },
        ));
    }
    Ok(Duration::from_secs(r.ttl_seconds))
}

struct LeaseWorker {
    client: LeasesClient<Channel>,
    auth: MetadataValue<Ascii>,
    prefix: String,
}

impl Worker for LeaseWorker {
    async fn call(&mut self) -> Result<(), String> {
        lease_checked(&mut self.client, &self.auth, &self.prefix, 0)
            .await
            .map(|_| ())
    }
}

/// The first `n` clients, each its own TLS connection, token and checker.
async fn workers(ep: &Endpoint, ids: &[ClientId], n: usize) -> anyhow::Result<Vec<LeaseWorker>> {
    leases::clients(std::slice::from_ref(ep), n, 1)
        .await?
        .into_iter()
        .zip(ids)
        .map(|(client, id)| {
            Ok(LeaseWorker {
                client,
                auth: id.bearer()?,
                prefix: leases::prefix(id),
            })
        })
        .collect()
}

/// Lease load: the first `n` clients leasing [`PATH`] back to back for `window`, each
/// credential for [`LEASE_TTL`].
pub async fn lease(
    ep: &Endpoint,
    ids: &[ClientId],
    n: usize,
    window: Window,
) -> anyhow::Result<Summary> {
    load::drive_async(workers(ep, ids, n).await?, window).await
}

/// What issuing a fixed number of credentials did.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Credentials issued (checked answers).
    pub count: usize,
    /// Failed Leases (not retried).
    pub errors: u64,
    /// The first failure, to show why.
    pub first_error: Option<String>,
    /// From the first request to the last answer.
    pub took: Duration,
    /// Credentials asked for after `expiry` had passed (each then lives 1 s).
    pub late: usize,
}

/// Issues `count` credentials of [`PATH`] with the first `n` clients, each asking for the
/// whole seconds left until `expiry` (rounded up, at least 1): every one expires between
/// `expiry` and about a second after it, by the broker's clock (this host's).
pub async fn issue_expiring(
    ep: &Endpoint,
    ids: &[ClientId],
    n: usize,
    count: usize,
    expiry: Instant,
) -> anyhow::Result<Issued> {
    let tickets = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut w in workers(ep, ids, n).await? {
        let tickets = tickets.clone();
        tasks.spawn(async move {
            let (mut ok, mut late, mut errors, mut first_error) = (0usize, 0usize, 0u64, None);
            while tickets.fetch_add(1, Ordering::Relaxed) < count {
                let left = expiry.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    late += 1;
                }
                let ttl = (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1);
                let call = lease_checked(&mut w.client, &w.auth, &w.prefix, ttl);
                match tokio::time::timeout(CALL_TIMEOUT, call).await {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert(format!("no answer within {CALL_TIMEOUT:?}"));
                    }
                }
            }
            (ok, late, errors, first_error)
        });
    }
    let mut out = Issued {
        count: 0,
        errors: 0,
        first_error: None,
        took: Duration::ZERO,
        late: 0,
    };
    while let Some(r) = tasks.join_next().await {
        let (ok, late, errors, first_error) = r?;
        out.count += ok;
        out.late += late;
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first_error;
        }
    }
    out.took = started.elapsed();
    Ok(out)
}

/// Ends every lease of the connection's credentials through the Admin API (`RevokeLeases`
/// by path prefix); returns how many it ended. Their roles are dropped by the broker's
/// revoker afterwards.
pub async fn revoke_all(ep: &Endpoint, bootstrap: &SecretString) -> anyhow::Result<usize> {
    let auth = bearer(bootstrap.expose_secret())?;
    let mut admin = AdminClient::new(ep.connect().await.context("connect to the broker")?);
    let ended = admin
        .revoke_leases(authed(
            RevokeLeasesRequest {
                selector: Some(LeaseSelector {
                    path_prefix: format!("db/{CONNECTION}/"),
                    ..Default::default()
                }),
            },
            &auth,
        ))
        .await
        .map_err(|s| anyhow::anyhow!("RevokeLeases: {}", status_text(&s)))?
        .into_inner()
        .lease_ids;
    Ok(ended.len())
}

/// `brokerctl db status` in numbers: (credentials not dropped, roles waiting to be dropped).
pub async fn db_status(ep: &Endpoint, bootstrap: &SecretString) -> anyhow::Result<(u64, usize)> {
    let auth = bearer(bootstrap.expose_secret())?;
    let mut admin = AdminClient::new(ep.connect().await.context("connect to the broker")?);
    let s = admin
        .db_status(authed(DbStatusRequest {}, &auth))
        .await
        .map_err(|s| anyhow::anyhow!("DbStatus: {}", status_text(&s)))?
        .into_inner();
    Ok((
        s.counts.iter().map(|c| c.count).sum(),
        s.pending_drops.len(),
    ))
}

/// A pool on the credentials' database as its superuser: `n` connections, opened before
/// the load starts.
pub async fn target_pool(url: &str, n: usize) -> anyhow::Result<PgPool> {
    let n = u32::try_from(n).context("too many connections")?;
    PgPoolOptions::new()
        .max_connections(n)
        .min_connections(n)
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .context("connect to the credentials' database")
}

/// Roles the broker made (name prefix `kh_`) in the cluster; roles are cluster-wide.
pub async fn marked_roles(pool: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM pg_roles WHERE rolname LIKE 'kh\\_%'")
        .fetch_one(pool)
        .await
        .context("count the kh_ roles")
}

/// A failed statement, by SQLSTATE only.
fn sql_error(what: &str, e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => format!(
            "{what}: SQLSTATE {}",
            d.code().as_deref().unwrap_or("unknown")
        ),
        None => format!("{what}: {e}"),
    }
}

struct RawWorker {
    pool: PgPool,
    run: Arc<str>,
    seq: Arc<AtomicU64>,
}

impl Worker for RawWorker {
    async fn call(&mut self) -> Result<(), String> {
        let name = format!(
            "bench_raw_{}_{}",
            self.run,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        // Zeroized on drop, like the broker's.
        let password = testkit::random::pin().map_err(|e| e.to_string())?;
        let expiration =
            humantime::format_rfc3339_millis(SystemTime::now() + LEASE_TTL).to_string();
        let create = dbrole::render(
            dbrole::DEFAULT_CREATION,
            &dbrole::Values {
                name: &name,
                password: password.as_str(),
                expiration: &expiration,
            },
        )
        .map_err(|e| format!("render: {e}"))?;
        sqlx::raw_sql(create.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| sql_error("CREATE ROLE", &e))?;
        sqlx::raw_sql(&format!("DROP ROLE {}", dbrole::quote_ident(&name)))
            .execute(&self.pool)
            .await
            .map_err(|e| sql_error("DROP ROLE", &e))?;
        Ok(())
    }
}

/// The raw baseline: `n` tasks, each with a connection of its own to `url`, creating a role
/// with the broker's creation statement and dropping it, back to back for `window`. Each
/// statement is its own transaction (one commit each).
pub async fn raw(url: &str, n: usize, window: Window) -> anyhow::Result<Summary> {
    let pool = target_pool(url, n).await?;
    let run: Arc<str> = hex::encode(testkit::random::bytes::<4>()?).into();
    let seq = Arc::new(AtomicU64::new(0));
    let workers = (0..n)
        .map(|_| RawWorker {
            pool: pool.clone(),
            run: run.clone(),
            seq: seq.clone(),
        })
        .collect();
    let s = load::drive_async(workers, window).await;
    pool.close().await;
    s
}
