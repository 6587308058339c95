#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target in fuzz/ for SECONDS each (default 60), one after another,
# each in one process (libFuzzer's default: no -jobs), then minimises its corpus
# (cargo fuzz cmin) so what is committed stays small.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz --locked). A crash stops
# the script with the reproducer under fuzz/artifacts/TARGET/; replay it with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# The committed corpora are also replayed on stable by hsm-tests/tests/fuzz_corpus.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi
for t in "${targets[@]}"; do
    echo "== $t: ${seconds}s"
    mkdir -p "fuzz/corpus/$t"
    cargo +nightly fuzz run --all-features "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048
    cargo +nightly fuzz cmin --all-features "$t" "fuzz/corpus/$t" -- -max_len=8192
done
