#!/usr/bin/env bash
# Keyhaven quickstart (the README's first command), on embedded defaults: a dev SoftHSM2 token
# under .keyhaven-dev/, the KMS v2 plugin on a Unix socket, the broker on SQLite with TLS from a
# generated dev CA, the broker-agent sidecar writing a leased secret to a file, and a dynamic
# PostgreSQL credential (a throwaway cluster: PostgreSQL is installed when missing).
#   scripts/quickstart.sh        runs the demo, then keeps everything up until Ctrl-C
#   scripts/quickstart.sh --ci   non-interactive: runs the demo, stops everything, exits 0 if all went well
# Ports (override with the environment): broker 8443, plugin metrics 9464, broker metrics 9465,
# agent metrics 9466.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_rust
need_softhsm

CI_MODE=0
[ "${1:-}" = "--ci" ] && CI_MODE=1

DEV="$PWD/.keyhaven-dev"
PLUGIN_METRICS="${KEYHAVEN_DEMO_METRICS_PORT:-9464}"
BROKER_PORT="${KEYHAVEN_DEMO_BROKER_PORT:-8443}"
BROKER_METRICS="${KEYHAVEN_DEMO_BROKER_METRICS_PORT:-9465}"
AGENT_METRICS="${KEYHAVEN_DEMO_AGENT_METRICS_PORT:-9466}"
SOCK="$DEV/kms.sock"
OUT="$DEV/secrets"

