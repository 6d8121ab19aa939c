// BullMQ side of ferrymq-bench.
//
// Driven by the ferrymq-bench binary (it installs this folder's pinned dependencies
// with `npm ci` into a cache directory and points NODE_PATH there). One run per
// process: the first argument is a JSON object describing the run, and the script
// prints exactly one JSON line on stdout with the figures, or `{"error": "..."}` and
// exit code 1.
//
//   node bench.js '{"mode":"produce","redis":{"host":"127.0.0.1","port":6398,"db":0},
//                   "queue":"q","n":100000,"size":100,"batch":100}'
//
// Modes:
//   produce  addBulk in chunks of `batch`, timed until the last chunk is acknowledged.
//   e2e      a Worker at `concurrency` runs while the same process addBulk-s `n` jobs;
//            timed from the first add until the n-th `completed` event, or stopped
//            at `max_ms` (then `done` < n and `capped` is true).
//   consume  the consuming half of `e2e` with the producer in another process
//            (`produce`): prints {"ready":true} once its Worker is up, then times
//            from the producer's start (carried in the jobs) to the n-th completion.
//   latency  one `add` per job at `rate` jobs/s; a Worker at concurrency 1 records
//            enqueue-to-handler latency (same process clock).
//   fill     addBulk `n` jobs and exit (backlog for `drain`).
//   drain    a Worker at `concurrency` processes `n` waiting jobs (at most `max_ms`);
//            reports the peak RSS of this process (VmHWM).
//
// Jobs are added with removeOnComplete: true, the closest BullMQ setting to
// ferrymq's delete-on-ack (BullMQ's default keeps every completed job).
'use strict';

const { Queue, Worker } = require('bullmq');
const { performance } = require('node:perf_hooks');

function now() {
  return performance.timeOrigin + performance.now(); // ms, sub-ms resolution
}

// VmHWM of this process. Not process.resourceUsage().maxRSS: Linux carries
// ru_maxrss across exec, so that would report the peak of the (large) bench
// process this one was forked from.
function peakRssKib() {
  const status = require('node:fs').readFileSync('/proc/self/status', 'utf8');
  const m = /^VmHWM:\s+(\d+) kB/m.exec(status);
  return m ? Number(m[1]) : null;
}

function fail(msg) {
  process.stdout.write(JSON.stringify({ error: String(msg) }) + '\n');
  process.exit(1);
}

const spec = JSON.parse(process.argv[2] || '{}');
const connection = {
  host: spec.redis.host,
  port: spec.redis.port,
  db: spec.redis.db || 0,
  maxRetriesPerRequest: null,
};
const jobOpts = { removeOnComplete: true, removeOnFail: true };
const filler = 'x'.repeat(Math.max(0, spec.size | 0));
const stallMs = spec.stall_ms || 15000;

// `s`: when producing started (ms, wall clock), so that a consumer in another
// process can time the run from the first add.
async function addAll(queue, n, batch) {
  const s = now();
  for (let sent = 0; sent < n; ) {
    const k = Math.min(batch, n - sent);
    const jobs = new Array(k);
    for (let i = 0; i < k; i++) jobs[i] = { name: 'j', data: { p: filler, s }, opts: jobOpts };
    await queue.addBulk(jobs);
    sent += k;
  }
}

// Resolves with the count when `count()` reaches `n`, or when `deadline` (ms, on
// the now() clock) passes; rejects when the count does not move for stallMs.
function untilCount(count, n, deadline) {
  return new Promise((resolve, reject) => {
    let last = -1;
    let lastMove = Date.now();
    const timer = setInterval(() => {
      const c = count();
      if (c >= n || (deadline && now() >= deadline)) {
        clearInterval(timer);
        resolve(c);
      } else if (c !== last) {
        last = c;
        lastMove = Date.now();
      } else if (Date.now() - lastMove > stallMs) {
        clearInterval(timer);
        reject(new Error(`stalled: ${c} of ${n} jobs completed, no progress for ${stallMs} ms`));
      }
    }, 5);
  });
}

async function main() {
  const queue = new Queue(spec.queue, { connection });
  await queue.waitUntilReady();
  const out = { bullmq: require('bullmq/package.json').version, node: process.version };
  try {
    if (spec.mode === 'produce' || spec.mode === 'fill') {
      const t0 = now();
      await addAll(queue, spec.n, spec.batch || 100);
      out.secs = (now() - t0) / 1000;
    } else if (spec.mode === 'e2e' || spec.mode === 'drain') {
      let done = 0;
      let t0 = now();
      const worker = new Worker(spec.queue, async () => {}, {
        connection,
        concurrency: spec.concurrency || 1,
        autorun: false,
      });
      worker.on('completed', () => {
        done += 1;
      });
      worker.on('error', (e) => fail(e));
      worker.run();
      await worker.waitUntilReady();
      if (spec.mode === 'e2e') {
        t0 = now();
        addAll(queue, spec.n, spec.batch || 100).catch(fail);
      } else {
        t0 = now();
      }
      const deadline = spec.max_ms ? t0 + spec.max_ms : 0;
      out.done = await untilCount(() => done, spec.n, deadline);
      out.secs = (now() - t0) / 1000;
      out.capped = out.done < spec.n;
      await worker.close();
      out.maxrss_kib = peakRssKib();
    } else if (spec.mode === 'consume') {
      // The consuming half of an end-to-end run whose producer is another process
      // (`produce`), so that each gets a core, as the Rust subjects' threads do.
      let done = 0;
      let t0 = null;
      const worker = new Worker(
        spec.queue,
        async (job) => {
          if (t0 === null) t0 = job.data.s;
        },
        { connection, concurrency: spec.concurrency || 1, autorun: false },
      );
      worker.on('completed', () => {
        done += 1;
      });
      worker.on('error', (e) => fail(e));
      worker.run();
      await worker.waitUntilReady();
      process.stdout.write(JSON.stringify({ ready: true }) + '\n');
      await untilCount(() => (t0 === null ? 0 : 1), 1, 0);
      const deadline = spec.max_ms ? t0 + spec.max_ms : 0;
      out.done = await untilCount(() => done, spec.n, deadline);
      out.secs = (now() - t0) / 1000;
      out.capped = out.done < spec.n;
      await worker.close();
    } else if (spec.mode === 'latency') {
      const lat = [];
      const worker = new Worker(
        spec.queue,
        async (job) => {
          lat.push(now() - job.data.t);
        },
        { connection, concurrency: 1, autorun: false },
      );
      worker.on('error', (e) => fail(e));
      worker.run();
      await worker.waitUntilReady();
      const start = now();
      const interval = 1000 / spec.rate;
      for (let i = 0; i < spec.n; i++) {
        const due = start + i * interval;
        const wait = due - now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        await queue.add('j', { p: filler, t: now() }, jobOpts);
      }
      await untilCount(() => lat.length, spec.n);
      await worker.close();
      out.latencies_us = lat.map((ms) => Math.round(ms * 1000));
    } else {
      fail(`unknown mode ${spec.mode}`);
    }
  } finally {
    await queue.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
}

main().catch(fail);
