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
