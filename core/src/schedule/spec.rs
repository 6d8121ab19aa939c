//! When a schedule fires ([`Every`]), what happens to runs missed while no scheduler
//! ran ([`CatchUp`]), and the pure planning step the scheduler takes each tick.
//!
//! Times are whole milliseconds since the Unix epoch (UTC) underneath: that is what
//! a store keeps and what a dedup id names, so two schedulers computing a run
//! agree on it to the millisecond.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::{Cron, Direction};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Shortest interval: a millisecond (runs are named by their millisecond).
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Longest interval: ten years. Longer is almost certainly a unit mistake, and
/// every run time must stay representable as milliseconds since the epoch.
pub const MAX_INTERVAL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Most missed runs [`CatchUp::All`] may enqueue after downtime.
pub const MAX_CATCH_UP: u32 = 1000;

/// Longest grace of [`CatchUp::Skip`]: a day.
pub const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The timing of a schedule, as stored (and compared: an upsert with the same
/// timing keeps the schedule's progress).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum EveryRepr {
    /// A cron expression (5 fields, or 6 with seconds first) in an IANA time zone.
    Cron { expr: String, tz: String },
    /// A fixed interval in milliseconds, counted from the schedule's anchor (its
    /// creation, or the last change of its timing).
    Interval { every_ms: u64 },
}

#[derive(Clone)]
enum Compiled {
    Cron(Box<Cron>, Tz),
    Interval(i64),
}

/// When a schedule fires: a cron expression in a time zone, or a fixed interval.
///
/// Validated when built (and when read back from a store): a bad expression, an
/// unknown time zone, a zero, sub-millisecond or huge interval is
/// [`InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the parameter.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::schedule::Every;
///
/// let weekdays = Every::cron_in("0 9 * * MON-FRI", "Europe/Berlin")?;
/// let often = Every::interval(Duration::from_secs(30))?;
/// assert!(Every::interval(Duration::ZERO).is_err());
/// assert!(Every::cron("61 * * * *").is_err());
/// # let _ = (weekdays, often);
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "EveryRepr", into = "EveryRepr")]
pub struct Every {
    repr: EveryRepr,
    compiled: Compiled,
}

impl PartialEq for Every {
    fn eq(&self, other: &Self) -> bool {
        self.repr == other.repr
    }
}
impl Eq for Every {}

impl fmt::Debug for Every {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Every({self})")
    }
}

impl fmt::Display for Every {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            EveryRepr::Cron { expr, tz } => write!(f, "cron `{expr}` ({tz})"),
            EveryRepr::Interval { every_ms } => write!(
                f,
                "every {}",
                humantime::format_duration(Duration::from_millis(*every_ms))
            ),
        }
    }
}

impl TryFrom<EveryRepr> for Every {
    type Error = Error;
    fn try_from(repr: EveryRepr) -> Result<Every> {
        match repr {
            EveryRepr::Cron { expr, tz } => Every::cron_in(&expr, &tz),
            EveryRepr::Interval { every_ms } => Every::interval(Duration::from_millis(every_ms)),
        }
    }
}

impl From<Every> for EveryRepr {
    fn from(e: Every) -> EveryRepr {
        e.repr
    }
}

/// A cron that can ever fire is searched for from this fixed point, so
/// validation does not depend on today's date.
fn reference_time() -> DateTime<Utc> {
    DateTime::from_timestamp(946_684_800, 0).unwrap_or(DateTime::UNIX_EPOCH) // 2000-01-01
}

