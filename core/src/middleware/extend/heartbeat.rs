//! One heartbeat for every lease of an [`ExtendVisibility`](super::ExtendVisibility)
//! service (and its clones): the leases sit in a slab, and a single driver task beats
//! the ones that are due.
//!
//! A task per delivery (the first design) cost a spawn, a timer and a join per
//! message even though almost every handler finishes long before its first beat. Now
//! starting a handler costs a slab insert under a short lock and finishing it a
//! removal; the driver sleeps until the earliest beat. Because every lease of one
//! service has the same period and a new lease's first beat is a full period away,
//! a registration never moves the earliest beat forward: the driver needs waking only
//! when it has nothing scheduled. It lingers a period after its last lease is gone,
//! then exits; the next registration starts it again.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use slab::Slab;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::delivery::AckHandle;
use crate::error::{ErrorKind, Result};
use crate::time::deadline_after;

/// The leases of one service and how to beat them.
pub(super) struct Beats {
    pub(super) timeout: Duration,
    pub(super) every: Duration,
    state: Mutex<State>,
    /// Wakes the driver when a lease arrives while it has no beat scheduled.
    wake: Notify,
}

impl std::fmt::Debug for Beats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beats")
            .field("timeout", &self.timeout)
            .field("every", &self.every)
            .field("leases", &self.lock().leases.len())
            .finish()
    }
}

#[derive(Default)]
struct State {
    leases: Slab<Lease>,
    /// Distinguishes a lease from a later one that reuses its slab key.
    next_id: u64,
    /// A driver task is running.
    driving: bool,
    /// The instant the driver sleeps until, if any.
    scheduled: Option<Instant>,
}

struct Lease {
    id: u64,
    acker: AckHandle,
    /// When the next beat is due.
    next: Instant,
    /// An extend is on its way (or the heartbeat of this lease stopped for good).
    busy: bool,
}

/// Removes its lease from the heartbeat when dropped: on completion, error, panic
/// unwinding or cancellation of the handler future alike.
#[derive(Debug)]
pub(super) struct Registration {
    beats: Arc<Beats>,
    key: usize,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut st = self.beats.lock();
        if st.leases.get(self.key).is_some_and(|l| l.id == self.id) {
            st.leases.remove(self.key);
        }
    }
}

impl Beats {
    pub(super) fn new(timeout: Duration, every: Duration) -> Self {
        Beats {
            timeout,
            every,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing below can leave the state half-updated on a panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Beat `acker` every period from now until the registration is dropped.
    pub(super) fn register(self: &Arc<Self>, acker: AckHandle) -> Registration {
        let next = deadline_after(Instant::now(), self.every);
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id = st.next_id.wrapping_add(1);
        let key = st.leases.insert(Lease {
            id,
            acker,
            next,
            busy: false,
        });
        let spawn = !st.driving;
        st.driving = true;
        let wake = !spawn && st.scheduled.map_or(true, |at| at > next);
        drop(st);
        if spawn {
            tokio::spawn(drive(self.clone()));
        } else if wake {
            self.wake.notify_one();
        }
        Registration {
            beats: self.clone(),
            key,
            id,
        }
    }
}

/// What an extend of lease (`key`, `id`) answered.
type Beaten = (usize, u64, Result<()>);

/// The driver: beats due leases, sleeps until the next one is due.
async fn drive(beats: Arc<Beats>) {
    let every = beats.every;
    // Leases due within this much of a beat are beaten with it (early is safe, and it
    // keeps the driver from waking once per lease).
    let slack = every / 16;
    // An extend that takes a whole period is given up (and tried again at the next
    // beat): a backend that never answers must not stop the other leases' beats.
    let give_up = every.max(Duration::from_millis(1));
    let mut extending: FuturesUnordered<futures::future::BoxFuture<'static, Beaten>> =
        FuturesUnordered::new();
    let mut idle_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let horizon = deadline_after(now, slack);
        let wake_at = {
            let mut st = beats.lock();
            let mut earliest: Option<Instant> = None;
            for (key, lease) in st.leases.iter_mut() {
                if lease.busy {
                    continue;
                }
                if lease.next <= horizon {
                    if lease.acker.is_settled() {
                        // Nothing left to keep; the registration goes when the
                        // handler returns.
                        lease.busy = true;
                        continue;
                    }
                    lease.busy = true;
                    lease.next = deadline_after(lease.next.max(now), every);
                    let (acker, id, timeout) = (lease.acker.clone(), lease.id, beats.timeout);
                    extending.push(Box::pin(async move {
                        let result =
                            match tokio::time::timeout(give_up, acker.extend(timeout)).await {
                                Ok(result) => result,
                                Err(_) => Err(crate::Error::new(
                                    ErrorKind::Timeout,
                                    "the extend did not answer within a heartbeat period",
                                )),
                            };
                        (key, id, result)
                    }));
                } else {
                    earliest = Some(earliest.map_or(lease.next, |e| e.min(lease.next)));
                }
            }
            if st.leases.is_empty() && extending.is_empty() {
                let since = *idle_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= every {
                    st.driving = false;
                    st.scheduled = None;
                    return;
                }
                earliest = Some(deadline_after(since, every));
            } else {
                idle_since = None;
            }
            st.scheduled = earliest;
            earliest
        };
        tokio::select! {
            Some((key, id, result)) = extending.next(), if !extending.is_empty() => {
                beaten(&beats, key, id, result);
            }
            () = sleep_until_opt(wake_at) => {}
            () = beats.wake.notified() => {}
        }
    }
}

fn beaten(beats: &Beats, key: usize, id: u64, result: Result<()>) {
    let stop = match &result {
        Ok(()) => {
            metrics::counter!("ferrymq_visibility_extended_total").increment(1);
            false
        }
        Err(e) if matches!(e.kind(), ErrorKind::AlreadyAcked | ErrorKind::LeaseExpired) => {
            if e.kind() == ErrorKind::LeaseExpired {
                tracing::warn!(error = %e, "visibility heartbeat: the lease is gone; the message may be handled twice");
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "visibility heartbeat: extend failed; trying again");
            false
        }
    };
    let mut st = beats.lock();
    if let Some(lease) = st.leases.get_mut(key).filter(|l| l.id == id) {
        // A lease whose heartbeat stopped stays busy: never beaten again.
        lease.busy = stop;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
