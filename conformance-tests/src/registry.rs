//! The one list of cases, and what each needs from a backend's capabilities.

use std::time::Duration;

use ferrymq_core::{Capabilities, Ordering, Priority};
use futures::future::BoxFuture;

use crate::cases::{
    basics, capacity, concurrency, lifecycle, ordering, receiving, scheduling, settle, validation,
    visibility,
};
use crate::context::Context;
use crate::failure::CaseResult;
use crate::middleware;

/// Runs a case against a context.
pub type CaseFn = for<'a> fn(&'a Context) -> BoxFuture<'a, CaseResult>;

/// One capability a case needs, with the name reported when it is missing.
#[derive(Clone, Copy)]
pub struct Requirement {
    /// What is needed, as reported: `not applicable: needs <needs>`.
    pub needs: &'static str,
    /// Whether the capabilities provide it.
    pub check: fn(&Capabilities) -> bool,
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
    /// `Ok` when the case applies to `caps`; otherwise the reason, naming every
    /// missing capability: `not applicable: needs A, B`.
    pub fn applies(&self, caps: &Capabilities) -> Result<(), String> {
        let missing: Vec<&str> = self
            .requires
            .iter()
            .filter(|r| !(r.check)(caps))
            .map(|r| r.needs)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not applicable: needs {}", missing.join(", ")))
        }
    }
}

/// The capabilities cases can require.
pub mod requires {
    use super::*;

    /// The delay the scheduling cases use.
    pub const CASE_DELAY: Duration = Duration::from_secs(2);

    /// Un-acked deliveries come back after a visibility timeout.
    pub const VISIBILITY_TIMEOUT: Requirement = Requirement {
        needs: "visibility_timeout",
        check: |c| c.visibility_timeout.is_some(),
    };
    /// `extend` pushes the redelivery deadline (meaningful only with a timeout).
    pub const EXTEND_VISIBILITY: Requirement = Requirement {
        needs: "extend_visibility",
        check: |c| c.extend_visibility && c.visibility_timeout.is_some(),
    };
    /// `nack` with a delay is honoured.
    pub const NACK_DELAY: Requirement = Requirement {
        needs: "nack_delay",
        check: |c| c.supports_nack_delay(CASE_DELAY),
    };
    /// `Delivery::attempt` counts redeliveries.
    pub const ATTEMPTS: Requirement = Requirement {
        needs: "attempts",
        check: |c| c.attempts.counts_nacks(),
    };
    /// Per-key ordering.
    pub const PER_KEY: Requirement = Requirement {
        needs: "Ordering::PerKey",
        check: |c| c.ordering == Ordering::PerKey,
    };
    /// Native per-message delay of at least [`CASE_DELAY`].
    pub const DELAY: Requirement = Requirement {
        needs: "max_delay",
        check: |c| c.supports_delay(CASE_DELAY),
    };
    /// Broker-side deduplication on `dedup_id`.
    pub const DEDUP: Requirement = Requirement {
        needs: "dedup_window",
        check: |c| c.dedup_window.is_some_and(|w| w >= Duration::from_secs(10)),
    };
    /// Depth counts.
    pub const DEPTH: Requirement = Requirement {
        needs: "depth",
        check: |c| c.depth.is_available(),
    };
    /// Priority is honoured, exactly or in at least two levels.
    pub const PRIORITY: Requirement = Requirement {
        needs: "Priority::Exact or Priority::Levels(n >= 2)",
        check: |c| match c.priority {
            Priority::Exact => true,
            Priority::Levels(n) => n >= 2,
            _ => false,
        },
    };
    /// The queue has a bound.
    pub const BOUNDED: Requirement = Requirement {
        needs: "bounded",
        check: |c| c.bounded,
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

/// Every case, in report order. To add one, write the function in a `cases/` module
/// (or `middleware.rs`) and add a line here.
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
    // settling
    case!(settle, ack_removes),
    case!(settle, second_ack_is_typed_error),
    case!(settle, concurrent_acks_exactly_one_wins),
    case!(settle, nack_redelivers),
    case!(settle, attempt_increments_on_redelivery, requires::ATTEMPTS),
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
        stale_ack_after_redelivery_is_lease_expired,
        requires::VISIBILITY_TIMEOUT
    ),
    case!(
        visibility,
        extend_prevents_redelivery,
        requires::EXTEND_VISIBILITY
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
    case!(capacity, depth_counts, requires::DEPTH),
    case!(capacity, queue_full_when_bounded, requires::BOUNDED),
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
    case!(middleware, backpressure_refuses_at_bound, requires::DEPTH),
    case!(
        middleware,
        per_key_order_with_concurrency_8,
        requires::PER_KEY
    ),
];

/// The case called `name`.
pub fn case(name: &str) -> Option<&'static Case> {
    CASES.iter().find(|c| c.name == name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_identifiers() {
        let mut seen = std::collections::HashSet::new();
        for case in CASES {
            assert!(seen.insert(case.name), "duplicate case {}", case.name);
            assert!(case
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        }
        assert!(CASES.len() >= 25, "only {} cases", CASES.len());
    }

    #[test]
    fn minimal_capabilities_gate_by_name() {
        let caps = Capabilities::minimal("none");
        let per_key = case("per_key_order").unwrap();
        assert_eq!(
            per_key.applies(&caps),
            Err("not applicable: needs Ordering::PerKey".to_string())
        );
        assert_eq!(case("round_trip").unwrap().applies(&caps), Ok(()));
        let gated: Vec<&str> = CASES
            .iter()
            .filter(|c| c.applies(&caps).is_err())
            .map(|c| c.name)
            .collect();
        assert_eq!(
            gated,
            [
                "attempt_increments_on_redelivery",
                "nack_with_delay_not_redelivered_early",
                "dropped_delivery_comes_back_after_visibility",
                "stale_ack_after_redelivery_is_lease_expired",
                "extend_prevents_redelivery",
                "per_key_order",
                "per_key_next_waits_for_head",
                "priority_order",
                "delayed_send_not_visible_early",
                "duplicate_dedup_id_delivered_once",
                "depth_counts",
                "queue_full_when_bounded",
                "poison_reaches_dlq_after_exactly_n_attempts",
                "extend_visibility_long_handler_delivered_once",
                "backpressure_refuses_at_bound",
                "per_key_order_with_concurrency_8",
            ]
        );
    }

    #[test]
    fn reasons_name_every_missing_capability() {
        let caps = Capabilities::minimal("none");
        let c = Case {
            name: "x",
            requires: &[requires::PER_KEY, requires::NACK_DELAY],
            run: CASES[0].run,
        };
        assert_eq!(
            c.applies(&caps).unwrap_err(),
            "not applicable: needs Ordering::PerKey, nack_delay"
        );
    }
}
