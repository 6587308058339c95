//! The lease loop: one task per secret. Each leases its path, writes the file, renews at
//! about two-thirds of the TTL (with jitter), leases again when the broker reports a newer
//! version or the lease reaches its maximum, and backs off (exponential, jittered, capped)
//! while the broker cannot be reached — keeping the last good file until the lease ends.
//! A version that cannot be written (its template fails, the volume is full) leaves the last
//! good file and its lease in place, and the agent not ready, with the reason, until a
//! version is written.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng as _;
use tokio::sync::watch;

use crate::client::{describe, Broker, Failure};
use crate::config::{Cli, OnExpiry, OnRevoked, SecretSpec};
use crate::files;
use crate::metrics::Metrics;

/// A held lease.
#[derive(Debug, Clone)]
pub struct Held {
    /// Lease id (not a secret: only its holder's token can renew or revoke it).
    pub id: String,
    /// Secret version in the file.
    pub version: u64,
    /// When the lease ends unless renewed.
    pub expires: SystemTime,
    /// Past this the broker will not renew.
    pub renewable_until: SystemTime,
    /// TTL the broker granted the last time.
    pub ttl: Duration,
    /// When to act next (renew, or lease again when it cannot be extended).
    pub next: SystemTime,
}

/// What the rest of the agent (readiness, metrics, shutdown) sees of one secret.
#[derive(Debug, Clone, Default)]
pub struct Slot {
    /// A file with a leased value is in place.
    pub written: bool,
    /// The lease behind the file, if any.
    pub lease: Option<(String, SystemTime)>,
    /// Why the file's lease ended with no lease to replace it (until one is granted).
    pub ended: Option<String>,
    /// Why the last leased version could not be written (render or file system), until a
    /// version is written. A file already in place is kept.
    pub failed: Option<String>,
}

/// State shared between the lease tasks, the HTTP listener and shutdown.
#[derive(Debug)]
pub struct Shared {
    /// What to lease and where to write it.
    pub specs: Vec<SecretSpec>,
    slots: Mutex<Vec<Slot>>,
    /// Metrics.
    pub metrics: Metrics,
    ready_file: Option<PathBuf>,
    ready: Mutex<bool>,
}

impl Shared {
    /// State for `specs`, nothing written yet.
    pub fn new(specs: Vec<SecretSpec>, ready_file: Option<PathBuf>) -> Shared {
        let n = specs.len();
        Shared {
            specs,
            slots: Mutex::new(vec![Slot::default(); n]),
            metrics: Metrics::default(),
            ready_file,
            ready: Mutex::new(false),
        }
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut Slot)) {
        let all_written = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = slots.get_mut(i) {
                f(s);
            }
            self.metrics
                .leases_held
                .set(slots.iter().filter(|s| s.lease.is_some()).count() as i64);
            slots
                .iter()
                .all(|s| s.written && s.ended.is_none() && s.failed.is_none())
        };
        self.set_ready(all_written);
    }

    fn set_ready(&self, now_ready: bool) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        if *ready == now_ready {
            return;
        }
        *ready = now_ready;
        self.metrics.ready.set(i64::from(now_ready));
        if let Some(p) = &self.ready_file {
            let r = if now_ready {
                std::fs::write(p, b"ready\n")
            } else {
                files::remove(p)
            };
            if let Err(e) = r {
                tracing::warn!(file = %p.display(), error = %e, "cannot update the ready file");
            }
        }
        if now_ready {
            tracing::info!("ready: every secret file is written under a lease");
        } else {
            tracing::warn!("not ready: a secret file is missing or its lease ended");
        }
    }

    /// What keeps the agent from being ready: each file not (or no longer) written, or whose
    /// lease ended with none to replace it, with the reason.
    pub fn not_ready(&self) -> Vec<String> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        self.specs
            .iter()
            .zip(slots.iter())
            .filter_map(|(spec, s)| {
                let file = spec.file.display();
                match (&s.ended, &s.failed, s.written) {
                    (Some(why), _, _) => Some(format!("{file}: lease ended ({why})")),
                    (None, Some(why), false) => Some(format!("{file}: not written ({why})")),
                    (None, Some(why), true) => Some(format!(
                        "{file}: the newest version could not be written ({why}); the previous file is kept"
                    )),
                    (None, None, false) => Some(format!("{file}: not written")),
                    (None, None, true) => None,
                }
            })
            .collect()
    }

    /// Each file with the expiry of its lease.
    pub fn expiries(&self) -> Vec<(String, Option<SystemTime>)> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        self.specs
            .iter()
            .zip(slots.iter())
            .map(|(spec, s)| {
                (
                    spec.file.display().to_string(),
                    s.lease.as_ref().map(|l| l.1),
                )
            })
            .collect()
    }

    /// Lease ids currently held.
    pub fn held_leases(&self) -> Vec<String> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .filter_map(|s| s.lease.as_ref().map(|l| l.0.clone()))
            .collect()
    }
}

