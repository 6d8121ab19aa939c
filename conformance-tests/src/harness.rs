//! Turns the case list into libtest-mimic trials and runs them on one tokio runtime.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::BoxError;
use futures::future::LocalBoxFuture;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use tokio::runtime::Runtime;

use crate::backend::Backend;
use crate::claims::Claims;
use crate::context::Context;
use crate::registry::{Case, CASES};

/// Longest the backend setup (connecting, probing the server) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest one case may take, beyond four visibility timeouts. Cases are meant to
/// take seconds; this only stops a hung backend from hanging the run.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Run the whole suite against the backend `setup` builds; call it from the `main`
/// of a `harness = false` test target and return its exit code. Trials are named
/// after the cases (`round_trip`); for several setups of one backend in one run see
/// [`run_setups`].
///
/// Accepts the usual test-binary arguments (`cargo test -p ferrymq-redis --test
/// conformance -- round_trip`, `--list`, `--ignored`, `--test-threads`), so it
/// works under both `cargo test` and `cargo nextest run`.
///
/// - A case whose requirements the backend does not meet is reported by name as
///   ignored with the reason (`ignored, not applicable: needs Ordering::PerKey`);
///   under nextest it is listed as ignored (shown as skipped).
/// - A case the backend lists in [`Backend::known_defects`] is reported as
///   `ignored, server defect: <evidence>`; `--ignored` runs it anyway.
/// - The backend's own [`Backend::extra_cases`] are listed and run with the rest.
/// - If `setup` fails (for example the server-address variable is missing, see
///   [`require_env`]) every case FAILS with that message: a suite that cannot reach
///   its server never passes. So does every case when `known_defects` names a case
///   that does not exist, or two cases share a name.
///
/// Before the cases, the harness probes the backend on a throwaway queue (one
/// message round trip, and its admin's operations): see [`Claims::probe`].
///
/// `setup` and every case run on one multi-threaded tokio runtime shared by the
/// whole run, so connection pools created in `setup` stay usable.
pub fn run<B, F, Fut>(setup: F) -> ExitCode
where
    B: Backend,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<B, BoxError>>,
{
    let Some(runtime) = build_runtime() else {
        return ExitCode::FAILURE;
    };
    let prepared = runtime.block_on(async {
        match tokio::time::timeout(SETUP_TIMEOUT, setup()).await {
            Ok(Ok(b)) => prepare(Arc::new(b)).await,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "backend setup did not finish within {SETUP_TIMEOUT:?}"
            )),
        }
    });
    run_prepared(&Arguments::from_args(), runtime, vec![(None, prepared)]).exit_code()
}

/// One setup of a backend for [`run_setups`]: a label (`sqs-fifo`) and the function
/// that builds the factory.
pub struct Setup {
    label: String,
    build: BuildFn,
}

/// Builds one setup's factory.
type BuildFn = Box<dyn FnOnce() -> LocalBoxFuture<'static, Result<Arc<dyn Backend>, BoxError>>>;

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Setup {
    /// A setup called `label` (lower-case ASCII letters, digits, `-` and `_`; unique
    /// in the run), built by `setup`.
    pub fn new<B, F, Fut>(label: impl Into<String>, setup: F) -> Self
    where
        B: Backend,
        F: FnOnce() -> Fut + 'static,
        Fut: Future<Output = Result<B, BoxError>> + 'static,
    {
        Setup {
            label: label.into(),
            build: Box::new(move || {
                Box::pin(async move { setup().await.map(|b| Arc::new(b) as Arc<dyn Backend>) })
            }),
        }
    }

    /// The label.
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// Run the whole suite against several setups of one backend in one test binary
/// (SQS standard and FIFO queues, a Kafka topic with one and with several
/// partitions): every case once per setup, trials named `<label>::<case>`, so
/// `-- sqs-fifo::` runs one setup and `-- per_key_order` one case on all.
///
/// ```ignore
/// use ferrymq_conformance::{run_setups, Setup};
///
/// fn main() -> std::process::ExitCode {
///     run_setups(vec![
///         Setup::new("sqs-standard", || SqsFactory::connect(false)),
///         Setup::new("sqs-fifo", || SqsFactory::connect(true)),
///     ])
/// }
/// ```
///
/// Each setup is built, probed and reported on its own: one whose setup fails fails
/// its own cases only. Labels that are empty, repeated or not made of lower-case
/// ASCII letters, digits, `-` and `_` fail every case of the run. Otherwise as
/// [`run`].
pub fn run_setups(setups: Vec<Setup>) -> ExitCode {
    let args = Arguments::from_args();
    match run_setups_with(&args, setups) {
        Some(conclusion) => conclusion.exit_code(),
        None => ExitCode::FAILURE,
    }
}

/// [`run_setups`] with arguments the caller parsed and may have adjusted: a backend
/// whose cases mostly wait on the server's timers can run more trials at once than
/// the machine has cores (`args.test_threads`, when the command line set none).
pub fn run_setups_args(args: &Arguments, setups: Vec<Setup>) -> ExitCode {
    match run_setups_with(args, setups) {
        Some(conclusion) => conclusion.exit_code(),
        None => ExitCode::FAILURE,
    }
}

/// [`run_setups`] with these arguments; `None` when nothing could run.
pub(crate) fn run_setups_with(
    args: &Arguments,
    setups: Vec<Setup>,
) -> Option<libtest_mimic::Conclusion> {
    if setups.is_empty() {
        eprintln!("ferrymq conformance: run_setups was given no setup");
        return None;
    }
    let runtime = build_runtime()?;
    let labels_problem = check_labels(setups.iter().map(Setup::label));
    let mut prepared = Vec::new();
    for setup in setups {
        let label = setup.label.clone();
        let result = match &labels_problem {
            Some(problem) => Err(problem.clone()),
            None => runtime.block_on(async {
                match tokio::time::timeout(SETUP_TIMEOUT, (setup.build)()).await {
                    Ok(Ok(b)) => prepare(b).await,
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "setup {label} did not finish within {SETUP_TIMEOUT:?}"
                    )),
                }
            }),
        };
        prepared.push((Some(label), result));
    }
    Some(run_prepared(args, runtime, prepared))
}

