//! Bounded helpers for writing cases: every wait has a deadline, so a broken backend
//! fails the case with a message instead of hanging it.

use std::fmt::Debug;
use std::future::Future;
use std::panic::Location;
use std::time::Duration;

use ferrymq_core::{Attempts, Consumer, Delivery, Depth, ErrorKind, Message, Producer, Result};
use tokio::time::Instant;

use crate::context::CALL_TIMEOUT;
use crate::failure::{CaseResult, Failure};

/// Largest `max` the helpers pass to [`Consumer::receive`]: the backend's native
/// batch, but at most 100.
pub fn receive_batch(c: &dyn Consumer) -> usize {
    c.capabilities().max_batch.clamp(1, 100)
}

/// One `receive(max, wait)`, failing if it errs, if it returns more than `max`, or
/// if it does not return within `wait` plus [`CALL_TIMEOUT`].
#[track_caller]
pub fn receive<'a>(
    c: &'a dyn Consumer,
    max: usize,
    wait: Duration,
) -> impl Future<Output = CaseResult<Vec<Delivery>>> + Send + 'a {
    let location = Location::caller();
    async move {
        match tokio::time::timeout(wait + CALL_TIMEOUT, c.receive(max, wait)).await {
            Ok(Ok(ds)) if ds.len() > max => Err(Failure::located(
                format!("receive(max = {max}) returned {} deliveries", ds.len()),
                location,
            )),
            Ok(Ok(ds)) => Ok(ds),
            Ok(Err(e)) => Err(Failure::located(format!("receive failed: {e}"), location)),
            Err(_) => Err(Failure::located(
                format!(
                    "receive(max = {max}, wait = {wait:?}) did not return within {:?}",
                    wait + CALL_TIMEOUT
                ),
                location,
            )),
        }
    }
}

/// Receive until exactly `n` deliveries were collected, failing if that takes longer
/// than `within`. Deliveries are returned in arrival order, unsettled.
#[track_caller]
pub fn receive_n<'a>(
    c: &'a dyn Consumer,
    n: usize,
    within: Duration,
) -> impl Future<Output = CaseResult<Vec<Delivery>>> + Send + 'a {
    let location = Location::caller();
    async move {
        let start = Instant::now();
        let deadline = start + within;
        let mut got: Vec<Delivery> = Vec::with_capacity(n);
        while got.len() < n {
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::located(
                    format!(
                        "expected {n} deliveries within {within:?}, got {}: {:?}",
                        got.len(),
                        texts(&got)
                    ),
                    location,
                ));
            }
            let max = (n - got.len()).min(receive_batch(c));
            match tokio::time::timeout(
                deadline - now + CALL_TIMEOUT,
                c.receive(max, deadline - now),
            )
            .await
            {
                Ok(Ok(ds)) if ds.len() > max => {
                    return Err(Failure::located(
                        format!("receive(max = {max}) returned {} deliveries", ds.len()),
                        location,
                    ))
                }
                Ok(Ok(ds)) => got.extend(ds),
                Ok(Err(e)) => {
                    return Err(Failure::located(format!("receive failed: {e}"), location))
                }
                Err(_) => {
                    return Err(Failure::located(
                        format!(
                            "receive(wait = {:?}) did not return in time",
                            deadline - now
                        ),
                        location,
                    ))
                }
            }
        }
        Ok(got)
    }
}

/// Receive exactly one delivery within `within`.
#[track_caller]
pub fn receive_one<'a>(
    c: &'a dyn Consumer,
    within: Duration,
) -> impl Future<Output = CaseResult<Delivery>> + Send + 'a {
    let location = Location::caller();
    async move {
        let mut ds = receive_n(c, 1, within)
            .await
            .map_err(|f| Failure::located(f.message().to_string(), location))?;
        ds.pop()
            .ok_or_else(|| Failure::located("receive_n(1) returned nothing", location))
    }
}

