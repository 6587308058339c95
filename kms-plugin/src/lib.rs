//! `kms-plugin`: the Kubernetes KMS v2 encryption provider. A gRPC server on a Unix socket
//! that envelope-encrypts the kube-apiserver's DEK seeds with KEKs held in a PKCS#11 HSM
//! (through `keyhaven-hsm`), plus the `keys` operator commands for online rotation.
//!
//! It does not cache plaintext, does not talk to the Kubernetes API, and never sees key
//! material: all cryptography on KEKs happens inside the HSM.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod plugin;
pub mod server;
pub mod socket;

pub use keyhaven_proto::kms::v2 as api;
