//! # ferrymq-conformance
//!
//! The conformance suite of ferrymq as a library: one set of cases, each checking a
//! promise of the core API (delivery, headers, settling, leases, ordering, delay,
//! dedup, depth, close...), run unchanged against every backend. A backend is judged
//! by the [`Capabilities`](ferrymq_core::Capabilities) it claims: a case whose
//! requirements it does not claim is reported **by name** as not applicable —
//! `test per_key_order ... ignored (not applicable: needs Ordering::PerKey)` —
//! never silently passed.
//!
//! ## Running
//!
//! ```text
//! cargo test -p ferrymq-conformance                        # unit tests + the memory run
//! cargo test -p ferrymq-conformance --test memory          # the memory run
//! cargo test -p ferrymq-redis --test conformance           # the Redis run
//! cargo test -p ferrymq-conformance --test memory -- per_key   # a filter
//! cargo nextest run -p ferrymq-conformance                 # also works
//! ```
//!
//! Each backend hosts its own run in its crate (`<backend>/tests/conformance.rs`),
//! so this crate depends on no backend crate; the memory backend's run lives here,
//! as ferrymq-core cannot depend on this crate. Server backends read their server's
//! address from an environment variable, so the suite can be pointed at a server you
//! already run (`FERRYMQ_TEST_REDIS_URL=redis://127.0.0.1:6399` for Redis).
//! `scripts/test.sh` starts the servers and sets the variables. If a variable is
//! missing, that backend's run **fails** — every case with a message saying how to
//! start the server — it never skips.
//!
//! ## What decides whether a case applies
//!
//! A case lists [`Requirement`]s, checked against the backend's [`Claims`]: its
//! declared capabilities, plus what the harness probes at setup on a throwaway queue
//! (does a delivery carry a lease deadline; which [`Admin`](ferrymq_core::Admin)
//! operations answer). A case that does not apply is reported by name as ignored
//! with the reason. A case the backend's *server* is known to fail is listed in
//! [`Backend::known_defects`] with the evidence and reported as `ignored, server
//! defect: <evidence>` — still by name, never as a pass.
//!
//! ## Adding a backend
//!
//! 1. Write `tests/conformance.rs` in the backend's crate, with a [`Backend`]
//!    factory and a `main`:
//!
//!    ```ignore
//!    use ferrymq_conformance::{require_env, Backend};
//!
//!    struct RedisFactory { /* pool, url */ }
//!
//!    #[async_trait::async_trait]
//!    impl Backend for RedisFactory {
//!        fn name(&self) -> &str { "redis" }
//!        fn capabilities(&self) -> ferrymq_core::Capabilities { /* with a ~2 s visibility */ }
//!        async fn producer(&self, queue: &str) -> ferrymq_core::Result<Box<dyn ferrymq_core::Producer>> { todo!() }
//!        async fn consumer(&self, queue: &str) -> ferrymq_core::Result<Box<dyn ferrymq_core::Consumer>> { todo!() }
//!        async fn admin(&self, queue: &str) -> ferrymq_core::Result<Box<dyn ferrymq_core::Admin>> { todo!() }
//!        async fn cleanup(&self, queue: &str) -> ferrymq_core::Result<()> { /* delete its keys */ Ok(()) }
//!        fn timer_slack(&self) -> std::time::Duration { std::time::Duration::from_millis(500) }
//!    }
//!
//!    fn main() -> std::process::ExitCode {
//!        ferrymq_conformance::run(|| async {
//!            let url = require_env(
//!                "FERRYMQ_TEST_REDIS_URL",
//!                "Start Redis with `scripts/test.sh`, or point the variable at a running \
//!                 server, e.g. FERRYMQ_TEST_REDIS_URL=redis://127.0.0.1:6399",
//!            )?;
//!            Ok(RedisFactory::connect(&url).await?)
//!        })
//!    }
//!    ```
//!
//!    Several setups of one backend (SQS standard and FIFO) go in one run with
//!    [`run_setups`]; trials are then named `<setup>::<case>`.
//!
//! 2. Declare it in the backend crate's `Cargo.toml` (the harness is ours, not
//!    libtest's), with this crate as a dev-dependency:
//!
//!    ```toml
//!    [dev-dependencies]
//!    ferrymq-conformance.workspace = true
//!
//!    [[test]]
//!    name = "conformance"
//!    harness = false
//!    ```
//!
//! Choose a short visibility timeout (1–2 s) and an honest [`Backend::timer_slack`]:
//! cases wait for the timeout to pass and allow timers to fire that much late, never
//! early. See [`Backend`] for the rest of the contract (fresh queue per name, the
//! queue existing and a group joined when `consumer()` returns, competing consumers,
//! capabilities equal to what producers and consumers report). Cases of the backend
//! alone go in [`Backend::extra_cases`] (build them with [`backend_case!`]).
//!
//! ## Adding a case
//!
//! 1. Write `pub async fn my_case(ctx: &Context) -> CaseResult` in the module of
//!    [`cases`] it belongs to (or in `middleware.rs` for middleware cases). Take fresh
//!    queues from [`Context::fresh`] / [`Context::queue`], bound every wait (the
//!    helpers in [`support`] do), keep it to a few seconds, derive timing from
//!    [`Context::visibility`] and [`Context::slack`], and assert what the API
//!    promises. Fail with `assert!`, [`ensure!`] or `?`.
//! 2. Add one line to [`CASES`] in `registry.rs`: `case!(module, my_case,
//!    requires::NACK_DELAY)`, listing the [`requires`] it needs (add a new
//!    [`Requirement`] there if none fits). That is the only list of shared cases.
//!
//! Every backend's run picks the case up; backends that lack a requirement report it
//! as not applicable by name.

pub mod backend;
pub mod cases;
pub mod claims;
pub mod context;
pub mod failure;
pub mod harness;
pub mod middleware;
pub mod registry;
pub mod support;

#[cfg(test)]
mod broken;

pub use backend::{unique_queue_name, Backend};
pub use claims::{AdminOps, Claims};
pub use context::Context;
pub use failure::{CaseResult, Failure};
pub use harness::{require_env, run, run_setups, run_setups_args, Setup};
pub use registry::{requires, Case, Requirement, CASES};
