#!/usr/bin/env bash
# broker-agent footprint: resident memory and CPU of one agent holding ten leased secrets,
# against a real broker (release builds, SoftHSM2, SQLite, TLS), over an idle window.
#   bench/agent-footprint.sh [--duration 60] [--ttl 30s] [--debug]
# Targets (issue 5): RSS < 15 MiB, near-zero CPU while idle. For scale, the same run measures
# the RSS of /bin/sleep (the smallest process on this machine) as a baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_rust
need_softhsm

DURATION=60
TTL=30s
PROFILE=release
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift 2 ;;
        --ttl) TTL=$2; shift 2 ;;
        --debug) PROFILE=debug; shift ;;
        *) echo "usage: $0 [--duration SECONDS] [--ttl 30s] [--debug]" >&2; exit 2 ;;
    esac
done

if [ "$PROFILE" = release ]; then
    cargo build -q --release -p broker-agent -p keyhaven-broker -p kms-plugin
else
    cargo build -q -p broker-agent -p keyhaven-broker -p kms-plugin
fi
BIN="${CARGO_TARGET_DIR:-$PWD/target}/$PROFILE"

W=$(mktemp -d)
PIDS=()
cleanup() {
    local i
    for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null || true; wait "${PIDS[$i]}" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000)); }

export SOFTHSM2_CONF="$W/softhsm2.conf"
mkdir -p "$W/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$W" > "$SOFTHSM2_CONF"
export KEYHAVEN_PKCS11_MODULE="$(kh_softhsm_module)" KEYHAVEN_TOKEN_LABEL=bench KEYHAVEN_PIN_FILE="$W/user.pin" KEYHAVEN_LOG=warn
( umask 077; echo 1234-bench-user > "$W/user.pin"; echo 5678-bench-so > "$W/so.pin"; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/bootstrap" )
"$BIN/kms-plugin" token init --token-label bench --so-pin-file "$W/so.pin" --pin-file "$W/user.pin" >/dev/null
"$BIN/brokerctl" keys init >/dev/null 2>&1
"$BIN/brokerctl" dev-ca --out "$W/pki" >/dev/null 2>&1

PORT=$(free_port)
"$BIN/broker" --listen "127.0.0.1:$PORT" --database-url "sqlite://$W/broker.db" \
    --tls-cert "$W/pki/server.pem" --tls-key "$W/pki/server-key.pem" \
    --dev --dev-key "$W/dev.pem" --bootstrap-file "$W/bootstrap" 2> "$W/broker.log" &
PIDS+=($!)
export KEYHAVEN_BROKER_ADDR="https://localhost:$PORT" KEYHAVEN_BROKER_CA="$W/pki/ca.pem"
for _ in $(seq 1 150); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
ctl() { "$BIN/brokerctl" --bootstrap-file "$W/bootstrap" "$@"; }

cat > "$W/policy.yaml" <<EOF
policies:
- name: bench
  subjects: [{namespace: bench, serviceaccount: app}]
  paths: ["bench/*"]
  capabilities: [read]
  ttl: $TTL
  max_ttl: 24h
EOF
ctl policy apply -f "$W/policy.yaml" >/dev/null
ARGS=()
for i in $(seq 1 10); do
    printf '{"username": "user-%d", "password": "%s"}' "$i" "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
        | ctl secrets put "bench/s$i" --from-json - >/dev/null
    ARGS+=(--secret "bench/s$i=s$i.json")
done
"$BIN/brokerctl" dev-token --namespace bench --serviceaccount app --pod app-0 --ttl 24h --dev-key "$W/dev.pem" > "$W/token" 2>/dev/null

MPORT=$(free_port)
"$BIN/broker-agent" --broker-addr "https://localhost:$PORT" --ca-file "$W/pki/ca.pem" \
    --token-file "$W/token" --output-dir "$W/out" --ready-file "$W/ready" \
    --metrics-addr "127.0.0.1:$MPORT" "${ARGS[@]}" 2> "$W/agent.log" &
AGENT=$!
PIDS+=($AGENT)
for _ in $(seq 1 150); do [ -e "$W/ready" ] && break; sleep 0.2; done
[ -e "$W/ready" ] || { cat "$W/agent.log" >&2; echo "the agent did not become ready" >&2; exit 1; }
sleep 2

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
threads() { awk '/^Threads:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
renewals() {
    (exec 3<>"/dev/tcp/127.0.0.1/$MPORT" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3) 2>/dev/null \
        | awk '/^keyhaven_agent_renewals_total\{outcome="ok"\}/ {print $2}' | head -1
}
TICKS=$(getconf CLK_TCK)

sleep 3600 & SLEEP=$!
PIDS+=($SLEEP)
sleep 0.2
BASE_RSS=$(rss_kib "$SLEEP")

echo "broker-agent footprint ($PROFILE build, 10 leased secrets, lease TTL $TTL, idle window ${DURATION}s)"
C0=$(cpu_ticks "$AGENT"); R0=$(renewals); T0=$(date +%s.%N)
sleep "$DURATION"
C1=$(cpu_ticks "$AGENT"); R1=$(renewals); T1=$(date +%s.%N)
RSS=$(rss_kib "$AGENT"); HWM=$(hwm_kib "$AGENT")
FILES=$(ls "$W/out" | wc -l)

awk -v rss="$RSS" -v hwm="$HWM" -v base="$BASE_RSS" -v c0="$C0" -v c1="$C1" -v hz="$TICKS" \
    -v t0="$T0" -v t1="$T1" -v r0="${R0:-0}" -v r1="${R1:-0}" -v files="$FILES" -v thr="$(threads "$AGENT")" 'BEGIN {
    cpu = (c1 - c0) / hz; wall = t1 - t0;
    printf "  files written            %d\n", files;
    printf "  threads                  %d\n", thr;
    printf "  resident memory (RSS)    %.1f MiB   (peak %.1f MiB; /bin/sleep baseline %.1f MiB; ratio %.1fx)\n", rss/1024, hwm/1024, base/1024, rss/base;
    printf "  CPU while idle           %.3f s over %.0f s = %.3f%% of one core (%d renewals in the window)\n", cpu, wall, 100*cpu/wall, r1 - r0;
    printf "  target RSS < 15 MiB      %s\n", (hwm/1024 < 15) ? "PASS" : "MISS";
    printf "  target CPU near zero     %s (< 0.5%% of one core)\n", (100*cpu/wall < 0.5) ? "PASS" : "MISS";
}'
