//! Turns the case list into libtest-mimic trials and runs them on one tokio runtime.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::BoxError;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use tokio::runtime::Runtime;

use crate::backend::Backend;
use crate::context::Context;
use crate::registry::{Case, CASES};

/// Longest the backend setup (connecting, probing the server) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest one case may take, beyond four visibility timeouts. Cases are meant to
/// take seconds; this only stops a hung backend from hanging the run.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Run the whole suite against the backend `setup` builds; call it from the `main`
/// of a `harness = false` test target and return its exit code.
///
/// Accepts the usual test-binary arguments (`cargo test -p ferrymq-conformance
/// --test memory -- round_trip`, `--list`, `--ignored`, `--test-threads`), so it
/// works under both `cargo test` and `cargo nextest run`.
///
/// - A case whose requirements the backend's capabilities do not meet is reported by
///   name as ignored with the reason (`ignored (not applicable: needs
///   Ordering::PerKey)`); under nextest it is listed as ignored (shown as skipped).
/// - If `setup` fails (for example the server-address variable is missing, see
///   [`require_env`]) every case FAILS with that message: a suite that cannot reach
///   its server never passes.
///
/// `setup` and every case run on one multi-threaded tokio runtime shared by the
/// whole run, so connection pools created in `setup` stay usable.
pub fn run<B, F, Fut>(setup: F) -> ExitCode
where
    B: Backend,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<B, BoxError>>,
{
    let args = Arguments::from_args();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("ferrymq-conformance")
        .build()
    {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            eprintln!("ferrymq conformance: cannot build the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let backend: Result<Arc<dyn Backend>, String> =
        match runtime.block_on(async { tokio::time::timeout(SETUP_TIMEOUT, setup()).await }) {
            Ok(Ok(b)) => Ok(Arc::new(b)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "backend setup did not finish within {SETUP_TIMEOUT:?}"
            )),
        };
    if !args.list {
        banner(&backend);
    }
    let trials = trials(&args, &runtime, &backend, CASES, under_nextest());
    let conclusion = libtest_mimic::run(&args, trials);
    if let Ok(rt) = Arc::try_unwrap(runtime) {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    conclusion.exit_code()
}

/// The value of the environment variable `var` that names a test server, or an error
/// that says how to get one: `how_to_start` should name the script that starts the
/// server (`scripts/test.sh`) and an example value.
///
/// ```
/// let err = ferrymq_conformance::require_env(
///     "FERRYMQ_TEST_SURELY_UNSET",
///     "run `scripts/test.sh`, or set it to redis://127.0.0.1:6399",
/// )
/// .unwrap_err();
/// assert!(err.to_string().contains("FERRYMQ_TEST_SURELY_UNSET is not set"));
/// ```
pub fn require_env(var: &str, how_to_start: &str) -> Result<String, BoxError> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        Ok(_) | Err(std::env::VarError::NotPresent) => Err(format!(
            "{var} is not set, so there is no server to run this backend's conformance \
             suite against. {how_to_start}"
        )
        .into()),
        Err(e) => Err(format!("{var}: {e}").into()),
    }
}

fn banner(backend: &Result<Arc<dyn Backend>, String>) {
    match backend {
        Ok(b) => {
            let caps = b.capabilities();
            let (apply, not): (Vec<&Case>, Vec<&Case>) =
                CASES.iter().partition(|c| c.applies(&caps).is_ok());
            println!(
                "\nferrymq conformance: {} ({}), {} cases: {} apply, {} not applicable",
                b.name(),
                b.describe(),
                CASES.len(),
                apply.len(),
                not.len()
            );
            println!("  {caps:?}");
            for c in not {
                if let Err(why) = c.applies(&caps) {
                    println!("  {}: {why}", c.name);
                }
            }
        }
        Err(msg) => {
            println!("\nferrymq conformance: BACKEND SETUP FAILED, every case fails:\n  {msg}\n");
        }
    }
}

/// Whether this process was started by cargo-nextest, which cannot show a skip
/// decided at run time (it would count it as a pass).
fn under_nextest() -> bool {
    std::env::var_os("NEXTEST").is_some() || std::env::var_os("NEXTEST_RUN_ID").is_some()
}

