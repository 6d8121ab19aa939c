use super::*;
use async_trait::async_trait;
use ferrymq_core::admin::Admin;
use ferrymq_core::memory::{delete_queue, MemoryConfig};
use ferrymq_core::{Capabilities, Consumer, Producer};
use futures::future::BoxFuture;

use crate::claims::AdminOps;
use crate::failure::CaseResult;
use crate::registry::case;

/// The memory backend claiming only the minimal capabilities: cases that need more
/// must be reported as not applicable, the rest (but `round_trip`, which compares
/// the claimed capabilities with the real ones) must still pass. Optionally with
/// its own cases, known defects and an admin.
#[derive(Default)]
struct Minimal {
    extra: Vec<Case>,
    defects: Vec<(&'static str, &'static str)>,
    admin: bool,
}

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
    async fn admin(&self, queue: &str) -> ferrymq_core::Result<Box<dyn Admin>> {
        if self.admin {
            Ok(Box::new(MemoryConfig::new(queue).admin()))
        } else {
            Err(ferrymq_core::Error::unsupported("no admin"))
        }
    }
    async fn cleanup(&self, queue: &str) -> ferrymq_core::Result<()> {
        delete_queue(queue);
        Ok(())
    }
    fn extra_cases(&self) -> Vec<Case> {
        self.extra.clone()
    }
    fn known_defects(&self) -> Vec<(&'static str, &'static str)> {
        self.defects.clone()
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
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

/// `backend` prepared as the harness does: probed on the runtime.
fn prepared(rt: &Runtime, backend: Minimal) -> Prepared {
    rt.block_on(prepare(Arc::new(backend)))
}

fn one(label: Option<&str>, prepared: Prepared) -> Vec<(Option<String>, Prepared)> {
    vec![(label.map(str::to_string), prepared)]
}

fn ready(p: &Prepared) -> &Ready {
    p.as_ref().unwrap()
}

/// A backend's own case: it reaches the concrete factory.
async fn minimal_own_case(ctx: &Context) -> CaseResult {
    crate::ensure!(
        ctx.backend_as::<Minimal>().is_some(),
        "backend_as did not find the factory"
    );
    let (_, p, c) = ctx.fresh().await?;
    crate::support::send(&*p, ferrymq_core::Message::new("own")).await?;
    let d = crate::support::receive_one(&*c, ctx.prompt()).await?;
    d.ack().await?;
    Ok(())
}

/// Arguments for a nested run: one thread, and the report written to a file of its
/// own (deleted on drop) — libtest-mimic writes straight to stdout, past the capture,
/// and a nested `test result: FAILED.` line in the output would read as ours.
struct Nested {
    args: Arguments,
    log: std::path::PathBuf,
}

impl Nested {
    fn new(extra: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "{}.log",
            crate::unique_queue_name("ferrymq-conformance-nested")
        ));
        let mut args = args(extra);
        args.test_threads = Some(1);
        args.logfile = Some(log.display().to_string());
        Nested { args, log }
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs `trials` filtered by `extra` arguments, quietly; the conclusion.
fn conclude(extra: &[&str], trials: Vec<Trial>) -> libtest_mimic::Conclusion {
    libtest_mimic::run(&Nested::new(extra).args, trials)
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
    let setups = one(None, prepared(&rt, Minimal::default()));
    for flags in [&["--list"][..], &["--ignored"][..]] {
        let ts = trials(&args(flags), &rt, &setups, false);
        assert_eq!(ts.len(), CASES.len());
        let ignored: Vec<&str> = ts
            .iter()
            .filter(|t| t.has_ignored_flag())
            .map(|t| t.name())
            .collect();
        assert!(ignored.contains(&"per_key_order"), "{flags:?}");
        assert!(
            ignored.contains(&"admin_peek_has_no_side_effects"),
            "{flags:?}"
        );
        assert!(!ignored.contains(&"round_trip"), "{flags:?}");
    }
    // A plain run decides at run time, so the reason can be printed.
    let ts = trials(&args(&[]), &rt, &setups, false);
    assert!(ts.iter().all(|t| !t.has_ignored_flag()));
    let c = conclude(&["--exact", "per_key_order"], ts);
    assert_eq!((c.num_passed, c.num_ignored, c.num_failed), (0, 1, 0));
}

#[test]
fn setup_failure_lists_every_case_to_fail() {
    let rt = runtime();
    let failed = one(None, Err("FERRYMQ_TEST_REDIS_URL is not set".into()));
    let ts = trials(&args(&["--list"]), &rt, &failed, false);
    assert_eq!(ts.len(), CASES.len());
    assert!(
        ts.iter().all(|t| !t.has_ignored_flag()),
        "none may be skipped"
    );
    let ts = trials(&args(&[]), &rt, &failed, false);
    let c = conclude(&["--exact", "round_trip"], ts);
    assert_eq!((c.num_passed, c.num_failed), (0, 1));
}

#[test]
fn applicable_case_runs_and_passes() {
    let rt = runtime();
    let c = case("queue_isolation").unwrap();
    let backend: Arc<dyn Backend> = Arc::new(Minimal::default());
    let claims = Claims::from_capabilities(backend.capabilities());
    run_case(&rt, backend, claims, *c).unwrap();
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

const PANICS: Case = Case {
    name: "panics",
    requires: &[],
    run: panics,
};
const FAILS: Case = Case {
    name: "fails",
    requires: &[],
    run: fails,
};

#[test]
fn panics_and_failures_are_reported() {
    let rt = runtime();
    let backend: Arc<dyn Backend> = Arc::new(Minimal::default());
    let claims = Claims::from_capabilities(backend.capabilities());
    let e = run_case(&rt, backend.clone(), claims.clone(), PANICS).unwrap_err();
    assert!(format!("{e:?}").contains("case panicked: boom"), "{e:?}");
    let e = run_case(&rt, backend, claims, FAILS).unwrap_err();
    assert!(format!("{e:?}").contains("arithmetic is off"), "{e:?}");
    assert!(format!("{e:?}").contains("tests.rs"), "location: {e:?}");
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

#[test]
fn backend_cases_are_listed_and_run_with_the_shared_ones() {
    let rt = runtime();
    let backend = Minimal {
        extra: vec![crate::backend_case!(minimal_own_case)],
        ..Minimal::default()
    };
    let setups = one(None, prepared(&rt, backend));
    assert_eq!(ready(&setups[0].1).cases.len(), CASES.len() + 1);
    let ts = trials(&args(&["--list"]), &rt, &setups, false);
    assert!(ts.iter().any(|t| t.name() == "minimal_own_case"));
    let ts = trials(&args(&[]), &rt, &setups, false);
    let c = conclude(&["--exact", "minimal_own_case"], ts);
    assert_eq!((c.num_passed, c.num_failed), (1, 0));
}

#[test]
fn a_known_defect_is_ignored_by_name_with_its_evidence() {
    let rt = runtime();
    let evidence = "server 9.9 reorders acks (issue #123)";
    let backend = Minimal {
        defects: vec![("queue_isolation", evidence)],
        ..Minimal::default()
    };
    let setups = one(None, prepared(&rt, backend));
    let r = ready(&setups[0].1);
    let the_case = case("queue_isolation").unwrap();
    assert_eq!(
        verdict(the_case, r),
        Verdict::Defect(format!("server defect: {evidence}"))
    );
    // Listed as ignored (so nextest skips it) ...
    let ts = trials(&args(&["--list"]), &rt, &setups, false);
    let listed = ts.iter().find(|t| t.name() == "queue_isolation").unwrap();
    assert!(listed.has_ignored_flag());
    // ... reported as ignored, never passed, in a plain run ...
    let ts = trials(&args(&[]), &rt, &setups, false);
    let c = conclude(&["--exact", "queue_isolation"], ts);
    assert_eq!((c.num_passed, c.num_ignored, c.num_failed), (0, 1, 0));
    // ... and run for real when ignored trials are asked for (the memory backend
    // does pass it, so the "defect" is gone).
    let ts = trials(&args(&["--include-ignored"]), &rt, &setups, false);
    let c = conclude(&["--include-ignored", "--exact", "queue_isolation"], ts);
    assert_eq!((c.num_passed, c.num_ignored, c.num_failed), (1, 0, 0));
}

#[test]
fn a_defect_naming_no_case_fails_the_whole_run() {
    let rt = runtime();
    let backend = Minimal {
        defects: vec![("round_tirp", "a typo")],
        ..Minimal::default()
    };
    let p = prepared(&rt, backend);
    let msg = p.as_ref().err().unwrap().clone();
    assert!(msg.contains("\"round_tirp\""), "{msg}");
    assert!(msg.contains("not a case of this run"), "{msg}");
    let setups = one(None, p);
    let ts = trials(&args(&["--list"]), &rt, &setups, false);
    assert!(ts.iter().all(|t| !t.has_ignored_flag()));
    let c = conclude(
        &["--exact", "round_trip"],
        trials(&args(&[]), &rt, &setups, false),
    );
    assert_eq!(c.num_failed, 1);

    // Other mistakes in the lists are errors too.
    let dup = plan(CASES, vec![crate::backend_case!(minimal_own_case)], vec![]);
    assert!(dup.is_ok());
    let twice = plan(
        CASES,
        vec![
            crate::backend_case!(minimal_own_case),
            crate::backend_case!(minimal_own_case),
        ],
        vec![],
    );
    assert!(twice.unwrap_err().contains("name of another case"));
    let shadow = plan(
        CASES,
        vec![Case {
            name: "round_trip",
            ..CASES[0]
        }],
        vec![],
    );
    assert!(shadow.is_err());
    let no_evidence = plan(CASES, vec![], vec![("round_trip", " ")]);
    assert!(no_evidence.unwrap_err().contains("without evidence"));
    let listed_twice = plan(
        CASES,
        vec![],
        vec![("round_trip", "a"), ("round_trip", "b")],
    );
    assert!(listed_twice.unwrap_err().contains("twice"));
    // A defect may name a backend's own case.
    let own = plan(
        CASES,
        vec![crate::backend_case!(minimal_own_case)],
        vec![("minimal_own_case", "flaky server")],
    );
    assert!(own.is_ok());
}

#[test]
fn several_setups_name_trials_setup_then_case() {
    let rt = runtime();
    let setups = vec![
        (Some("one".to_string()), prepared(&rt, Minimal::default())),
        (Some("two".to_string()), Err("two: no server".to_string())),
    ];
    let ts = trials(&args(&["--list"]), &rt, &setups, false);
    assert_eq!(ts.len(), 2 * CASES.len());
    assert!(ts.iter().any(|t| t.name() == "one::queue_isolation"));
    assert!(ts.iter().any(|t| t.name() == "two::queue_isolation"));
    // One failed setup fails its own cases only.
    let c = conclude(
        &["queue_isolation"],
        trials(&args(&[]), &rt, &setups, false),
    );
    assert_eq!((c.num_passed, c.num_failed), (1, 1));
    // Labels must be distinct and plain.
    assert!(check_labels(["sqs-standard", "sqs-fifo"].into_iter()).is_none());
    assert!(check_labels(["a", "a"].into_iter())
        .unwrap()
        .contains("twice"));
    assert!(check_labels(["a::b"].into_iter()).is_some());
    assert!(check_labels([""].into_iter()).is_some());
}

#[test]
fn the_probe_finds_admin_operations_and_lease_deadlines() {
    let rt = runtime();
    let without = prepared(&rt, Minimal::default());
    assert_eq!(ready(&without).claims.admin, AdminOps::NONE);
    // Memory deliveries carry their lease deadline, whatever Minimal claims.
    assert!(ready(&without).claims.lease_deadline);
    let with = prepared(
        &rt,
        Minimal {
            admin: true,
            ..Minimal::default()
        },
    );
    assert_eq!(ready(&with).claims.admin, AdminOps::ALL);
    let peek = case("admin_peek_has_no_side_effects").unwrap();
    assert_eq!(verdict(peek, ready(&with)), Verdict::Run);
    assert_eq!(
        verdict(peek, ready(&without)),
        Verdict::NotApplicable("not applicable: needs Admin::peek (probed: Unsupported)".into())
    );
}

#[test]
fn run_setups_runs_each_setup_under_its_label() {
    let setups = || {
        vec![
            Setup::new("one", || async { Ok(Minimal::default()) }),
            Setup::new("two", || async {
                Err::<Minimal, BoxError>("two: no server".into())
            }),
        ]
    };
    let a = Nested::new(&["queue_isolation"]);
    let c = run_setups_with(&a.args, setups()).unwrap();
    // one::queue_isolation passes, two::queue_isolation fails with the setup error.
    assert_eq!((c.num_passed, c.num_failed), (1, 1));
    let a = Nested::new(&["--exact", "one::queue_isolation"]);
    let c = run_setups_with(&a.args, setups()).unwrap();
    assert_eq!(
        (c.num_passed, c.num_failed, c.num_filtered_out),
        (1, 0, 2 * CASES.len() as u64 - 1)
    );
    // A repeated label fails every case of the run.
    let twice = vec![
        Setup::new("same", || async { Ok(Minimal::default()) }),
        Setup::new("same", || async { Ok(Minimal::default()) }),
    ];
    let a = Nested::new(&["queue_isolation"]);
    let c = run_setups_with(&a.args, twice).unwrap();
    assert_eq!((c.num_passed, c.num_failed), (0, 2));
    assert!(run_setups_with(&a.args, Vec::new()).is_none());
}
