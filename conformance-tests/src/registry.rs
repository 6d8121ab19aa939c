//! The one list of cases, and what each needs from a backend.

use std::time::Duration;

use ferrymq_core::{Accuracy, Ordering, Priority};
pub use futures::future::BoxFuture;

use crate::cases::{
    admin, basics, capacity, concurrency, lifecycle, limits, ordering, receiving, schedules,
    scheduling, settle, validation, visibility,
};
use crate::claims::Claims;
use crate::context::Context;
use crate::failure::CaseResult;
use crate::jobs;
use crate::middleware;

/// Runs a case against a context.
pub type CaseFn = for<'a> fn(&'a Context) -> BoxFuture<'a, CaseResult>;

/// One thing a case needs from a backend, with the name reported when it is missing.
#[derive(Clone, Copy)]
pub struct Requirement {
    /// What is needed, as reported: `not applicable: needs <needs>`.
    pub needs: &'static str,
    /// Whether the backend's claims provide it.
    pub check: fn(&Claims) -> bool,
}

impl std::fmt::Debug for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.needs)
    }
}

/// A conformance case: a name, what it needs, and the function that runs it.
#[derive(Clone, Copy)]
pub struct Case {
    /// Test name, the name of the case function.
    pub name: &'static str,
    /// Every requirement must hold for the case to apply.
    pub requires: &'static [Requirement],
    /// The case.
    pub run: CaseFn,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("requires", &self.requires)
            .finish_non_exhaustive()
    }
}

impl Case {
    /// `Ok` when the case applies to a backend making these claims; otherwise the
    /// reason, naming every missing requirement: `not applicable: needs A, B`.
    pub fn applies(&self, claims: &Claims) -> Result<(), String> {
        let missing: Vec<&str> = self
            .requires
            .iter()
            .filter(|r| !(r.check)(claims))
            .map(|r| r.needs)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not applicable: needs {}", missing.join(", ")))
        }
    }
}

/// What cases can require.
pub mod requires {
    use super::*;

    /// The delay the scheduling cases use.
    pub const CASE_DELAY: Duration = Duration::from_secs(2);

    /// Un-acked deliveries come back after a visibility timeout.
    pub const VISIBILITY_TIMEOUT: Requirement = Requirement {
        needs: "visibility_timeout",
        check: |c| c.capabilities.visibility_timeout.is_some(),
    };
    /// `extend` pushes the redelivery deadline (meaningful only with a timeout).
    pub const EXTEND_VISIBILITY: Requirement = Requirement {
        needs: "extend_visibility",
        check: |c| c.capabilities.extend_visibility && c.capabilities.visibility_timeout.is_some(),
    };
    /// `nack` with a delay of [`CASE_DELAY`] is honoured.
    pub const NACK_DELAY: Requirement = Requirement {
        needs: "max_nack_delay >= 2s",
        check: |c| c.capabilities.supports_nack_delay(CASE_DELAY),
    };
    /// `Delivery::attempt` goes up on a redelivery after a nack.
    pub const ATTEMPTS_ON_NACK: Requirement = Requirement {
        needs: "attempts.counts_nacks()",
        check: |c| c.capabilities.attempts.counts_nacks(),
    };
    /// `Ack::release` gives a message back without counting an attempt.
    pub const RELEASE_KEEPS_ATTEMPT: Requirement = Requirement {
        needs: "release_keeps_attempt",
        check: |c| c.capabilities.release_keeps_attempt,
    };
    /// Per-key ordering in the strict sense: one message of a key in flight at a
    /// time, and a retry keeps its place.
    pub const PER_KEY: Requirement = Requirement {
        needs: "Ordering::PerKey",
        check: |c| c.capabilities.ordering == Ordering::PerKey,
    };
    /// A key's messages are handed out in send order (either per-key variant); a
    /// retry may lose its place.
    pub const KEY_ORDER: Requirement = Requirement {
        needs: "Ordering::PerKey or Ordering::PerKeyPipelined",
        check: |c| c.capabilities.ordering.keeps_key_order(),
    };
    /// Native per-message delay of at least [`CASE_DELAY`].
    pub const DELAY: Requirement = Requirement {
        needs: "max_delay >= 2s",
        check: |c| c.capabilities.supports_delay(CASE_DELAY),
    };
    /// Broker-side deduplication on `dedup_id`.
    pub const DEDUP: Requirement = Requirement {
        needs: "dedup_window >= 10s",
        check: |c| {
            c.capabilities
                .dedup_window
                .is_some_and(|w| w >= Duration::from_secs(10))
        },
    };
    /// Depth counts, exact at the moment they are read.
    pub const DEPTH_EXACT: Requirement = Requirement {
        needs: "depth == Accuracy::Exact",
        check: |c| c.capabilities.depth == Accuracy::Exact,
    };
    /// Priority is honoured, exactly or in at least two levels.
    pub const PRIORITY: Requirement = Requirement {
        needs: "Priority::Exact or Priority::Levels(n >= 2)",
        check: |c| match c.capabilities.priority {
            Priority::Exact => true,
            Priority::Levels(n) => n >= 2,
            _ => false,
        },
    };
    /// The queue has a bound.
    pub const BOUNDED: Requirement = Requirement {
        needs: "bounded",
        check: |c| c.capabilities.bounded,
    };
    /// Deliveries carry their lease deadline (probed at setup).
    pub const LEASE_DEADLINE: Requirement = Requirement {
        needs: "a lease deadline on deliveries (probed: Delivery::lease_deadline() was None)",
        check: |c| c.lease_deadline && c.capabilities.visibility_timeout.is_some(),
    };
    /// The backend's admin answers `peek` (probed at setup).
    pub const ADMIN_PEEK: Requirement = Requirement {
        needs: "Admin::peek (probed: Unsupported)",
        check: |c| c.admin.peek,
    };
    /// The backend's admin answers `purge` (probed at setup).
    pub const ADMIN_PURGE: Requirement = Requirement {
        needs: "Admin::purge (probed: Unsupported)",
        check: |c| c.admin.purge,
    };
}

