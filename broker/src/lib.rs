//! `broker`: issues short-lived, least-privilege secret leases to workloads identified by
//! their Kubernetes ServiceAccount tokens; default deny, per-service-account policies,
//! tamper-evident audit, secrets stored under DEKs wrapped by HSM KEKs.
//!
//! Binaries: `broker` (the server) and `brokerctl` (the operator CLI).
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
mod background;
pub mod crypto;
pub mod fuzz_targets;
pub mod grpc;
pub mod health;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod rate_limit;
pub mod server;
pub mod service;

pub use service::rotation;
pub mod store;
pub mod target_db;

pub use keyhaven_broker_core::{bounded, identity, policy};
pub use keyhaven_hsm as hsm;
pub use keyhaven_proto::broker::v1 as api;