/// Fail if anything is delivered before `until`. `why` says why nothing may come.
///
/// A receive that started before `until` may return after it, with a message that
/// came due meanwhile; such deliveries are not early and are handed back (so the
/// caller can take them as the awaited ones). Anything returned before `until` fails.
#[track_caller]
pub fn expect_none_until<'a>(
    c: &'a dyn Consumer,
    until: Instant,
    why: &'a str,
) -> impl Future<Output = CaseResult<Vec<Delivery>>> + Send + 'a {
    let location = Location::caller();
    async move {
        let start = Instant::now();
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(Vec::new());
            }
            let wait = until - now;
            let ds =
                match tokio::time::timeout(wait + CALL_TIMEOUT, c.receive(receive_batch(c), wait))
                    .await
                {
                    Ok(Ok(ds)) => ds,
                    Ok(Err(e)) => {
                        return Err(Failure::located(format!("receive failed: {e}"), location))
                    }
                    Err(_) => {
                        return Err(Failure::located(
                            format!("receive(wait = {wait:?}) did not return in time"),
                            location,
                        ))
                    }
                };
            if ds.is_empty() {
                continue;
            }
            if Instant::now() >= until {
                return Ok(ds);
            }
            return Err(Failure::located(
                format!(
                    "expected no delivery ({why}), but {:?} arrived after {:?}",
                    texts(&ds),
                    start.elapsed()
                ),
                location,
            ));
        }
    }
}

/// Fail if anything is delivered during the next `during` (for times when nothing is
/// due at all).
#[track_caller]
pub fn expect_none<'a>(
    c: &'a dyn Consumer,
    during: Duration,
    why: &'a str,
) -> impl Future<Output = CaseResult> + Send + 'a {
    let location = Location::caller();
    async move {
        let start = Instant::now();
        let late = expect_none_until(c, start + during, why)
            .await
            .map_err(|f| Failure::located(f.message().to_string(), location))?;
        if late.is_empty() {
            Ok(())
        } else {
            Err(Failure::located(
                format!(
                    "expected no delivery ({why}), but {:?} arrived after {:?}",
                    texts(&late),
                    start.elapsed()
                ),
                location,
            ))
        }
    }
}

/// The one delivery in `early` (handed back by [`expect_none_until`]), or else the
/// next one received within `within`.
#[track_caller]
pub fn take_or_receive_one<'a>(
    c: &'a dyn Consumer,
    mut early: Vec<Delivery>,
    within: Duration,
) -> impl Future<Output = CaseResult<Delivery>> + Send + 'a {
    let location = Location::caller();
    async move {
        if early.len() > 1 {
            return Err(Failure::located(
                format!("expected one delivery, got {:?}", texts(&early)),
                location,
            ));
        }
        match early.pop() {
            Some(d) => Ok(d),
            None => receive_one(c, within)
                .await
                .map_err(|f| Failure::located(f.message().to_string(), location)),
        }
    }
}

/// Receive everything that arrives until a receive of `quiet` comes back empty, or
/// `within` has passed. Deliveries are returned unsettled, in arrival order.
#[track_caller]
pub fn drain<'a>(
    c: &'a dyn Consumer,
    quiet: Duration,
    within: Duration,
) -> impl Future<Output = CaseResult<Vec<Delivery>>> + Send + 'a {
    let location = Location::caller();
    async move {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(got);
            }
            let wait = quiet.min(deadline - now);
            let ds = receive(c, receive_batch(c), wait)
                .await
                .map_err(|f| Failure::located(f.message().to_string(), location))?;
            if ds.is_empty() {
                return Ok(got);
            }
            got.extend(ds);
        }
    }
}

/// Ack every delivery, failing on the first error.
pub async fn ack_all(ds: &[Delivery]) -> CaseResult {
    for d in ds {
        if let Err(e) = d.ack().await {
            return Err(Failure::new(format!("ack of {:?} failed: {e}", text(d))));
        }
    }
    Ok(())
}

/// Send `message`, failing the case on error.
#[track_caller]
pub fn send<'a>(
    p: &'a dyn Producer,
    message: Message,
) -> impl Future<Output = CaseResult<ferrymq_core::SendReceipt>> + Send + 'a {
    let location = Location::caller();
    async move {
        match tokio::time::timeout(CALL_TIMEOUT, p.send(message)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(Failure::located(format!("send failed: {e}"), location)),
            Err(_) => Err(Failure::located(
                format!("send did not return within {CALL_TIMEOUT:?}"),
                location,
            )),
        }
    }
}

/// Send every message with `send_batch`, failing on any error (outer or per entry).
#[track_caller]
pub fn send_all<'a>(
    p: &'a dyn Producer,
    messages: Vec<Message>,
) -> impl Future<Output = CaseResult> + Send + 'a {
    let location = Location::caller();
    async move {
        let n = messages.len();
        let results = match tokio::time::timeout(CALL_TIMEOUT, p.send_batch(messages)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Err(Failure::located(
                    format!("send_batch failed: {e}"),
                    location,
                ))
            }
            Err(_) => {
                return Err(Failure::located(
                    format!("send_batch did not return within {CALL_TIMEOUT:?}"),
                    location,
                ))
            }
        };
        if results.len() != n {
            return Err(Failure::located(
                format!("send_batch of {n} returned {} results", results.len()),
                location,
            ));
        }
        for (i, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                return Err(Failure::located(
                    format!("send_batch entry {i} failed: {e}"),
                    location,
                ));
            }
        }
        Ok(())
    }
}