/// `case!(module, function, requirement...)`: an entry of [`CASES`] named after the
/// function, which must be `pub async fn function(ctx: &Context) -> CaseResult`.
macro_rules! case {
    ($module:ident, $name:ident $(, $req:expr)* $(,)?) => {{
        fn run(ctx: &Context) -> BoxFuture<'_, CaseResult> {
            Box::pin($module::$name(ctx))
        }
        Case {
            name: stringify!($name),
            requires: &[$($req),*],
            run,
        }
    }};
}

/// `backend_case!(function, requirement...)`: a [`Case`] named after `function`
/// (in scope, `async fn function(ctx: &Context) -> CaseResult`), for a backend's
/// [`extra_cases`](crate::Backend::extra_cases).
///
/// ```
/// use ferrymq_conformance::{backend_case, requires, CaseResult, Context};
///
/// async fn redis_keys_expire(ctx: &Context) -> CaseResult {
///     let _ = ctx.queue();
///     Ok(())
/// }
///
/// let case = backend_case!(redis_keys_expire, requires::VISIBILITY_TIMEOUT);
/// assert_eq!(case.name, "redis_keys_expire");
/// ```
#[macro_export]
macro_rules! backend_case {
    ($name:ident $(, $req:expr)* $(,)?) => {{
        fn run(ctx: &$crate::Context) -> $crate::registry::BoxFuture<'_, $crate::CaseResult> {
            ::std::boxed::Box::pin($name(ctx))
        }
        $crate::Case {
            name: ::std::stringify!($name),
            requires: &[$($req),*],
            run,
        }
    }};
}

