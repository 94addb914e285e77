#!/bin/sh
# Makes the cluster on first start (user and database $POSTGRES_USER with $POSTGRES_PASSWORD), then runs the
# server on every address of the container's networks.
set -eu
bin=/usr/lib/postgresql/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    "$bin/initdb" --auth-host=scram-sha-256 --auth-local=peer --username=postgres --encoding=UTF8 "$PGDATA" >/dev/null
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    psql -v ON_ERROR_STOP=1 -q -d postgres -c "CREATE ROLE \"$POSTGRES_USER\" LOGIN PASSWORD '$POSTGRES_PASSWORD'" \
        -c "CREATE DATABASE \"$POSTGRES_USER\" OWNER \"$POSTGRES_USER\""
    "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
