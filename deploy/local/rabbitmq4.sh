#!/usr/bin/env bash
# A RabbitMQ 4.x node beside the machine's own broker, for testing Burrow on both.
#
# On Debian as root, RabbitMQ 4.x comes from Debian 13 (trixie)'s own package, installed once
# per machine into a debootstrap chroot and reused; its nodes share this machine's network and
# epmd, each with its own node name, ports and data directory. Elsewhere, run a 4.x broker
# yourself (e.g. `docker run -d -p 5673:5672 rabbitmq:4`) and point BURROW_TEST_AMQP_URL at it.
#
#   rabbitmq4.sh ensure [PORT]      build the chroot if missing; start the node on PORT (5673)
#   rabbitmq4.sh stop [PORT]        stop that node
#   rabbitmq4.sh ctl PORT ARGS...   rabbitmqctl (or -diagnostics/-plugins via CTL=) for that node
#   rabbitmq4.sh exec CMD ARGS...   run CMD inside the chroot with this environment's RABBITMQ_*
#   rabbitmq4.sh root               print the chroot's path (building it if missing)
#
# The node on PORT is named burrow4-PORT@localhost, listens for distribution on PORT+20000 and
# for Prometheus on PORT+10020 (5673 -> 15693), and keeps its data in the chroot under
# /var/lib/rabbitmq/burrow4-PORT. The test suite's fault harness starts its private nodes here too.
set -euo pipefail

ROOT="${BURROW_RABBITMQ4_ROOT:-/var/lib/burrow/rabbitmq4-trixie}"
SUITE=trixie

die() { echo "rabbitmq4: $*" >&2; exit 1; }

mirror() {
    # The Debian mirror this machine's apt already uses (deb822 or one-line sources).
    local uri
    uri=$(grep -hoE '^(URIs:|deb)[[:space:]]+[a-z]+://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        awk '{print $2}' | head -n1 || true)
    [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources*"
    echo "$uri"
}

mounted() { grep -qs " $1 " /proc/mounts; }

mount_fs() {
    mounted "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mounted "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
    # Name resolution as on the host: the node's name is <name>@localhost. Replaced whole
    # (never emptied then written) and only when it differs: nodes may be resolving right now.
    if ! cmp -s /etc/hosts "$ROOT/etc/hosts"; then
        cp /etc/hosts "$ROOT/etc/hosts.burrow" && mv "$ROOT/etc/hosts.burrow" "$ROOT/etc/hosts"
    fi
}

build() {
    [ -f "$ROOT/.burrow-ready" ] && { mount_fs; return 0; }
    [ "$(id -u)" = 0 ] || die "building the RabbitMQ 4.x chroot needs root (or set BURROW_TEST_AMQP_URL to a 4.x broker)"
    command -v apt-get >/dev/null || die "no apt-get: this script builds RabbitMQ 4.x on Debian only"
    if ! command -v debootstrap >/dev/null; then
        echo "rabbitmq4: installing debootstrap"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    local partial="$ROOT.partial"
    for fs in proc dev; do mounted "$partial/$fs" && umount -l "$partial/$fs"; done
    rm -rf "$partial"
    mkdir -p "$(dirname "$ROOT")"
    echo "rabbitmq4: debootstrap $SUITE into $ROOT (once per machine)"
    debootstrap --variant=minbase "$SUITE" "$partial" "$(mirror)" >/dev/null
    # No service starts inside the chroot on install: nodes are started by this script.
    printf '#!/bin/sh\nexit 101\n' >"$partial/usr/sbin/policy-rc.d"
    chmod +x "$partial/usr/sbin/policy-rc.d"
    mount -t proc proc "$partial/proc"
    mount --bind /dev "$partial/dev"
    cp /etc/hosts "$partial/etc/hosts"
    chroot "$partial" apt-get update -qq
    chroot "$partial" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
    umount -l "$partial/proc" "$partial/dev"
    touch "$partial/.burrow-ready"
    mv "$partial" "$ROOT"
    mount_fs
    # shellcheck disable=SC2016 # dpkg-query formats ${Version} itself
    echo "rabbitmq4: $(chroot "$ROOT" dpkg-query -W -f '${Version}' rabbitmq-server) installed"
}

node_env() {
    # The environment of the node on port $1 (as `env` arguments, inside the chroot).
    local port=$1 name="burrow4-$1"
    local base="/var/lib/rabbitmq/$name"
    echo "HOME=/var/lib/rabbitmq RABBITMQ_NODENAME=$name@localhost RABBITMQ_NODE_PORT=$port" \
        "RABBITMQ_DIST_PORT=$((port + 20000)) RABBITMQ_MNESIA_BASE=$base/mnesia" \
        "RABBITMQ_LOG_BASE=$base/log RABBITMQ_CONFIG_FILE=$base/rabbitmq.conf" \
        "RABBITMQ_ENABLED_PLUGINS_FILE=$base/enabled_plugins RABBITMQ_PID_FILE=$base/pid" \
        "RABBITMQ_ENABLED_PLUGINS=rabbitmq_prometheus"
}

in_root() { chroot "$ROOT" "$@"; }

ctl() {
    local port=$1; shift
    local tool="${CTL:-rabbitmqctl}"
    # shellcheck disable=SC2046
    in_root env $(node_env "$port") "$tool" -n "burrow4-$port@localhost" "$@"
}

reachable() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure() {
    local port=${1:-5673}
    if [ ! -f "$ROOT/.burrow-ready" ] && reachable "$port"; then
        echo "rabbitmq4: a broker of your own answers on 127.0.0.1:$port; using it"
        return 0
    fi
    build
    if reachable "$port" && CTL=rabbitmq-diagnostics ctl "$port" -q check_running >/dev/null 2>&1; then
        echo "rabbitmq4: running on 127.0.0.1:$port"
        return 0
    fi
    local base="$ROOT/var/lib/rabbitmq/burrow4-$port"
    mkdir -p "$base/log" "$base/mnesia"
    cat >"$base/rabbitmq.conf" <<CONF
listeners.tcp.default = $port
loopback_users = none
prometheus.tcp.port = $((port + 10020))
CONF
    echo '[rabbitmq_prometheus].' >"$base/enabled_plugins"
    in_root chown -R rabbitmq:rabbitmq "/var/lib/rabbitmq/burrow4-$port"
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    echo "rabbitmq4: starting burrow4-$port@localhost on 127.0.0.1:$port"
    # shellcheck disable=SC2046
    in_root env $(node_env "$port") rabbitmq-server -detached
    for _ in $(seq 1 120); do
        if reachable "$port" && CTL=rabbitmq-diagnostics ctl "$port" -q check_running >/dev/null 2>&1; then
            echo "rabbitmq4: running on 127.0.0.1:$port ($(ctl "$port" -q version))"
            return 0
        fi
        sleep 1
    done
    die "node on $port did not come up within 120 s; see $base/log/"
}

stop() {
    local port=${1:-5673}
    [ -f "$ROOT/.burrow-ready" ] || return 0
    mount_fs
    ctl "$port" -q stop >/dev/null 2>&1 || true
}

cmd=${1:-ensure}
shift || true
case "$cmd" in
    ensure) ensure "$@" ;;
    stop) stop "$@" ;;
    ctl) build; ctl "$@" ;;
    exec) build; in_root "$@" ;;
    root) build >&2; echo "$ROOT" ;;
    *) die "unknown command: $cmd (ensure, stop, ctl, exec, root)" ;;
esac
