#!/usr/bin/env bash
# The whole test suite, with every server it needs: installs and starts them on
# 127.0.0.1, runs the tests against them, then stops what it started.
#
#   scripts/test.sh                     # everything (scripts/run-tests.py)
#   scripts/test.sh [cargo test args]   # a slice, e.g. -p ferrymq-redis --test fault
#
# To use servers you already run, export their addresses first
# (FERRYMQ_TEST_REDIS_URL=redis://host:port, FERRYMQ_TEST_REDIS_CLUSTER_URL=redis://host:port,
# FERRYMQ_TEST_SQS_ENDPOINT=http://host:port, FERRYMQ_TEST_KAFKA_BROKERS=host:port); the script then starts nothing for them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export FERRYMQ_CACHE="${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FERRYMQ_CACHE/target}"

stop_on_exit=()
cleanup() {
  for cmd in "${stop_on_exit[@]}"; do $cmd >/dev/null || true; done
}
trap cleanup EXIT

if [[ -z "${FERRYMQ_TEST_REDIS_URL:-}" ]]; then
  port="${FERRYMQ_REDIS_PORT:-6399}"
  # A server someone else started on the port is used and left running.
  if ! scripts/redis.sh status "$port" >/dev/null 2>&1; then
    stop_on_exit+=("scripts/redis.sh stop $port")
  fi
  scripts/redis.sh start "$port"
  export FERRYMQ_TEST_REDIS_URL="redis://127.0.0.1:$port"
fi
# Start (or reuse) one server of a kind: `use_server SCRIPT PORT`. A server someone
# else started on the port is used and left running; one this script started is
# stopped on exit.
use_server() {
  local script="$1" port="$2"
  if ! "scripts/$script" status "$port" >/dev/null 2>&1; then
    stop_on_exit+=("scripts/$script stop $port")
  fi
  "scripts/$script" start "$port"
}

# The three servers start one after another but come up while the next installs;
# LocalStack's first install (~1-2 min) and Kafka's jars (~10 s) are cached in
# $FERRYMQ_CACHE and reused.
if [[ -z "${FERRYMQ_TEST_SQS_ENDPOINT:-}" ]]; then
  port="${FERRYMQ_SQS_PORT:-4599}"
  use_server sqs.sh "$port"
  export FERRYMQ_TEST_SQS_ENDPOINT="http://127.0.0.1:$port"
fi
if [[ -z "${FERRYMQ_TEST_KAFKA_BROKERS:-}" ]]; then
  port="${FERRYMQ_KAFKA_PORT:-9192}"
  use_server kafka.sh "$port"
  export FERRYMQ_TEST_KAFKA_BROKERS="127.0.0.1:$port"
fi
# A 3-master Redis Cluster on PORT..PORT+2 (bus ports +10000) for the redis-cluster
# conformance setup and backend-redis/tests/cluster.rs.
if [[ -z "${FERRYMQ_TEST_REDIS_CLUSTER_URL:-}" ]]; then
  port="${FERRYMQ_REDIS_CLUSTER_PORT:-7000}"
  use_server redis-cluster.sh "$port"
  export FERRYMQ_TEST_REDIS_CLUSTER_URL="redis://127.0.0.1:$port"
fi
# The SDK must never reach for real AWS credentials or a config file in a test run.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
echo "== servers: redis=$FERRYMQ_TEST_REDIS_URL redis-cluster=$FERRYMQ_TEST_REDIS_CLUSTER_URL sqs=$FERRYMQ_TEST_SQS_ENDPOINT kafka=$FERRYMQ_TEST_KAFKA_BROKERS"

if [[ $# -gt 0 ]]; then
  # A slice (`scripts/test.sh -p ferrymq-redis --test fault`): plain cargo test, no examples.
  cargo test "$@"
  exit
fi
# The whole suite: what `cargo test --workspace --all-features --no-fail-fast` runs (one
# build, then every test binary and the doc tests), with several packages' binaries side
# by side, then every runnable example on every backend (each checks its own guarantee
# and exits non-zero when it fails) and `ferry demo` on the networked servers.
python3 scripts/run-tests.py
