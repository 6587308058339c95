//! `kms-plugin keys rotate --complete`: the whole rotation as one command — a new primary,
//! every plugin serving it, the apiserver writing under it, every object re-written, the
//! proof from etcd, and (with `--retire-old`) the old keys destroyed once nothing needs them.
//!
//! Every step is idempotent and the run keeps no state of its own: what is left to do is read
//! from the token and from etcd. A run that finds objects still stored under an older key of
//! this token finishes that rotation instead of starting another, so a re-run after a crash
//! (or `kill -9`) continues where the last one stopped.

use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;
use keyhaven_hsm::BlockingKeystore;

use crate::apiserver::{self, KubeArgs};
use crate::envelope;
use crate::etcd::{Etcd, EtcdArgs};
use crate::keys::{fetch_report, KeysError};
use crate::migrate::{MigrateArgs, Migration};
use crate::plugin::Keyring;
use crate::retire::{self, RetireChecks};
use crate::usage::Inventory;

/// Options of `keys rotate --complete`.
#[derive(Debug, Clone, Args)]
pub struct CompleteArgs {
    /// Retire (destroy) the older keys that the proof shows unused, with the same checks as
    /// `keys retire`.
    #[arg(long, requires = "complete")]
    pub retire_old: bool,
    /// How long to wait for every `--plugin-addr` to serve the new primary.
    #[arg(long, env = "KEYHAVEN_PLUGIN_WAIT", default_value = "2m", value_parser = humantime::parse_duration)]
    pub plugin_wait: Duration,
    /// How long to wait for the apiserver to write under the new key (it polls Status about
    /// every 60 s).
    #[arg(long, env = "KEYHAVEN_APISERVER_WAIT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub apiserver_wait: Duration,
    /// Pause between two canary writes while waiting for the apiserver.
    #[arg(long, env = "KEYHAVEN_CANARY_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub canary_interval: Duration,
}

/// The timeline printed at the end (and on failure).
#[derive(Debug, Default)]
struct Timeline {
    steps: Vec<(String, Duration, String)>,
}

impl Timeline {
    fn add(&mut self, out: &mut dyn Write, step: &str, t0: Instant, outcome: String) {
        let took = t0.elapsed();
        let _ = writeln!(out, "[{step}] {outcome} ({:.1} s)", took.as_secs_f64());
        self.steps.push((step.to_owned(), took, outcome));
    }

    fn print(&self, out: &mut dyn Write) {
        let _ = writeln!(out, "\ntimeline:");
        let total: Duration = self.steps.iter().map(|s| s.1).sum();
        for (step, took, _) in &self.steps {
            let _ = writeln!(out, "  {step:<10} {:>8.1} s", took.as_secs_f64());
        }
        let _ = writeln!(out, "  {:<10} {:>8.1} s", "total", total.as_secs_f64());
    }
}

/// Everything `rotate --complete` needs.
#[derive(Debug)]
pub struct Rotation<'a> {
    /// The token.
    pub ks: &'a BlockingKeystore,
    /// etcd access (required).
    pub etcd: &'a EtcdArgs,
    /// apiserver access.
    pub kube: &'a KubeArgs,
    /// Migration tuning.
    pub migrate: &'a MigrateArgs,
    /// Retire checks (plugin addresses double as the plugins to wait for).
    pub checks: &'a RetireChecks,
    /// This command's own options.
    pub opts: &'a CompleteArgs,
}