fn build_runtime() -> Option<Arc<Runtime>> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("ferrymq-conformance")
        .build()
    {
        Ok(rt) => Some(Arc::new(rt)),
        Err(e) => {
            eprintln!("ferrymq conformance: cannot build the tokio runtime: {e}");
            None
        }
    }
}

fn run_prepared(
    args: &Arguments,
    runtime: Arc<Runtime>,
    setups: Vec<(Option<String>, Prepared)>,
) -> libtest_mimic::Conclusion {
    if !args.list {
        for (label, prepared) in &setups {
            banner(label.as_deref(), prepared);
        }
    }
    let trials = trials(args, &runtime, &setups, under_nextest());
    let conclusion = libtest_mimic::run(args, trials);
    drop(setups);
    if let Ok(rt) = Arc::try_unwrap(runtime) {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    conclusion
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

/// A backend ready to run: what it claims, its cases and its known defects; or why
/// none of its cases can run.
pub(crate) type Prepared = Result<Ready, String>;

pub(crate) struct Ready {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) claims: Claims,
    /// The shared cases, then the backend's own.
    pub(crate) cases: Vec<Case>,
    /// Case name -> evidence.
    pub(crate) defects: HashMap<&'static str, &'static str>,
}

/// Probe `backend` and check its extra cases and known defects.
pub(crate) async fn prepare(backend: Arc<dyn Backend>) -> Prepared {
    let (cases, defects) = plan(CASES, backend.extra_cases(), backend.known_defects())?;
    let claims = Claims::probe(&*backend).await?;
    Ok(Ready {
        backend,
        claims,
        cases,
        defects,
    })
}

/// The cases of a run (`shared`, then `extra`) and its known defects, or what is
/// wrong with them: a repeated or malformed case name, a defect naming no case of the
/// run, a defect listed twice or without evidence.
pub(crate) fn plan(
    shared: &[Case],
    extra: Vec<Case>,
    defects: Vec<(&'static str, &'static str)>,
) -> Result<(Vec<Case>, HashMap<&'static str, &'static str>), String> {
    let mut cases: Vec<Case> = shared.to_vec();
    let mut names: HashSet<&'static str> = cases.iter().map(|c| c.name).collect();
    for case in extra {
        if !is_identifier(case.name) {
            return Err(format!(
                "the backend's extra case {:?} is not a valid case name (lower-case ASCII \
                 letters, digits and _)",
                case.name
            ));
        }
        if !names.insert(case.name) {
            return Err(format!(
                "the backend's extra case {} has the name of another case of the run",
                case.name
            ));
        }
        cases.push(case);
    }
    let mut listed = HashMap::new();
    for (name, evidence) in defects {
        if !names.contains(name) {
            return Err(format!(
                "known_defects names {name:?}, which is not a case of this run (a typo, or a \
                 case that was renamed or removed)"
            ));
        }
        if evidence.trim().is_empty() {
            return Err(format!(
                "known_defects lists {name} without evidence: say which server defect it \
                 is and how it shows"
            ));
        }
        if listed.insert(name, evidence).is_some() {
            return Err(format!("known_defects lists {name} twice"));
        }
    }
    Ok((cases, listed))
}

/// A case or setup name: non-empty, lower-case ASCII letters, digits and `_`.
pub(crate) fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn check_labels<'a>(labels: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut seen = HashSet::new();
    for label in labels {
        let valid = !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            return Some(format!(
                "setup label {label:?} is not lower-case ASCII letters, digits, - and _"
            ));
        }
        if !seen.insert(label) {
            return Some(format!("setup label {label} is used twice"));
        }
    }
    None
}

