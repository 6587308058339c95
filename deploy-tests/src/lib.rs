//! `deploy-tests`: structural checks of the deployment files — `docker-compose.yml`,
//! `deploy/Dockerfile`, the Kubernetes manifests and the commands in `docs/operations.md` —
//! against our binaries' own `--help` and the broker's and agent's own parsers. The checks are
//! in `tests/deploy_files.rs`; they need no HSM, database or container engine, only the
//! workspace's binaries built (`cargo build --workspace --bins`).
//!
//! This library is empty: it holds no code for other crates.
#![forbid(unsafe_code)]
