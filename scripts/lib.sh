# shellcheck shell=bash
# shellcheck disable=SC2154 # `me` is set by the script that sources this file
# Shared by the server scripts (redis.sh, redis-cluster.sh, sqs.sh, kafka.sh); sourced,
# never run. Each script sets `me` (its name, the prefix of every message) first.
#
# Why one file: the four scripts install Debian packages and stop what they started the
# same way, and a fix to either (an apt failure that hid its output, a stop that left a
# child behind) belongs in all four at once.

# Install Debian packages, or fail with apt's own output.
apt_install() {
    echo "$me: installing $* (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    local out
    if ! out="$(apt-get update -qq 2>&1)"; then
        echo "$out" >&2
        echo "$me: apt-get update failed" >&2
        exit 1
    fi
    if ! out="$(apt-get install -y -qq "$@" 2>&1)"; then
        echo "$out" >&2
        echo "$me: apt-get install $* failed" >&2
        exit 1
    fi
}

# The pid in a pid file, when that process is alive; nothing otherwise.
live_pid() {
    local pid=""
    [ -f "$1" ] && pid="$(cat "$1" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
}

# Wait up to N tenths of a second for a process to be gone.
wait_gone() {
    local pid="$1" tenths="$2"
    for _ in $(seq 1 "$tenths"); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$pid" 2>/dev/null
}

# SIGTERM a process group led by PID (started with setsid, so children go with it; a
# plain process when it leads none), SIGKILL it when it is still there after N tenths.
stop_group() {
    local pid="$1" tenths="$2"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$tenths"; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 50 || true
    fi
}

# Something accepts connections on a loopback port.
port_taken() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

redis_ping() {
    [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null || true)" = "PONG" ]
}

ensure_redis_installed() {
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        apt_install redis-server
    fi
}

# Stop the redis-server on PORT: by its pid file when we started it, else (a server
# started elsewhere) by SHUTDOWN NOSAVE. Prints what it did; LABEL names it.
stop_redis() {
    local port="$1" pidfile="$2" label="$3" pid
    pid="$(live_pid "$pidfile")"
    if [ -n "$pid" ]; then
        kill "$pid"
        wait_gone "$pid" 100 || kill -9 "$pid" 2>/dev/null || true
        echo "$me: stopped $label (pid $pid)"
    elif command -v redis-cli >/dev/null 2>&1 && redis_ping "$port"; then
        redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
        echo "$me: stopped $label (SHUTDOWN)"
    else
        rm -f "$pidfile"
        return 1
    fi
    rm -f "$pidfile"
}

# `SCRIPT start|stop|status [PORT]`, for scripts with no options of their own: sets `cmd`
# and `port` (DEFAULT when none is given), or prints the usage and exits 2.
parse_command_and_port() {
    local default="$1"
    shift
    cmd="${1:-}"
    port="$default"
    [ -n "$cmd" ] || usage
    shift
    case $# in
        0) ;;
        1) case "$1" in
            [0-9]*) port="$1" ;;
            *) usage ;;
        esac ;;
        *) usage ;;
    esac
}