pub(crate) fn trials(
    args: &Arguments,
    runtime: &Arc<Runtime>,
    backend: &Result<Arc<dyn Backend>, String>,
    cases: &'static [Case],
    nextest: bool,
) -> Vec<Trial> {
    let backend = match backend {
        Ok(b) => b.clone(),
        Err(msg) => {
            return cases
                .iter()
                .map(|case| {
                    let msg = format!("backend setup failed: {msg}");
                    Trial::test(case.name, move || Err(Failed::from(msg)))
                })
                .collect()
        }
    };
    let caps = backend.capabilities();
    cases
        .iter()
        .map(|case| match case.applies(&caps) {
            Ok(()) => {
                let runtime = runtime.clone();
                let backend = backend.clone();
                Trial::test(case.name, move || run_case(&runtime, backend, case))
            }
            Err(reason) => {
                // Listed as ignored so nextest skips it; at run time (cargo test)
                // reported as ignored with the reason, never as a pass.
                Trial::ignorable_test(case.name, move || not_applicable(reason, nextest))
                    .with_ignored_flag(args.list || args.ignored)
            }
        })
        .collect()
}

/// The outcome of a case that does not apply: ignored with the reason; but a failure
/// under nextest, which would count a skip decided at run time as a pass (it only
/// gets there when asked to run ignored tests).
fn not_applicable(reason: String, nextest: bool) -> Result<Completion, Failed> {
    if nextest {
        Err(Failed::from(format!(
            "{reason}; it was run anyway (--run-ignored), and nextest would count a \
             skip decided at run time as a pass"
        )))
    } else {
        Ok(Completion::ignored_with(reason))
    }
}

