#!/usr/bin/env bash
# Keyhaven quickstart (the README's first command): a dev SoftHSM2 token under .keyhaven-dev/.
# This grows as the parts land. --ci: non-interactive, exits when done.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_rust
need_softhsm

DEV="$PWD/.keyhaven-dev"
mkdir -p "$DEV/tokens"
chmod 700 "$DEV"
export SOFTHSM2_CONF="$DEV/softhsm2.conf"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$DEV" > "$SOFTHSM2_CONF"
if [ ! -s "$DEV/user.pin" ]; then
    ( umask 077; head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DEV/user.pin"; head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DEV/so.pin" )
fi
if ! softhsm2-util --show-slots 2>/dev/null | grep -q 'Label:.*keyhaven-dev'; then
    kh_say "creating the dev SoftHSM2 token 'keyhaven-dev' in $DEV/tokens"
    softhsm2-util --init-token --free --label keyhaven-dev \
        --so-pin "$(cat "$DEV/so.pin")" --pin "$(cat "$DEV/user.pin")" >/dev/null
fi
kh_say "dev token:"
softhsm2-util --show-slots | grep -E 'Label:|Serial number:|Initialized:' | sed 's/^/    /'
