#!/usr/bin/env bash
# A CycloneDX SBOM (JSON, spec 1.5) per shipped binary, from the Cargo metadata, with
# cargo-cyclonedx (scripts/deps.sh: need_cargo_cyclonedx). Writes OUT_DIR/<binary>.cdx.json:
#
#   scripts/sbom.sh OUT_DIR [BINARY...]     # default: the five binaries the images ship
#
# Each SBOM lists the crates of the binary's package graph for this host's target, without
# build-dependencies. cargo-cyclonedx resolves features for the whole workspace (as
# `cargo metadata` does), so an SBOM may list a few crates more than `cargo tree -p` of that
# package alone: never fewer. deploy/Dockerfile runs this in its build stage;
# scripts/compose-test.sh runs it on the host and checks the SBOMs in the images.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [BINARY...]" >&2; exit 2; }
out=$1; shift
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(kms-plugin broker brokerctl broker-agent keyhaven-injector)
cd "$(dirname "$0")/.."
mkdir -p "$out"
# cargo-cyclonedx writes <package dir>/<binary>_bin.cdx.json for every binary of the workspace.
cargo cyclonedx --quiet --describe binaries --format json --spec-version 1.5 --no-build-deps
trap 'rm -f ./*/*_bin.cdx.json' EXIT
for b in "${bins[@]}"; do
    f=$(ls ./*/"${b}_bin.cdx.json" 2>/dev/null | head -n 1)
    [ -n "$f" ] || { echo "sbom.sh: cargo-cyclonedx wrote no SBOM for $b" >&2; exit 1; }
    mv "$f" "$out/$b.cdx.json"
done
