#!/usr/bin/env bash
# Make sure PostgreSQL answers on 127.0.0.1:5432 (the outbox and inbox tests use it; trust or
# password auth for user postgres, see BURROW_TEST_POSTGRES_URL).
# Reachable: nothing to do. Installed but down: start its clusters. Missing on Debian as root:
# apt install, then start.
set -euo pipefail
host=127.0.0.1
port="${BURROW_POSTGRES_PORT:-5432}"

reachable() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

# The tests' database (`test`), made once when this machine's server lacks it.
ensure_test_db() {
    if command -v psql >/dev/null 2>&1 \
        && ! psql -h "$host" -p "$port" -U postgres -tAc "select 1" test >/dev/null 2>&1; then
        psql -h "$host" -p "$port" -U postgres -c "create database test" postgres >/dev/null 2>&1 \
            || echo "postgres: no database 'test' and could not create it" >&2
    fi
}

if reachable; then
    echo "postgres: reachable on $host:$port"
    ensure_test_db
    exit 0
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "postgres: not installed; installing Debian's postgresql"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        cat >&2 <<'MSG'
postgres: no server on 127.0.0.1:5432 and PostgreSQL is not installed.
Get one of:
  - Debian/Ubuntu:  sudo apt-get install postgresql
  - macOS:          brew install postgresql@16 && brew services start postgresql@16
  - any OS with a container engine:
        docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16
or point BURROW_TEST_POSTGRES_URL at a server you already have.
MSG
        exit 1
    fi
fi

echo "postgres: installed but down; starting its clusters"
pg_lsclusters --no-header | while read -r version cluster _; do
    pg_ctlcluster "$version" "$cluster" start || true
done
for _ in $(seq 1 60); do
    if reachable; then
        echo "postgres: running on $host:$port"
        ensure_test_db
        exit 0
    fi
    sleep 1
done
echo "postgres: did not come up within 60 s; see /var/log/postgresql/" >&2
exit 1
