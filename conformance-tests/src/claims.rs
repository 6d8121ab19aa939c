//! What a backend offers, as the cases see it: its declared [`Capabilities`], plus what
//! the harness finds out by trying at setup (which [`Admin`] operations answer, whether
//! deliveries carry a lease deadline).
//!
//! Probing matters for features that have no capability flag: a backend gains them
//! when its code does, and the cases that need them become applicable in the same
//! run, without anyone editing a list. What a probe finds is printed in the banner
//! and every case it rules out is reported by name with the reason — never passed.

use std::time::Duration;

use ferrymq_core::admin::Admin;
use ferrymq_core::{Capabilities, ErrorKind, Message};

use crate::backend::Backend;
use crate::context::CALL_TIMEOUT;

/// Which [`Admin`] operations a backend's admin answers (anything but `Unsupported`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdminOps {
    /// [`Admin::peek`].
    pub peek: bool,
    /// [`Admin::purge`].
    pub purge: bool,
    /// [`Admin::describe`].
    pub describe: bool,
}

impl AdminOps {
    /// No admin operation.
    pub const NONE: AdminOps = AdminOps {
        peek: false,
        purge: false,
        describe: false,
    };

    /// Every operation the admin cases use.
    pub const ALL: AdminOps = AdminOps {
        peek: true,
        purge: true,
        describe: true,
    };

    /// Ask `admin` (bound to an existing, empty queue) which operations it answers.
    /// An answer other than `Unsupported` — success or any other error — counts as
    /// supported, so a broken operation fails its case instead of being skipped.
    pub async fn probe(admin: &dyn Admin) -> AdminOps {
        async fn answers<T>(f: impl std::future::Future<Output = ferrymq_core::Result<T>>) -> bool {
            match tokio::time::timeout(CALL_TIMEOUT, f).await {
                Ok(Err(e)) => e.kind() != ErrorKind::Unsupported,
                // A hang counts as supported: its case then fails loudly.
                Ok(Ok(_)) | Err(_) => true,
            }
        }
        AdminOps {
            peek: answers(admin.peek(1)).await,
            describe: answers(admin.describe()).await,
            // Last: the queue is empty, so a working purge removes nothing.
            purge: answers(admin.purge()).await,
        }
    }
}

/// Everything the requirements of a case are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Claims {
    /// What the factory's queues declare they can do.
    pub capabilities: Capabilities,
    /// Which admin operations answer (probed).
    pub admin: AdminOps,
    /// Whether deliveries carry a lease deadline ([`Delivery::lease_deadline`] is
    /// `Some`) — probed on a real delivery.
    ///
    /// [`Delivery::lease_deadline`]: ferrymq_core::Delivery::lease_deadline
    pub lease_deadline: bool,
}

impl Claims {
    /// Claims made of capabilities alone: no admin operation, lease deadlines
    /// wherever there is a visibility timeout.
    pub fn from_capabilities(capabilities: Capabilities) -> Self {
        Claims {
            lease_deadline: capabilities.visibility_timeout.is_some(),
            capabilities,
            admin: AdminOps::NONE,
        }
    }

    /// The same claims with these admin operations.
    pub fn with_admin(mut self, admin: AdminOps) -> Self {
        self.admin = admin;
        self
    }

    /// The same claims with `lease_deadline` set.
    pub fn with_lease_deadline(mut self, known: bool) -> Self {
        self.lease_deadline = known;
        self
    }

    /// Find out what `backend` offers: its capabilities, then one message sent,
    /// received and acked on a throwaway queue (does the delivery carry a lease
    /// deadline?), then its admin asked what it answers. The queue is cleaned up.
    ///
    /// Fails when the backend cannot do the round trip at all: no case could pass.
    pub async fn probe(backend: &dyn Backend) -> Result<Claims, String> {
        let capabilities = backend.capabilities();
        let queue = backend.queue_name("claims-probe");
        let outcome = Self::probe_queue(backend, &queue, capabilities).await;
        let cleanup = tokio::time::timeout(CALL_TIMEOUT, backend.cleanup(&queue)).await;
        let claims = outcome?;
        match cleanup {
            Ok(Ok(())) => Ok(claims),
            Ok(Err(e)) => Err(format!("cleaning up the probe queue {queue} failed: {e}")),
            Err(_) => Err(format!(
                "cleaning up the probe queue {queue} did not finish within {CALL_TIMEOUT:?}"
            )),
        }
    }

    async fn probe_queue(
        backend: &dyn Backend,
        queue: &str,
        capabilities: Capabilities,
    ) -> Result<Claims, String> {
        let (p, c) = call(queue, "open", CALL_TIMEOUT, backend.open(queue)).await?;
        call(queue, "send", CALL_TIMEOUT, p.send(Message::new("probe"))).await?;
        let wait = Duration::from_secs(5) + backend.timer_slack();
        let deadline = tokio::time::Instant::now() + wait;
        let mut got = Vec::new();
        while got.is_empty() && tokio::time::Instant::now() < deadline {
            got = call(queue, "receive", wait + CALL_TIMEOUT, c.receive(1, wait)).await?;
        }
        let delivery = got.pop().ok_or_else(|| {
            format!("probe on queue {queue}: the probe message did not arrive within {wait:?}")
        })?;
        let lease_deadline = delivery.lease_deadline().is_some();
        call(queue, "ack", CALL_TIMEOUT, delivery.ack()).await?;
        let admin = match tokio::time::timeout(CALL_TIMEOUT, backend.admin(queue)).await {
            Ok(Ok(admin)) => AdminOps::probe(&*admin).await,
            Ok(Err(e)) if e.kind() == ErrorKind::Unsupported => AdminOps::NONE,
            Ok(Err(e)) => return Err(format!("probe on queue {queue}: admin: {e}")),
            Err(_) => {
                return Err(format!(
                    "probe on queue {queue}: admin: no answer within {CALL_TIMEOUT:?}"
                ))
            }
        };
        Ok(Claims {
            capabilities,
            admin,
            lease_deadline,
        })
    }
}

/// Await one probe step, bounded by `limit`.
async fn call<T>(
    queue: &str,
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = ferrymq_core::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("probe on queue {queue}: {what}: {e}")),
        Err(_) => Err(format!(
            "probe on queue {queue}: {what}: no answer within {limit:?}"
        )),
    }
}
