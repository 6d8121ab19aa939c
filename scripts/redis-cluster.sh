#!/usr/bin/env bash
# Start or stop a throwaway 3-master Redis Cluster for ferrymq's tests, bound to 127.0.0.1.
#
#   scripts/redis-cluster.sh start  [PORT]   # masters on PORT, PORT+1, PORT+2 (default 7000); bus ports +10000
#   scripts/redis-cluster.sh stop   [PORT]
#   scripts/redis-cluster.sh status [PORT]
#
# No replicas: three masters sharing the 16384 slots (`redis-cli --cluster create`).
# Installs Debian's redis-server when it is missing (as scripts/redis.sh does).
# Idempotent: `start` on a port whose cluster already says `cluster_state:ok` reuses
# it; a half-started one (nodes up, cluster not formed) is stopped and started over.
# State (pid, log, nodes.conf per node) lives in
# ${FERRYMQ_REDIS_CLUSTER_STATE:-/tmp/ferrymq-redis-cluster-PORT}/NODE_PORT. A node that
# does not answer PING within ~10 s, or a cluster that is not `ok` within ~20 s, fails
# the script with the logs.
#
# Clients: any node is a seed, e.g. redis://127.0.0.1:PORT/QUEUE?cluster=true for
# ferrymq-redis; `redis-cli -c -p PORT` follows redirects by hand.
set -euo pipefail
me=redis-cluster.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    echo "usage: $0 start [PORT] | stop [PORT] | status [PORT]" >&2
    exit 2
}

parse_command_and_port 7000 "$@"
if [ "$port" -lt 1 ] || [ "$port" -gt 55533 ]; then
    echo "$me: PORT must be 1-55533 (its bus ports are PORT+10000 .. PORT+10002)" >&2
    exit 2
fi

ports=("$port" "$((port + 1))" "$((port + 2))")
state="${FERRYMQ_REDIS_CLUSTER_STATE:-/tmp/ferrymq-redis-cluster-$port}"

cluster_ok() {
    redis-cli -h 127.0.0.1 -p "$port" cluster info 2>/dev/null | tr -d '\r' | grep -qx 'cluster_state:ok'
}

show_logs() {
    for p in "${ports[@]}"; do
        echo "--- node $p: $state/$p/redis.log" >&2
        tail -n 30 "$state/$p/redis.log" >&2 2>/dev/null || true
    done
}

start_node() {
    local p="$1" dir="$state/$1"
    mkdir -p "$dir"
    rm -f "$dir/redis.pid" "$dir/nodes.conf" "$dir/dump.rdb"
    : >"$dir/redis.log"
    if ! redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no \
        --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
        --cluster-node-timeout 5000 --daemonize yes \
        --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"; then
        echo "$me: redis-server on port $p failed to start" >&2
        show_logs
        exit 1
    fi
}

stop_node() {
    stop_redis "$1" "$state/$1/redis.pid" "node $1" || true
}

stop() {
    for p in "${ports[@]}"; do
        stop_node "$p"
    done
    echo "$me: cluster on 127.0.0.1:$port-$((port + 2)) stopped"
}

start() {
    ensure_redis_installed
    if cluster_ok; then
        echo "$me: cluster already ok on 127.0.0.1:$port-$((port + 2)), reusing it"
        return 0
    fi
    # Anything answering on our ports is a cluster that did not form: start over.
    for p in "${ports[@]}"; do
        if redis_ping "$p"; then
            echo "$me: node $p answers but the cluster is not ok; restarting it" >&2
            stop_node "$p"
        fi
    done
    for p in "${ports[@]}"; do
        start_node "$p"
    done
    for p in "${ports[@]}"; do
        local up=""
        for _ in $(seq 1 100); do
            if redis_ping "$p"; then
                up=1
                break
            fi
            sleep 0.1
        done
        if [ -z "$up" ]; then
            echo "$me: node $p did not answer PING within 10 s" >&2
            show_logs
            exit 1
        fi
    done
    local out
    if ! out="$(redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes 2>&1)"; then
        echo "$out" >&2
        echo "$me: redis-cli --cluster create failed" >&2
        show_logs
        exit 1
    fi
    for _ in $(seq 1 200); do
        if cluster_ok && [ "$(redis-cli -h 127.0.0.1 -p "$port" cluster info | tr -d '\r' | sed -n 's/^cluster_slots_ok://p')" = 16384 ]; then
            echo "$me: cluster ready on 127.0.0.1:$port-$((port + 2)) (3 masters, bus $((port + 10000))-$((port + 10002)), state $state)"
            return 0
        fi
        sleep 0.1
    done
    echo "$me: cluster on port $port is not ok within 20 s:" >&2
    redis-cli -h 127.0.0.1 -p "$port" cluster info >&2 || true
    show_logs
    exit 1
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status)
        if command -v redis-cli >/dev/null 2>&1 && cluster_ok; then
            echo "cluster ok on 127.0.0.1:$port-$((port + 2))"
        else
            echo "no cluster ok on 127.0.0.1:$port-$((port + 2))"
            exit 1
        fi
        ;;
    *) usage ;;
esac
