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
me=redis.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

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

ping_ok() {
    redis_ping "$port"
}

start() {
    ensure_redis_installed
    if ping_ok; then
        echo "$me: redis already answering on 127.0.0.1:$port, reusing it"
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
        echo "$me: redis-server failed to start; log:" >&2
        cat "$logfile" >&2 || true
        exit 1
    fi
    for _ in $(seq 1 100); do
        if ping_ok; then
            echo "$me: redis-server ready on 127.0.0.1:$port (state $state)"
            return 0
        fi
        if grep -q -E "aborting|Fatal error|FATAL" "$logfile" 2>/dev/null; then
            echo "$me: redis-server on port $port failed to start; log:" >&2
            cat "$logfile" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    echo "$me: redis-server on port $port did not answer PING within 10 s; log:" >&2
    cat "$logfile" >&2 || true
    exit 1
}

stop() {
    stop_redis "$port" "$pidfile" "redis-server on port $port" ||
        echo "$me: no redis-server running on port $port"
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