impl Every {
    /// A fixed interval: runs at `anchor + k × every` for k ≥ 1, where the anchor is
    /// the moment the schedule was created (or its timing last changed). Between
    /// [`MIN_INTERVAL`] and [`MAX_INTERVAL`], in whole milliseconds.
    pub fn interval(every: Duration) -> Result<Every> {
        if every.is_zero() {
            return Err(Error::invalid_config(
                "every",
                "the interval must be greater than zero",
            ));
        }
        if every < MIN_INTERVAL {
            return Err(Error::invalid_config(
                "every",
                format!("{every:?} is shorter than the minimum of 1ms"),
            ));
        }
        if every > MAX_INTERVAL {
            return Err(Error::invalid_config(
                "every",
                format!(
                    "{} is longer than the maximum of {}",
                    humantime::format_duration(every),
                    humantime::format_duration(MAX_INTERVAL)
                ),
            ));
        }
        if every.subsec_nanos() % 1_000_000 != 0 {
            return Err(Error::invalid_config(
                "every",
                format!("{every:?} is not a whole number of milliseconds"),
            ));
        }
        // Bounded above by MAX_INTERVAL, so it fits.
        let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let ms = i64::try_from(every_ms).unwrap_or(i64::MAX);
        Ok(Every {
            repr: EveryRepr::Interval { every_ms },
            compiled: Compiled::Interval(ms),
        })
    }

    /// A cron expression evaluated in UTC. See [`cron_in`](Every::cron_in).
    pub fn cron(expr: &str) -> Result<Every> {
        Every::cron_in(expr, "UTC")
    }

    /// A cron expression evaluated in the IANA time zone `tz` (`Europe/Berlin`,
    /// `America/New_York`, `UTC`), parsed by the `croner` crate: 5 fields
    /// (`min hour day-of-month month day-of-week`) or 6 with seconds first, names
    /// (`MON-FRI`, `JAN`), `L`, `W`, `#`, and `@daily`-style nicknames.
    ///
    /// Daylight saving time follows croner (and Vixie cron): a fixed time that
    /// falls into the gap of a spring-forward change runs right after the gap that
    /// day; a fixed time that repeats in a fall-back change runs once; wildcard or
    /// stepped fields run at each real occurrence.
    pub fn cron_in(expr: &str, tz: &str) -> Result<Every> {
        let zone: Tz = tz.parse().map_err(|_| {
            Error::invalid_config(
                "tz",
                format!("{tz:?} is not an IANA time zone name (like Europe/Berlin or UTC)"),
            )
        })?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr.trim())
            .map_err(|e| Error::invalid_config("cron", format!("{expr:?}: {e}")))?;
        if cron
            .find_next_occurrence(&reference_time().with_timezone(&zone), false)
            .is_err()
        {
            return Err(Error::invalid_config(
                "cron",
                format!("{expr:?} never fires"),
            ));
        }
        Ok(Every {
            repr: EveryRepr::Cron {
                expr: expr.trim().to_string(),
                tz: zone.name().to_string(),
            },
            compiled: Compiled::Cron(Box::new(cron), zone),
        })
    }

    /// The interval, for an interval schedule.
    pub fn as_interval(&self) -> Option<Duration> {
        match self.repr {
            EveryRepr::Interval { every_ms } => Some(Duration::from_millis(every_ms)),
            EveryRepr::Cron { .. } => None,
        }
    }

    /// The canonical text a store compares to tell whether an upsert changed the
    /// timing (JSON of the stored form).
    pub fn timing_key(&self) -> String {
        serde_json::to_string(&self.repr).unwrap_or_default()
    }

    /// The first run strictly after `t`.
    pub fn next_after(&self, anchor: DateTime<Utc>, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.compiled {
            Compiled::Interval(p) => {
                let (a, t) = (anchor.timestamp_millis(), t.timestamp_millis());
                let k = if t < a {
                    1
                } else {
                    div_floor(i128::from(t) - i128::from(a), i128::from(*p)) + 1
                };
                interval_run(a, *p, k)
            }
            Compiled::Cron(cron, tz) => cron
                .find_next_occurrence(&t.with_timezone(tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
        }
    }

    /// Up to `max` of the latest runs in `(after, upto]`, oldest first.
    pub fn recent(
        &self,
        anchor: DateTime<Utc>,
        after: DateTime<Utc>,
        upto: DateTime<Utc>,
        max: usize,
    ) -> Vec<DateTime<Utc>> {
        if max == 0 || upto <= after {
            return Vec::new();
        }
        match &self.compiled {
            Compiled::Interval(period) => {
                let a = i128::from(anchor.timestamp_millis());
                let p = i128::from(*period);
                let hi = div_floor(i128::from(upto.timestamp_millis()) - a, p);
                let lo = (div_floor(i128::from(after.timestamp_millis()) - a, p) + 1).max(1);
                if hi < lo {
                    return Vec::new();
                }
                let max = i128::try_from(max).unwrap_or(i128::MAX);
                let start = lo.max(hi - max + 1);
                (start..=hi)
                    .filter_map(|k| interval_run(anchor.timestamp_millis(), *period, k))
                    .collect()
            }
            Compiled::Cron(cron, tz) => {
                let mut runs: Vec<DateTime<Utc>> = cron
                    .iter_from(upto.with_timezone(tz), Direction::Backward)
                    .map(|d| d.with_timezone(&Utc))
                    .take_while(|d| *d > after)
                    .take(max)
                    .collect();
                runs.reverse();
                runs
            }
        }
    }

    /// The latest run at or before `t`, if it is after `after`.
    pub fn latest(
        &self,
        anchor: DateTime<Utc>,
        after: DateTime<Utc>,
        t: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.recent(anchor, after, t, 1).pop()
    }
}

fn div_floor(a: i128, b: i128) -> i128 {
    let q = a / b;
    if (a % b != 0) && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    }
}

