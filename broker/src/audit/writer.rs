//! The audit writer: group commit. Requests queue their events ([`AuditJob`]); one task writes
//! everything waiting (up to 512 jobs) in a single transaction, then appends the records to
//! the JSON-lines file in chain order, then answers each request. A request is answered only
//! after its record is durable, so "if audit cannot be written, the request fails" holds,
//! while concurrent requests share one commit instead of queueing on the chain lock one by one.
//!
//! A state change other than a lease (a policy apply, leases ended by it) is a [`Change`]: a
//! transaction the caller prepares that stores the change and its records together; the writer
//! runs it between two batches and mirrors its records to the file, so the file keeps chain
//! order.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use super::{AuditEvent, AuditRecord, JsonlSink};
use crate::store::{
    AuditAppender, LeaseFilter, LeaseRow, RenewedLease, Renewing, Store, StoreError,
};

/// Most jobs in one commit.
const MAX_BATCH: usize = 512;
/// Jobs waiting for the writer before senders wait too.
const QUEUE: usize = 8192;

/// Audit records (and possibly a new lease row, or a renewal) waiting for the writer.
#[derive(Debug)]
struct AuditJob {
    /// The records to append, in order.
    events: Vec<AuditEvent>,
    /// A lease row stored in the same transaction: it exists iff its record does.
    lease: Option<LeaseRow>,
    /// A renewal made in the same transaction: the lease is extended iff the job's last
    /// record (the renewal's) is stored; if the lease was no longer renewable, that record is
    /// replaced by the renewal's refusal.
    renewal: Option<Renewing>,
    /// The secrets generation the lease's version was read under, when it came from memory.
    generation: Option<i64>,
    /// Where the answer goes.
    reply: oneshot::Sender<Result<Committed, WriteError>>,
}

/// A transaction that stores a change and its audit records together, returning the records.
pub type Change = Pin<Box<dyn Future<Output = Result<Vec<AuditRecord>, StoreError>> + Send>>;

/// A [`Change`] waiting for the writer.
struct ChangeJob {
    change: Change,
    reply: oneshot::Sender<Result<(), ChangeError>>,
}

/// What the writer task receives. Records jobs are the hot path (one per request) and move
/// through the channel by value: boxing them to shrink the rare change variant would cost an
/// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Job {
    Records(AuditJob),
    Change(ChangeJob),
}

/// Why a [`Change`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The transaction failed: nothing was stored.
    #[error("change not stored")]
    Store(#[source] StoreError),
    /// The change and its records are stored, but the JSON-lines file could not be written.
    #[error("change stored, but the audit file could not be written")]
    File(#[source] std::io::Error),
    /// The writer task is gone (the process is shutting down): nothing was stored.
    #[error("audit writer stopped")]
    Gone,
}

/// What became of an audit job.
#[derive(Debug)]
pub enum Committed {
    /// Stored; the job's last record.
    Record(Box<AuditRecord>),
    /// Stored; the renewal's record, and the lease as renewed (`None`: it was no longer
    /// renewable, and the record is the refusal).
    Renewal(Box<AuditRecord>, Option<RenewedLease>),
    /// Nothing stored: a secret changed since the job's lease version was read.
    Stale,
}

/// Why a job was not stored. The cause is logged by the writer; callers answer UNAVAILABLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The database refused the append.
    #[error("audit log unavailable")]
    Log,
    /// The JSON-lines file could not be written (the batch's leases were ended).
    #[error("audit file unavailable")]
    File,
    /// The writer task is gone (the process is shutting down).
    #[error("audit writer stopped")]
    Gone,
    /// The writer stored the batch but has no record for this job (a bug).
    #[error("audit writer lost a record")]
    Lost,
}

/// The writer's metrics.
#[derive(Debug, Clone)]
pub struct WriterMetrics {
    /// Seconds per commit.
    pub commit_secs: Histogram,
    /// Records per commit.
    pub batch_records: Histogram,
}

/// The handle requests send their jobs to.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<Job>,
}

