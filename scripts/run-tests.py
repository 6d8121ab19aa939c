#!/usr/bin/env python3
"""Run the whole suite the way `cargo test --workspace --all-features --no-fail-fast`
does, but with the test binaries of different packages running side by side.

Why: most of the suite waits on servers and clocks (LocalStack's visibility timers,
the one-minute Redis soak, Kafka group joins), so running it one binary after
another spends ~10 minutes mostly asleep. Cargo builds everything once
(`--no-run`), then this script runs each package's test binaries in order, as cargo
would (same working directory and CARGO_* variables), with several packages at a
time, plus the doc tests, then every example on every backend and `ferry demo` on
the networked ones, also side by side, and last the bench's `--smoke` run. Output of each binary is kept in a log and
printed whole when it finishes, so nothing interleaves; a failure is printed again
at the end. Exit status 1 when anything failed.

Used by scripts/test.sh (which starts the servers and exports their addresses):

    scripts/run-tests.py [--jobs N] [--skip-examples] [--skip-bench]

FERRYMQ_TEST_JOBS sets how many packages run at once (default 3: the SQS package alone
takes as long as the rest together, and more lanes only add CPU load next to it).
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARGO = os.environ.get("CARGO", "cargo")
BUILD_FLAGS = ["--workspace", "--all-features"]

# The runnable examples of the facade (ferrymq/examples): each checks its own guarantee on
# the backend FERRYMQ_URL names and exits non-zero when it does not hold.
KAFKA_EXAMPLES = ["exactly_once"]
EXAMPLES = ["quickstart", "worker", "dead_letter", "per_key_order", "backpressure", "batching", "autoscale", "schedule", "progress", "flow"]

# Packages whose binaries take longest start first (measured, seconds, warm).
LONGEST_FIRST = ["ferrymq-sqs", "ferrymq-redis", "ferrymq-kafka", "ferrymq-conformance", "ferrymq-cli"]

print_lock = threading.Lock()


def say(text):
    with print_lock:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()


def build():
    """Build every test binary, example and bin once; the test binaries, by package."""
    cmd = [CARGO, "test", *BUILD_FLAGS, "--no-run", "--message-format=json-render-diagnostics"]
    say("== build: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    binaries = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        if not msg.get("profile", {}).get("test"):
            continue
        package = msg["package_id"]
        manifest_dir = os.path.dirname(msg["manifest_path"])
        name = package_name(msg)
        target = msg["target"]
        label = f"{name} {target['kind'][0]}:{target['name']}"
        binaries.setdefault(name, []).append(
            {"label": label, "exe": msg["executable"], "dir": manifest_dir, "package": name,
             "version": package_version(package)})
    if proc.wait() != 0:
        say("== build failed")
        sys.exit(1)
    subprocess.run([CARGO, "build", "-q", *BUILD_FLAGS, "--examples", "--bins"], cwd=ROOT, check=True)
    # Cargo runs unit tests first, then integration tests, each group by name.
    for runs in binaries.values():
        runs.sort(key=lambda r: (not r["label"].split(" ")[1].startswith("lib"), r["label"]))
    return binaries


def package_name(msg):
    pid = msg["package_id"]
    # "path+file:///work/main/core#ferrymq-core@0.1.0" or "ferrymq-core 0.1.0 (path+...)"
    if "#" in pid:
        tail = pid.split("#", 1)[1]
        return tail.split("@", 1)[0] if "@" in tail else os.path.basename(msg["manifest_path"].rsplit("/", 1)[0])
    return pid.split(" ", 1)[0]


def package_version(pid):
    if "@" in pid:
        return pid.rsplit("@", 1)[1]
    if "#" in pid:
        return pid.rsplit("#", 1)[1]
    parts = pid.split(" ")
    return parts[1] if len(parts) > 1 else "0.0.0"


class Results:
    def __init__(self):
        self.failed = []
        self.lock = threading.Lock()

    def record(self, label, ok, log_path):
        if not ok:
            with self.lock:
                self.failed.append((label, log_path))


def run_logged(label, cmd, cwd, env, logdir, results):
    log_path = os.path.join(logdir, label.replace("/", "_").replace(" ", "_").replace(":", "_") + ".log")
    start = time.monotonic()
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    took = time.monotonic() - start
    with open(log_path, errors="replace") as log:
        text = log.read()
    ok = code == 0
    summary = [line for line in text.splitlines() if line.startswith("test result:")]
    status = "ok" if ok else f"FAILED (exit {code})"
    say(f"\n== {label}: {status} in {took:.1f}s\n{text.rstrip()}")
    if summary:
        say(f"== {label}: {summary[-1]}")
    results.record(label, ok, log_path)
    return ok


def test_env(run):
    env = dict(os.environ)
    env["CARGO_MANIFEST_DIR"] = run["dir"]
    env["CARGO_PKG_NAME"] = run["package"]
    env["CARGO_PKG_VERSION"] = run["version"]
    env["CARGO"] = CARGO
    return env


def run_units(units, jobs, logdir, results):
    """Each unit is a list of (label, cmd, cwd, env) run in order; `jobs` units at once."""
    work = queue.Queue()
    for unit in units:
        work.put(unit)

    def worker():
        while True:
            try:
                unit = work.get_nowait()
            except queue.Empty:
                return
            for label, cmd, cwd, env in unit:
                run_logged(label, cmd, cwd, env, logdir, results)

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_units(binaries):
    order = sorted(binaries, key=lambda p: LONGEST_FIRST.index(p) if p in LONGEST_FIRST else len(LONGEST_FIRST))
    units = []
    for package in order:
        units.append([(r["label"], [r["exe"]], r["dir"], test_env(r)) for r in binaries[package]])
    doc = [CARGO, "test", *BUILD_FLAGS, "--doc", "--no-fail-fast"]
    units.append([("doc-tests", doc, ROOT, dict(os.environ))])
    return units


def example_units():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    examples_dir = os.path.join(target, "debug", "examples")
    ferry = os.path.join(target, "debug", "ferry")
    redis = os.environ["FERRYMQ_TEST_REDIS_URL"]
    sqs = os.environ["FERRYMQ_TEST_SQS_ENDPOINT"]
    kafka = os.environ["FERRYMQ_TEST_KAFKA_BROKERS"]

    def urls(queue_name):
        return {
            "memory": None,
            "redis": f"{redis}/{queue_name}?visibility=5s",
            "sqs": f"sqs://{queue_name}?endpoint={sqs}&create=true&visibility=5s",
            "sqs-fifo": f"sqs://{queue_name}.fifo?endpoint={sqs}&create=true&visibility=5s",
            "kafka": f"kafka://{kafka}/{queue_name}?create=true",
        }

    units = []
    for example in EXAMPLES:
        for backend, url in urls(f"example-{example}").items():
            env = dict(os.environ)
            env.pop("FERRYMQ_URL", None)
            if url:
                env["FERRYMQ_URL"] = url
            units.append([(f"example {example} ({backend})", [os.path.join(examples_dir, example)], ROOT, env)])
    # Kafka-only examples: each checks its own guarantee and exits non-zero if it broke.
    for example in KAFKA_EXAMPLES:
        env = dict(os.environ)
        env["KAFKA_BROKERS"] = kafka
        units.append([(f"example {example} (kafka)", [os.path.join(examples_dir, example)], ROOT, env)])
    for backend, url in urls("{queue}").items():
        if url:
            units.append([(f"ferry demo ({backend})", [ferry, "demo", "--url", url], ROOT, dict(os.environ))])
    return units


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("FERRYMQ_TEST_JOBS", "3")))
    parser.add_argument("--skip-examples", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()

    started = time.monotonic()
    binaries = build()
    built = time.monotonic()
    results = Results()
    with tempfile.TemporaryDirectory(prefix="ferrymq-tests-") as logdir:
        n = sum(len(v) for v in binaries.values())
        say(f"\n== tests: {n} binaries in {len(binaries)} packages, {args.jobs} packages at a time, then doc tests")
        run_units(test_units(binaries), args.jobs, logdir, results)
        tested = time.monotonic()
        if not args.skip_examples:
            say("\n== examples on memory, redis, sqs (standard and FIFO) and kafka; ferry demo on the servers")
            run_units(example_units(), 6, logdir, results)
        examined = time.monotonic()
        if not args.skip_bench:
            # The bench's smoke run (tiny counts, every subject once, its own Redis on
            # 6398): so the bench never rots. Speed is not asserted; a failing ferrymq
            # or raw-baseline run fails it.
            say("\n== bench smoke run (ferrymq-bench --smoke, dev profile)")
            bench = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "ferrymq-bench")
            run_units([[("bench --smoke", [bench, "--smoke"], ROOT, dict(os.environ))]], 1, logdir, results)
        done = time.monotonic()
        say(f"\n== times: build {built - started:.0f}s, tests {tested - built:.0f}s, "
            f"examples {examined - tested:.0f}s, bench smoke {done - examined:.0f}s, total {done - started:.0f}s")
        if results.failed:
            say(f"== {len(results.failed)} FAILED:")
            for label, _ in results.failed:
                say(f"   {label}")
            return 1
    say("== all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
