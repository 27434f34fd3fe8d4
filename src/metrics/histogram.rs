//! A latency histogram a shard writes without a lock or an allocation: a
//! fixed array of bucket counters and a sum, relaxed atomics written by the
//! shard's thread only, read (cumulated) at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (`le`) of the buckets, in microseconds: 1 ms to 10 s. Ids
/// carry whole milliseconds, so a bound under 1 ms would tell nothing.
pub const BOUNDS_US: [u64; 13] = [
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000,
    5_000_000, 10_000_000,
];

/// Longest observation counted as such: an hour. A message id's time is a
/// producer's claim (a Redis entry may be given any id), so one far in the
/// past counts as an hour, in the `+Inf` bucket, and cannot swamp the sum.
pub const MAX_OBSERVATION_US: u64 = 3_600_000_000;

/// Counts of observations per bucket (not cumulative; the last is over
/// every bound) and their sum.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A histogram as read at one moment: cumulative counts per bound, the
/// count (`+Inf`) and the sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `(le in seconds, observations <= le)`, one per [`BOUNDS_US`].
    pub buckets: Vec<(f64, u64)>,
    /// Every observation.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl LatencyHistogram {
    /// Counts one observation of `us` microseconds.
    pub fn observe_us(&self, us: u64) {
        let us = us.min(MAX_OBSERVATION_US);
        let i = BOUNDS_US.partition_point(|&le| le < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Reads the buckets, cumulated. The count is the sum of the buckets
    /// read, so `+Inf` always equals it.
    pub fn snapshot(&self) -> Snapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BOUNDS_US.len());
        for (le, c) in BOUNDS_US.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            buckets.push((*le as f64 / 1e6, cumulative));
        }
        let over = self.counts[BOUNDS_US.len()].load(Ordering::Relaxed);
        Snapshot {
            buckets,
            count: cumulative + over,
            sum: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::default();
        for us in [0, 1_000, 1_001, 7_000, 10_000_000, 10_000_001, u64::MAX] {
            h.observe_us(us);
        }
        let s = h.snapshot();
        let at = |le: f64| s.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!(at(0.001), 2, "0 and exactly 1 ms are <= 1 ms");
        assert_eq!(at(0.002), 3);
        assert_eq!(at(0.005), 3);
        assert_eq!(at(0.01), 4);
        assert_eq!(at(10.0), 5, "exactly 10 s");
        assert_eq!(s.count, 7, "two over every bound");
        let sum_us = 1_000 + 1_001 + 7_000 + 10_000_000 + 10_000_001 + MAX_OBSERVATION_US;
        assert!((s.sum - sum_us as f64 / 1e6).abs() < 1e-6, "{}", s.sum);
        assert!(s
            .buckets
            .windows(2)
            .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0));
    }
}
