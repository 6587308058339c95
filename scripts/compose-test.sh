#!/usr/bin/env bash
# docker-compose.yml end to end on podman, without a container registry (CI, and any machine
# that cannot pull). Run as root on Debian bookworm, from anywhere:
#
#   scripts/compose-test.sh
#
# 1. Images: a Debian base made with debootstrap (cached as localhost/debian-base:bookworm), the
#    release binaries built on this host and their CycloneDX SBOMs (scripts/sbom.sh, also left
#    in the target dir as release/<binary>.cdx.json), the tools image keyhaven/keyhaven:dev and
#    the shell-less images keyhaven/<target>:dev and :<version> from deploy/Dockerfile on them,
#    and stand-ins for the upstream postgres and busybox images
#    (deploy/compose/podman.override.yml). Each image's SBOMs are checked against `cargo tree`
#    of the binary's package; the shell-less images must hold no shell, package manager or
#    interpreter (by their files, and `podman run --entrypoint /bin/sh` must fail). Each image's
#    size and file count are printed.
# 2. `podman-compose up`, one service at a time in depends_on order: podman 4.3 has no systemd
#    here to run healthchecks, and podman-compose ignores `condition: service_healthy` before
#    podman 4.6, so this script enforces each depends_on condition itself (it runs the service's
#    own healthcheck with `podman healthcheck run`).
# 3. Checks from outside, as a user would: the plugin's Status/Encrypt/Decrypt on its socket,
#    the broker's /readyz on 127.0.0.1:9465, the workload's files (value = a lease from the
#    broker, mode 0400), a new secret version reaching the file, `brokerctl audit verify`, the
#    agent revoking its leases when stopped, and no PIN/credential/token/secret value in any
#    container's log. From `podman inspect`: every container runs as a non-root user on a
#    read-only root filesystem. Faults: the broker killed (the agent keeps its last good files,
#    then gets the next version once the broker is back) and the plugin restarted (the next
#    KMS call works).
# 4. `down`: containers, volumes and network are removed, also on failure. The images stay
#    (keyhaven/*, localhost/keyhaven-postgres:dev, and the base, which is made only when
#    missing): the next run reuses their layers.
#
# No secret is ever on a command line: they are read from the volumes into files in a private
# temp dir and handed to tools as file paths (grep -f, --token-file, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_rust
need_podman
need_cargo_cyclonedx

PROJECT=keyhaven   # `name:` in docker-compose.yml
BASE_IMAGE=localhost/debian-base:bookworm
BINARIES_IMAGE=localhost/keyhaven-binaries:dev
KEYHAVEN_IMAGE=keyhaven/keyhaven:dev   # the tools image: `image:` of x-keyhaven in docker-compose.yml
POSTGRES_IMAGE=localhost/keyhaven-postgres:dev   # deploy/compose/podman.override.yml
BINS=(kms-plugin broker brokerctl broker-agent keyhaven-injector)
# The deploy/Dockerfile targets deploy/kubernetes/ runs, built as keyhaven/<target>:<version>
# (deploy-tests checks that every image a manifest names is one of these) and as
# keyhaven/<target>:dev (docker-compose.yml's long-running services run the first three). All
# are shell-less.
K8S_TARGETS=(kms-plugin broker broker-agent injector)
IMAGE_VERSION=$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "kms-plugin"))')
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

say() { printf '\033[1m==> compose-test:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1mcompose-test: FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (rootful podman: the compose file's volumes and ports)"
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] \
    || die "this host is ${VERSION_CODENAME:-not Debian}: the images are Debian bookworm and run binaries built here, linked against this host's glibc"

WORK=$(mktemp -d)
chmod 0700 "$WORK"
# Podman settings for this run only: runc (crun fails on hosts with a mixed cgroup v1/v2 layout),
# ulimits a host without systemd can grant, no journald/systemd.
cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"
# --read-only-tmpfs=false: podman's `--read-only` otherwise adds writable tmpfs at /tmp, /run
# and /var/tmp; Docker adds none. Without them a service that writes where the compose file gives
# it no tmpfs fails here as it would under `docker compose`.
compose() { "$KH_PODMAN_COMPOSE" -p "$PROJECT" -f docker-compose.yml -f deploy/compose/podman.override.yml \
    --podman-run-args=--read-only-tmpfs=false "$@"; }

