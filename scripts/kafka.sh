#!/usr/bin/env bash
# Start or stop a throwaway Apache Kafka (KRaft, one combined broker+controller) for
# ferrymq's tests, bound to 127.0.0.1.
#
#   scripts/kafka.sh start   [PORT] [--keep-data] # default port 9092; the controller on PORT+1
#   scripts/kafka.sh stop    [PORT]
#   scripts/kafka.sh status  [PORT]   # exit 0 only when the broker answers ApiVersions
#   scripts/kafka.sh restart [PORT]   # stop (if running), start again with the same data
#   scripts/kafka.sh kill    [PORT]   # SIGKILL the broker (a crash: no shutdown, data kept)
#
# Kafka comes from the Maven repository, not a tarball: the jars listed by
# scripts/services/kafka-pom.xml (kafka_2.13, kafka-tools, a log4j2 binding) and their
# runtime dependencies are copied by Maven into
# ${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}/kafka-VERSION/lib (local repository beside it in
# .../m2). The lib dir counts only when the marker written after a successful copy is there
# (and names the same pom); otherwise it is resolved again. Installs Debian's JRE 17 and
# Maven when missing.
#
# Idempotent: `start` on a port where the broker already answers reuses it. Otherwise a
# fresh data dir is formatted and the broker started — unless `--keep-data` (or
# FERRYMQ_KAFKA_KEEP_DATA=1) is given and the state dir holds a formatted data dir: then
# the broker starts on that data (its topics, offsets and committed group offsets), as a
# production broker restarts after a crash. `restart` is `stop` then `start --keep-data`;
# `kill` + `restart` is a broker crash and recovery (the crash tests use it). State (server.properties, log4j2
# config, pid, logs, data) lives in ${FERRYMQ_KAFKA_STATE:-/tmp/ferrymq-kafka-PORT}; the
# broker's log is server.log there. A broker that does not answer within ~90 s fails the
# script with its log tail.
#
# Env: FERRYMQ_KAFKA_CONTROLLER_PORT (default PORT+1), FERRYMQ_KAFKA_HEAP_OPTS
# (default "-Xmx512m -Xms256m"), JAVA (default java).
#
# The Kafka tools run from the same jars (tools-log4j2.properties in the state dir keeps
# them quiet), e.g.
#   java -Dlog4j2.configurationFile=/tmp/ferrymq-kafka-9092/tools-log4j2.properties \
#       -cp "$FERRYMQ_CACHE/kafka-4.1.2/lib/*" org.apache.kafka.tools.TopicCommand \
#       --bootstrap-server 127.0.0.1:9092 --list
set -euo pipefail
me=kafka.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    echo "usage: $0 start [PORT] [--keep-data] | stop [PORT] | status [PORT] | restart [PORT] | kill [PORT]" >&2
    exit 2
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
port=9092
keep_data="${FERRYMQ_KAFKA_KEEP_DATA:-0}"
while [ $# -gt 0 ]; do
    case "$1" in
        [0-9]*)
            port="$1"
            shift
            ;;
        --keep-data)
            keep_data=1
            shift
            ;;
        *) usage ;;
    esac
done
cport="${FERRYMQ_KAFKA_CONTROLLER_PORT:-$((port + 1))}"

here="$(cd "$(dirname "$0")" && pwd)"
pom="$here/services/kafka-pom.xml"
kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
[ -n "$kafka_version" ] || {
    echo "$me: no <kafka.version> in $pom" >&2
    exit 1
}
cache="${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}"
install_dir="$cache/kafka-$kafka_version"
lib="$install_dir/lib"
marker="$install_dir/installed"
m2="$cache/m2"
java="${JAVA:-java}"
# shellcheck disable=SC2206 # word splitting of the heap options is intended
heap_opts=(${FERRYMQ_KAFKA_HEAP_OPTS:--Xmx512m -Xms256m})