impl Rotation<'_> {
    /// Runs (or continues) a rotation.
    pub async fn run(&self, out: &mut dyn Write) -> Result<(), KeysError> {
        let mut timeline = Timeline::default();
        let r = self.steps(out, &mut timeline).await;
        timeline.print(out);
        r
    }

    async fn steps(&self, out: &mut dyn Write, tl: &mut Timeline) -> Result<(), KeysError> {
        if !self.etcd.configured() {
            return Err(KeysError::Refused(
                "rotate --complete proves the migration by reading etcd: give --etcd-endpoints \
                 (and --etcd-cacert/--etcd-cert/--etcd-key). Without etcd access, run \
                 `keys rotate`, `keys migrate` and `keys retire` one by one."
                    .into(),
            ));
        }
        let t0 = Instant::now();
        let etcd = Etcd::connect(self.etcd).await?;
        let client = apiserver::client(self.kube).await?;
        let mut resources = Vec::new();
        for name in &self.migrate.resources {
            resources.push(apiserver::resolve(&client, name).await?);
        }
        let ring = Keyring::from_keks(self.ks.list_keks()?);
        let before = Inventory::scan(&etcd, true).await?;
        let pending = pending_objects(&ring, &before);
        let primary = match (ring.primary(), pending) {
            (Some(p), n) if n > 0 => {
                tl.add(
                    out,
                    "rotate",
                    t0,
                    format!(
                        "continuing the rotation to {}: {n} objects still under older keys \
                         (no new key made; run again afterwards for another rotation)",
                        p.key_id
                    ),
                );
                p.key_id.clone()
            }
            _ => {
                let k = self.ks.generate_kek()?;
                let key_id = envelope::key_id(&k.id);
                tl.add(
                    out,
                    "rotate",
                    t0,
                    format!("created KEK {} — new primary key_id {key_id}", k.label),
                );
                key_id
            }
        };

        let t0 = Instant::now();
        let outcome = self.wait_plugins(&primary).await?;
        tl.add(out, "plugins", t0, outcome);

        let t0 = Instant::now();
        let deadline = Instant::now() + self.opts.apiserver_wait;
        let outcome = loop {
            let seen = apiserver::write_canary(&client, self.kube, Some(&etcd), &primary).await?;
            if seen.is_under(&primary) {
                break seen.describe();
            }
            if Instant::now() >= deadline {
                return Err(KeysError::Refused(format!(
                    "the apiserver still does not write under {primary} after {} ({}). It \
                     adopts a new key at its next Status poll (about every 60 s) once its plugin \
                     serves it: check the plugins (SIGHUP adopts at once) and that every \
                     apiserver uses them, then run this command again; it continues.",
                    humantime::format_duration(self.opts.apiserver_wait),
                    seen.describe()
                )));
            }
            tokio::time::sleep(self.opts.canary_interval).await;
        };
        tl.add(out, "apiserver", t0, outcome);

        let t0 = Instant::now();
        let migration = Migration::new(&client, Some(&etcd), &primary, self.migrate, true);
        let mut failed = 0;
        for r in &resources {
            let s = migration.run(r).await?;
            let _ = writeln!(out, "  {}", s.line());
            for (id, why) in &s.failed {
                let _ = writeln!(out, "    failed {id}: {why}");
            }
            failed += s.failed.len();
        }
        tl.add(out, "migrate", t0, format!("{failed} objects failed"));
        if failed > 0 {
            return Err(KeysError::Refused(format!(
                "{failed} objects could not be re-written (listed above): fix them and run this \
                 command again; it continues"
            )));
        }

        let t0 = Instant::now();
        let after = Inventory::scan(&etcd, true).await?;
        let ring = Keyring::from_keks(self.ks.list_keks()?);
        let left = pending_objects(&ring, &after);
        let old: Vec<(String, u64)> = ring
            .keys
            .iter()
            .filter(|k| k.key_id != primary)
            .map(|k| (k.key_id.clone(), after.objects_under(&k.key_id)))
            .collect();
        tl.add(
            out,
            "prove",
            t0,
            format!(
                "etcd revision {}: {left} objects under older keys of this token, {} under {primary}",
                after.stats.revision,
                after.objects_under(&primary)
            ),
        );
        if left > 0 {
            return Err(KeysError::Refused(format!(
                "{left} objects are still stored under older keys (written meanwhile by an \
                 apiserver that had not adopted {primary}?): run this command again"
            )));
        }
        if !self.opts.retire_old {
            let _ = writeln!(
                out,
                "older keys now unused: {} — retire them with `kms-plugin keys retire KEY_ID --yes` \
                 (or run again with --retire-old)",
                if old.is_empty() { "none".into() } else { old.iter().map(|k| k.0.as_str()).collect::<Vec<_>>().join(", ") }
            );
            return Ok(());
        }
        let t0 = Instant::now();
        let mut retired = 0;
        for (key_id, _) in &old {
            retire::check(&ring, key_id, self.checks, Some(&etcd), Some(&after)).await?;
            let line = retire::destroy(self.ks, &ring, key_id)?;
            let _ = writeln!(out, "  {line}");
            retired += 1;
        }
        let _ = writeln!(out, "{}", retire::BACKUP_NOTE);
        tl.add(out, "retire", t0, format!("{retired} older keys destroyed"));
        Ok(())
    }

    async fn wait_plugins(&self, primary: &str) -> Result<String, KeysError> {
        if self.checks.plugin_addrs.is_empty() {
            return Ok(
                "no --plugin-addr given: not waiting for plugins (they adopt the key within \
                 their rescan interval, 10 s by default)"
                    .into(),
            );
        }
        let deadline = Instant::now() + self.opts.plugin_wait;
        for addr in &self.checks.plugin_addrs {
            loop {
                let seen = fetch_report(addr).ok().and_then(|r| r.primary);
                if seen.as_deref() == Some(primary) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(KeysError::Refused(format!(
                        "the plugin at {addr} does not serve {primary} after {} (it serves {}): \
                         send it SIGHUP, or check it uses this token; then run again",
                        humantime::format_duration(self.opts.plugin_wait),
                        seen.as_deref().unwrap_or("nothing / unreachable")
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(format!(
            "{} plugin(s) serve {primary}",
            self.checks.plugin_addrs.len()
        ))
    }
}

/// Objects stored under this token's keys other than the primary.
fn pending_objects(ring: &Keyring, inv: &Inventory) -> u64 {
    let primary = ring.primary().map(|k| k.key_id.as_str());
    ring.keys
        .iter()
        .filter(|k| Some(k.key_id.as_str()) != primary)
        .map(|k| inv.objects_under(&k.key_id))
        .sum()
}
