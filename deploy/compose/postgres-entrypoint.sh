#!/bin/sh
# Entrypoint of deploy/compose/postgres.Containerfile: runs as root, makes the cluster on first
# start (superuser POSTGRES_USER with the password in POSTGRES_PASSWORD_FILE, database
# POSTGRES_DB, password authentication for every TCP client), then runs the server as `postgres`.
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

install -d -o postgres -g postgres -m 0700 "$PGDATA"
chown postgres:postgres "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -n "${POSTGRES_PASSWORD_FILE:-}" ] || { echo "postgres-entrypoint: POSTGRES_PASSWORD_FILE is not set" >&2; exit 1; }
    # The file belongs to another uid (0600): hand initdb a copy only `postgres` can read.
    pwdir=$(mktemp -d)
    cp "$POSTGRES_PASSWORD_FILE" "$pwdir/pw"
    chown -R postgres:postgres "$pwdir"
    as_postgres initdb --username="$POSTGRES_USER" --pwfile="$pwdir/pw" \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -rf "$pwdir"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        # A first-run server on its Unix socket only, as the official image does.
        as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
        echo 'CREATE DATABASE :"db";' | as_postgres psql -q -h /tmp -U "$POSTGRES_USER" -d postgres \
            -v ON_ERROR_STOP=1 -v db="$POSTGRES_DB"
        as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    echo "postgres-entrypoint: cluster initialised in $PGDATA"
fi
[ "$1" = postgres ] || exec "$@"
shift
exec setpriv --reuid=postgres --regid=postgres --init-groups -- \
    postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
