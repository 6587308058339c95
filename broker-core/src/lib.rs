//! `keyhaven-broker-core`: what the broker server and its operator CLI (`brokerctl`) share —
//! the workload [`identity`], the [`policy`] model and its validation, the [`audit`] record
//! with its hash chain and verification, and the dev-mode token issuer ([`dev_token`]).
//!
//! Pure logic: no database, no network, no async runtime, no HSM. The server adds storage and
//! transport around it; the CLI adds a gRPC client.
#![forbid(unsafe_code)]

pub mod audit;
pub mod bounded;
pub mod dbrole;
pub mod dev_token;
pub mod fuzz_targets;
pub mod identity;
pub mod lease_ttl;
pub mod policy;