/// Every shared case, in report order. To add one, write the function in a `cases/`
/// module (or `middleware.rs`) and add a line here.
pub static CASES: &[Case] = &[
    // basics: what goes in comes out
    case!(basics, round_trip),
    case!(basics, delivery_metadata),
    case!(basics, binary_and_json_bodies_byte_identical),
    case!(basics, header_fidelity),
    case!(basics, queue_isolation),
    // validation: bad input is refused whole and typed
    case!(validation, invalid_header_rejected_nothing_sent),
    case!(validation, oversize_rejected_too_large),
    case!(validation, batch_send_per_entry_results),
    case!(validation, batch_larger_than_max_batch),
    // limits: what a backend cannot do is refused, typed; nothing panics
    case!(limits, delay_beyond_max_delay_is_unsupported),
    case!(limits, huge_durations_never_panic),
    // settling
    case!(settle, ack_removes),
    case!(settle, second_ack_is_typed_error),
    case!(settle, concurrent_acks_exactly_one_wins),
    case!(settle, nack_redelivers),
    case!(
        settle,
        attempt_increments_on_redelivery,
        requires::ATTEMPTS_ON_NACK
    ),
    case!(settle, release_is_prompt, requires::VISIBILITY_TIMEOUT),
    case!(
        settle,
        release_does_not_count_an_attempt,
        requires::RELEASE_KEEPS_ATTEMPT,
        requires::ATTEMPTS_ON_NACK
    ),
    // leases and redelivery timing
    case!(
        visibility,
        nack_with_delay_not_redelivered_early,
        requires::NACK_DELAY
    ),
    case!(
        visibility,
        dropped_delivery_comes_back_after_visibility,
        requires::VISIBILITY_TIMEOUT
    ),
    case!(
        visibility,
        stale_handle_after_lease_gone_is_lease_expired,
        requires::VISIBILITY_TIMEOUT
    ),
    case!(
        visibility,
        extend_prevents_redelivery,
        requires::EXTEND_VISIBILITY
    ),
    case!(
        visibility,
        lease_deadline_is_known,
        requires::LEASE_DEADLINE
    ),
    // ordering and priority
    case!(ordering, per_key_order, requires::PER_KEY),
    case!(ordering, per_key_next_waits_for_head, requires::PER_KEY),
    case!(ordering, priority_order, requires::PRIORITY),
    // delay and dedup
    case!(scheduling, delayed_send_not_visible_early, requires::DELAY),
    case!(
        scheduling,
        duplicate_dedup_id_delivered_once,
        requires::DEDUP
    ),
    // schedules (core/src/schedule) over the backend's producer
    case!(schedules, schedule_runs_once_across_schedulers),
    case!(
        schedules,
        schedule_takeover_resend_delivered_once,
        requires::DEDUP
    ),
    // many consumers, many settles
    case!(concurrency, competing_consumers),
    case!(concurrency, many_nacks_lose_nothing),
    case!(concurrency, no_loss_across_consumer_restarts),
    // receive semantics
    case!(receiving, receive_returns_as_soon_as_message_arrives),
    case!(receiving, receive_waits_then_returns_empty),
    case!(receiving, receive_respects_max),
    // close
    case!(lifecycle, send_after_close_is_closed),
    case!(lifecycle, receive_after_close_is_closed),
    case!(lifecycle, stream_ends_after_close),
    // depth and bounds
    case!(capacity, depth_counts, requires::DEPTH_EXACT),
    case!(capacity, queue_full_when_bounded, requires::BOUNDED),
    // admin (ferrymq_core::admin)
    case!(admin, admin_peek_has_no_side_effects, requires::ADMIN_PEEK),
    case!(admin, admin_purge_removes_waiting, requires::ADMIN_PURGE),
    // middleware and worker (ferrymq_core::middleware, ferrymq_core::worker)
    case!(
        middleware,
        poison_reaches_dlq_after_exactly_n_attempts,
        requires::NACK_DELAY
    ),
    case!(middleware, transient_failure_then_success_not_dead_lettered),
    case!(middleware, dedup_under_redelivery),
    case!(
        middleware,
        extend_visibility_long_handler_delivered_once,
        requires::EXTEND_VISIBILITY
    ),
    case!(middleware, graceful_shutdown_under_load_loses_nothing),
    case!(
        middleware,
        backpressure_refuses_at_bound,
        requires::DEPTH_EXACT
    ),
    case!(
        middleware,
        per_key_order_with_concurrency_8,
        requires::KEY_ORDER
    ),
    case!(
        middleware,
        per_key_order_with_concurrency_8_and_retries,
        requires::PER_KEY
    ),
    case!(
        middleware,
        slow_handler_worker_handles_each_once_c1,
        requires::VISIBILITY_TIMEOUT
    ),
    case!(
        middleware,
        slow_handler_worker_handles_each_once_c4,
        requires::VISIBILITY_TIMEOUT
    ),
    // jobs (ferrymq_core::jobs): states, results, events, flows
    case!(
        jobs,
        jobs_record_states_results_and_events,
        requires::NACK_DELAY
    ),
    case!(jobs, flow_parent_runs_after_its_children_once),
];

