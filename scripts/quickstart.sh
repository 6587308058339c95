#!/usr/bin/env bash
# Keyhaven quickstart (the README's first command), on embedded defaults: a dev SoftHSM2 token
# under .keyhaven-dev/, the KMS v2 plugin on a Unix socket, and a key rotation.
#   scripts/quickstart.sh        runs the demo, then keeps the plugin up until Ctrl-C
#   scripts/quickstart.sh --ci   non-interactive: runs the demo and exits 0 if all went well
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_rust
need_softhsm

CI_MODE=0
[ "${1:-}" = "--ci" ] && CI_MODE=1

DEV="$PWD/.keyhaven-dev"
PORT="${KEYHAVEN_DEMO_METRICS_PORT:-9464}"
SOCK="$DEV/kms.sock"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    return 0
}
trap cleanup EXIT
trap 'echo; kh_say "stopping"; exit 0' INT TERM

kh_say "building (cargo build --workspace --bins)"
cargo build -q --workspace --bins
BIN="$PWD/target/debug"

mkdir -p "$DEV/tokens"
chmod 700 "$DEV"
export SOFTHSM2_CONF="$DEV/softhsm2.conf"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$DEV" > "$SOFTHSM2_CONF"
export KEYHAVEN_PKCS11_MODULE="$(kh_softhsm_module)"
export KEYHAVEN_TOKEN_LABEL=keyhaven-dev
export KEYHAVEN_PIN_FILE="$DEV/user.pin"
export KEYHAVEN_LOG=warn

if [ ! -s "$DEV/user.pin" ]; then
    ( umask 077
      head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DEV/user.pin"
      head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DEV/so.pin" )
fi
if ! "$BIN/kms-plugin" keys list >/dev/null 2>&1; then
    kh_say "1. creating the dev HSM token 'keyhaven-dev' (SoftHSM2, in $DEV/tokens; PINs in 0600 files)"
    "$BIN/kms-plugin" token init --token-label keyhaven-dev \
        --so-pin-file "$DEV/so.pin" --pin-file "$DEV/user.pin"
else
    kh_say "1. using the dev HSM token 'keyhaven-dev' in $DEV/tokens"
fi

kh_say "2. the key-encryption key lives inside the HSM and never leaves it"
"$BIN/kms-plugin" keys init

kh_say "3. starting the KMS v2 plugin on unix://$SOCK (metrics on 127.0.0.1:$PORT)"
"$BIN/kms-plugin" serve --listen "unix://$SOCK" --metrics-addr "127.0.0.1:$PORT" \
    --rescan-interval 2s --self-test-interval 2s 2> "$DEV/kms-plugin.log" &
PIDS+=($!)
for _ in $(seq 1 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { cat "$DEV/kms-plugin.log" >&2; kh_say "the plugin did not start"; exit 1; }

kh_say "4. what the kube-apiserver does: Status, Encrypt a DEK seed, Decrypt it"
"$BIN/kms-plugin" probe --listen "unix://$SOCK" | sed 's/^/    /'

kh_say "5. rotating the key online (no restart): keys rotate, then SIGHUP so the plugin adopts it now"
"$BIN/kms-plugin" keys rotate | sed 's/^/    /'
kill -HUP "${PIDS[0]}"
sleep 1
"$BIN/kms-plugin" probe --listen "unix://$SOCK" | sed 's/^/    /'
"$BIN/kms-plugin" keys list --plugin-addr "127.0.0.1:$PORT" | sed 's/^/    /'
echo "    (older KEKs stay decrypt-only until you retire them: see docs/kms-plugin.md)"

kh_say "6. health and metrics: curl http://127.0.0.1:$PORT/readyz -> $(curl -fsS "http://127.0.0.1:$PORT/readyz" 2>/dev/null || echo '(curl not installed)')"

if [ "$CI_MODE" = 1 ]; then
    kh_say "quickstart finished (non-interactive)"
    exit 0
fi
kh_say "the plugin keeps running: try '$BIN/kms-plugin probe --listen unix://$SOCK'. Ctrl-C stops everything."
wait "${PIDS[0]}"
