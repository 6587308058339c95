//! `hsm-tests`: end-to-end tests of Keyhaven against real SoftHSM2 tokens, and the support
//! only they use. The tests are in `tests/`; the parts they stand up (tokens, PostgreSQL,
//! etcd, the dev PKI, child processes) come from `testkit`.
//!
//! Each test makes its own `testkit::softhsm::SoftHsm` token in a temporary directory with its
//! own `SOFTHSM2_CONF`, so tests never share state. Run them with `cargo nextest` (a process
//! per test, fully parallel); under plain `cargo test` the token serialises the tests of one
//! binary, because SoftHSM2 reads its configuration once per process.
//!
//! Here: the `kms-plugin` and `broker` processes as the tests drive them ([`process`],
//! [`broker`]), panicking shorthands for the kit's process helpers, and a small apiserver over
//! etcd ([`apiserver`]), and a pod / service-account watch server ([`kube_watch`]).
#![forbid(unsafe_code)]
// Test support: a fixture that cannot set up its part should fail the test loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod apiserver;
pub mod broker;
pub mod broker_client;
pub mod kube_watch;
pub mod process;