state="${FERRYMQ_KAFKA_STATE:-/tmp/ferrymq-kafka-$port}"
pidfile="$state/kafka.pid"
logfile="$state/server.log"    # the broker's log4j2 log
consolefile="$state/console.log" # the JVM's stdout and stderr

ensure_java() {
    if ! command -v "$java" >/dev/null 2>&1; then
        [ "$java" = java ] || {
            echo "$me: JAVA=$java not found" >&2
            exit 1
        }
        apt_install openjdk-17-jre-headless
    fi
    local major
    major="$("$java" -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n 1 || true)"
    if [ -z "$major" ] || [ "$major" -lt 17 ]; then
        echo "$me: Kafka $kafka_version needs Java 17 or newer; '$java' is ${major:-unknown} (set JAVA)" >&2
        exit 1
    fi
}

ensure_installed() {
    ensure_java
    local id
    id="$(sha256sum <"$pom" | cut -d' ' -f1)"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$id" ] && [ -d "$lib" ]; then
        return
    fi
    command -v mvn >/dev/null 2>&1 || apt_install maven
    echo "$me: resolving Kafka $kafka_version jars into $lib (Maven)" >&2
    rm -rf "$lib" "$marker" "$install_dir/lib.partial"
    mkdir -p "$install_dir"
    cp "$pom" "$install_dir/pom.xml"
    local out
    if ! out="$(mvn -B -q -Dstyle.color=never -f "$install_dir/pom.xml" -Dmaven.repo.local="$m2" \
        dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$install_dir/lib.partial" 2>&1)"; then
        echo "$out" >&2
        echo "$me: Maven could not resolve Kafka $kafka_version" >&2
        exit 1
    fi
    mv "$install_dir/lib.partial" "$lib"
    echo "$id" >"$marker"
}

# The broker answers an ApiVersions (v0) request with error code 0. Bash only, no JVM.
ready() {
    local reply
    # shellcheck disable=SC2016 # $1 expands in the inner bash
    reply="$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        # size 15 | api_key 18 | api_version 0 | correlation_id 1 | client_id "probe"
        printf "\x00\x00\x00\x0f\x00\x12\x00\x00\x00\x00\x00\x01\x00\x05probe" >&3
        head -c 10 <&3 | od -An -tx1 | tr -d " \n"
    ' _ "$port" 2>/dev/null || true)"
    # size (4 bytes), correlation_id 1, error_code 0
    [ "${#reply}" = 20 ] && [ "${reply:8}" = "000000010000" ]
}

running_pid() {
    live_pid "$pidfile"
}

fail_with_log() {
    echo "$me: $1; last lines of $logfile (config dumps left out):" >&2
    grep -v $'^\t' "$logfile" 2>/dev/null | tail -n 60 >&2 || true
    if [ -s "$consolefile" ]; then
        echo "$me: last lines of $consolefile:" >&2
        tail -n 30 "$consolefile" >&2 || true
    fi
    stop >/dev/null 2>&1 || true
    exit 1
}

# A Kafka cluster id: 16 random bytes, base64url without padding (as `random-uuid` prints);
# never starting with '-', which the storage tool would read as an option.
cluster_id() {
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [ "${id:0:1}" != "-" ] && break
    done
    echo "$id"
}

write_config() {
    cat >"$state/server.properties" <<EOF
# Generated by scripts/kafka.sh: one KRaft node, broker and controller, on 127.0.0.1.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$state/data
num.partitions=1
auto.create.topics.enable=false
delete.topic.enable=true
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
log.segment.bytes=16777216
# After a crash (kill -9) the restarted broker cannot register until the controller
# fenced its old incarnation (broker.session.timeout.ms, 9 s by default): 4 s, with
# heartbeats every 0.5 s so a live broker is never fenced for a late heartbeat.
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=500
log.retention.check.interval.ms=60000
EOF
    cat >"$state/log4j2.properties" <<EOF
# Generated by scripts/kafka.sh: the broker logs to server.log in its state dir.
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $logfile
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
    cat >"$state/tools-log4j2.properties" <<EOF
# Generated by scripts/kafka.sh: for the storage tool and other Kafka tools, warnings to stderr.
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
EOF
}

