//! `kms-plugin`: the Kubernetes KMS v2 encryption provider. A gRPC server on a Unix socket
//! that envelope-encrypts the kube-apiserver's DEK seeds with KEKs held in a PKCS#11 HSM
//! (through `keyhaven-hsm`), plus operator subcommands for key rotation.
//!
//! Not built yet: the server and the key subcommands arrive with the `kms-plugin` issue.
#![forbid(unsafe_code)]

pub use keyhaven_hsm as hsm;
pub use keyhaven_proto::kms::v2 as api;
