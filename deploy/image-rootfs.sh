#!/usr/bin/env bash
# The root filesystem of a shell-less image (deploy/Dockerfile: FROM scratch + COPY of ROOTFS),
# assembled inside the Debian runtime stage it copies its files from:
#
#   image-rootfs.sh ROOTFS [--libs-of FILE | --add FILE | --lib SONAME | --dir DIR]...
#
#   --libs-of FILE  the shared libraries FILE loads (its `ldd` closure, the dynamic loader
#                   included), not FILE itself: the binaries, which the image COPYs itself
#   --add FILE      FILE, and its libraries when it is an ELF object (a dlopen'd PKCS#11
#                   module, which `ldd` of the binary does not list)
#   --lib SONAME    the library of that name in the loader's cache (`ldconfig -p`), as --add
#   --dir DIR       an empty directory owned by uid/gid 10001, mode 0700 (what the process
#                   writes, and the mount points of volumes, which take its owner and mode)
#
# Every ROOTFS also gets the CA certificates, an /etc/passwd and /etc/group with root, nobody
# and keyhaven (10001), and an nsswitch.conf: files for users, files then DNS for hosts (glibc
# 2.36 has the files and dns services built in, so no libnss_* is needed).
#
# A file is copied to the same path, and every symlink on the way to it (a directory's, such as
# /lib64 -> usr/lib64 on a merged-/usr Debian, or the file's own) is copied as a symlink, so
# every name the loader or a program uses resolves in ROOTFS as it does here. No shell, no
# package manager and nothing else of this image goes in.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 ROOTFS [--libs-of FILE | --add FILE | --lib SONAME | --dir DIR]..." >&2; exit 2; }
ROOT=$1; shift
die() { echo "image-rootfs.sh: $*" >&2; exit 1; }

# copy PATH: PATH into ROOT, symlinks on the way included.
copy() {
    local path rest prefix="" comp target
    path=$(realpath -m -s "$1")
    rest=${path#/}
    while [ -n "$rest" ]; do
        comp=${rest%%/*}
        if [ "$comp" = "$rest" ]; then rest=""; else rest=${rest#*/}; fi
        prefix=$prefix/$comp
        if [ -L "$prefix" ]; then
            mkdir -p "$ROOT${prefix%/*}"
            [ -L "$ROOT$prefix" ] || cp -P "$prefix" "$ROOT$prefix"
            target=$(readlink "$prefix")
            case $target in /*) ;; *) target=${prefix%/*}/$target ;; esac
            copy "$target${rest:+/$rest}"
            return
        fi
    done
    [ -f "$path" ] || die "$1: not a file"
    mkdir -p "$ROOT${path%/*}"
    cp -p "$path" "$ROOT$path"
}

# libs FILE: the libraries FILE loads, from `ldd` (none for a static executable).
libs() {
    local out
    if ! out=$(ldd "$1" 2>&1); then
        case $out in *"not a dynamic executable"* | *"statically linked"*) return ;; esac
        die "ldd $1: $out"
    fi
    case $out in *"not found"*) die "ldd $1: a library is missing: $out" ;; esac
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<< "$out" \
        | while read -r lib; do copy "$lib"; done
}

is_elf() { [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }

# add FILE: FILE, and its libraries when it is an ELF object.
add() { copy "$1"; if is_elf "$1"; then libs "$1"; fi; }

# lib_path SONAME: where the loader's cache has it.
lib_path() {
    local p
    p=$(ldconfig -p | awk -v n="$1" '$1 == n { print $NF; exit }')
    [ -n "$p" ] || die "$1: not in the loader's cache (ldconfig -p)"
    echo "$p"
}

mkdir -p "$ROOT"
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || die "$1 needs a value"
    case $1 in
        --libs-of) libs "$2" ;;
        --add) add "$2" ;;
        --lib) add "$(lib_path "$2")" ;;
        --dir) install -d -o 10001 -g 10001 -m 0700 "$ROOT$2" ;;
        *) die "unknown option $1" ;;
    esac
    shift 2
done

copy /etc/ssl/certs/ca-certificates.crt
cat > "$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
keyhaven:x:10001:10001:keyhaven:/nonexistent:/usr/sbin/nologin
EOF
cat > "$ROOT/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
keyhaven:x:10001:
EOF
cat > "$ROOT/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
EOF
chmod 0644 "$ROOT/etc/passwd" "$ROOT/etc/group" "$ROOT/etc/nsswitch.conf"
