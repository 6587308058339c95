//! `broker`: issues short-lived, least-privilege secret leases to workloads identified by
//! their Kubernetes ServiceAccount tokens; default deny, per-service-account policies,
//! tamper-evident audit, secrets stored under DEKs wrapped by HSM KEKs.
//!
//! Not built yet: storage, auth, policy, leases and audit arrive with the `broker` issue.
#![forbid(unsafe_code)]

pub use keyhaven_hsm as hsm;
pub use keyhaven_proto::broker::v1 as api;
