#!/usr/bin/env bash
# Start or stop a throwaway redis-server for ferrymq's tests, bound to 127.0.0.1.
#
#   scripts/redis.sh start [PORT] [--aof DIR]   # default port 6399; --aof: appendonly, fsync always, data in DIR
#   scripts/redis.sh stop  [PORT]
#   scripts/redis.sh status [PORT]
#
# Installs Debian's redis-server when it is missing. Idempotent: `start` on a port
# where our server already answers PING reuses it. State (pid, log, data) lives in
# ${FERRYMQ_REDIS_STATE:-/tmp/ferrymq-redis-PORT}. A server that does not answer PING
# within ~10 s fails the script with its log.
set -euo pipefail

usage() {
    echo "usage: $0 start [PORT] [--aof DIR] | stop [PORT] | status [PORT]" >&2
    exit 2
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
port=6399
aof_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --aof)
            [ $# -ge 2 ] || usage
            aof_dir="$2"
            shift 2
            ;;
        [0-9]*)
            port="$1"
            shift
            ;;
        *) usage ;;
    esac
done

state="${FERRYMQ_REDIS_STATE:-/tmp/ferrymq-redis-$port}"
pidfile="$state/redis.pid"
logfile="$state/redis.log"

ensure_installed() {
    if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
        return
    fi
    echo "redis.sh: installing redis-server (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    local out
    if ! out="$(apt-get update -qq 2>&1)"; then
        echo "$out" >&2
        echo "redis.sh: apt-get update failed" >&2
        exit 1
    fi
    if ! out="$(apt-get install -y -qq redis-server 2>&1)"; then
        echo "$out" >&2
        echo "redis.sh: apt-get install redis-server failed" >&2
        exit 1
    fi
}

ping_ok() {
    [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null || true)" = "PONG" ]
}

start() {
    ensure_installed
    if ping_ok; then
        echo "redis.sh: redis already answering on 127.0.0.1:$port, reusing it"
        return 0
    fi
    mkdir -p "$state"
    rm -f "$pidfile"
    : >"$logfile"
    local args=(--port "$port" --bind 127.0.0.1 --save '' --daemonize yes
        --pidfile "$pidfile" --logfile "$logfile" --dir "$state")
    if [ -n "$aof_dir" ]; then
        mkdir -p "$aof_dir"
        args+=(--appendonly yes --appendfsync always --dir "$aof_dir")
    else
        args+=(--appendonly no)
    fi
    if ! redis-server "${args[@]}"; then
        echo "redis.sh: redis-server failed to start; log:" >&2
        cat "$logfile" >&2 || true
        exit 1
    fi
    for _ in $(seq 1 100); do
        if ping_ok; then
            echo "redis.sh: redis-server ready on 127.0.0.1:$port (state $state)"
            return 0
        fi
        if grep -q -E "aborting|Fatal error|FATAL" "$logfile" 2>/dev/null; then
            echo "redis.sh: redis-server on port $port failed to start; log:" >&2
            cat "$logfile" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    echo "redis.sh: redis-server on port $port did not answer PING within 10 s; log:" >&2
    cat "$logfile" >&2 || true
    exit 1
}

stop() {
    local pid=""
    [ -f "$pidfile" ] && pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        echo "redis.sh: stopped redis-server on port $port (pid $pid)"
    elif command -v redis-cli >/dev/null 2>&1 && ping_ok; then
        # Not started by this script (no pidfile): ask it to stop without saving.
        redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
        echo "redis.sh: stopped redis-server on port $port (SHUTDOWN)"
    else
        echo "redis.sh: no redis-server running on port $port"
    fi
    rm -f "$pidfile"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status)
        if command -v redis-cli >/dev/null 2>&1 && ping_ok; then
            echo "running on 127.0.0.1:$port"
        else
            echo "not running on 127.0.0.1:$port"
            exit 1
        fi
        ;;
    *) usage ;;
esac