start() {
    ensure_installed
    if ready; then
        echo "$me: Kafka already answering on 127.0.0.1:$port, reusing it"
        return 0
    fi
    if [ -n "$(running_pid)" ]; then
        # Ours, but not answering (still starting, or hung): start over.
        stop >/dev/null
    fi
    local p
    for p in "$port" "$cport"; do
        if port_taken "$p"; then
            echo "$me: 127.0.0.1:$p is taken by a server that is not our Kafka" >&2
            exit 1
        fi
    done
    mkdir -p "$state"
    local reuse=0
    if [ "$keep_data" = 1 ] && [ -f "$state/data/meta.properties" ]; then
        reuse=1
        echo "--- restart on the kept data, $(date -u +%FT%TZ) ---" >>"$logfile"
        echo "--- restart on the kept data, $(date -u +%FT%TZ) ---" >>"$consolefile"
    else
        rm -rf "$state/data"
        : >"$logfile"
        : >"$consolefile"
    fi
    write_config
    local jvm=(-Dlog4j2.configurationFile="$state/log4j2.properties" -Dkafka.logs.dir="$state"
        -Djava.awt.headless=true)
    local out
    # A short-lived JVM: C1 only and the serial GC start it ~0.3 s faster.
    if [ "$reuse" = 0 ] && ! out="$("$java" -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        -Dlog4j2.configurationFile="$state/tools-log4j2.properties" \
        -cp "$lib/*" kafka.tools.StorageTool format \
        -t "$(cluster_id)" -c "$state/server.properties" 2>&1)"; then
        echo "$out" >&2
        fail_with_log "formatting $state/data failed"
    fi
    (
        cd "$state"
        # setsid: its own process group, so `stop` can end it with everything it spawned.
        exec setsid nohup "$java" "${heap_opts[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
            "${jvm[@]}" -cp "$lib/*" kafka.Kafka "$state/server.properties" \
            >>"$consolefile" 2>&1 </dev/null
    ) &
    echo $! >"$pidfile"
    local pid
    pid="$(cat "$pidfile")"
    for _ in $(seq 1 360); do
        if ready; then
            local how="fresh data"
            [ "$reuse" = 1 ] && how="kept data"
            echo "$me: Kafka $kafka_version ready on 127.0.0.1:$port (controller 127.0.0.1:$cport, state $state, $how)"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || fail_with_log "Kafka on port $port exited during start"
        sleep 0.25
    done
    fail_with_log "Kafka on port $port did not answer ApiVersions within 90 s"
}

stop() {
    local pid
    pid="$(running_pid)"
    if [ -n "$pid" ]; then
        stop_group "$pid" 300
        echo "$me: stopped Kafka on port $port (pid $pid)"
    elif ready; then
        echo "$me: Kafka answers on port $port but was not started from $state; leaving it running" >&2
    else
        echo "$me: no Kafka running on port $port"
    fi
    rm -f "$pidfile"
}

# A crash: SIGKILL the broker's process group, nothing flushed, the data dir kept.
kill9() {
    local pid
    pid="$(running_pid)"
    if [ -z "$pid" ]; then
        echo "$me: no Kafka started from $state runs on port $port" >&2
        exit 1
    fi
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || true
    rm -f "$pidfile"
    echo "$me: killed Kafka on port $port (pid $pid, SIGKILL; data kept in $state/data)"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    restart)
        stop
        keep_data=1
        start
        ;;
    kill) kill9 ;;
    status)
        if ready; then
            echo "running on 127.0.0.1:$port"
        else
            echo "not running on 127.0.0.1:$port"
            exit 1
        fi
        ;;
    *) usage ;;
esac
