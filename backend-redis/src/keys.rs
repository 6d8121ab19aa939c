//! The names of a queue's keys. All share the `{queue}` hash tag, so every key of a
//! queue lives in one Redis Cluster slot and a script may touch them together.

/// Every key of one queue (see the crate docs for what each holds).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// One stream per priority level, level 0 (lowest) first.
    pub(crate) ready: Vec<String>,
    /// ZSET: message id -> due time (ms since the epoch).
    pub(crate) delayed: String,
    /// HASH: message id -> the delayed message (MessagePack).
    pub(crate) jobs: String,
    /// HASH: `level/stream-id` -> lease deadline (ms), for leases extended past the
    /// visibility timeout.
    pub(crate) leases: String,
    /// Stream of dead-lettered messages.
    pub(crate) dead: String,
    /// SET of revoked leases `level/stream-id/deliveries` (reclaimed while still
    /// held), so their stale handles cannot ack.
    pub(crate) revoked: String,
    /// Counter for the ids of delayed sends.
    pub(crate) seq: String,
    /// HASH: the queue's recorded settings.
    pub(crate) meta: String,
    /// Ordered queues — HASH: message key -> `<stream id>:<n>`: the key's head (its
    /// oldest unsettled message: in flight, parked or about to be handed out) and
    /// how many entries are held behind it.
    pub(crate) locks: String,
    /// Ordered queues — ZSET (lexicographic, all scores 0): the entries read from the
    /// stream while their key's head was unsettled, `<len>:<key><padded stream id>`,
    /// so a key's held entries sort in stream order. Pending, owned by `~held`.
    pub(crate) held: String,
    /// Ordered queues — LIST of key heads due to be handed out (`stream-id|key`):
    /// the next of a key after its head was acked, and nacked heads.
    pub(crate) unblocked: String,
    /// Ordered queues — ZSET: key heads nacked with a delay (`stream-id|key` -> due
    /// time, ms); their key stays blocked until they are handed out again.
    pub(crate) parked: String,
    /// Rate-limited queues — ZSET: one member per delivery of the current window
    /// (score: the delivery time, ms).
    pub(crate) limiter: String,
    /// Ordered queues — STREAM (one entry): written when a head is queued for
    /// hand-out, so consumers waiting in `XREAD BLOCK` wake up for it.
    pub(crate) wake: String,
    dedup_prefix: String,
    /// Suffix of message ids per level (`""`, `"@1"`, ...): stream ids are unique
    /// per stream only.
    pub(crate) suffixes: Vec<String>,
}

impl Keys {
    pub(crate) fn new(queue: &str, levels: u8) -> Self {
        let base = format!("ferrymq:{{{queue}}}");
        Keys {
            ready: (0..levels).map(|l| format!("{base}:ready:{l}")).collect(),
            delayed: format!("{base}:delayed"),
            jobs: format!("{base}:jobs"),
            leases: format!("{base}:leases"),
            dead: format!("{base}:dead"),
            revoked: format!("{base}:revoked"),
            seq: format!("{base}:seq"),
            meta: format!("{base}:meta"),
            locks: format!("{base}:locks"),
            held: format!("{base}:held"),
            unblocked: format!("{base}:unblocked"),
            parked: format!("{base}:parked"),
            limiter: format!("{base}:limiter"),
            wake: format!("{base}:wake"),
            dedup_prefix: format!("{base}:dedup:"),
            suffixes: (0..levels)
                .map(|l| {
                    if l == 0 {
                        String::new()
                    } else {
                        format!("@{l}")
                    }
                })
                .collect(),
        }
    }

    /// The dedup claim of `id`.
    pub(crate) fn dedup(&self, id: &str) -> String {
        let mut key = String::with_capacity(self.dedup_prefix.len() + id.len());
        key.push_str(&self.dedup_prefix);
        key.push_str(id);
        key
    }

    /// The level of a ready-stream key, from a server reply.
    pub(crate) fn level_of(&self, key: &[u8]) -> Option<usize> {
        self.ready.iter().position(|k| k.as_bytes() == key)
    }

    /// Every key with the type it must have, for the startup check.
    pub(crate) fn typed(&self) -> Vec<(&str, &'static str)> {
        let mut v: Vec<(&str, &'static str)> =
            self.ready.iter().map(|k| (k.as_str(), "stream")).collect();
        v.push((&self.delayed, "zset"));
        v.push((&self.jobs, "hash"));
        v.push((&self.leases, "hash"));
        v.push((&self.dead, "stream"));
        v.push((&self.revoked, "set"));
        v.push((&self.seq, "string"));
        v.push((&self.meta, "hash"));
        v.push((&self.locks, "hash"));
        v.push((&self.held, "zset"));
        v.push((&self.unblocked, "list"));
        v.push((&self.parked, "zset"));
        v.push((&self.limiter, "zset"));
        v.push((&self.wake, "stream"));
        v
    }
}

/// The priority level of a message: its priority clamped to `0..levels`.
pub(crate) fn level(priority: Option<i32>, levels: u8) -> usize {
    let top = i32::from(levels.max(1)) - 1;
    priority.unwrap_or(0).clamp(0, top) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag() {
        let k = Keys::new("orders", 2);
        assert_eq!(
            k.ready,
            vec!["ferrymq:{orders}:ready:0", "ferrymq:{orders}:ready:1"]
        );
        assert_eq!(k.delayed, "ferrymq:{orders}:delayed");
        assert_eq!(k.dedup("x"), "ferrymq:{orders}:dedup:x");
        assert_eq!(k.level_of(b"ferrymq:{orders}:ready:1"), Some(1));
        assert_eq!(k.suffixes, vec!["", "@1"]);
    }

    #[test]
    fn every_key_of_a_queue_is_in_one_cluster_slot() {
        use redis::cluster_routing::Slot;
        for queue in ["orders", "a", "x:y", "with-dash_and.dot", "ü"] {
            let k = Keys::new(queue, 16);
            let slot = Slot::for_key(&k.meta);
            assert_eq!(slot, Slot::for_key(queue), "the hash tag is the queue name");
            let mut all: Vec<String> = k.typed().iter().map(|(key, _)| key.to_string()).collect();
            all.push(k.dedup("some:id{with}braces"));
            // Keys other modules build on the same base (dedup store, job store,
            // schedules).
            for suffix in [
                "handled:k",
                "job:1",
                "jobstate:active",
                "events",
                "flow:p",
                "schedules",
                "schedule:s",
            ] {
                all.push(format!("ferrymq:{{{queue}}}:{suffix}"));
            }
            for key in &all {
                assert_eq!(Slot::for_key(key), slot, "{key} of queue {queue}");
            }
        }
        assert_ne!(
            Slot::for_key(Keys::new("orders", 1).meta),
            Slot::for_key(Keys::new("emails", 1).meta),
            "different queues may be on different masters"
        );
    }

    #[test]
    fn priority_clamps_into_levels() {
        assert_eq!(level(None, 4), 0);
        assert_eq!(level(Some(-5), 4), 0);
        assert_eq!(level(Some(2), 4), 2);
        assert_eq!(level(Some(99), 4), 3);
        assert_eq!(level(Some(7), 1), 0);
    }
}