/// The case called `name`.
pub fn case(name: &str) -> Option<&'static Case> {
    CASES.iter().find(|c| c.name == name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrymq_core::Capabilities;

    fn minimal() -> Claims {
        Claims::from_capabilities(Capabilities::minimal("none"))
    }

    #[test]
    fn names_are_unique_identifiers() {
        let mut seen = std::collections::HashSet::new();
        for case in CASES {
            assert!(seen.insert(case.name), "duplicate case {}", case.name);
            assert!(crate::harness::is_identifier(case.name), "{}", case.name);
        }
        assert!(CASES.len() >= 25, "only {} cases", CASES.len());
    }

    #[test]
    fn minimal_capabilities_gate_by_name() {
        let claims = minimal();
        let per_key = case("per_key_order").unwrap();
        assert_eq!(
            per_key.applies(&claims),
            Err("not applicable: needs Ordering::PerKey".to_string())
        );
        assert_eq!(case("round_trip").unwrap().applies(&claims), Ok(()));
        let gated: Vec<&str> = CASES
            .iter()
            .filter(|c| c.applies(&claims).is_err())
            .map(|c| c.name)
            .collect();
        assert_eq!(
            gated,
            [
                "attempt_increments_on_redelivery",
                "release_is_prompt",
                "release_does_not_count_an_attempt",
                "nack_with_delay_not_redelivered_early",
                "dropped_delivery_comes_back_after_visibility",
                "stale_handle_after_lease_gone_is_lease_expired",
                "extend_prevents_redelivery",
                "lease_deadline_is_known",
                "per_key_order",
                "per_key_next_waits_for_head",
                "priority_order",
                "delayed_send_not_visible_early",
                "duplicate_dedup_id_delivered_once",
                "schedule_takeover_resend_delivered_once",
                "depth_counts",
                "queue_full_when_bounded",
                "admin_peek_has_no_side_effects",
                "admin_purge_removes_waiting",
                "poison_reaches_dlq_after_exactly_n_attempts",
                "extend_visibility_long_handler_delivered_once",
                "backpressure_refuses_at_bound",
                "per_key_order_with_concurrency_8",
                "per_key_order_with_concurrency_8_and_retries",
                "slow_handler_worker_handles_each_once_c1",
                "slow_handler_worker_handles_each_once_c4",
                "jobs_record_states_results_and_events",
            ]
        );
    }

    #[test]
    fn capabilities_split_the_requirements() {
        use ferrymq_core::{Accuracy, Attempts};
        let mut caps = Capabilities::minimal("kafka-like");
        caps.ordering = Ordering::PerKeyPipelined;
        caps.attempts = Attempts::NacksOnly;
        caps.depth = Accuracy::Approximate;
        caps.visibility_timeout = Some(Duration::from_secs(2));
        caps.max_nack_delay = Some(Duration::from_secs(1));
        let claims = Claims::from_capabilities(caps);
        let applies = |name: &str| case(name).unwrap().applies(&claims);
        // Pipelined key order: the worker keeps order one key at a time, but a
        // retry loses its place, so the strict cases do not apply.
        assert_eq!(applies("per_key_order_with_concurrency_8"), Ok(()));
        assert!(applies("per_key_order_with_concurrency_8_and_retries").is_err());
        assert!(applies("per_key_order").is_err());
        assert!(applies("per_key_next_waits_for_head").is_err());
        // Nacks count; release does not keep the attempt here.
        assert_eq!(applies("attempt_increments_on_redelivery"), Ok(()));
        assert_eq!(
            applies("release_does_not_count_an_attempt"),
            Err("not applicable: needs release_keeps_attempt".to_string())
        );
        // Approximate depth: no exact-count case.
        assert!(applies("depth_counts").is_err());
        assert!(applies("backpressure_refuses_at_bound").is_err());
        // A 1 s nack delay does not cover the 2 s the cases use.
        assert_eq!(
            applies("nack_with_delay_not_redelivered_early"),
            Err("not applicable: needs max_nack_delay >= 2s".to_string())
        );
        // Probed claims.
        assert_eq!(applies("lease_deadline_is_known"), Ok(()));
        let no_deadline = claims.clone().with_lease_deadline(false);
        assert!(case("lease_deadline_is_known")
            .unwrap()
            .applies(&no_deadline)
            .is_err());
        let admin = claims.with_admin(crate::AdminOps::ALL);
        assert_eq!(
            case("admin_purge_removes_waiting").unwrap().applies(&admin),
            Ok(())
        );
    }

    #[test]
    fn reasons_name_every_missing_capability() {
        let c = Case {
            name: "x",
            requires: &[requires::PER_KEY, requires::NACK_DELAY],
            run: CASES[0].run,
        };
        assert_eq!(
            c.applies(&minimal()).unwrap_err(),
            "not applicable: needs Ordering::PerKey, max_nack_delay >= 2s"
        );
    }
}