impl AuditWriter {
    /// Starts the writer task over `store`, appending also to `file` when it holds a sink.
    pub fn spawn(
        store: Store,
        file: Arc<Mutex<Option<JsonlSink>>>,
        metrics: WriterMetrics,
    ) -> AuditWriter {
        let (tx, rx) = mpsc::channel::<Job>(QUEUE);
        // Its own connection, and where its last append left the chain: while nobody else
        // appends (one replica), each batch goes in as one statement, without a head read.
        let appender = store.audit_appender();
        let task = Task {
            store,
            file,
            appender,
            metrics,
        };
        tokio::spawn(task.run(rx));
        AuditWriter { tx }
    }

    /// Queues `events` (and `lease`, guarded by `generation` when given) and waits until
    /// they are durable, or refused.
    pub async fn write(
        &self,
        events: Vec<AuditEvent>,
        lease: Option<LeaseRow>,
        generation: Option<i64>,
    ) -> Result<Committed, WriteError> {
        let (reply, answer) = oneshot::channel();
        let job = AuditJob {
            events,
            lease,
            renewal: None,
            generation,
            reply,
        };
        self.tx
            .send(Job::Records(job))
            .await
            .map_err(|_| WriteError::Gone)?;
        answer.await.map_err(|_| WriteError::Gone)?
    }

    /// Queues `events`, whose last is the record of `renewal`, and waits until the renewal and
    /// the records are durable together, or refused. Returns the last record stored and the
    /// lease as renewed (`None`: it was no longer renewable; the last record is then
    /// `renewal.refused`).
    pub async fn renew(
        &self,
        events: Vec<AuditEvent>,
        renewal: Renewing,
    ) -> Result<(AuditRecord, Option<RenewedLease>), WriteError> {
        let (reply, answer) = oneshot::channel();
        let job = AuditJob {
            events,
            lease: None,
            renewal: Some(renewal),
            generation: None,
            reply,
        };
        self.tx
            .send(Job::Records(job))
            .await
            .map_err(|_| WriteError::Gone)?;
        match answer.await.map_err(|_| WriteError::Gone)?? {
            Committed::Renewal(rec, lease) => Ok((*rec, lease)),
            Committed::Record(_) | Committed::Stale => Err(WriteError::Lost),
        }
    }

    /// Runs `change` (a transaction storing a change with its records) in turn with the
    /// batches, then appends its records to the JSON-lines file.
    pub async fn change(&self, change: Change) -> Result<(), ChangeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job::Change(ChangeJob { change, reply }))
            .await
            .map_err(|_| ChangeError::Gone)?;
        answer.await.map_err(|_| ChangeError::Gone)?
    }
}

struct Task {
    store: Store,
    file: Arc<Mutex<Option<JsonlSink>>>,
    appender: AuditAppender,
    metrics: WriterMetrics,
}

