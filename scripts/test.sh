#!/usr/bin/env bash
# The whole Keyhaven test suite (the README's second command).
# Installs what the tests need when run as root on Debian/Ubuntu; otherwise says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_rust
need_softhsm
need_postgres
need_etcd

# End-to-end tests start our real binaries (kms-plugin, ...): build them first.
cargo build --workspace --bins

if cargo nextest --version >/dev/null 2>&1; then
    # A process per test: every test gets its own SoftHSM2 token and runs in parallel.
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    kh_say "cargo-nextest not found; using cargo test (HSM tests of one binary then run one at a time)."
    kh_say "For the faster parallel run: cargo install cargo-nextest --locked"
    exec cargo test --workspace --no-fail-fast "$@"
fi
