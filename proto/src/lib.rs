//! Keyhaven's wire contracts, generated at build time from the `.proto` files beside this
//! crate: the Kubernetes KMS v2 plugin API (`v2.KeyManagementService`, which must match
//! upstream exactly) and the broker's own lease API — plus [`endpoint`], the rules every
//! broker client follows to reach it.
#![forbid(unsafe_code)]

/// Kubernetes KMS v2 (`package v2`), as the kube-apiserver calls it.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod kms {
    /// `package v2` from `kms/v2/api.proto`, and the `EncryptedObject` the apiserver
    /// stores in etcd (`kms/v2/storage.proto`, the same upstream package).
    pub mod v2 {
        tonic::include_proto!("v2");
    }
}

/// The broker API (`package keyhaven.broker.v1`).
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod broker {
    /// `package keyhaven.broker.v1` from `broker/v1/broker.proto`.
    pub mod v1 {
        tonic::include_proto!("keyhaven.broker.v1");
    }
}

pub mod endpoint;
