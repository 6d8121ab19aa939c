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
//! cargo test -p ferrymq-conformance                     # every backend's run
//! cargo test -p ferrymq-conformance --test memory       # one backend
//! cargo test -p ferrymq-conformance --test memory -- per_key   # a filter
//! cargo nextest run -p ferrymq-conformance              # also works
//! ```
//!
//! Server backends read their server's address from an environment variable, so the
//! suite can be pointed at a server you already run (`FERRYMQ_TEST_REDIS_URL=
//! redis://127.0.0.1:6399` for Redis). `scripts/test.sh` starts the servers and sets
//! the variables. If a variable is missing, that backend's run **fails** — every
//! case with a message saying how to start the server — it never skips.
//!
//! ## Adding a backend
//!
//! 1. Write `tests/<backend>.rs` with a [`Backend`] factory and a `main`:
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
//! 2. Declare it in this crate's `Cargo.toml` (the harness is ours, not libtest's),
//!    with the backend crate as a dev-dependency:
//!
//!    ```toml
//!    [[test]]
//!    name = "redis"
//!    harness = false
//!    ```
//!
//! Choose a short visibility timeout (1–2 s) and an honest [`Backend::timer_slack`]:
//! cases wait for the timeout to pass and allow timers to fire that much late, never
//! early. See [`Backend`] for the rest of the contract (fresh queue per name,
//! competing consumers, capabilities equal to what producers and consumers report).
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
//!    requires::NACK_DELAY)`, listing the [`registry::requires`] it needs (add a new
//!    [`Requirement`] there if none fits). That is the only list of cases.
//!
//! Every backend's run picks the case up; backends whose capabilities lack a
//! requirement report it as not applicable by name.

pub mod backend;
pub mod cases;
pub mod context;
pub mod failure;
pub mod harness;
pub mod middleware;
pub mod registry;
pub mod support;

pub use backend::{unique_queue_name, Backend};
pub use context::Context;
pub use failure::{CaseResult, Failure};
pub use harness::{require_env, run};
pub use registry::{Case, Requirement, CASES};
