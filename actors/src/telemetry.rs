//! What the actor shell, the journals and the cluster node count for the server's metrics:
//! plain atomics and fixed-bucket histograms, written on the hot path without a lock or an
//! allocation and read by the server (`services::telemetry`) when it is scraped. Nothing
//! here knows a metrics format; the domain stays out of it (no clock, no IO: the shell
//! measures, the domain decides).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (microseconds) of latency buckets from 50 µs to 10 s: a group commit's
/// `fdatasync` on a fast disk, a JetStream append, a NATS round trip, up to the 5 s command
/// timeout.
pub const LATENCY_BUCKETS_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Upper bounds of a count per batch (appends in one group commit), up to the journal's
/// batch bound.
pub const BATCH_BUCKETS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192];

/// A histogram with fixed upper bounds: one relaxed atomic add per bucket and one for the
/// sum per observation, no lock, no allocation. Observations above the last bound land in
/// the implicit `+Inf` bucket.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, and the last for everything above (not cumulative).
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// A histogram as read at one moment: cumulative counts per upper bound (`u64::MAX` for
/// `+Inf`), the sum and the count of observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(u64, u64)>,
    pub sum: u64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must increase");
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// A latency histogram over [`LATENCY_BUCKETS_US`], observed in microseconds.
    pub fn latency() -> Histogram {
        Histogram::new(LATENCY_BUCKETS_US)
    }

    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Observes a duration in microseconds (for [`Histogram::latency`]).
    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, count)| {
                cumulative += count.load(Ordering::Relaxed);
                (self.bounds.get(i).copied().unwrap_or(u64::MAX), cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum: self.sum.load(Ordering::Relaxed),
            count: cumulative,
        }
    }
}

/// What a journal counts: how many appends each write carried and how long it took to be
/// durable (embedded: the log record written and `fdatasync`ed; cluster: a JetStream append
/// until acknowledged).
#[derive(Debug)]
pub struct JournalStats {
    /// Which journal: `log` (embedded) or `jetstream` (cluster).
    pub kind: &'static str,
    pub appends_per_write: Histogram,
    pub write_latency_us: Histogram,
}

impl JournalStats {
    pub fn new(kind: &'static str) -> JournalStats {
        JournalStats {
            kind,
            appends_per_write: Histogram::new(BATCH_BUCKETS),
            write_latency_us: Histogram::latency(),
        }
    }
}

/// A journal's figures at one moment.
#[derive(Debug, Clone)]
pub struct JournalFigures {
    pub kind: &'static str,
    pub appends_per_write: HistogramSnapshot,
    pub write_latency_us: HistogramSnapshot,
    /// Appends handed over and not yet taken by the writer.
    pub queue_depth: u64,
    pub queue_capacity: u64,
    /// The embedded log's storage: `fdatasync`s and bytes written.
    pub syncs: Option<u64>,
    pub bytes_written: Option<u64>,
}

/// Running actors of one kind and the commands waiting in their mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindFigures {
    pub kind: &'static str,
    pub running: u64,
    /// Messages queued in all of the kind's mailboxes, and in the fullest one.
    pub queued: u64,
    pub queued_max: u64,
}

/// Outcomes at one hub, counted from its events once they are durable.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HubCounts {
    /// Swaps by reason: missed accept, missed pickup, declined, failed, partner unavailable.
    pub swaps: [u64; SwapKind::COUNT],
    /// Missed SLA deadlines: accept, pickup, delivery.
    pub sla_misses: [u64; SlaDeadline::COUNT],
    /// Buyers' delivery windows missed (a remedy was booked).
    pub window_misses: u64,
}

impl HubCounts {
    pub fn add(&mut self, other: &HubCounts) {
        for (mine, theirs) in self.swaps.iter_mut().zip(other.swaps) {
            *mine += theirs;
        }
        for (mine, theirs) in self.sla_misses.iter_mut().zip(other.sla_misses) {
            *mine += theirs;
        }
        self.window_misses += other.window_misses;
    }
}

/// Why a dispatch was swapped, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapKind {
    MissedAccept,
    MissedPickup,
    Declined,
    Failed,
    PartnerUnavailable,
}

