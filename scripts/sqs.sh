#!/usr/bin/env bash
# Start or stop a throwaway SQS (LocalStack, no Docker) for ferrymq's tests, bound to 127.0.0.1.
#
#   scripts/sqs.sh start  [PORT]   # default port 4566
#   scripts/sqs.sh stop   [PORT]
#   scripts/sqs.sh status [PORT]   # exit 0 only when SQS answers ListQueues
#
# Installs localstack-core[runtime] 4.13.1 into a venv under
# ${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}/localstack-4.13.1/venv, pinned by
# scripts/services/localstack-4.13.1-constraints.txt (~40 s the first time). The venv counts
# as installed only when the marker written after a successful install is there (and names
# the same pins); otherwise it is rebuilt. Needs python3 >= 3.11 (FERRYMQ_PYTHON overrides).
#
# Idempotent: `start` on a port where SQS already answers reuses it. State (pid, log,
# LocalStack's FILESYSTEM_ROOT) lives in ${FERRYMQ_SQS_STATE:-/tmp/ferrymq-sqs-PORT}.
# A server that does not answer within ~60 s fails the script with its log.
#
# Endpoint: http://127.0.0.1:PORT, path-style queue URLs, any credentials (e.g. test/test),
# region us-east-1.
set -euo pipefail
me=sqs.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    echo "usage: $0 start [PORT] | stop [PORT] | status [PORT]" >&2
    exit 2
}

parse_command_and_port 4566 "$@"

here="$(cd "$(dirname "$0")" && pwd)"
ls_version=4.13.1
constraints="$here/services/localstack-$ls_version-constraints.txt"
cache="${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}"
install_dir="$cache/localstack-$ls_version"
venv="$install_dir/venv"
marker="$install_dir/installed"
requirements=("localstack-core[runtime]==$ls_version" 'cbor2<6' 'pyopenssl<26' 'cryptography<47' service-identity)

state="${FERRYMQ_SQS_STATE:-/tmp/ferrymq-sqs-$port}"
pidfile="$state/localstack.pid"
logfile="$state/localstack.log"

# What the marker must say for the venv to count as installed: the pins and the requirements.
install_id() {
    {
        sha256sum <"$constraints"
        printf '%s\n' "${requirements[@]}"
    } | sha256sum | cut -d' ' -f1
}

ensure_installed() {
    command -v curl >/dev/null 2>&1 || apt_install curl
    local id
    id="$(install_id)"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$id" ] && [ -x "$venv/bin/python" ]; then
        return
    fi
    local python="${FERRYMQ_PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        echo "$me: need Python >= 3.11 as '$python' (set FERRYMQ_PYTHON)" >&2
        exit 1
    fi
    echo "$me: installing localstack-core $ls_version into $venv (pip, ~40 s)" >&2
    rm -rf "$venv" "$marker"
    mkdir -p "$install_dir"
    local out
    if ! out="$("$python" -m venv "$venv" 2>&1)"; then
        echo "$out" >&2
        echo "$me: python -m venv failed" >&2
        exit 1
    fi
    if ! out="$("$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -c "$constraints" "${requirements[@]}" 2>&1)"; then
        echo "$out" >&2
        echo "$me: pip install of localstack-core $ls_version failed" >&2
        exit 1
    fi
    echo "$id" >"$marker"
}

ready() {
    local code
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST \
        -H 'Content-Type: application/x-amz-json-1.0' \
        -H 'X-Amz-Target: AmazonSQS.ListQueues' \
        -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0' \
        -d '{}' "http://127.0.0.1:$port/" 2>/dev/null || true)"
    [ "$code" = "200" ]
}

running_pid() {
    live_pid "$pidfile"
}

fail_with_log() {
    echo "$me: $1; log ($logfile):" >&2
    cat "$logfile" >&2 || true
    stop >/dev/null 2>&1 || true
    exit 1
}

start() {
    ensure_installed
    if ready; then
        echo "$me: SQS already answering on 127.0.0.1:$port, reusing it"
        return 0
    fi
    if [ -n "$(running_pid)" ]; then
        # Ours, but not answering (still starting, or hung): start over.
        stop >/dev/null
    fi
    if port_taken "$port"; then
        echo "$me: 127.0.0.1:$port is taken by a server that is not SQS" >&2
        exit 1
    fi
    # A fresh LocalStack tmp/state each start; its cache (service catalog, TLS cert) is
    # kept in $state/fs/var, which saves ~3 s on the next start.
    mkdir -p "$state/fs"
    rm -rf "$state/fs/tmp"
    (
        cd "$state"
        export GATEWAY_SERVER=hypercorn
        export GATEWAY_LISTEN="127.0.0.1:$port"
        export LOCALSTACK_HOST="127.0.0.1:$port"
        export SERVICES=sqs
        export SQS_ENDPOINT_STRATEGY=path
        export DNS_ADDRESS=0
        export DISABLE_EVENTS=1
        export SKIP_SSL_CERT_DOWNLOAD=1
        export PERSISTENCE=0
        export FILESYSTEM_ROOT="$state/fs"
        # Host layout everywhere (inside a container it would use /tmp/localstack, /var/lib/localstack).
        export OVERRIDE_IN_DOCKER=0
        # setsid: its own process group, so `stop` can end it with everything it spawned.
        exec setsid nohup "$venv/bin/python" -m localstack.runtime.main \
            >"$logfile" 2>&1 </dev/null
    ) &
    echo $! >"$pidfile"
    local pid
    pid="$(cat "$pidfile")"
    for _ in $(seq 1 300); do
        if ready; then
            echo "$me: SQS (LocalStack $ls_version) ready on http://127.0.0.1:$port (state $state)"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || fail_with_log "LocalStack on port $port exited during start"
        sleep 0.2
    done
    fail_with_log "LocalStack on port $port did not answer ListQueues within 60 s"
}

stop() {
    local pid
    pid="$(running_pid)"
    if [ -n "$pid" ]; then
        stop_group "$pid" 100
        echo "$me: stopped LocalStack on port $port (pid $pid)"
    elif command -v curl >/dev/null 2>&1 && ready; then
        echo "$me: SQS answers on port $port but was not started from $state; leaving it running" >&2
    else
        echo "$me: no LocalStack running on port $port"
    fi
    rm -f "$pidfile"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status)
        if command -v curl >/dev/null 2>&1 && ready; then
            echo "running on http://127.0.0.1:$port"
        else
            echo "not running on 127.0.0.1:$port"
            exit 1
        fi
        ;;
    *) usage ;;
esac
