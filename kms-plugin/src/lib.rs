//! `kms-plugin`: the Kubernetes KMS v2 encryption provider. A gRPC server on a Unix socket
//! that envelope-encrypts the kube-apiserver's DEK seeds with KEKs held in a PKCS#11 HSM
//! (through `keyhaven-hsm`), plus the `keys` operator commands for online rotation.
//!
//! The server does not cache plaintext, does not talk to the Kubernetes API, and never sees
//! key material: all cryptography on KEKs happens inside the HSM. Only the operator commands
//! that finish a rotation read etcd (`keys usage`, `keys retire`) and write through the
//! apiserver (`keys migrate`, `keys rotate --complete`).
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod cli;
pub mod client;
pub mod envelope;
pub mod error;
pub mod etcd;
pub mod fuzz_targets;
pub mod health;
pub mod http;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod migrate;
pub mod plugin;
pub mod progress;
pub mod retire;
pub mod rotation;
pub mod server;
pub mod socket;
pub mod storage;
pub mod usage;

pub use keyhaven_proto::kms::v2 as api;