fn run_case(
    runtime: &Runtime,
    backend: Arc<dyn Backend>,
    case: &'static Case,
) -> Result<(), Failed> {
    let limit = CASE_TIMEOUT
        + backend
            .capabilities()
            .visibility_timeout
            .unwrap_or_default()
            * 4;
    runtime.block_on(async move {
        let ctx = Arc::new(Context::new(backend, case.name));
        let task = tokio::spawn({
            let ctx = ctx.clone();
            async move { (case.run)(&ctx).await }
        });
        let abort = task.abort_handle();
        let outcome = match tokio::time::timeout(limit, task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(failure))) => Err(failure.to_string()),
            Ok(Err(join)) => Err(match join.try_into_panic() {
                Ok(payload) => panic_message(payload),
                Err(e) => format!("the case task ended abnormally: {e}"),
            }),
            Err(_) => {
                abort.abort();
                Err(format!(
                    "did not finish within {limit:?}: the backend hangs or a wait is unbounded"
                ))
            }
        };
        let cleanup = ctx.cleanup().await;
        match (outcome, cleanup) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(c)) => Err(Failed::from(c)),
            (Err(o), Ok(())) => Err(Failed::from(o)),
            (Err(o), Err(c)) => Err(Failed::from(format!("{o}\nalso: {c}"))),
        }
    })
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(non-string panic payload)");
    format!("case panicked: {text}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use ferrymq_core::memory::{delete_queue, MemoryConfig};
    use ferrymq_core::{Capabilities, Consumer, Producer};
    use futures::future::BoxFuture;

    use crate::failure::CaseResult;
    use crate::registry::case;

    /// The memory backend claiming only the minimal capabilities: cases that need
    /// more must be reported as not applicable, the rest must still pass.
    struct Minimal;

    #[async_trait]
    impl Backend for Minimal {
        fn name(&self) -> &str {
            "minimal"
        }
        fn capabilities(&self) -> Capabilities {
            let mut caps = Capabilities::minimal("memory");
            caps.visibility_timeout = None;
            caps
        }
        async fn producer(&self, queue: &str) -> ferrymq_core::Result<Box<dyn Producer>> {
            Ok(Box::new(MemoryConfig::new(queue).producer()?))
        }
        async fn consumer(&self, queue: &str) -> ferrymq_core::Result<Box<dyn Consumer>> {
            Ok(Box::new(MemoryConfig::new(queue).consumer()?))
        }
        async fn cleanup(&self, queue: &str) -> ferrymq_core::Result<()> {
            delete_queue(queue);
            Ok(())
        }
    }

    fn runtime() -> Arc<Runtime> {
        Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        )
    }

    fn args(extra: &[&str]) -> Arguments {
        let mut argv = vec!["conformance"];
        argv.extend_from_slice(extra);
        Arguments::from_iter(argv)
    }

    fn minimal() -> Result<Arc<dyn Backend>, String> {
        Ok(Arc::new(Minimal))
    }

    #[test]
    fn not_applicable_is_ignored_with_its_reason_never_passed() {
        let reason = "not applicable: needs Ordering::PerKey".to_string();
        match not_applicable(reason.clone(), false) {
            Ok(Completion::Ignored { reason: Some(r) }) => assert_eq!(r, reason),
            Ok(Completion::Ignored { reason: None }) => panic!("no reason given"),
            Ok(Completion::Completed) => panic!("a case that does not apply passed"),
            Err(e) => panic!("failed: {e:?}"),
        }
        // Under nextest a run-time skip would count as a pass: fail instead.
        assert!(not_applicable(reason, true).is_err());
    }

    #[test]
    fn listing_marks_not_applicable_cases_ignored() {
        let rt = runtime();
        for flags in [&["--list"][..], &["--ignored"][..]] {
            let ts = trials(&args(flags), &rt, &minimal(), CASES, false);
            assert_eq!(ts.len(), CASES.len());
            let ignored: Vec<&str> = ts
                .iter()
                .filter(|t| t.has_ignored_flag())
                .map(|t| t.name())
                .collect();
            assert!(ignored.contains(&"per_key_order"), "{flags:?}");
            assert!(!ignored.contains(&"round_trip"), "{flags:?}");
        }
        // A plain run decides at run time, so the reason can be printed.
        let ts = trials(&args(&[]), &rt, &minimal(), CASES, false);
        assert!(ts.iter().all(|t| !t.has_ignored_flag()));
    }

    #[test]
    fn setup_failure_lists_every_case_to_fail() {
        let rt = runtime();
        let failed: Result<Arc<dyn Backend>, String> =
            Err("FERRYMQ_TEST_REDIS_URL is not set".into());
        let ts = trials(&args(&["--list"]), &rt, &failed, CASES, false);
        assert_eq!(ts.len(), CASES.len());
        assert!(
            ts.iter().all(|t| !t.has_ignored_flag()),
            "none may be skipped"
        );
    }

    #[test]
    fn applicable_case_runs_and_passes() {
        let rt = runtime();
        let c = case("queue_isolation").unwrap();
        run_case(&rt, Arc::new(Minimal), c).unwrap();
    }

    fn panics(_: &Context) -> BoxFuture<'_, CaseResult> {
        Box::pin(async { panic!("boom") })
    }

    fn fails(ctx: &Context) -> BoxFuture<'_, CaseResult> {
        Box::pin(async move {
            let _ = ctx.queue();
            crate::ensure!(1 + 1 == 3, "arithmetic is off");
            Ok(())
        })
    }

    static PANICS: Case = Case {
        name: "panics",
        requires: &[],
        run: panics,
    };
    static FAILS: Case = Case {
        name: "fails",
        requires: &[],
        run: fails,
    };

    #[test]
    fn panics_and_failures_are_reported() {
        let rt = runtime();
        let e = run_case(&rt, Arc::new(Minimal), &PANICS).unwrap_err();
        assert!(format!("{e:?}").contains("case panicked: boom"), "{e:?}");
        let e = run_case(&rt, Arc::new(Minimal), &FAILS).unwrap_err();
        assert!(format!("{e:?}").contains("arithmetic is off"), "{e:?}");
        assert!(format!("{e:?}").contains("harness.rs"), "location: {e:?}");
    }

    #[test]
    fn require_env_names_the_variable_and_the_script() {
        let err = require_env(
            "FERRYMQ_TEST_DEFINITELY_NOT_SET",
            "Start it with scripts/test.sh.",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("FERRYMQ_TEST_DEFINITELY_NOT_SET is not set"),
            "{err}"
        );
        assert!(err.contains("scripts/test.sh"), "{err}");
    }
}