project_containers() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'; }
[ -z "$(project_containers)" ] \
    || die "compose project '$PROJECT' already has containers (podman ps -a): bring it down first"

# stdin without the lines holding a secret of $WORK/secrets.txt (its empty lines left out: an
# empty pattern matches, and would hide, every line).
redact() { grep -v -F -f <(grep -v '^$' "$WORK/secrets.txt"); }

STARTED=0
cleanup() {
    local rc=$?
    set +e
    if [ "$STARTED" -eq 1 ]; then
        if [ "$rc" -ne 0 ]; then
            say "failed: the containers' state and last log lines"
            podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}} {{.Status}}' >&2
            for c in $(project_containers); do
                echo "--- podman logs $c (last 20 lines)" >&2
                podman logs --tail 20 "$c" 2>&1 | redact >&2
            done
        fi
        say "down: removing the containers, volumes and network"
        compose down -v -t 20 >/dev/null 2>&1
        # What `down` missed (e.g. a `run` container after a failure).
        for c in $(project_containers); do podman rm -f -t 5 "$c" >/dev/null 2>&1; done
        for v in $(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT"); do
            podman volume rm -f "$v" >/dev/null 2>&1
        done
        podman pod rm -f "pod_$PROJECT" >/dev/null 2>&1
        podman network rm -f "${PROJECT}_default" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
: > "$WORK/secrets.txt"

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
# The Debian mirror this machine's apt uses (one-line or deb822 sources).
debian_mirror() {
    local m
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" && $3 ~ /^bookworm$/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }')
    [ -n "$m" ] || m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ { u = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm" && u != "") { print u; exit } }')
    echo "${m:-http://deb.debian.org/debian}"
}

if podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE: cached"
else
    mirror=$(debian_mirror)
    say "base image $BASE_IMAGE: debootstrap bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    # The downloaded .debs and lists: every Containerfile runs apt-get update before installing.
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

say "release build of ${BINS[*]} (target dir $TARGET_DIR)"
cargo build --release --locked $(printf -- '--bin %s ' "${BINS[@]}")
mkdir -p "$WORK/bins"
install -s -D -m 0755 -t "$WORK/bins/out" $(printf -- "$TARGET_DIR/release/%s " "${BINS[@]}")
say "SBOMs (cargo-cyclonedx), also in $TARGET_DIR/release/<binary>.cdx.json"
scripts/sbom.sh "$WORK/bins/out/sbom" "${BINS[@]}"
cp "$WORK"/bins/out/sbom/*.cdx.json "$TARGET_DIR/release/"
tar -C "$WORK/bins" -c out | podman import -q - "$BINARIES_IMAGE" >/dev/null
rm -rf "$WORK/bins"

say "building $KEYHAVEN_IMAGE and keyhaven/{$(IFS=,; echo "${K8S_TARGETS[*]}")}:{dev,$IMAGE_VERSION} (deploy/Dockerfile on $BASE_IMAGE, with the host's binaries)"
# build_target TARGET TAG...
build_target() {
    local target=$1 tags=() t
    shift
    for t in "$@"; do tags+=(-t "$t"); done
    podman build -q -f deploy/Dockerfile --target "$target" "${tags[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg BINARIES="$BINARIES_IMAGE" . >/dev/null
}
build_target keyhaven "$KEYHAVEN_IMAGE"
for t in "${K8S_TARGETS[@]}"; do build_target "$t" "keyhaven/$t:dev" "keyhaven/$t:$IMAGE_VERSION"; done
podman rmi "$BINARIES_IMAGE" >/dev/null   # only the build needs it

# What a reviewer looks for in an image's files: a shell, a package manager, an interpreter.
SHELL_LIKE='(^|/)(sh|bash|dash|ash|zsh|busybox|apt|apt-get|dpkg|perl|python3?)$|(^|/)var/lib/dpkg/'
# image_files IMAGE: the paths of IMAGE's filesystem, one a line, into $WORK/files.txt; prints
# IMAGE's size and file count.
image_files() {
    local c
    c=$(podman create -q "$1")
    podman export "$c" | tar -t > "$WORK/files.txt"
    podman rm -f "$c" > /dev/null
    printf '%s, %s files' "$(podman image inspect "$1" --format '{{.Size}}' | awk '{ printf "%.1f MB", $1 / 1e6 }')" \
        "$(grep -vc '/$' "$WORK/files.txt")"
}
say "check: the shell-less images hold no shell, package manager or interpreter, and cannot run /bin/sh"
# Both checks find the shell where there is one: the tools image's.
about=$(image_files "$KEYHAVEN_IMAGE")
grep -Eq "$SHELL_LIKE" "$WORK/files.txt" || die "$KEYHAVEN_IMAGE: the file check finds no shell"
podman run --rm --entrypoint /bin/sh "$KEYHAVEN_IMAGE" -c true || die "$KEYHAVEN_IMAGE: /bin/sh does not run"
say "  $KEYHAVEN_IMAGE: $about (the tools image, with a shell)"
for t in "${K8S_TARGETS[@]}"; do
    image=keyhaven/$t:dev
    about=$(image_files "$image")
    if grep -E "$SHELL_LIKE" "$WORK/files.txt" > "$WORK/found.txt"; then
        die "$image holds $(tr '\n' ' ' < "$WORK/found.txt")"
    fi
    if podman run --rm --entrypoint /bin/sh "$image" -c true > /dev/null 2>&1; then
        die "$image: /bin/sh runs"
    fi
    say "  $image: $about, no shell"
done

# Each image's SBOMs, read out of the image, list every crate `cargo tree` finds in the binary's
# package graph (normal dependencies, this host's target), at the Cargo.lock version.
say "check: each image ships the SBOM of each of its binaries, listing the crates of Cargo.lock it uses"
cargo metadata --format-version 1 --locked > "$WORK/metadata.json"
for image in "$KEYHAVEN_IMAGE" $(printf -- "keyhaven/%s:dev " "${K8S_TARGETS[@]}"); do
    c=$(podman create -q "$image")
    for b in "${BINS[@]}"; do
        podman cp "$c:/usr/local/bin/$b" - > /dev/null 2>&1 || continue   # not in this image
        podman cp "$c:/usr/share/doc/keyhaven/$b.cdx.json" - 2>/dev/null | tar -x -O > "$WORK/sbom.json" \
            || { podman rm -f "$c" > /dev/null; die "$image ships $b but not /usr/share/doc/keyhaven/$b.cdx.json"; }
        pkg=$(python3 -c 'import json, sys
meta = json.load(open(sys.argv[1]))
print(next(p["name"] for p in meta["packages"] for t in p["targets"] if t["name"] == sys.argv[2] and "bin" in t["kind"]))' \
            "$WORK/metadata.json" "$b")
        cargo tree --locked -p "$pkg" -e normal --prefix none > "$WORK/tree.txt"
        python3 - "$WORK/sbom.json" "$WORK/tree.txt" "$b" "$pkg" "$image" <<'EOF' \
            || { podman rm -f "$c" > /dev/null; die "the SBOM of $b in $image"; }
import json, sys
bom_file, tree_file, binary, package, image = sys.argv[1:]
bom = json.load(open(bom_file))
listed = {(c["name"], c["version"]) for c in bom.get("components", [])}
want = set()
for line in open(tree_file):
    name, version = line.split()[:2]
    if name != package:
        want.add((name, version.lstrip("v")))
missing = sorted(want - listed)
root = bom.get("metadata", {}).get("component", {})
if bom.get("bomFormat") != "CycloneDX" or root.get("name") != binary or missing:
    sys.exit(f"{image}: {binary}.cdx.json (of {root.get('name')!r}) lacks {len(missing)} of the "
             f"{len(want)} crates of `cargo tree -p {package}`: {missing[:10]}")
print(f"  {image}: {binary}.cdx.json lists the {len(want)} crates of `cargo tree -p {package}` "
      f"({len(listed)} components)", file=sys.stderr)
EOF
    done
    podman rm -f "$c" > /dev/null
done
say "building $POSTGRES_IMAGE (deploy/compose/postgres.Containerfile)"
podman build -q -f deploy/compose/postgres.Containerfile -t "$POSTGRES_IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" . >/dev/null

# ---------------------------------------------------------------------------------------------
# Up, in depends_on order
# ---------------------------------------------------------------------------------------------
# The services in start order, each with its depends_on conditions: "svc dep:condition ...".
compose config > "$WORK/compose.yml"
"${KH_PODMAN_COMPOSE%/*}/python" - "$WORK/compose.yml" > "$WORK/order.txt" <<'EOF'
import sys, yaml
services = yaml.safe_load(open(sys.argv[1]))["services"]
def deps(s):
    d = services[s].get("depends_on") or {}
    return {k: "service_started" for k in d} if isinstance(d, list) else {k: (v or {}).get("condition", "service_started") for k, v in d.items()}
done = []
while len(done) < len(services):
    ready = sorted(s for s in services if s not in done and all(d in done for d in deps(s)))
    if not ready:
        sys.exit("depends_on has a cycle")
    for s in ready:
        print(s, *(f"{d}:{c}" for d, c in deps(s).items()))
        done.append(s)
EOF

container_of() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=io.podman.compose.service=$1" --format '{{.Names}}' | head -n 1; }

# Waits until the service's container meets the condition; fails after $2 seconds.
wait_for() {
    local svc=$1 cond=$2 timeout=$3 c t=0 state code
    c=$(container_of "$svc")
    [ -n "$c" ] || die "service $svc has no container"
    while :; do
        state=$(podman inspect "$c" --format '{{.State.Status}}')
        case "$cond" in
            service_started)
                [ "$state" = running ] && return 0 ;;
            service_healthy)
                # What podman's systemd timer would do: run the service's own healthcheck.
                if [ "$state" = running ] && podman healthcheck run "$c" >/dev/null 2>&1; then return 0; fi ;;
            service_completed_successfully)
                if [ "$state" = exited ]; then
                    code=$(podman inspect "$c" --format '{{.State.ExitCode}}')
                    [ "$code" -eq 0 ] && return 0
                    die "service $svc exited with $code"
                fi ;;
            *) die "service $svc: unknown depends_on condition $cond" ;;
        esac
        [ "$t" -lt "$timeout" ] || die "service $svc: not $cond after ${timeout}s (state $state)"
        sleep 2; t=$((t + 2))
    done
}

STARTED=1
UP_START=$SECONDS
while read -r -u 3 svc deps; do
    for d in $deps; do
        say "$svc waits for ${d%%:*} (${d#*:})"
        wait_for "${d%%:*}" "${d#*:}" 180
    done
    say "up: $svc"
    compose up -d --no-build --no-deps "$svc" < /dev/null > "$WORK/up.log" 2>&1 \
        || { grep -v 'systemd' "$WORK/up.log" >&2; die "podman-compose up $svc"; }
done 3< "$WORK/order.txt"
wait_for workload service_started 60
# The services nothing waits for are healthy too (the kms-plugin's healthcheck is `kms-plugin
# probe`, in its container).
while read -r -u 3 svc _; do
    c=$(container_of "$svc")
    if [ -n "$(podman inspect "$c" --format '{{if .Config.Healthcheck}}yes{{end}}')" ] \
       && [ "$(podman inspect "$c" --format '{{.State.Status}}')" = running ]; then
        wait_for "$svc" service_healthy 60
    fi
done 3< "$WORK/order.txt"
say "up: $(project_containers | wc -l) containers, every one ready $((SECONDS - UP_START)) s after the first \`up\`"

# The real and effective uids of every process in the PID namespace of host process $1 (the
# images have no ps(1) for `podman top`): read from the host's /proc.
namespace_uids() {
    local ns p
    ns=$(readlink "/proc/$1/ns/pid")
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/ns/pid" 2>/dev/null)" = "$ns" ] || continue
        awk '/^Uid:/ { print $2; print $3 }' "$p/status" 2>/dev/null
    done | sort -u | tr '\n' ' '
}
say "check: every container runs as a non-root user on a read-only root filesystem (podman inspect)"
for c in $(project_containers); do
    read -r ro user state pid < <(podman inspect "$c" --format '{{.HostConfig.ReadonlyRootfs}} {{if .Config.User}}{{.Config.User}}{{else}}root{{end}} {{.State.Status}} {{.State.Pid}}')
    [ "$ro" = true ] || die "container $c: the root filesystem is writable (HostConfig.ReadonlyRootfs $ro)"
    if [ "$state" = running ]; then
        # What runs, not what was asked for: postgres' entrypoint starts as root and drops to
        # its own user. Every process of the container, by the uid it runs as.
        uids=$(namespace_uids "$pid")
        [ -n "$uids" ] || die "container $c: no process found in its PID namespace"
        case " $uids" in *" 0 "*) die "container $c: a process runs as root (uids: $uids)" ;; esac
        say "  $c: read-only root filesystem, processes as uid $uids"
    else
        # A one-shot that has finished: the user it ran as.
        case "${user%%:*}" in root|0|"") die "container $c ($state): ran as root" ;; esac
        say "  $c ($state): read-only root filesystem, ran as $user"
    fi
done

# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
volume_dir() { podman volume inspect "${PROJECT}_$1" --format '{{.Mountpoint}}'; }
BROKERCTL="$TARGET_DIR/release/brokerctl"
CA="$(volume_dir ca)/ca.pem"
TOKEN="$(volume_dir workload-token)/token"
BOOTSTRAP="$(volume_dir bootstrap)/credential"
admin() { "$BROKERCTL" --addr https://127.0.0.1:8443 --ca-file "$CA" --bootstrap-file "$BOOTSTRAP" "$@"; }
as_workload() { "$BROKERCTL" --addr https://127.0.0.1:8443 --ca-file "$CA" --token-file "$TOKEN" "$@"; }
AGENT=$(container_of workload-agent)
WORKLOAD=$(container_of workload)

# Every secret of the demo, one a line, for the log scan (from the volumes, never on argv).
collect_secrets() {
    local f
    for f in "$(volume_dir hsm-pins)/user.pin" "$(volume_dir hsm-pins)/so.pin" "$BOOTSTRAP" \
             "$(volume_dir db-credentials)/password" "$TOKEN" "$(volume_dir broker-tls)/server-key.pem"; do
        [ -s "$f" ] || die "expected secret file $f is missing or empty"
        if [ "${f##*.}" = pem ]; then
            grep -v -e '-----' "$f" >> "$WORK/secrets.txt"   # the key's base64 lines
        else
            cat "$f" >> "$WORK/secrets.txt"; echo >> "$WORK/secrets.txt"
        fi
    done
}
collect_secrets

say "check: kms-plugin Status/Encrypt/Decrypt on its socket, from the host (as the kube-apiserver)"
"$TARGET_DIR/release/kms-plugin" probe --listen "unix://$(volume_dir kms-socket)/kms.sock"

say "check: broker /readyz on 127.0.0.1:9465"
readyz() {
    exec 3<>/dev/tcp/127.0.0.1/9465 || return 1
    printf 'GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    tr -d '\r' <&3 > "$WORK/readyz"
    exec 3<&-
    head -n 1 "$WORK/readyz" | grep -q '^HTTP/1\.[01] 200 '
}
# A probe of the database or the HSM that times out (2 s) on a loaded machine makes /readyz 503
# until the next good probe (2 s later): give it a few tries, and show each refusal's reason.
t=0
until readyz; do
    say "  /readyz: $(head -n 1 "$WORK/readyz") $(sed '1,/^$/d' "$WORK/readyz" | head -c 300)"
    [ "$t" -lt 20 ] || die "/readyz did not answer 200 within 20 s"
    sleep 2; t=$((t + 2))
done
status=$(head -n 1 "$WORK/readyz")
# Ready means the broker reached its database at postgres:5432, by the service's name: the
# glibc of its shell-less image resolves names (files, then DNS: nsswitch.conf).
say "  $status (the broker reached postgres by its service name)"

# The password of shop/db as the broker hands it to the workload's identity (a lease of our own,
# revoked at once), into $1.
leased_password() {
    as_workload -o json lease --show-values shop/db > "$WORK/lease.json"
    "${KH_PODMAN_COMPOSE%/*}/python" - "$WORK/lease.json" "$1" "$WORK/lease-id" <<'EOF'
import json, sys
lease = json.load(open(sys.argv[1]))
open(sys.argv[2], "w").write(lease["data"]["password"])
open(sys.argv[3], "w").write(lease["lease_id"])
EOF
    as_workload revoke "$(cat "$WORK/lease-id")" >/dev/null
    rm -f "$WORK/lease.json"
    cat "$1" >> "$WORK/secrets.txt"; echo >> "$WORK/secrets.txt"
}

# The workload's files, read inside the workload container (uid 10001, read-only mount).
check_files() {
    local want=$1
    [ "$(podman exec "$WORKLOAD" stat -c '%a %u' /keyhaven/secrets/db-password)" = "400 10001" ] \
        || die "db-password: mode/owner $(podman exec "$WORKLOAD" stat -c '%a %u' /keyhaven/secrets/db-password), want 400 10001"
    podman exec "$WORKLOAD" cat /keyhaven/secrets/db-password > "$WORK/file-password"
    podman exec "$WORKLOAD" cat /keyhaven/secrets/db.json > "$WORK/file-db.json"
    "${KH_PODMAN_COMPOSE%/*}/python" - "$WORK/file-db.json" "$WORK/file-password" "$want" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
raw = open(sys.argv[2]).read()
want = open(sys.argv[3]).read()
ok = doc.get("username") == "shop" and doc.get("password") == want and raw == want
sys.exit(0 if ok else 1)
EOF
}

say "check: the workload's files hold the leased value, db-password mode 0400"
leased_password "$WORK/v1"
check_files "$WORK/v1" || die "the workload's files do not hold the value the broker leases"

say "check: a new version of shop/db (compose run setup) reaches the file"
compose run --rm --no-deps setup > "$WORK/setup-run.log" 2>&1 \
    || { redact < "$WORK/setup-run.log" >&2; die "compose run setup"; }
leased_password "$WORK/v2"
cmp -s "$WORK/v1" "$WORK/v2" && die "setup did not put a new value of shop/db"
t=0
until check_files "$WORK/v2"; do
    # The agent learns of the new version when it renews, at about 2/3 of the 1 m TTL.
    [ "$t" -lt 120 ] || die "the new version did not reach the workload's files within 120 s"
    sleep 5; t=$((t + 5))
done
say "  reached the files after ~${t}s"
cp "$WORK/setup-run.log" "$WORK/setup-runs.log"

say "fault: the broker killed (podman kill): the agent keeps its last good files"
BROKER=$(container_of broker)
podman kill "$BROKER" > /dev/null
for t in 0 10; do
    sleep "$t"
    check_files "$WORK/v2" || die "the workload's files changed or went away ${t}s after the broker was killed"
done
[ "$(podman inspect "$AGENT" --format '{{.State.Status}}')" = running ] || die "the agent stopped when the broker died"
say "  the files kept their value and mode 0400 for 10 s without a broker"
t=0
until [ "$(podman inspect "$BROKER" --format '{{.State.Status}}')" = running ]; do
    if [ "$t" -ge 20 ]; then
        # podman counts `podman kill` as a stop by the user and restarts only on a crash
        # (restart: unless-stopped): start it again as a user would.
        say "  not restarted by podman after ${t}s: podman-compose up -d broker, as a user would"
        compose up -d --no-build --no-deps broker < /dev/null > "$WORK/up.log" 2>&1 \
            || { grep -v 'systemd' "$WORK/up.log" >&2; die "podman-compose up -d broker"; }
        break
    fi
    sleep 2; t=$((t + 2))
done
[ "$t" -ge 20 ] || say "  podman restarted it (restart: unless-stopped) after ~${t}s"
wait_for broker service_healthy 120
say "fault: once the broker is back, a new version reaches the agent's files"
compose run --rm --no-deps setup > "$WORK/setup-run.log" 2>&1 \
    || { redact < "$WORK/setup-run.log" >&2; die "compose run setup after the broker's restart"; }
cat "$WORK/setup-run.log" >> "$WORK/setup-runs.log"
leased_password "$WORK/v3"
cmp -s "$WORK/v2" "$WORK/v3" && die "setup did not put a new value of shop/db"
t=0
until check_files "$WORK/v3"; do
    [ "$t" -lt 150 ] || die "the agent did not recover: the new version did not reach its files within 150 s of the broker's return"
    sleep 5; t=$((t + 5))
done
say "  the agent recovered: the new version reached the files after ~${t}s"

say "fault: the kms-plugin container restarted: the next KMS call works"
PLUGIN=$(container_of kms-plugin)
podman restart -t 10 "$PLUGIN" > "$WORK/restart.log" 2>&1 \
    || { grep -v systemd "$WORK/restart.log" >&2; die "podman restart $PLUGIN"; }
plugin_ready() {
    exec 3<>/dev/tcp/127.0.0.1/9464 || return 1
    printf 'GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    head -n 1 <&3 | grep -q ' 200 '
    local rc=$?
    exec 3<&-
    return "$rc"
}
t=0
until plugin_ready 2> /dev/null; do
    [ "$t" -lt 60 ] || die "the kms-plugin is not ready 60 s after its restart"
    sleep 1; t=$((t + 1))
done
"$TARGET_DIR/release/kms-plugin" probe --listen "unix://$(volume_dir kms-socket)/kms.sock" \
    || die "the first KMS call after the plugin's restart failed"
say "  ready ~${t}s after the restart; Status/Encrypt/Decrypt answered"

say "check: brokerctl audit verify"
admin audit verify

say "check: the agent revokes its leases when stopped"
agent_leases() {
    admin -o json leases list --namespace demo --pod workload > "$WORK/leases.json"
    "${KH_PODMAN_COMPOSE%/*}/python" - "$WORK/leases.json" <<'EOF'
import json, sys
print(sum(1 for l in json.load(open(sys.argv[1])) if l["state"] == "active"))
EOF
}
before=$(agent_leases)
[ "$before" -gt 0 ] || die "the broker lists no active lease of the workload's agent"
compose stop -t 20 workload-agent >/dev/null 2>&1
[ "$(podman inspect "$AGENT" --format '{{.State.ExitCode}}')" -eq 0 ] || die "the agent did not exit 0 on SIGTERM"
after=$(agent_leases)
[ "$after" -eq 0 ] || die "$after of the agent's leases are still active after it stopped"
say "  $before active leases before, none after"

say "check: no PIN, credential, token or secret value in any container's log"
sort -u "$WORK/secrets.txt" | grep -v '^$' > "$WORK/patterns.txt"
# Each log is read into a file first: `podman logs | grep -q` fails under pipefail when grep
# stops reading at its first match (podman gets SIGPIPE), which would hide a leak.
# The scan finds what is there: the demo app prints the file it reads, so its log has the value.
podman logs "$WORKLOAD" > "$WORK/log.txt" 2>&1
grep -q -F -f "$WORK/v1" "$WORK/log.txt" \
    || die "the workload's log does not show the value it read (the log scan would see nothing)"
leaks=0
for c in $(project_containers); do
    # The demo app prints the file it reads (docker-compose.yml says so): its log may show the
    # secret's values, not the rest.
    if [ "$c" = "$WORKLOAD" ]; then
        grep -v -x -F -f "$WORK/v1" "$WORK/patterns.txt" | grep -v -x -F -f "$WORK/v2" \
            | grep -v -x -F -f "$WORK/v3" > "$WORK/patterns-app.txt" || true
        pat="$WORK/patterns-app.txt"
    else
        pat="$WORK/patterns.txt"
    fi
    podman logs "$c" > "$WORK/log.txt" 2>&1
    if grep -q -F -f "$pat" "$WORK/log.txt"; then
        say "  LEAK in the log of $c"; leaks=$((leaks + 1))
    fi
done
grep -q -F -f "$WORK/patterns.txt" "$WORK/setup-runs.log" && { say "  LEAK in the log of compose run setup"; leaks=$((leaks + 1)); }
[ "$leaks" -eq 0 ] || die "secrets in $leaks container logs"
say "  $(wc -l < "$WORK/patterns.txt") secret values, none in $(project_containers | wc -l) container logs"

say "down"
compose down -v -t 20 > "$WORK/down.log" 2>&1 || { tail -n 20 "$WORK/down.log" >&2; die "podman-compose down"; }
[ -z "$(project_containers)" ] || die "containers left after down: $(project_containers | tr '\n' ' ')"
[ -z "$(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT")" ] || die "volumes left after down"
! podman network exists "${PROJECT}_default" || die "network ${PROJECT}_default left after down"
STARTED=0
say "all checks passed"
