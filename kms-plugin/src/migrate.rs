//! `kms-plugin keys migrate`: re-write every object of the encrypted resources through the
//! apiserver, so each is stored under the current primary key.
//!
//! A no-op update (the object as read, `PUT` back) makes the apiserver re-encrypt an object
//! whose stored key_id is stale. Lists are paginated; updates run with bounded concurrency
//! and a request rate; a conflict is re-read and retried (the conflicting write was itself a
//! write under the current key), a vanished object is skipped. With etcd access, an object
//! already under the primary is not touched, so a second run redoes only what still needs it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::Client;
use serde::Serialize;

use crate::apiserver::{ApiserverError, Resource};
use crate::etcd::Etcd;
use crate::progress::Progress;
use crate::storage::{classify, object_key, Stored};

/// Tuning of a migration.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Resource to re-write (repeatable): `secrets`, `configmaps`, or `<plural>.<group>`
    /// for any resource in the EncryptionConfiguration, custom resources included.
    #[arg(
        long = "resource",
        env = "KEYHAVEN_MIGRATE_RESOURCES",
        value_delimiter = ',',
        default_value = "secrets"
    )]
    pub resources: Vec<String>,
    /// Updates in flight at once.
    #[arg(long, env = "KEYHAVEN_MIGRATE_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,
    /// Most apiserver requests per second (lists, reads and updates together).
    #[arg(long, env = "KEYHAVEN_MIGRATE_QPS", default_value_t = 50.0)]
    pub qps: f64,
    /// Objects per list page.
    #[arg(long, env = "KEYHAVEN_MIGRATE_PAGE_SIZE", default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub page_size: u32,
}

/// What happened to one resource.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// The resource.
    pub resource: String,
    /// Objects listed.
    pub listed: u64,
    /// Re-written through the apiserver.
    pub rewritten: u64,
    /// Already under the primary key (read from etcd): left alone.
    pub already_current: u64,
    /// Gone between the list and the update.
    pub not_found: u64,
    /// Could not be re-written: `namespace/name` and why.
    pub failed: Vec<(String, String)>,
    /// Time taken.
    pub seconds: f64,
}

/// Spaces requests at most `qps` per second across every task.
#[derive(Debug)]
struct Pacer {
    next: tokio::sync::Mutex<Instant>,
    every: Duration,
}

impl Pacer {
    fn new(qps: f64) -> Pacer {
        let every = if qps.is_finite() && qps > 0.0 {
            Duration::from_secs_f64(1.0 / qps)
        } else {
            Duration::ZERO
        };
        Pacer {
            next: tokio::sync::Mutex::new(Instant::now()),
            every,
        }
    }

    async fn wait(&self) {
        if self.every.is_zero() {
            return;
        }
        let mut next = self.next.lock().await;
        let now = Instant::now();
        if *next > now {
            tokio::time::sleep_until((*next).into()).await;
        }
        *next = (*next).max(now) + self.every;
    }
}

/// One migration run over an apiserver (and, when given, etcd to skip current objects).
pub struct Migration<'a> {
    client: &'a Client,
    etcd: Option<&'a Etcd>,
    primary: &'a str,
    args: &'a MigrateArgs,
    pacer: Pacer,
    show_progress: bool,
}

impl std::fmt::Debug for Migration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("primary", &self.primary)
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

/// How often a conflicting or failing update is tried before the object counts as failed.
const ATTEMPTS: u32 = 5;

enum Outcome {
    Rewritten,
    Current,
    NotFound,
    Failed(String),
}

impl<'a> Migration<'a> {
    /// A migration that re-writes objects not yet under `primary`.
    pub fn new(
        client: &'a Client,
        etcd: Option<&'a Etcd>,
        primary: &'a str,
        args: &'a MigrateArgs,
        show_progress: bool,
    ) -> Self {
        Migration {
            client,
            etcd,
            primary,
            args,
            pacer: Pacer::new(args.qps),
            show_progress,
        }
    }