/// `anchor + k × period` as a time, or `None` past the representable range.
fn interval_run(anchor_ms: i64, period_ms: i64, k: i128) -> Option<DateTime<Utc>> {
    let ms = i128::from(anchor_ms).checked_add(k.checked_mul(i128::from(period_ms))?)?;
    DateTime::from_timestamp_millis(i64::try_from(ms).ok()?)
}

/// What a scheduler does with runs that came due while no scheduler was running
/// (or while it was slower than the schedule).
///
/// "Missed" means: every run after the schedule's cursor (the last run dealt with)
/// and at or before now. In normal operation that is the one run that just came
/// due; after downtime it can be many.
///
/// | policy | after downtime | string |
/// |---|---|---|
/// | `Skip { grace }` | the latest missed run is enqueued only if it is at most `grace` old; every other missed run is dropped | `skip`, `skip:30s` |
/// | `Once` (default) | the latest missed run is enqueued (late), the earlier ones are dropped | `once` |
/// | `All { max }` | the latest `max` missed runs are enqueued, oldest first; earlier ones are dropped | `all:100` |
///
/// Dropped runs are never enqueued later: the cursor moves past them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum CatchUp {
    /// Drop missed runs; a run that just came due (at most `grace` ago) still goes.
    Skip {
        /// How late a run may be and still be enqueued (at most [`MAX_GRACE`]).
        #[serde(with = "humantime_serde")]
        grace: Duration,
    },
    /// Enqueue the latest missed run once, drop the rest.
    #[default]
    Once,
    /// Enqueue every missed run, at most `max` (1..=[`MAX_CATCH_UP`]) of the latest.
    All {
        /// Most runs enqueued to catch up.
        max: u32,
    },
}

impl CatchUp {
    /// `Skip` with the default grace of one minute.
    pub fn skip() -> CatchUp {
        CatchUp::Skip {
            grace: Duration::from_secs(60),
        }
    }