/// Check that `result` failed with `kind`.
#[track_caller]
pub fn expect_kind<T: Debug>(what: &str, result: Result<T>, kind: ErrorKind) -> CaseResult {
    match result {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(Failure::new(format!(
            "{what}: expected a {kind:?} error, got {:?}: {e}",
            e.kind()
        ))),
        Ok(v) => Err(Failure::new(format!(
            "{what}: expected a {kind:?} error, but it succeeded with {v:?}"
        ))),
    }
}

/// Check the attempt of `d`, which would be `want` if every counted redelivery
/// counted once, as the backend's `attempts` counts: exactly (`Exact`, `NacksOnly`;
/// callers pass the count of what the backend counts), at least `want`
/// (`Approximate`, which may over-count), or 1 (`Untracked`: every delivery says 1).
#[track_caller]
pub fn expect_attempt(d: &Delivery, want: u32, attempts: Attempts, what: &str) -> CaseResult {
    let got = d.attempt();
    let (ok, expected) = match attempts {
        Attempts::Untracked => (got == 1, "1 (attempts are untracked)".to_string()),
        Attempts::Approximate => (got >= want, format!("at least {want}")),
        _ => (got == want, want.to_string()),
    };
    if ok {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "{what}: attempt {got}, expected {expected} ({attempts:?})"
        )))
    }
}

/// Poll `probe` until the waiting / in-flight / delayed counts equal `want` (dead
/// letters are not compared), for at most `within`.
#[track_caller]
pub fn expect_depth<'a, F, Fut>(
    what: &'a str,
    want: Depth,
    within: Duration,
    mut probe: F,
) -> impl Future<Output = CaseResult> + Send + 'a
where
    F: FnMut() -> Fut + Send + 'a,
    Fut: Future<Output = Result<Depth>> + Send,
{
    let location = Location::caller();
    async move {
        let deadline = Instant::now() + within;
        loop {
            let got = match tokio::time::timeout(CALL_TIMEOUT, probe()).await {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    return Err(Failure::located(
                        format!("{what}: depth failed: {e}"),
                        location,
                    ))
                }
                Err(_) => {
                    return Err(Failure::located(
                        format!("{what}: depth did not return within {CALL_TIMEOUT:?}"),
                        location,
                    ))
                }
            };
            let same = got.waiting == want.waiting
                && got.in_flight == want.in_flight
                && got.delayed == want.delayed;
            if same {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Failure::located(
                    format!(
                        "{what}: expected depth waiting={} in_flight={} delayed={}, \
                         still waiting={} in_flight={} delayed={} after {within:?}",
                        want.waiting,
                        want.in_flight,
                        want.delayed,
                        got.waiting,
                        got.in_flight,
                        got.delayed
                    ),
                    location,
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A depth with these counts (dead letters zero).
pub fn depth(waiting: u64, in_flight: u64, delayed: u64) -> Depth {
    Depth {
        waiting,
        in_flight,
        delayed,
        dead_lettered: 0,
    }
}

/// The payload as text (lossy), shortened for messages.
pub fn text(d: &Delivery) -> String {
    let s = String::from_utf8_lossy(d.payload());
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s.into_owned()
    }
}

/// The payloads as text, in order.
pub fn texts(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(text).collect()
}

/// The payloads as text, sorted (for comparing sets where order is not promised).
pub fn sorted_texts(ds: &[Delivery]) -> Vec<String> {
    let mut v = texts(ds);
    v.sort();
    v
}

/// Send `message` and return the backend's answer, error or not (for cases that
/// expect a refusal); fails only if the send hangs.
#[track_caller]
pub fn try_send<'a>(
    p: &'a dyn Producer,
    message: Message,
) -> impl Future<Output = CaseResult<Result<ferrymq_core::SendReceipt>>> + Send + 'a {
    let location = Location::caller();
    async move {
        tokio::time::timeout(CALL_TIMEOUT, p.send(message))
            .await
            .map_err(|_| {
                Failure::located(
                    format!("send did not return within {CALL_TIMEOUT:?}"),
                    location,
                )
            })
    }
}
