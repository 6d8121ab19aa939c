//! Queue depth: how much work is where.

/// Message counts of a queue at one moment. Backends that only know approximate counts
/// (SQS) report those; counts a backend cannot know are zero and its capabilities say so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Depth {
    /// Ready to be delivered now.
    pub waiting: u64,
    /// Delivered and not yet acked (leased).
    pub in_flight: u64,
    /// Scheduled for later: delayed sends and nacks with a delay.
    pub delayed: u64,
    /// In the backend's own dead-letter store, where it has one.
    pub dead_lettered: u64,
}

impl Depth {
    /// Everything not yet acked: waiting + in flight + delayed.
    pub fn total(&self) -> u64 {
        self.waiting + self.in_flight + self.delayed
    }
}