/// Everything a lease task needs.
#[derive(Debug)]
pub struct Ctx {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The broker.
    pub broker: Broker,
    /// Output directory.
    pub output_dir: PathBuf,
    /// `--on-expiry`.
    pub on_expiry: OnExpiry,
    /// `--on-revoked`.
    pub on_revoked: OnRevoked,
    /// `--backoff-max`.
    pub backoff_max: Duration,
}

/// Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... capped, each wait drawn from
/// [½, 1] of the step.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);

    /// A fresh backoff capped at `max`.
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            step: Backoff::FIRST.min(max),
            max,
        }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.step = Backoff::FIRST.min(self.max);
    }
}

/// When to renew a lease granted for `ttl`: about two-thirds through, ±10 %.
pub fn renew_after(ttl: Duration) -> Duration {
    ttl.mul_f64(rand::rng().random_range(0.57..=0.77))
}

fn unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Why writing a leased secret failed.
#[derive(Debug)]
pub enum WriteError {
    /// The data does not fit the configured format (a configuration problem).
    Render(files::RenderError),
    /// The file system refused.
    Io(std::io::Error),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Render(e) => write!(f, "{e}"),
            WriteError::Io(e) => write!(f, "cannot write the file: {e}"),
        }
    }
}

impl Ctx {
    fn path_of(&self, i: usize) -> PathBuf {
        self.output_dir.join(&self.shared.specs[i].file)
    }

    /// Leases secret `i` and writes its file. On success returns the lease.
    pub async fn lease_and_write(&self, i: usize) -> Result<Held, LeaseFailure> {
        let spec = &self.shared.specs[i];
        let resp = match self.broker.lease(&spec.path, spec.ttl).await {
            Ok(r) => {
                self.shared.metrics.lease("ok");
                r
            }
            Err(status) => {
                let f = Failure::of(&status);
                self.shared.metrics.lease(f.label());
                self.shared.metrics.failure(&format!("lease_{}", f.label()));
                return Err(LeaseFailure::Broker(f, describe(&status)));
            }
        };
        let data: HashMap<String, Vec<u8>> = resp.data;
        let rendered = files::render(spec, &data);
        // The data map holds plaintext: wipe it once rendered.
        for (_, mut v) in data {
            zeroize::Zeroize::zeroize(&mut v);
        }
        let written = match rendered {
            Ok(content) => {
                files::write_atomic(&self.path_of(i), &content, spec.mode).map_err(WriteError::Io)
            }
            Err(e) => Err(WriteError::Render(e)),
        };
        let now = SystemTime::now();
        let ttl = Duration::from_secs(resp.ttl_seconds);
        let held = Held {
            id: resp.lease_id,
            version: resp.version,
            expires: now + ttl,
            renewable_until: unix(resp.renewable_until),
            ttl,
            next: now,
        };
        if let Err(e) = written {
            self.shared.metrics.failure(match e {
                WriteError::Render(_) => "render",
                WriteError::Io(_) => "write",
            });
            // Do not hold a lease for a file we could not write.
            let _ = self.broker.revoke(&held.id).await;
            let why = e.to_string();
            self.shared.update(i, |s| s.failed = Some(why.clone()));
            return Err(LeaseFailure::Write(why));
        }
        self.shared.metrics.file_writes.inc();
        tracing::info!(
            path = %spec.path,
            file = %spec.file.display(),
            version = held.version,
            lease_id = %held.id,
            ttl_s = held.ttl.as_secs(),
            "wrote secret file"
        );
        let mut held = held;
        held.next = schedule(&held, now);
        let (id, exp) = (held.id.clone(), held.expires);
        self.shared.update(i, |s| {
            s.written = true;
            s.lease = Some((id, exp));
            s.ended = None;
            s.failed = None;
        });
        Ok(held)
    }