# Started processes, stopped in reverse order (the agent first, so it can still revoke its
# leases at the broker).
PIDS=()
cleanup() {
    local i
    for ((i=${#PIDS[@]}-1; i>=0; i--)); do
        local p="${PIDS[$i]}"
        if kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
    PIDS=()
    return 0
}
trap cleanup EXIT
trap 'echo; kh_say "stopping (Ctrl-C): the agent revokes its leases, then the broker and the plugin stop"; cleanup; exit 0' INT TERM

fail() { kh_say "FAILED: $*"; for f in "$DEV"/*.log; do echo "--- $f"; tail -n 20 "$f"; done >&2; exit 1; }
# GET http://127.0.0.1:$1$2 without curl: prints the body, returns non-zero unless 200.
http_get() {
    local resp
    resp=$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$2" >&3 && cat <&3) 2>/dev/null) || return 1
    printf '%s' "${resp#*$'\r\n\r\n'}"
    [[ "$resp" == "HTTP/1."?" 200"* ]]
}
# wait_until <seconds> <description> <command...>
wait_until() {
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || fail "timed out waiting for $what"
        sleep 0.2
    done
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
indent() { sed 's/^/    /'; }

kh_say "building (cargo build --workspace --bins)"
cargo build -q --workspace --bins
BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug"

for p in "$PLUGIN_METRICS" "$BROKER_PORT" "$BROKER_METRICS" "$AGENT_METRICS"; do
    port_free "$p" || fail "port $p on 127.0.0.1 is in use (another quickstart still running?); set KEYHAVEN_DEMO_*_PORT"
done

mkdir -p "$DEV/tokens"
chmod 700 "$DEV"
rm -rf "$OUT" "$DEV/ready"
export SOFTHSM2_CONF="$DEV/softhsm2.conf"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$DEV" > "$SOFTHSM2_CONF"
export KEYHAVEN_PKCS11_MODULE="$(kh_softhsm_module)"
export KEYHAVEN_TOKEN_LABEL=keyhaven-dev
export KEYHAVEN_PIN_FILE="$DEV/user.pin"
export KEYHAVEN_LOG=warn

secret_file() { # secret_file <path>: 32 random hex characters, 0600
    [ -s "$1" ] || ( umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$1" )
}
secret_file "$DEV/user.pin"
secret_file "$DEV/so.pin"
secret_file "$DEV/bootstrap"

if ! "$BIN/kms-plugin" keys list >/dev/null 2>&1; then
    kh_say "1. creating the dev HSM token 'keyhaven-dev' (SoftHSM2, in $DEV/tokens; PINs in 0600 files)"
    "$BIN/kms-plugin" token init --token-label keyhaven-dev \
        --so-pin-file "$DEV/so.pin" --pin-file "$DEV/user.pin"
else
    kh_say "1. using the dev HSM token 'keyhaven-dev' in $DEV/tokens"
fi

kh_say "2. key-encryption keys live inside the HSM and never leave it: one for the KMS plugin, one for the broker"
"$BIN/kms-plugin" keys init | indent
"$BIN/brokerctl" keys init 2>&1 | indent

kh_say "3. starting the KMS v2 plugin on unix://$SOCK (metrics on 127.0.0.1:$PLUGIN_METRICS)"
"$BIN/kms-plugin" serve --listen "unix://$SOCK" --metrics-addr "127.0.0.1:$PLUGIN_METRICS" \
    --rescan-interval 2s --self-test-interval 2s 2> "$DEV/kms-plugin.log" &
PLUGIN_PID=$!
PIDS+=("$PLUGIN_PID")
wait_until 20 "the plugin's socket" test -S "$SOCK"

kh_say "4. what the kube-apiserver does: Status, Encrypt a DEK seed, Decrypt it"
"$BIN/kms-plugin" probe --listen "unix://$SOCK" | indent

kh_say "5. a dev CA and TLS certificates for the broker (demo only), then the broker on SQLite"
[ -s "$DEV/pki/ca.pem" ] || "$BIN/brokerctl" dev-ca --out "$DEV/pki" 2>/dev/null | indent
"$BIN/broker" --listen "127.0.0.1:$BROKER_PORT" \
    --database-url "sqlite://$DEV/broker.db" \
    --tls-cert "$DEV/pki/server.pem" --tls-key "$DEV/pki/server-key.pem" \
    --dev --dev-key "$DEV/dev-issuer.pem" \
    --bootstrap-file "$DEV/bootstrap" --audit-file "$DEV/audit.jsonl" \
    --metrics-addr "127.0.0.1:$BROKER_METRICS" 2> "$DEV/broker.log" &
PIDS+=($!)
wait_until 30 "the broker to be ready" http_get "$BROKER_METRICS" /readyz
echo "    broker on https://127.0.0.1:$BROKER_PORT (dev mode: it trusts tokens minted by 'brokerctl dev-token')"

# brokerctl as the operator (bootstrap credential) and as the workload (its token).
export KEYHAVEN_BROKER_ADDR="https://localhost:$BROKER_PORT"
export KEYHAVEN_BROKER_CA="$DEV/pki/ca.pem"
admin() { "$BIN/brokerctl" --bootstrap-file "$DEV/bootstrap" "$@"; }

kh_say "6. a policy: service account demo/web may read demo/* in leases of 6s, renewable up to 1h"
cat > "$DEV/policy.yaml" <<'EOF'
policies:
- name: demo-web
  subjects: [{namespace: demo, serviceaccount: web}]
  paths: ["demo/*"]
  capabilities: [read]
  ttl: 6s
  max_ttl: 1h
EOF
admin policy apply -f "$DEV/policy.yaml" | indent
echo '{"username": "app", "password": "correct-horse-1"}' | admin secrets put demo/db --from-json - | indent

kh_say "7. the workload's identity: a dev ServiceAccount token for demo/web in pod web-0"
"$BIN/brokerctl" dev-token --namespace demo --serviceaccount web --pod web-0 --ttl 1h \
    --dev-key "$DEV/dev-issuer.pem" > "$DEV/token" 2>/dev/null
chmod 600 "$DEV/token"

kh_say "8. the broker-agent sidecar leases demo/db and writes it to $OUT/db.json"
KEYHAVEN_LOG=info "$BIN/broker-agent" --broker-addr "https://localhost:$BROKER_PORT" --ca-file "$DEV/pki/ca.pem" \
    --token-file "$DEV/token" --output-dir "$OUT" --secret demo/db=db.json \
    --ready-file "$DEV/ready" --metrics-addr "127.0.0.1:$AGENT_METRICS" 2> "$DEV/agent.log" &
PIDS+=($!)
wait_until 30 "the agent's ready file" test -e "$DEV/ready"
echo "    $(stat -c '%A %n' "$OUT/db.json")"
echo "    $(cat "$OUT/db.json")"

kh_say "9. the agent renews its lease at about two-thirds of the TTL (waiting for one renewal)"
renewed() { http_get "$AGENT_METRICS" /metrics | grep -Eq '^keyhaven_agent_renewals_total\{outcome="ok"\} [1-9]'; }
wait_until 30 "a renewal" renewed
admin leases list --namespace demo --pod web-0 | indent

kh_say "10. an operator updates the secret; the agent sees the new version at its next renewal and rewrites the file"
echo '{"username": "app", "password": "correct-horse-2"}' | admin secrets put demo/db --from-json - | indent
wait_until 30 "the updated file" grep -q correct-horse-2 "$OUT/db.json"
echo "    $(cat "$OUT/db.json")"

kh_say "11. default deny: the same workload asks for a path outside its policy"
if "$BIN/brokerctl" --token-file "$DEV/token" lease other-team/db > "$DEV/denied.txt" 2>&1; then
    fail "the broker leased a path outside the policy"
fi
indent < "$DEV/denied.txt"

kh_say "12. a dynamic PostgreSQL credential: a database role made for each lease, dropped when it ends"
need_postgres || fail "PostgreSQL is needed for this step (apt-get install -y postgresql)"
PSQL=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql | sort -V | tail -n 1)
secret_file "$DEV/pg-admin.pw"
rm -f "$DEV/pg.port"
"$BIN/keyhaven-dev-postgres" "$DEV/pg-admin.pw" "$DEV/pg.port" 2> "$DEV/postgres.log" &
PIDS+=($!)
wait_until 60 "the throwaway PostgreSQL" test -s "$DEV/pg.port"
echo "    a throwaway PostgreSQL on 127.0.0.1:$(cat "$DEV/pg.port"): database shop, tables orders and payroll"
# printf is a shell builtin: the admin password is on no command line.
( umask 077; printf 'postgres://keyhaven_admin:%s@127.0.0.1:%s/shop\n' \
    "$(cat "$DEV/pg-admin.pw")" "$(cat "$DEV/pg.port")" > "$DEV/pg-url" )
admin db connection put shop --url-file "$DEV/pg-url" | indent
rm -f "$DEV/pg-url"
admin db connection rotate-root shop | indent
cat > "$DEV/readonly.yaml" <<'EOF'
ttl: 1m
max_ttl: 1h
max_per_identity: 2
max_total: 10
creation: |
  CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}};
  GRANT SELECT ON orders TO {{name}};
EOF
admin db role put shop/readonly -f "$DEV/readonly.yaml" | indent
sed 's|paths: \["demo/\*"\]|paths: ["demo/*", "db/shop/readonly"]|' "$DEV/policy.yaml" > "$DEV/policy-db.yaml"
admin policy apply -f "$DEV/policy-db.yaml" | indent
echo "    a second agent (another pod of demo/web) leases db/shop/readonly into $DEV/db-secrets/pg.env"
rm -rf "$DEV/db-secrets" "$DEV/db-ready"
KEYHAVEN_LOG=info "$BIN/broker-agent" --broker-addr "https://localhost:$BROKER_PORT" --ca-file "$DEV/pki/ca.pem" \
    --token-file "$DEV/token" --output-dir "$DEV/db-secrets" --secret db/shop/readonly=pg.env \
    --ready-file "$DEV/db-ready" 2> "$DEV/agent-db.log" &
DB_AGENT=$!
PIDS+=("$DB_AGENT")
wait_until 30 "the credential's file" test -e "$DEV/db-ready"
# psql_as_lease <sql>: logs in as the app would, with the file's values (environment, not argv).
psql_as_lease() {
    ( set -a; . "$DEV/db-secrets/pg.env"; set +a
      PGPASSWORD="$PASSWORD" exec "$PSQL" -h "$HOST" -p "$PORT" -U "$USERNAME" -d "$DATABASE" \
          -X -q -t -A -v ON_ERROR_STOP=1 -c "$1" )
}
echo "    $(stat -c '%A %n' "$DEV/db-secrets/pg.env"); the role: $(sed -n 's/^USERNAME="\(.*\)"$/\1/p' "$DEV/db-secrets/pg.env")"
ITEMS=$(psql_as_lease 'SELECT item FROM orders ORDER BY id') || fail "the leased credential did not log in"
echo "    logged in with it: SELECT item FROM orders -> $(echo "$ITEMS" | paste -sd, -)"
if psql_as_lease 'SELECT * FROM payroll' > "$DEV/payroll.txt" 2>&1; then
    fail "the credential read a table it was not granted"
fi
echo "    and SELECT FROM payroll is refused: $(grep -o 'permission denied.*' "$DEV/payroll.txt")"
echo "    the pod goes away: its agent revokes the lease on exit, and the broker drops the role"
kill -TERM "$DB_AGENT"; wait "$DB_AGENT" 2>/dev/null || true
login_refused() { ! psql_as_lease 'SELECT 1' >/dev/null 2>&1; }
wait_until 30 "the role to be dropped" login_refused
echo "    logging in with it again: $( (psql_as_lease 'SELECT 1' 2>&1 || true) | grep -o 'password authentication failed.*' || true)"
admin db status | indent

kh_say "13. rotating the KMS key online (no restart): keys rotate, then SIGHUP so the plugin adopts it now"
"$BIN/kms-plugin" keys rotate | indent
kill -HUP "$PLUGIN_PID"
sleep 1
"$BIN/kms-plugin" probe --listen "unix://$SOCK" | indent
"$BIN/kms-plugin" keys list --plugin-addr "127.0.0.1:$PLUGIN_METRICS" | indent
echo "    (older KEKs stay decrypt-only until you retire them: see docs/rotation.md)"
OLD_KEY=$("$BIN/kms-plugin" keys list | awk '$1 == "decrypt-only" {print $2; exit}')
echo "    retiring $OLD_KEY is refused until etcd shows no object needs it (no etcd in this demo):"
if "$BIN/kms-plugin" keys retire "$OLD_KEY" --yes > "$DEV/retire.txt" 2>&1; then
    fail "keys retire destroyed a key without proof that nothing needs it"
fi
fold -s -w 92 < "$DEV/retire.txt" | indent

kh_say "14. keyhaven-injector, the admission webhook: the AdmissionReview it answers for a demo pod that asks"
echo "    for demo/db as db.json and as a template (the same code as the webhook, no cluster needed)"
demo_review() { # demo_review <annotations JSON>: the AdmissionReview the apiserver sends for a new pod
    cat <<JSON
{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
 "request": {"uid": "0f6c1b2e-demo", "kind": {"group": "", "version": "v1", "kind": "Pod"},
  "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "demo",
  "operation": "CREATE", "userInfo": {"username": "kubernetes-admin"}, "dryRun": false,
  "object": {"apiVersion": "v1", "kind": "Pod",
   "metadata": {"name": "web-0", "namespace": "demo", "labels": {"keyhaven.io/inject": "true"},
                "annotations": $1},
   "spec": {"serviceAccountName": "web", "securityContext": {"runAsUser": 10001},
            "containers": [{"name": "app", "image": "registry.example/web:1"}]}}}}
JSON
}
injector() { "$BIN/keyhaven-injector" mutate --agent-image keyhaven/broker-agent:0.1.0 \
    --broker-addr "https://localhost:$BROKER_PORT" "$@"; }
demo_review '{"keyhaven.io/secret-db.json": "demo/db", "keyhaven.io/secret-db.conf": "demo/db",
              "keyhaven.io/template-db.conf": "user={{ username }} password={{ password }}"}' \
    > "$DEV/review.json"
injector "$DEV/review.json" | sed -E 's/("patch": "[^"]{40})[^"]*"/\1..."/' | indent
echo "    the patch, decoded — the agent as a native sidecar, its volumes, the app's read-only mount:"
injector --patch "$DEV/review.json" | grep -E '^    "(op|path)"' | paste - - | tr -s ' \t' ' ' | indent
echo "    the injected agent's command line:"
injector --patched-pod "$DEV/review.json" | sed -n '/"command"/,/]/p' | sed '1d;$d' | indent
echo "    a typo in an annotation is refused, not ignored:"
demo_review '{"keyhaven.io/secret-db.json": "demo/db", "keyhaven.io/formt-db.json": "json"}' \
    > "$DEV/typo.json"
injector "$DEV/typo.json" | grep '"message"' | fold -s -w 92 | indent

kh_say "15. the audit log is hash-chained; verifying it"
admin audit verify | indent

kh_say "health and metrics: http://127.0.0.1:$PLUGIN_METRICS/metrics (plugin), :$BROKER_METRICS (broker), :$AGENT_METRICS (agent)"

if [ "$CI_MODE" = 1 ]; then
    cleanup
    grep -q "leases revoked on exit" "$DEV/agent.log" || fail "the agent did not revoke its leases on exit"
    kh_say "quickstart finished (non-interactive): everything stopped, the agent's leases revoked"
    exit 0
fi
kh_say "everything keeps running; try:"
echo "    KEYHAVEN_BROKER_ADDR=$KEYHAVEN_BROKER_ADDR KEYHAVEN_BROKER_CA=$KEYHAVEN_BROKER_CA \\"
echo "      $BIN/brokerctl --bootstrap-file $DEV/bootstrap secrets put demo/db --from-file password=<file>"
echo "    then watch $OUT/db.json change.  Ctrl-C stops everything."
wait "$PLUGIN_PID"
