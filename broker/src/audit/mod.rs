//! The audit log: the record types, chain and verification live in `keyhaven-broker-core`
//! (shared with `brokerctl`); the database-backed group-commit writer is the server's own.

pub use keyhaven_broker_core::audit::*;

pub mod writer;
