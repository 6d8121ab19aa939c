#!/usr/bin/env bash
# The whole test suite, with every server it needs: installs and starts them on
# 127.0.0.1, runs the tests against them, stops them. Usage: scripts/test.sh [cargo test args]
#
# Point the suite at servers you already run instead by exporting their URLs first
# (FERRYMQ_TEST_REDIS_URL=redis://host:port); the script then starts nothing for them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export FERRYMQ_CACHE="${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FERRYMQ_CACHE/target}"

started=()
cleanup() {
  for svc in "${started[@]}"; do $svc || true; done
}
trap cleanup EXIT

if [[ -z "${FERRYMQ_TEST_REDIS_URL:-}" ]]; then
  port="${FERRYMQ_REDIS_PORT:-6399}"
  scripts/redis.sh start "$port"
  started+=("scripts/redis.sh stop $port")
  export FERRYMQ_TEST_REDIS_URL="redis://127.0.0.1:$port"
fi

echo "== servers: redis=$FERRYMQ_TEST_REDIS_URL"
cargo test --workspace --all-features "$@"
