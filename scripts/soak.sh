#!/usr/bin/env bash
# The long soak of the Redis backend (audit #13): churning chaos workers (one steady,
# two killed -9 and restarted every 1-5 s) over many messages, then Redis memory, key
# count, consumer names in the group and the steady worker's RSS, printed and bounded.
# Not part of the test suite (tests/soak.rs is its one-minute version).
#
#   scripts/soak.sh [--minutes N] [--messages M] [--port P] [--churners C]
#
# Defaults: 20 minutes, 1000000 messages, port 6419, 2 churners. Starts a redis-server
# of its own on the port (which must be free) and stops it at the end. Exit status 0
# when every bound held, 1 when one did not (printed as "BOUND BROKEN").
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export FERRYMQ_CACHE="${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FERRYMQ_CACHE/target}"

args=("$@")
port=6419
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes | --messages | --churners)
            [ $# -ge 2 ] || { echo "usage: $0 [--minutes N] [--messages M] [--port P] [--churners C]" >&2; exit 2; }
            shift 2
            ;;
        --port)
            [ $# -ge 2 ] || { echo "usage: $0 [--minutes N] [--messages M] [--port P] [--churners C]" >&2; exit 2; }
            port="$2"
            shift 2
            ;;
        *)
            echo "usage: $0 [--minutes N] [--messages M] [--port P] [--churners C]" >&2
            exit 2
            ;;
    esac
done

if ! command -v redis-server >/dev/null 2>&1; then
    # redis.sh installs Debian's redis-server; the soak then runs its own.
    scripts/redis.sh start "$port"
    scripts/redis.sh stop "$port"
fi

cargo build --release -q -p ferrymq-redis --example soak
exec "$CARGO_TARGET_DIR/release/examples/soak" "${args[@]}"