/// What one write of a batch of audit jobs came to.
enum Written {
    /// The append was guarded and a secret changed since: nothing stored.
    Stale,
    /// One answer per job, in order.
    Answers(Vec<Result<Committed, WriteError>>),
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(j) => j,
                None => match rx.recv().await {
                    Some(j) => j,
                    None => return,
                },
            };
            let first = match first {
                Job::Records(j) => j,
                Job::Change(c) => {
                    self.change(c).await;
                    continue;
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Job::Records(j)) => jobs.push(j),
                    // After this batch.
                    Ok(change) => {
                        next = Some(change);
                        break;
                    }
                    Err(_) => break,
                }
            }
            // Leases whose versions came from memory are guarded by the generation they were
            // read under. Versions read under an older generation than the newest here are
            // outdated already: those jobs are sent back at once.
            let newest = jobs.iter().filter_map(|j| j.generation).max();
            let (mut jobs, outdated): (Vec<_>, Vec<_>) = jobs
                .into_iter()
                .partition(|j| j.generation.is_none() || j.generation == newest);
            for j in outdated {
                let _ = j.reply.send(Ok(Committed::Stale));
            }
            loop {
                let generation = jobs.iter().filter_map(|j| j.generation).max();
                match self.write(&mut jobs, generation).await {
                    Written::Stale => {
                        // Nothing stored: the guarded jobs go back to be made again, the
                        // others are appended without the guard.
                        let (guarded, rest): (Vec<_>, Vec<_>) =
                            jobs.into_iter().partition(|j| j.generation.is_some());
                        for j in guarded {
                            let _ = j.reply.send(Ok(Committed::Stale));
                        }
                        jobs = rest;
                        if jobs.is_empty() {
                            break;
                        }
                    }
                    Written::Answers(answers) => {
                        for (j, a) in jobs.into_iter().zip(answers) {
                            let _ = j.reply.send(a);
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Runs one change, mirrors its records to the file, answers.
    async fn change(&mut self, job: ChangeJob) {
        let answer = match job.change.await {
            Err(e) => Err(ChangeError::Store(e)),
            Ok(recs) => {
                let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
                match f.as_mut() {
                    Some(sink) => match recs.iter().find_map(|r| sink.append(r).err()) {
                        Some(e) => {
                            tracing::error!(error = %e, "audit file write failed after a change was stored with its records");
                            Err(ChangeError::File(e))
                        }
                        None => Ok(()),
                    },
                    None => Ok(()),
                }
            }
        };
        let _ = job.reply.send(answer);
    }

    /// Stores `jobs` in one transaction (guarded by `generation` when given), then appends
    /// the records to the JSON-lines file in chain order. The jobs' events and lease rows are
    /// moved into the batch, and given back only when nothing was stored ([`Written::Stale`]).
    async fn write(&mut self, jobs: &mut [AuditJob], generation: Option<i64>) -> Written {
        let mut events = Vec::with_capacity(jobs.len() * 2);
        let mut leases = Vec::new();
        // Each renewal, with the index of its record (its job's last).
        let mut renewals = Vec::new();
        // Where each job's events end, and whether it brought a lease row.
        let mut ends = Vec::with_capacity(jobs.len());
        for j in jobs.iter_mut() {
            events.append(&mut j.events);
            let lease = j.lease.take();
            ends.push((events.len(), lease.is_some()));
            leases.extend(lease);
            if let Some(r) = &j.renewal {
                renewals.push((events.len().saturating_sub(1), r));
            }
        }
        self.metrics.batch_records.observe(events.len() as f64);
        let t0 = std::time::Instant::now();
        let appended = self
            .appender
            .append_renewing(&events, &leases, &renewals, generation)
            .await;
        self.metrics.commit_secs.observe(t0.elapsed().as_secs_f64());
        let (recs, renewed) = match appended {
            Ok(r) => r,
            Err(StoreError::StaleGeneration { .. }) => {
                // Each job gets its own events and lease row back, last job first.
                for (i, j) in jobs.iter_mut().enumerate().rev() {
                    j.events = events.split_off(if i == 0 { 0 } else { ends[i - 1].0 });
                    if ends[i].1 {
                        j.lease = leases.pop();
                    }
                }
                return Written::Stale;
            }
            Err(e) => {
                tracing::error!(error = %e, "audit write failed; refusing the requests");
                return Written::Answers(jobs.iter().map(|_| Err(WriteError::Log)).collect());
            }
        };
        let file_failed = {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            match f.as_mut() {
                Some(sink) => recs.iter().find_map(|r| sink.append(r).err()),
                None => None,
            }
        };
        if let Some(e) = &file_failed {
            tracing::error!(error = %e, "audit file write failed; refusing the requests");
            // The leases of this batch are stored, but their requests fail: end them, so no
            // lease exists that its holder was told it did not get.
            for l in &leases {
                if let Err(e) = self
                    .store
                    .revoke_leases(
                        &LeaseFilter::Id(l.id.clone()),
                        super::now_ms(),
                        "revoked:audit_failed",
                    )
                    .await
                {
                    tracing::error!(lease_id = %l.id, error = %e, "could not end a lease whose audit failed (it expires by its TTL)");
                }
            }
        }
        let mut renewed = renewed.into_iter();
        Written::Answers(
            jobs.iter()
                .zip(ends)
                // Each job's answer is the last record of its own events (and its renewal's
                // lease, in job order).
                .map(|(j, (end, _))| {
                    let lease = j.renewal.as_ref().map(|_| renewed.next().flatten());
                    match (&file_failed, recs.get(end.saturating_sub(1))) {
                        (None, Some(rec)) => Ok(match lease {
                            Some(l) => Committed::Renewal(Box::new(rec.clone()), l),
                            None => Committed::Record(Box::new(rec.clone())),
                        }),
                        (None, None) => Err(WriteError::Lost),
                        (Some(_), _) => Err(WriteError::File),
                    }
                })
                .collect(),
        )
    }
}
