# Shared by the README's two commands and CI: make sure what Keyhaven needs is installed.
# On Debian/Ubuntu as root it installs missing packages; otherwise it says exactly what to run.
# Source it; then call the need_* functions.

kh_say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

kh_apt_install() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        kh_say "missing: $* — install with: sudo apt-get install -y $*"
        return 1
    fi
    kh_say "installing $* (apt-get)"
    if [ -z "${KH_APT_UPDATED:-}" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        KH_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        kh_say "missing: a Rust toolchain (cargo). Install it from https://rustup.rs, then re-run."
        return 1
    fi
    # Our own protos build with protox (pure Rust), but the etcd client crate's build script
    # runs protoc.
    if ! command -v protoc >/dev/null 2>&1 && [ -z "${PROTOC:-}" ]; then
        kh_apt_install protobuf-compiler
    fi
}

# etcd server binary (the `keys usage`/`migrate`/`retire` tests start throwaway members).
need_etcd() {
    if command -v etcd >/dev/null 2>&1 || [ -n "${KEYHAVEN_ETCD_BIN:-}" ]; then
        return 0
    fi
    kh_apt_install etcd-server
    command -v etcd >/dev/null 2>&1 || { kh_say "etcd-server installed but etcd not found"; return 1; }
}

# The PKCS#11 module path of SoftHSM2 on this machine (empty if none).
kh_softhsm_module() {
    local p
    for p in "${KEYHAVEN_PKCS11_MODULE:-}" /usr/lib/softhsm/libsofthsm2.so \
             /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
             /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
             /usr/local/lib/softhsm/libsofthsm2.so; do
        if [ -n "$p" ] && [ -f "$p" ]; then echo "$p"; return 0; fi
    done
    return 1
}

need_softhsm() {
    if command -v softhsm2-util >/dev/null 2>&1 && kh_softhsm_module >/dev/null; then
        return 0
    fi
    kh_apt_install softhsm2
    kh_softhsm_module >/dev/null || { kh_say "SoftHSM2 installed but libsofthsm2.so not found"; return 1; }
}

# PostgreSQL server binaries (the broker's tests start throwaway clusters from them).
need_postgres() {
    if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ -n "${KEYHAVEN_PG_BIN:-}" ]; then
        return 0
    fi
    kh_apt_install postgresql
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { kh_say "PostgreSQL installed but initdb not found"; return 1; }
}

# Podman, podman-compose and debootstrap (scripts/compose-test.sh builds the images and runs
# docker-compose.yml without a container registry). Debian's podman-compose (1.0.3) exits 0
# when a container fails, so podman-compose comes from PyPI, into a venv of its own; after
# this, KH_PODMAN_COMPOSE is the command to run.
KH_PODMAN_COMPOSE_VERSION="${KH_PODMAN_COMPOSE_VERSION:-1.6.*}"
need_podman() {
    local pkgs=() venv="${KH_PODMAN_COMPOSE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/keyhaven/podman-compose}"
    command -v podman >/dev/null 2>&1 || pkgs+=(podman)
    # crun (podman's default runtime) fails on hosts with a mixed cgroup v1/v2 layout; runc works.
    command -v runc >/dev/null 2>&1 || pkgs+=(runc)
    command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
    # `init: true` in the compose file runs catatonit as the container's PID 1.
    [ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null 2>&1 || pkgs+=(catatonit)
    command -v python3 >/dev/null 2>&1 || pkgs+=(python3)
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || pkgs+=(python3-venv)
    if [ "${#pkgs[@]}" -gt 0 ]; then
        kh_apt_install "${pkgs[@]}" || return 1
    fi
    if ! "$venv/bin/podman-compose" version 2>/dev/null | grep -q '^podman-compose version 1\.'; then
        kh_say "installing podman-compose==$KH_PODMAN_COMPOSE_VERSION (pip, into $venv)"
        python3 -m venv "$venv" && "$venv/bin/pip" install -q "podman-compose==$KH_PODMAN_COMPOSE_VERSION" \
            || { kh_say "could not install podman-compose from PyPI"; return 1; }
    fi
    KH_PODMAN_COMPOSE="$venv/bin/podman-compose"
}

# A cargo subcommand installed from the Rust crate registry with `cargo install --locked` into
# ~/.cargo/bin (kept there: the next run finds it). $1: the crate, $2: its version (pinned, so
# every machine runs the same checks), $3: the cargo subcommand it provides.
kh_cargo_install() {
    local crate=$1 version=$2 sub=$3
    if cargo "$sub" --version 2>/dev/null | grep -q -E " $version\$"; then
        return 0
    fi
    kh_say "installing $crate $version (cargo install --locked: compiles it, a few minutes)"
    # Not into the workspace's target dir: cargo install builds in a temp dir of its own.
    env -u CARGO_TARGET_DIR cargo install --locked --quiet "$crate" --version "=$version" \
        || { kh_say "could not install $crate $version"; return 1; }
}

# cargo-deny: licenses, bans, duplicate versions and sources of the dependency tree (deny.toml).
KH_CARGO_DENY_VERSION="${KH_CARGO_DENY_VERSION:-0.18.3}"
need_cargo_deny() { kh_cargo_install cargo-deny "$KH_CARGO_DENY_VERSION" deny; }

# cargo-cyclonedx: a CycloneDX SBOM per binary from the Cargo metadata (scripts/sbom.sh).
KH_CARGO_CYCLONEDX_VERSION="${KH_CARGO_CYCLONEDX_VERSION:-0.5.7}"
need_cargo_cyclonedx() { kh_cargo_install cargo-cyclonedx "$KH_CARGO_CYCLONEDX_VERSION" cyclonedx; }