    /// Check the bounds.
    pub fn validate(&self) -> Result<()> {
        match *self {
            CatchUp::Skip { grace } if grace > MAX_GRACE => Err(Error::invalid_config(
                "catch_up.grace",
                format!(
                    "{} is longer than the maximum of 1day",
                    humantime::format_duration(grace)
                ),
            )),
            CatchUp::All { max } if max == 0 || max > MAX_CATCH_UP => Err(Error::invalid_config(
                "catch_up.max",
                format!("{max} is not in 1..={MAX_CATCH_UP}"),
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for CatchUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CatchUp::Skip { grace } => write!(f, "skip:{}", humantime::format_duration(*grace)),
            CatchUp::Once => f.write_str("once"),
            CatchUp::All { max } => write!(f, "all:{max}"),
        }
    }
}

impl FromStr for CatchUp {
    type Err = Error;
    fn from_str(s: &str) -> Result<CatchUp> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let policy = match (name, arg) {
            ("skip", None) => CatchUp::skip(),
            ("skip", Some(a)) => CatchUp::Skip {
                grace: humantime::parse_duration(a)
                    .map_err(|e| Error::invalid_config("catch_up.grace", format!("{a:?}: {e}")))?,
            },
            ("once", None) => CatchUp::Once,
            ("all", Some(a)) => CatchUp::All {
                max: a.parse().map_err(|_| {
                    Error::invalid_config("catch_up.max", format!("{a:?} is not a number"))
                })?,
            },
            _ => {
                return Err(Error::invalid_config(
                    "catch_up",
                    format!("{s:?}: expected skip, skip:GRACE, once or all:MAX"),
                ))
            }
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// The scheduler's next step for one schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing due; the next run is at `next` (none: the schedule never fires again).
    Idle { next: Option<DateTime<Utc>> },
    /// Enqueue the run at this time.
    Enqueue(DateTime<Utc>),
    /// Move the cursor to this run without enqueueing it (a dropped run).
    Skip(DateTime<Utc>),
}

/// What to do for a schedule whose runs up to `cursor` are dealt with, at `now`.
pub(crate) fn plan(
    every: &Every,
    catch_up: CatchUp,
    anchor: DateTime<Utc>,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Step {
    let due = match catch_up {
        CatchUp::All { max } => every
            .recent(
                anchor,
                cursor,
                now,
                usize::try_from(max).unwrap_or(usize::MAX),
            )
            .first()
            .copied()
            .map(Step::Enqueue),
        CatchUp::Once => every.latest(anchor, cursor, now).map(Step::Enqueue),
        CatchUp::Skip { grace } => every.latest(anchor, cursor, now).map(|run| {
            let late = (now - run).to_std().unwrap_or(Duration::ZERO);
            if late <= grace {
                Step::Enqueue(run)
            } else {
                Step::Skip(run)
            }
        }),
    };
    due.unwrap_or_else(|| Step::Idle {
        next: every.next_after(anchor, cursor.max(now)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn intervals_count_from_the_anchor() {
        let e = Every::interval(Duration::from_secs(60)).unwrap();
        let a = t("2026-01-01T00:00:30Z");
        assert_eq!(e.next_after(a, a), Some(t("2026-01-01T00:01:30Z")));
        assert_eq!(
            e.next_after(a, t("2026-01-01T00:01:30Z")),
            Some(t("2026-01-01T00:02:30Z"))
        );
        assert_eq!(
            e.recent(a, a, t("2026-01-01T00:05:00Z"), 2),
            vec![t("2026-01-01T00:03:30Z"), t("2026-01-01T00:04:30Z")]
        );
        assert!(e.recent(a, a, t("2026-01-01T00:01:29Z"), 5).is_empty());
        assert_eq!(
            e.latest(a, t("2026-01-01T00:01:30Z"), t("2026-01-01T00:02:29Z")),
            None
        );
    }

    #[test]
    fn bad_intervals_are_typed_errors_naming_every() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(1500),
            MAX_INTERVAL + Duration::from_secs(1),
            Duration::MAX,
        ] {
            let e = Every::interval(d).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidConfig, "{d:?}");
            assert!(e.to_string().contains("`every`"), "{e}");
        }
        // The largest interval near the end of time: no panic, no run.
        let e = Every::interval(MAX_INTERVAL).unwrap();
        let end = DateTime::<Utc>::MAX_UTC;
        assert_eq!(e.next_after(end, end), None);
        assert!(
            e.recent(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MIN_UTC, end, 3)
                .len()
                == 3
        );
    }

    #[test]
    fn bad_cron_and_zone_name_the_parameter() {
        for (expr, tz, param) in [
            ("61 * * * *", "UTC", "`cron`"),
            ("* * *", "UTC", "`cron`"),
            ("0 0 30 2 *", "UTC", "`cron`"),
            ("0 9 * * *", "Mars/Olympus", "`tz`"),
        ] {
            let e = Every::cron_in(expr, tz).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidConfig);
            assert!(e.to_string().contains(param), "{e}");
        }
    }

    #[test]
    fn cron_follows_the_time_zone_across_daylight_saving() {
        // 09:00 in Berlin is 08:00 UTC in winter (CET) and 07:00 UTC in summer.
        let e = Every::cron_in("0 9 * * *", "Europe/Berlin").unwrap();
        let a = t("2026-03-27T12:00:00Z");
        let runs = e.recent(a, a, t("2026-03-31T00:00:00Z"), 10);
        assert_eq!(
            runs,
            vec![
                t("2026-03-28T08:00:00Z"),
                t("2026-03-29T07:00:00Z"), // the spring-forward day
                t("2026-03-30T07:00:00Z"),
            ]
        );
        // 02:30 does not exist on 2026-03-29 in Berlin: it runs right after the gap.
        let gap = Every::cron_in("30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            gap.next_after(a, t("2026-03-28T12:00:00Z")),
            Some(t("2026-03-29T01:00:00Z")) // 03:00 CEST
        );
        // Seconds as a sixth field, first.
        let secs = Every::cron("*/10 * * * * *").unwrap();
        assert_eq!(
            secs.next_after(a, t("2026-01-01T00:00:01Z")),
            Some(t("2026-01-01T00:00:10Z"))
        );
    }

    #[test]
    fn catch_up_policies() {
        let e = Every::interval(Duration::from_secs(60)).unwrap();
        let a = t("2026-01-01T00:00:00Z");
        let now = t("2026-01-01T00:10:10Z"); // runs at :01..:10 are due
        assert_eq!(
            plan(&e, CatchUp::Once, a, a, now),
            Step::Enqueue(t("2026-01-01T00:10:00Z"))
        );
        assert_eq!(
            plan(&e, CatchUp::All { max: 3 }, a, a, now),
            Step::Enqueue(t("2026-01-01T00:08:00Z"))
        );
        assert_eq!(
            plan(&e, CatchUp::All { max: 100 }, a, a, now),
            Step::Enqueue(t("2026-01-01T00:01:00Z"))
        );
        let skip = CatchUp::Skip {
            grace: Duration::from_secs(5),
        };
        assert_eq!(
            plan(&e, skip, a, a, now),
            Step::Skip(t("2026-01-01T00:10:00Z"))
        );
        assert_eq!(
            plan(&e, skip, a, a, t("2026-01-01T00:10:03Z")),
            Step::Enqueue(t("2026-01-01T00:10:00Z"))
        );
        assert_eq!(
            plan(&e, CatchUp::Once, a, t("2026-01-01T00:10:00Z"), now),
            Step::Idle {
                next: Some(t("2026-01-01T00:11:00Z"))
            }
        );
    }

    #[test]
    fn catch_up_parses_and_bounds() {
        assert_eq!("once".parse::<CatchUp>().unwrap(), CatchUp::Once);
        assert_eq!("all:5".parse::<CatchUp>().unwrap(), CatchUp::All { max: 5 });
        assert_eq!(
            "skip:30s".parse::<CatchUp>().unwrap(),
            CatchUp::Skip {
                grace: Duration::from_secs(30)
            }
        );
        for bad in ["all:0", "all:1001", "all", "skip:2days", "never"] {
            let e = bad.parse::<CatchUp>().unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidConfig, "{bad}");
            assert!(e.to_string().contains("`catch_up"), "{e}");
        }
    }

    #[test]
    fn timing_round_trips_through_serde() {
        let e = Every::cron_in("0 9 * * MON-FRI", "Europe/Berlin").unwrap();
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Every>(&json).unwrap(), e);
        let bad = r#"{"kind":"interval","every_ms":0}"#;
        assert!(serde_json::from_str::<Every>(bad).is_err());
    }
}