    /// The lease behind file `i` ended (`kind`: `expired` or `revoked`) with none to replace
    /// it: `--on-expiry` applies, and the agent is not ready until a lease is granted again.
    fn lease_ended(&self, i: usize, kind: &'static str, why: &str) {
        let spec = &self.shared.specs[i];
        self.shared.metrics.lease_end(kind);
        match self.on_expiry {
            OnExpiry::Keep => {
                tracing::warn!(path = %spec.path, file = %spec.file.display(), why, "lease ended; keeping the last file (--on-expiry keep)");
            }
            OnExpiry::Delete => {
                tracing::warn!(path = %spec.path, file = %spec.file.display(), why, "lease ended; deleting the file (--on-expiry delete)");
                self.delete_file(i);
            }
        }
        let why = why.to_owned();
        self.shared.update(i, |s| {
            s.lease = None;
            s.ended = Some(why);
        });
    }

    fn delete_file(&self, i: usize) {
        if let Err(e) = files::remove(&self.path_of(i)) {
            self.shared.metrics.failure("delete");
            tracing::error!(file = %self.shared.specs[i].file.display(), error = %e, "cannot delete the file");
        }
        self.shared.update(i, |s| {
            s.written = false;
            s.lease = None;
        });
    }
}

/// Why leasing a secret failed.
#[derive(Debug, Clone)]
pub enum LeaseFailure {
    /// The broker said no, or could not be reached.
    Broker(Failure, String),
    /// The value could not be written (format or file system).
    Write(String),
}

impl std::fmt::Display for LeaseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseFailure::Broker(_, m) => write!(f, "{m}"),
            LeaseFailure::Write(m) => write!(f, "{m}"),
        }
    }
}

/// When to act on a lease just granted or renewed at `now`: renew about two-thirds through
/// the TTL; when the broker cannot extend it any more, lease again two-thirds through what
/// is left.
fn schedule(h: &Held, now: SystemTime) -> SystemTime {
    if can_extend(h) {
        now + renew_after(h.ttl)
    } else {
        now + until(h.expires).mul_f64(2.0 / 3.0)
    }
}

/// Whether renewing would extend the lease by a useful amount (at least a tenth of its TTL,
/// and at least a second).
fn can_extend(h: &Held) -> bool {
    let gain = h
        .renewable_until
        .duration_since(h.expires)
        .unwrap_or_default();
    gain >= (h.ttl / 10).max(Duration::from_secs(1))
}

/// Sleeps until `t`; `false` when shutdown came first.
async fn sleep_until(t: SystemTime, stop: &mut watch::Receiver<bool>) -> bool {
    sleep_for(until(t), stop).await
}

async fn sleep_for(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.changed() => false,
    }
}