    /// Re-writes every object of `resource`.
    pub async fn run(&self, resource: &Resource) -> Result<Summary, ApiserverError> {
        let t0 = Instant::now();
        let all = resource.api(self.client, None);
        let progress = self
            .show_progress
            .then(|| Progress::new(resource.name.clone(), None));
        let summary = Mutex::new(Summary {
            resource: resource.name.clone(),
            ..Summary::default()
        });
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default().limit(self.args.page_size);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            self.pacer.wait().await;
            let page = all
                .list(&lp)
                .await
                .map_err(|source| ApiserverError::Request {
                    what: format!("listing {}", resource.name),
                    source,
                })?;
            if token.is_none() {
                if let (Some(p), Some(rest)) = (&progress, page.metadata.remaining_item_count) {
                    p.set_total(page.items.len() as u64 + u64::try_from(rest).unwrap_or(0));
                }
            }
            lock(&summary).listed += page.items.len() as u64;
            futures_util::stream::iter(page.items)
                .for_each_concurrent(self.args.concurrency as usize, |obj| {
                    let summary = &summary;
                    let progress = &progress;
                    async move {
                        let id = display_name(&obj);
                        let outcome = self.one(resource, obj).await;
                        let mut s = lock(summary);
                        match outcome {
                            Outcome::Rewritten => s.rewritten += 1,
                            Outcome::Current => s.already_current += 1,
                            Outcome::NotFound => s.not_found += 1,
                            Outcome::Failed(why) => {
                                if let Some(p) = progress {
                                    p.println(&format!("failed: {} {id}: {why}", resource.name));
                                }
                                s.failed.push((id, why));
                            }
                        }
                        drop(s);
                        if let Some(p) = progress {
                            p.inc(1);
                        }
                    }
                })
                .await;
            token = page.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        let mut s = summary.into_inner().unwrap_or_else(|p| p.into_inner());
        s.seconds = t0.elapsed().as_secs_f64();
        Ok(s)
    }

    async fn one(&self, resource: &Resource, mut obj: DynamicObject) -> Outcome {
        let Some(name) = obj.metadata.name.clone() else {
            return Outcome::Failed("object without a name".into());
        };
        let ns = obj.metadata.namespace.clone();
        if let Some(etcd) = self.etcd {
            let key = object_key(etcd.prefix(), &resource.name, ns.as_deref(), &name);
            if let Ok(Some(v)) = etcd.get(&key).await {
                if matches!(classify(&v), Stored::KmsV2 { key_id, .. } if key_id == self.primary) {
                    return Outcome::Current;
                }
            }
        }
        let api: Api<DynamicObject> = resource.api(self.client, ns.as_deref());
        let mut backoff = Duration::from_millis(100);
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            obj.types = Some(resource.type_meta());
            self.pacer.wait().await;
            match api.replace(&name, &PostParams::default(), &obj).await {
                Ok(_) => return Outcome::Rewritten,
                Err(kube::Error::Api(s)) if s.code == 404 => return Outcome::NotFound,
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Written by someone else meanwhile: read the current object and write
                    // that back.
                    self.pacer.wait().await;
                    match api.get_opt(&name).await {
                        Ok(Some(fresh)) => obj = fresh,
                        Ok(None) => return Outcome::NotFound,
                        Err(e) => last = short(&e),
                    }
                    last = format!("conflict ({last})");
                }
                Err(kube::Error::Api(s)) if s.code == 429 || s.code >= 500 => {
                    last = format!("HTTP {} {}", s.code, s.message);
                }
                Err(kube::Error::Api(s)) => {
                    return Outcome::Failed(format!("HTTP {} {}", s.code, s.message))
                }
                Err(e) => last = short(&e),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        Outcome::Failed(format!("gave up after {ATTEMPTS} attempts: {last}"))
    }
}

fn short(e: &kube::Error) -> String {
    let s = e.to_string();
    s.chars().take(300).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn display_name(o: &DynamicObject) -> String {
    let name = o.metadata.name.as_deref().unwrap_or("?");
    match &o.metadata.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

impl Summary {
    /// One line for the operator.
    pub fn line(&self) -> String {
        format!(
            "{}: {} listed, {} re-written, {} already under the primary, {} gone meanwhile, {} failed ({:.1} s)",
            self.resource,
            self.listed,
            self.rewritten,
            self.already_current,
            self.not_found,
            self.failed.len(),
            self.seconds
        )
    }
}
