//! Done offsets above the committed watermark, carried in the commit's metadata so
//! a restart skips what was already processed instead of replaying it.
//!
//! The committed offset stays the watermark (the first record not done), so any
//! Kafka client resuming the group is correct; ferrymq also reads the metadata:
//!
//! ```text
//! fmq1:<span>:<gap>+<len>,<gap>+<len>,…
//! ```
//!
//! `span` is the length of the region described, `[watermark, watermark + span)`;
//! the ranges are the records in it that are **not** done, each given as the count
//! of done offsets before it (from the end of the previous range, or from the
//! watermark) and its length. Every other offset of the region is done. Offsets are
//! deltas, so the text stays short; it is kept under [`MAX_METADATA`] bytes by
//! shortening the region (everything after it is replayed, which is safe).

/// Prefix (and version) of ferrymq's commit metadata.
pub const PREFIX: &str = "fmq1:";

/// Longest metadata written: under the broker's `offset.metadata.max.bytes`
/// (4096 by default), so a commit is never refused for its metadata.
pub const MAX_METADATA: usize = 3800;

/// Not-done ranges above this many per partition pause the partition (fetching
/// more would only add done records the metadata can no longer describe).
pub const MAX_RANGES: usize = 300;

/// A previous session's progress on one partition: from the committed watermark
/// `pos` up to `end` (exclusive), only the `undone` ranges (inclusive, absolute,
/// ascending) are still to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub end: i64,
    pub undone: Vec<(i64, i64)>,
}

impl Progress {
    /// Whether `offset` was done by the previous session (skip it).
    pub fn is_done(&self, offset: i64) -> bool {
        offset < self.end
            && !self
                .undone
                .iter()
                .any(|(a, b)| *a <= offset && offset <= *b)
    }
}

/// The metadata for a commit at `pos` (the first undone offset) describing
/// `[pos, end)` with its `undone` ranges (ascending, inclusive, the first starting
/// at `pos`). Empty when nothing above `pos` is done.
pub fn encode(pos: i64, end: i64, undone: &[(i64, i64)]) -> String {
    if end <= pos || undone.is_empty() || (undone.len() == 1 && undone[0] == (pos, end - 1)) {
        return String::new();
    }
    let mut body = String::new();
    let mut cursor = pos;
    let mut span_end = end;
    for (i, (a, b)) in undone.iter().enumerate() {
        let item = format!(
            "{}{}+{}",
            if i == 0 { "" } else { "," },
            a - cursor,
            b - a + 1
        );
        // Room for the prefix and the span (at most 20 digits and a colon).
        if PREFIX.len() + 21 + body.len() + item.len() > MAX_METADATA {
            // Describe only up to this range: it and everything after is replayed.
            span_end = *a;
            break;
        }
        body.push_str(&item);
        cursor = b + 1;
    }
    if span_end <= pos {
        return String::new();
    }
    format!("{PREFIX}{}:{body}", span_end - pos)
}

/// Read metadata committed at `pos`; `None` when it is not ferrymq's or does not
/// parse (the commit is then just a watermark).
pub fn decode(pos: i64, metadata: &str) -> Option<Progress> {
    let rest = metadata.strip_prefix(PREFIX)?;
    let (span, body) = rest.split_once(':')?;
    let span: i64 = span.parse().ok().filter(|s| *s > 0)?;
    let end = pos.checked_add(span)?;
    let mut undone = Vec::new();
    let mut cursor = pos;
    for item in body.split(',').filter(|s| !s.is_empty()) {
        let (gap, len) = item.split_once('+')?;
        let gap: i64 = gap.parse().ok().filter(|g| *g >= 0)?;
        let len: i64 = len.parse().ok().filter(|l| *l > 0)?;
        let a = cursor.checked_add(gap)?;
        let b = a.checked_add(len - 1)?;
        if b >= end {
            return None;
        }
        undone.push((a, b));
        cursor = b + 1;
    }
    Some(Progress { end, undone })
}

/// Ascending inclusive ranges of a sorted offset sequence.
pub fn ranges(offsets: impl IntoIterator<Item = i64>) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for o in offsets {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == o => *b = o,
            _ => out.push((o, o)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_skip() {
        // Watermark 2; 3, 5, 7, 8, 9 done; 2, 4, 6 not; region up to 10.
        let undone = ranges([2, 4, 6]);
        let meta = encode(2, 10, &undone);
        assert_eq!(meta, "fmq1:8:0+1,1+1,1+1");
        let p = decode(2, &meta).unwrap();
        assert_eq!(p.end, 10);
        assert_eq!(p.undone, undone);
        let skipped: Vec<i64> = (2..12).filter(|o| p.is_done(*o)).collect();
        assert_eq!(skipped, [3, 5, 7, 8, 9]);
    }

    #[test]
    fn nothing_done_above_the_watermark_needs_no_metadata() {
        assert_eq!(encode(5, 9, &[(5, 8)]), "");
        assert_eq!(encode(5, 5, &[]), "");
    }

    #[test]
    fn foreign_or_broken_metadata_is_ignored() {
        for m in [
            "",
            "hello",
            "fmq1:",
            "fmq1:x:",
            "fmq1:5:9+1",
            "fmq1:5:0+0",
            "fmq1:-1:",
            "fmq1:5:-1+2",
        ] {
            assert_eq!(decode(0, m), None, "{m:?}");
        }
    }

    #[test]
    fn long_progress_is_cut_to_fit_and_the_rest_replays() {
        // Every other record done over a long stretch: too many ranges to fit.
        let undone: Vec<(i64, i64)> = (0..5000).map(|i| (100 + 2 * i, 100 + 2 * i)).collect();
        let meta = encode(100, 100 + 10_000, &undone);
        assert!(meta.len() <= MAX_METADATA, "{}", meta.len());
        let p = decode(100, &meta).unwrap();
        assert!(p.end < 100 + 10_000);
        // Within the region the encoding is exact; beyond it nothing is skipped.
        for o in 100..p.end {
            assert_eq!(p.is_done(o), (o - 100) % 2 == 1, "{o}");
        }
        assert!(!p.is_done(p.end));
    }
}
