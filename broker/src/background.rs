//! The loops every broker replica runs beside serving requests: KEK refresh, automatic
//! rotation and re-wrap; the policy generation, DEK cache and heartbeat watches; the reaper;
//! and, on SQLite, the write-ahead-log checkpoint. Each holds only a weak reference to the
//! broker and ends with it.

use std::sync::Arc;
use std::time::Duration;

use crate::server::ServeArgs;
use crate::service::Broker;

/// How often the broker checkpoints a SQLite write-ahead log. Often, so the checkpoint that
/// starts the log over (`Store::checkpoint_wal`) finds little left to copy and stalls the
/// writer least (bench/README.md has the measurements). An idle log makes it a no-op.
const WAL_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);

/// Spawns every loop for `broker`, configured by `args`.
pub(crate) fn spawn_all(broker: &Arc<Broker>, args: &ServeArgs) {
    // KEK refresh, automatic rotation and re-wrap: every replica runs this loop.
    {
        let b = Arc::downgrade(broker);
        let every = args.kek_refresh_interval;
        let (batch, pause) = (args.rewrap_batch_size, args.rewrap_pause);
        let workers = if broker.store().kind() == "postgres" {
            usize::from(args.rewrap_workers)
        } else {
            1
        };
        if !broker.config_auto_rotation().is_off() {
            tracing::info!(rule = %broker.config_auto_rotation().describe(), "automatic KEK rotation on");
        }
        tokio::spawn(async move {
            loop {
                let Some(b) = b.upgrade() else { return };
                if let Err(e) = b.auto_rotate().await {
                    tracing::warn!(error = %e.chain(), "automatic KEK rotation check failed");
                }
                // Each pass re-reads the KEK list (adopting a new primary) before looking for
                // work; concurrent passes take disjoint rows (SKIP LOCKED).
                let mut passes = tokio::task::JoinSet::new();
                for _ in 0..workers {
                    let b = b.clone();
                    passes.spawn(async move { b.rewrap_pass(batch, pause).await });
                }
                drop(b);
                while let Some(r) = passes.join_next().await {
                    if let Ok(Err(e)) = r {
                        tracing::warn!(error = %e.chain(), "re-wrap pass failed; it resumes at the next one");
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    // Policy generation watch, DEK cache watch and the replica heartbeat: every replica runs
    // these.
    crate::service::spawn_policy_watch(broker);
    crate::service::spawn_dek_watch(broker);
    crate::service::spawn_heartbeat(broker);
    // Dynamic database credentials: drop the roles of ended leases, reconcile.
    crate::service::spawn_db_revoker(
        Arc::downgrade(broker),
        crate::service::DB_REVOKE_EVERY,
        args.db_reconcile_interval,
    );

    // Reaper.
    {
        let b = Arc::downgrade(broker);
        let every = args.reap_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(b) = b.upgrade() else { return };
                loop {
                    match b.reap(500).await {
                        Ok(500) => continue,
                        Ok(n) => {
                            if n > 0 {
                                tracing::info!(expired = n, "reaper ended expired leases");
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reaper pass failed");
                            break;
                        }
                    }
                }
            }
        });
    }

    // SQLite: checkpoint the write-ahead log off the request path (see Store::checkpoint_wal).
    if broker.store().kind() == "sqlite" {
        let b = Arc::downgrade(broker);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(WAL_CHECKPOINT_INTERVAL).await;
                let Some(b) = b.upgrade() else { return };
                match b.store().checkpoint_wal().await {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "WAL checkpoint failed; SQLite's own checkpoint takes over until it works again");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
