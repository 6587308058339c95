//! `hsm-tests`: end-to-end tests of Keyhaven against real SoftHSM2 tokens, and the fixture
//! they share. This library holds only test support; the tests are in `tests/`.
//!
//! Each test makes its own [`SoftHsm`] token in a temporary directory with its own
//! `SOFTHSM2_CONF`, so tests never share state. Run them with `cargo nextest` (a process per
//! test, fully parallel); under plain `cargo test` the fixture serialises the tests of one
//! binary, because SoftHSM2 reads its configuration once per process.
#![forbid(unsafe_code)]
// Test support: a fixture that cannot set up its token should fail the test loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod apiserver;
pub mod broker;
pub mod etcd;
pub mod postgres;
pub mod process;
pub mod softhsm;
pub mod tls;

pub use softhsm::SoftHsm;