/// The life of one secret, until shutdown.
pub async fn run_secret(ctx: Arc<Ctx>, i: usize, mut stop: watch::Receiver<bool>) {
    let spec = ctx.shared.specs[i].clone();
    let mut backoff = Backoff::new(ctx.backoff_max);
    let mut held: Option<Held> = None;
    let mut relet = false;
    // Set when the broker refused a renewal (the lease was revoked) and the agent leases
    // again: if that fails, the lease has ended with nothing to replace it.
    let mut revoked = false;
    loop {
        if *stop.borrow() {
            return;
        }
        // A lease that ran out while we could not renew or replace it.
        if let Some(h) = &held {
            if SystemTime::now() >= h.expires {
                held = None;
                relet = false;
                ctx.lease_ended(
                    i,
                    "expired",
                    "expired before it could be renewed or replaced",
                );
            }
        }
        let Some(mut h) = held.take() else {
            match ctx.lease_and_write(i).await {
                Ok(new) => {
                    backoff.reset();
                    revoked = false;
                    held = Some(new);
                }
                Err(e) => {
                    if std::mem::take(&mut revoked) {
                        ctx.lease_ended(
                            i,
                            "revoked",
                            &format!("revoked, and leasing again failed: {e}"),
                        );
                    }
                    let wait = backoff.next_wait();
                    tracing::warn!(path = %spec.path, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot lease");
                    if !sleep_for(wait, &mut stop).await {
                        return;
                    }
                }
            }
            continue;
        };
        if !relet {
            if !sleep_until(h.next, &mut stop).await {
                // Shutdown: the lease stays in the shared state for revocation.
                return;
            }
            if SystemTime::now() >= h.expires {
                held = Some(h);
                continue;
            }
        }
        if relet || !can_extend(&h) {
            // A newer version exists, or the lease is at its maximum: lease again, then let
            // the old lease go.
            match ctx.lease_and_write(i).await {
                Ok(new) => {
                    backoff.reset();
                    relet = false;
                    tracing::info!(path = %spec.path, old = %h.id, new = %new.id, version = new.version, "replaced the lease");
                    if let Err(s) = ctx.broker.revoke(&h.id).await {
                        tracing::debug!(lease_id = %h.id, error = %describe(&s), "could not revoke the replaced lease (it expires on its own)");
                    }
                    held = Some(new);
                }
                Err(LeaseFailure::Broker(Failure::Refused, m))
                    if ctx.on_revoked == OnRevoked::Delete =>
                {
                    tracing::warn!(path = %spec.path, error = %m, "lease refused; deleting the file and stopping (--on-revoked delete)");
                    ctx.delete_file(i);
                    return;
                }
                Err(e @ LeaseFailure::Write(_)) => {
                    // The broker gave the new version and it cannot be written (a template
                    // that does not fit it, a full volume): keep the current file and its
                    // lease, renewed as usual. Each renewal that reports the newer version
                    // tries it again, at most every --backoff-max. The slot says why the
                    // agent is not ready meanwhile.
                    relet = false;
                    h.next = SystemTime::now() + renew_after(h.ttl).min(ctx.backoff_max);
                    tracing::warn!(path = %spec.path, error = %e, "cannot write the newer version; keeping the current file and lease");
                    held = Some(h);
                }
                Err(e) => {
                    relet = true;
                    let wait = backoff.next_wait().min(until(h.expires));
                    tracing::warn!(path = %spec.path, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot lease the secret again; keeping the current file");
                    held = Some(h);
                    if !sleep_for(wait, &mut stop).await {
                        return;
                    }
                }
            }
            continue;
        }
        let increment = spec.ttl.unwrap_or(h.ttl);
        match ctx.broker.renew(&h.id, increment).await {
            Ok(r) => {
                backoff.reset();
                ctx.shared.metrics.renewal("ok");
                let now = SystemTime::now();
                h.ttl = Duration::from_secs(r.ttl_seconds);
                h.expires = now + h.ttl;
                h.renewable_until = unix(r.renewable_until);
                h.next = schedule(&h, now);
                tracing::debug!(path = %spec.path, lease_id = %h.id, ttl_s = r.ttl_seconds, newer = r.newer_version, "renewed");
                let (id, exp) = (h.id.clone(), h.expires);
                ctx.shared.update(i, |s| s.lease = Some((id, exp)));
                if r.newer_version {
                    tracing::info!(path = %spec.path, version = h.version, "a newer secret version exists; leasing it");
                    relet = true;
                }
                held = Some(h);
            }
            Err(status) => {
                let f = Failure::of(&status);
                ctx.shared.metrics.renewal(f.label());
                ctx.shared.metrics.failure(&format!("renew_{}", f.label()));
                if f == Failure::Refused {
                    match ctx.on_revoked {
                        OnRevoked::LeaseAgain => {
                            tracing::warn!(path = %spec.path, lease_id = %h.id, error = %describe(&status), "renewal refused; leasing again");
                            ctx.shared.update(i, |s| s.lease = None);
                            // held stays None: the loop leases at once.
                            revoked = true;
                        }
                        OnRevoked::Delete => {
                            tracing::warn!(path = %spec.path, lease_id = %h.id, error = %describe(&status), "renewal refused; deleting the file and stopping (--on-revoked delete)");
                            ctx.delete_file(i);
                            return;
                        }
                    }
                } else {
                    let wait = backoff.next_wait().min(until(h.expires));
                    tracing::warn!(path = %spec.path, lease_id = %h.id, error = %describe(&status), retry_in_ms = wait.as_millis() as u64, "cannot renew; keeping the file and retrying");
                    h.next = SystemTime::now() + wait;
                    held = Some(h);
                }
            }
        }
    }
}

/// Builds the context from the flags.
pub fn context(cli: &Cli, specs: Vec<SecretSpec>) -> Result<Arc<Ctx>, String> {
    let broker = Broker::new(cli)?;
    Ok(Arc::new(Ctx {
        shared: Arc::new(Shared::new(specs, cli.ready_file.clone())),
        broker,
        output_dir: cli.output_dir.clone(),
        on_expiry: cli.on_expiry,
        on_revoked: cli.on_revoked,
        backoff_max: cli.backoff_max,
    }))
}

/// `--once`: lease and write every secret, retrying only failures that may pass (broker
/// unreachable, token not yet valid) a few times. Returns the problems, one per secret.
pub async fn run_once(ctx: &Ctx) -> Vec<String> {
    const ATTEMPTS: usize = 5;
    let mut problems = Vec::new();
    for i in 0..ctx.shared.specs.len() {
        let spec = &ctx.shared.specs[i];
        let mut backoff = Backoff::new(ctx.backoff_max.min(Duration::from_secs(5)));
        let mut attempt = 0;
        loop {
            attempt += 1;
            match ctx.lease_and_write(i).await {
                Ok(_) => break,
                Err(LeaseFailure::Broker(Failure::Refused, m)) | Err(LeaseFailure::Write(m)) => {
                    problems.push(format!("{} -> {}: {m}", spec.path, spec.file.display()));
                    break;
                }
                Err(e) if attempt >= ATTEMPTS => {
                    problems.push(format!(
                        "{} -> {}: {e} (after {ATTEMPTS} attempts)",
                        spec.path,
                        spec.file.display()
                    ));
                    break;
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(path = %spec.path, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot lease; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(ttl: u64, renewable_for: u64) -> Held {
        let now = SystemTime::now();
        Held {
            id: "l".into(),
            version: 1,
            expires: now + Duration::from_secs(ttl),
            renewable_until: now + Duration::from_secs(renewable_for),
            ttl: Duration::from_secs(ttl),
            next: now,
        }
    }

    #[test]
    fn a_failed_write_makes_the_agent_not_ready_with_the_reason() {
        let spec =
            crate::config::parse_secret_flag("shop/db=db.conf").unwrap_or_else(|e| panic!("{e}"));
        let shared = Shared::new(vec![spec], None);
        let why = "template error at line 1: undefined password".to_string();
        shared.update(0, |s| s.failed = Some(why.clone()));
        assert_eq!(
            shared.not_ready(),
            vec![format!("db.conf: not written ({why})")]
        );
        shared.update(0, |s| {
            s.written = true;
            s.failed = None;
        });
        assert!(shared.not_ready().is_empty());
        // A newer version that cannot be written: the previous file stays, not ready.
        shared.update(0, |s| s.failed = Some(why.clone()));
        let now = shared.not_ready();
        assert_eq!(now.len(), 1);
        assert!(
            now[0].contains(&why) && now[0].contains("previous file is kept"),
            "{now:?}"
        );
        assert_eq!(shared.metrics.ready.get(), 0);
    }

    #[test]
    fn renews_about_two_thirds_through() {
        for _ in 0..1000 {
            let d = renew_after(Duration::from_secs(300));
            assert!(
                d >= Duration::from_secs(171) && d <= Duration::from_secs(231),
                "{d:?}"
            );
        }
        let h = held(300, 3600);
        assert!(can_extend(&h));
        let now = SystemTime::now();
        let at = schedule(&h, now).duration_since(now).unwrap_or_default();
        assert!(at >= Duration::from_secs(171) && at <= Duration::from_secs(231));
    }

    #[test]
    fn at_its_maximum_a_lease_is_replaced_before_it_ends() {
        let h = held(300, 305);
        assert!(!can_extend(&h));
        let now = SystemTime::now();
        let at = schedule(&h, now).duration_since(now).unwrap_or_default();
        assert!(
            at > Duration::from_secs(190) && at <= Duration::from_secs(200),
            "{at:?}"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(4));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(250) && waits[0] <= Duration::from_millis(500));
        assert!(waits[1] >= Duration::from_millis(500) && waits[1] <= Duration::from_secs(1));
        for w in &waits {
            assert!(*w <= Duration::from_secs(4));
        }
        assert!(waits[7] >= Duration::from_secs(2));
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(500));
    }
}