impl SwapKind {
    pub const COUNT: usize = 5;
    pub const ALL: [SwapKind; SwapKind::COUNT] = [
        SwapKind::MissedAccept,
        SwapKind::MissedPickup,
        SwapKind::Declined,
        SwapKind::Failed,
        SwapKind::PartnerUnavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SwapKind::MissedAccept => "missed_accept",
            SwapKind::MissedPickup => "missed_pickup",
            SwapKind::Declined => "declined",
            SwapKind::Failed => "failed",
            SwapKind::PartnerUnavailable => "partner_unavailable",
        }
    }
}

/// Which SLA deadline a partner missed, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlaDeadline {
    Accept,
    Pickup,
    Deliver,
}

impl SlaDeadline {
    pub const COUNT: usize = 3;
    pub const ALL: [SlaDeadline; SlaDeadline::COUNT] = [SlaDeadline::Accept, SlaDeadline::Pickup, SlaDeadline::Deliver];

    pub fn label(self) -> &'static str {
        match self {
            SlaDeadline::Accept => "accept",
            SlaDeadline::Pickup => "pickup",
            SlaDeadline::Deliver => "deliver",
        }
    }
}

/// What the actors of this process count, shared through their `Env`.
#[derive(Debug, Default)]
pub struct ActorStats {
    /// By hub id: as many entries as hubs this process's hub actors ran (the registry
    /// bounds hubs), so a label per hub stays bounded.
    hubs: Mutex<BTreeMap<String, HubCounts>>,
}

impl ActorStats {
    /// Adds a hub's outcomes of one durable batch (called only when there are some).
    pub fn count_hub(&self, hub_id: &str, add: impl FnOnce(&mut HubCounts)) {
        let mut hubs = self.hubs.lock().expect("hub counts lock");
        match hubs.get_mut(hub_id) {
            Some(counts) => add(counts),
            None => add(hubs.entry(hub_id.to_string()).or_default()),
        }
    }

    pub fn hubs(&self) -> Vec<(String, HubCounts)> {
        let hubs = self.hubs.lock().expect("hub counts lock");
        hubs.iter().map(|(hub, counts)| (hub.clone(), counts.clone())).collect()
    }
}

/// What a cluster node counts.
#[derive(Debug)]
pub struct ClusterStats {
    pub partitions_acquired: AtomicU64,
    pub partitions_released: AtomicU64,
    /// Commands sent to another node by NATS request, until the reply (microseconds).
    pub request_latency_us: Histogram,
    /// From an update's storing in the projections stream to its applying here
    /// (microseconds, between the NATS server's clock and this node's).
    pub projection_lag_us: Histogram,
    /// Updates the projection consumer had still to deliver at its last message.
    pub projection_pending: AtomicU64,
}

impl Default for ClusterStats {
    fn default() -> Self {
        ClusterStats {
            partitions_acquired: AtomicU64::new(0),
            partitions_released: AtomicU64::new(0),
            request_latency_us: Histogram::latency(),
            projection_lag_us: Histogram::latency(),
            projection_pending: AtomicU64::new(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() {
        let histogram = Histogram::new(&[10, 100]);
        for value in [0, 10, 11, 100, 101, 5_000] {
            histogram.observe(value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.buckets, vec![(10, 2), (100, 4), (u64::MAX, 6)]);
        assert_eq!(snapshot.count, 6);
        assert_eq!(snapshot.sum, 10 + 11 + 100 + 101 + 5_000);
    }

    #[test]
    fn hub_counts_are_kept_per_hub() {
        let stats = ActorStats::default();
        stats.count_hub("hub-a", |c| c.swaps[SwapKind::Declined as usize] += 1);
        stats.count_hub("hub-a", |c| c.window_misses += 2);
        stats.count_hub("hub-b", |c| c.sla_misses[SlaDeadline::Pickup as usize] += 1);
        let hubs = stats.hubs();
        assert_eq!(hubs.len(), 2);
        assert_eq!(hubs[0].1.swaps, [0, 0, 1, 0, 0]);
        assert_eq!(hubs[0].1.window_misses, 2);
        assert_eq!(hubs[1].1.sla_misses, [0, 1, 0]);
    }
}