fn banner(label: Option<&str>, prepared: &Prepared) {
    let prefix = label.map(|l| format!("[{l}] ")).unwrap_or_default();
    match prepared {
        Ok(ready) => {
            let b = &ready.backend;
            let verdicts: Vec<(&Case, Verdict)> =
                ready.cases.iter().map(|c| (c, verdict(c, ready))).collect();
            let apply = verdicts
                .iter()
                .filter(|(_, v)| matches!(v, Verdict::Run))
                .count();
            println!(
                "\nferrymq conformance: {prefix}{} ({}), {} cases ({} of the backend's own): \
                 {apply} apply, {} not applicable, {} known server defects",
                b.name(),
                b.describe(),
                ready.cases.len(),
                ready.cases.len() - CASES.len(),
                verdicts
                    .iter()
                    .filter(|(_, v)| matches!(v, Verdict::NotApplicable(_)))
                    .count(),
                verdicts
                    .iter()
                    .filter(|(_, v)| matches!(v, Verdict::Defect(_)))
                    .count(),
            );
            println!("  {:?}", ready.claims.capabilities);
            println!(
                "  probed: lease deadline on deliveries: {}; admin: {:?}",
                if ready.claims.lease_deadline {
                    "yes"
                } else {
                    "no"
                },
                ready.claims.admin
            );
            for (c, v) in &verdicts {
                match v {
                    Verdict::Run => {}
                    Verdict::NotApplicable(why) | Verdict::Defect(why) => {
                        println!("  {}: {why}", c.name)
                    }
                }
            }
        }
        Err(msg) => {
            println!(
                "\nferrymq conformance: {prefix}BACKEND SETUP FAILED, every case fails:\n  {msg}\n"
            );
        }
    }
}

/// Whether this process was started by cargo-nextest, which cannot show a skip
/// decided at run time (it would count it as a pass).
fn under_nextest() -> bool {
    std::env::var_os("NEXTEST").is_some() || std::env::var_os("NEXTEST_RUN_ID").is_some()
}

/// What to do with a case of a ready backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Run,
    /// The reason: `not applicable: needs ...`.
    NotApplicable(String),
    /// The reason: `server defect: <evidence>`.
    Defect(String),
}

pub(crate) fn verdict(case: &Case, ready: &Ready) -> Verdict {
    if let Err(reason) = case.applies(&ready.claims) {
        return Verdict::NotApplicable(reason);
    }
    match ready.defects.get(case.name) {
        Some(evidence) => Verdict::Defect(format!("server defect: {evidence}")),
        None => Verdict::Run,
    }
}

pub(crate) fn trials(
    args: &Arguments,
    runtime: &Arc<Runtime>,
    setups: &[(Option<String>, Prepared)],
    nextest: bool,
) -> Vec<Trial> {
    let mut trials = Vec::new();
    for (label, prepared) in setups {
        let name = |case: &str| match label {
            Some(l) => format!("{l}::{case}"),
            None => case.to_string(),
        };
        let ready = match prepared {
            Ok(ready) => ready,
            Err(msg) => {
                for case in CASES {
                    let msg = format!("backend setup failed: {msg}");
                    trials.push(Trial::test(name(case.name), move || Err(Failed::from(msg))));
                }
                continue;
            }
        };
        let listed_ignored = args.list || args.ignored;
        for case in &ready.cases {
            let case = *case;
            let trial = match verdict(&case, ready) {
                Verdict::Run => {
                    let (runtime, backend, claims) =
                        (runtime.clone(), ready.backend.clone(), ready.claims.clone());
                    Trial::test(name(case.name), move || {
                        run_case(&runtime, backend, claims, case)
                    })
                }
                Verdict::NotApplicable(reason) => {
                    // Listed as ignored so nextest skips it; at run time (cargo test)
                    // reported as ignored with the reason, never as a pass.
                    Trial::ignorable_test(name(case.name), move || not_applicable(reason, nextest))
                        .with_ignored_flag(listed_ignored)
                }
                Verdict::Defect(reason) => {
                    // Asked to run ignored trials: run it, to see whether the server
                    // still has the defect.
                    let run_it = args.ignored || args.include_ignored;
                    let (runtime, backend, claims) =
                        (runtime.clone(), ready.backend.clone(), ready.claims.clone());
                    Trial::ignorable_test(name(case.name), move || {
                        if run_it {
                            run_case(&runtime, backend, claims, case)
                                .map(|()| Completion::Completed)
                                .map_err(|e| {
                                    Failed::from(format!(
                                        "({reason}) {}",
                                        e.message().unwrap_or("failed")
                                    ))
                                })
                        } else {
                            Ok(Completion::ignored_with(reason))
                        }
                    })
                    .with_ignored_flag(listed_ignored)
                }
            };
            trials.push(trial);
        }
    }
    trials
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

pub(crate) fn run_case(
    runtime: &Runtime,
    backend: Arc<dyn Backend>,
    claims: Claims,
    case: Case,
) -> Result<(), Failed> {
    let limit = CASE_TIMEOUT
        + claims
            .capabilities
            .visibility_timeout
            .unwrap_or_default()
            .saturating_mul(4);
    runtime.block_on(async move {
        let ctx = Arc::new(Context::with_claims(backend, claims, case.name));
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
mod tests;
