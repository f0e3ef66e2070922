#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on BURROW_AMQP_PORT (default 5672) on this machine.
# Reachable: nothing to do. Installed but down: start it. Missing on Debian as root: apt install.
set -euo pipefail
port="${BURROW_AMQP_PORT:-5672}"
host="${BURROW_AMQP_HOST:-127.0.0.1}"

reachable() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if reachable; then
    echo "rabbitmq: reachable on $host:$port"
    exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "rabbitmq: not installed; installing Debian's rabbitmq-server"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    else
        cat >&2 <<'MSG'
rabbitmq: no broker on 127.0.0.1:5672 and rabbitmq-server is not installed.
Get one of:
  - Debian/Ubuntu:  sudo apt-get install rabbitmq-server
  - macOS:          brew install rabbitmq && brew services start rabbitmq
  - any OS with a container engine:  docker run -d -p 5672:5672 rabbitmq:3.13
or point BURROW_AMQP_URL at a broker you already have.
MSG
        exit 1
    fi
fi

if ! rabbitmq-diagnostics -q check_running >/dev/null 2>&1; then
    echo "rabbitmq: installed but down; starting it"
    # Many queues (tests, delay ladders) need more than the default 1024 file handles.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    rabbitmq-server -detached || true
fi
for _ in $(seq 1 90); do
    if rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && reachable; then
        echo "rabbitmq: running on $host:$port"
        exit 0
    fi
    sleep 1
done
echo "rabbitmq: did not come up within 90 s; see /var/log/rabbitmq/" >&2
exit 1
