//! Call-rate bounds for checkout: per storefront (one misbehaving backend cannot take the
//! platform for itself) and per buyer (bots are a drop's first visitors, and a bot that
//! hammers Reserve with one buyer id is slowed to a human's pace). A bound that is reached
//! answers RESOURCE_EXHAUSTED with a RetryInfo saying when to come back; nothing changed.
//!
//! Each key has a GCRA bucket (the "theoretical arrival time" form of a token bucket: one
//! instant per key, no refill timer). Time is tokio's, so paused-time tests drive it.

use crate::limits::BUYER_BUCKETS_MAX;
use domain::limits::STOREFRONTS_MAX;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The bounds' defaults (`crate::limits`), also named here beside the throttle they set.
pub use crate::limits::{
    BUYER_RESERVES_PER_SEC_DEFAULT, BUYER_RESERVE_BURST_DEFAULT, STOREFRONT_CALLS_PER_SEC_DEFAULT,
};

/// A bucket's key: 64 bits of a keyed hash (buyer references are keyed hashes already),
/// so the tables hold no strings and hash nothing again.
type Key = u64;

/// Spreads already-random 64-bit keys over a table without hashing them again.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Table = HashMap<Key, Instant, std::hash::BuildHasherDefault<KeyHasher>>;

/// Locks the table is split over, so concurrent calls seldom wait for one another.
const SHARDS: usize = 16;

/// Keyed GCRA buckets with a bounded table, split over `SHARDS` locks.
pub struct Buckets {
    interval: Duration,
    tolerance: Duration,
    capacity_per_shard: usize,
    shards: Vec<Mutex<Table>>,
}

impl Buckets {
    /// `per_sec` calls a second on average, up to `burst` at once; at most about
    /// `capacity` keys.
    pub fn new(per_sec: u32, burst: u32, capacity: usize) -> Buckets {
        let interval = Duration::from_secs(1) / per_sec.max(1);
        Buckets {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            capacity_per_shard: capacity.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(Table::default())).collect(),
        }
    }

    /// Takes one call for `key`, or says how long until one is allowed.
    pub fn take(&self, key: Key) -> Result<(), Duration> {
        let now = Instant::now();
        let mut table = self.shards[(key as usize) % SHARDS].lock().expect("throttle lock");
        if table.len() >= self.capacity_per_shard && !table.contains_key(&key) {
            table.retain(|_, at| *at > now);
            if table.len() >= self.capacity_per_shard {
                return Ok(());
            }
        }
        let arrival = table.entry(key).or_insert(now);
        let start = (*arrival).max(now);
        let wait = start.saturating_duration_since(now);
        if wait > self.tolerance {
            return Err(wait - self.tolerance);
        }
        *arrival = start + self.interval;
        Ok(())
    }

    /// Takes up to `n` calls for `key` at once, as `n` calls of [`Buckets::take`] one after
    /// another would: how many it took, and, when it took fewer, how long until the next
    /// one is allowed. One lock for the lot (a message of ReserveStream).
    pub fn take_many(&self, key: Key, n: u32) -> (u32, Option<Duration>) {
        if n == 0 {
            return (0, None);
        }
        let now = Instant::now();
        let mut table = self.shards[(key as usize) % SHARDS].lock().expect("throttle lock");
        if table.len() >= self.capacity_per_shard && !table.contains_key(&key) {
            table.retain(|_, at| *at > now);
            if table.len() >= self.capacity_per_shard {
                return (n, None);
            }
        }
        let arrival = table.entry(key).or_insert(now);
        let start = (*arrival).max(now);
        let wait = start.saturating_duration_since(now);
        if wait > self.tolerance {
            return (0, Some(wait - self.tolerance));
        }
        // Call k (from 0) waits `wait + k * interval`: allowed while that is within tolerance.
        let room = (self.tolerance - wait).as_nanos() / self.interval.as_nanos().max(1) + 1;
        let taken = n.min(u32::try_from(room).unwrap_or(u32::MAX));
        *arrival = start + self.interval * taken;
        let next_wait = (taken < n).then(|| (wait + self.interval * taken).saturating_sub(self.tolerance));
        (taken, next_wait)
    }
}

/// The checkout bounds of one node.
pub struct CheckoutThrottle {
    /// SipHash with keys random per process: bucket keys nobody outside can aim at.
    keys: std::hash::RandomState,
    storefronts: Buckets,
    buyers: Buckets,
}

impl CheckoutThrottle {
    pub fn new(storefront_per_sec: u32, buyer_per_sec: u32, buyer_burst: u32) -> CheckoutThrottle {
        CheckoutThrottle {
            keys: std::hash::RandomState::new(),
            // A storefront may spend one second's worth at once.
            storefronts: Buckets::new(storefront_per_sec, storefront_per_sec, STOREFRONTS_MAX),
            buyers: Buckets::new(buyer_per_sec, buyer_burst, BUYER_BUCKETS_MAX),
        }
    }

    fn key(&self, parts: &[&str]) -> Key {
        use std::hash::BuildHasher;
        self.keys.hash_one(parts)
    }

    /// One checkout call by `storefront`.
    pub fn storefront_call(&self, storefront: &str) -> Result<(), Status> {
        self.storefronts
            .take(self.key(&[storefront]))
            .map_err(|wait| exhausted(format!("storefront {storefront} is over its call rate"), wait))
    }

    /// `n` checkout calls by `storefront` at once (a ReserveStream message): how many of
    /// them are allowed (the first ones), and the refusal of the others, if any.
    pub fn storefront_calls(&self, storefront: &str, n: u32) -> (u32, Option<Status>) {
        let (taken, wait) = self.storefronts.take_many(self.key(&[storefront]), n);
        let refusal = wait.map(|wait| exhausted(format!("storefront {storefront} is over its call rate"), wait));
        (taken, refusal)
    }

    /// One write by the holder of an order's token (a buyer's device): bounded like a
    /// buyer's reserves, per order.
    pub fn order_token_call(&self, order_id: &str) -> Result<(), Status> {
        self.buyers
            .take(self.key(&["", order_id]))
            .map_err(|wait| exhausted(format!("too many calls for order {order_id}"), wait))
    }

    /// One reserve for `buyer` (the opaque buyer reference, never the buyer id itself).
    pub fn buyer_reserve(&self, storefront: &str, buyer: &str) -> Result<(), Status> {
        self.buyers
            .take(self.key(&[storefront, buyer]))
            .map_err(|wait| exhausted("this buyer is reserving too fast".to_string(), wait))
    }
}

impl Default for CheckoutThrottle {
    fn default() -> CheckoutThrottle {
        CheckoutThrottle::new(
            STOREFRONT_CALLS_PER_SEC_DEFAULT,
            BUYER_RESERVES_PER_SEC_DEFAULT,
            BUYER_RESERVE_BURST_DEFAULT,
        )
    }
}

fn exhausted(what: String, wait: Duration) -> Status {
    // Rounded up to whole milliseconds, so a client that waits exactly this long gets in.
    let wait = Duration::from_millis(wait.as_millis() as u64 + 1);
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("{what}; nothing was changed, retry in {} ms", wait.as_millis()),
        ErrorDetails::with_retry_info(Some(wait)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let buckets = Buckets::new(10, 3, 100);
        let (a, b) = (1, 2);
        for _ in 0..3 {
            assert_eq!(buckets.take(a), Ok(()));
        }
        let wait = buckets.take(a).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        assert_eq!(buckets.take(b), Ok(()));
        tokio::time::advance(wait).await;
        assert_eq!(buckets.take(a), Ok(()));
        assert!(buckets.take(a).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..3 {
            assert_eq!(buckets.take(a), Ok(()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_drops_refilled_buckets_and_never_locks_newcomers_out() {
        // Keys of one shard, so that shard's table (two keys) fills.
        let (one, two, three) = (SHARDS as u64, 2 * SHARDS as u64, 3 * SHARDS as u64);
        let buckets = Buckets::new(1, 1, 2 * SHARDS);
        assert_eq!(buckets.take(one), Ok(()));
        assert_eq!(buckets.take(two), Ok(()));
        // Full, and nobody has refilled: a newcomer passes untracked, again and again.
        assert_eq!(buckets.take(three), Ok(()));
        assert_eq!(buckets.take(three), Ok(()));
        assert!(buckets.take(one).is_err());
        tokio::time::advance(Duration::from_secs(2)).await;
        // Refilled buckets make room: the newcomer is tracked now.
        assert_eq!(buckets.take(three), Ok(()));
        assert!(buckets.take(three).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn taking_many_at_once_is_taking_them_one_after_another() {
        for (per_sec, burst, first, n) in [(10, 3, 0, 5), (10, 3, 2, 1), (10, 3, 3, 2), (1_000, 1_000, 10, 2_000)] {
            let (one_by_one, at_once) = (Buckets::new(per_sec, burst, 100), Buckets::new(per_sec, burst, 100));
            for _ in 0..first {
                let _ = one_by_one.take(1);
                let _ = at_once.take(1);
            }
            let mut expected = (0, None);
            for _ in 0..n {
                match one_by_one.take(1) {
                    Ok(()) => expected.0 += 1,
                    Err(wait) => {
                        expected.1 = Some(wait);
                        break;
                    }
                }
            }
            assert_eq!(
                at_once.take_many(1, n),
                expected,
                "{per_sec}/s, burst {burst}, {first} then {n}"
            );
            // Both buckets are left in the same state.
            tokio::time::advance(Duration::from_millis(150)).await;
            assert_eq!(at_once.take(1).is_ok(), one_by_one.take(1).is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_call_says_when_to_retry() {
        let throttle = CheckoutThrottle::new(1_000, 1, 1);
        assert!(throttle.buyer_reserve("web", "b1").is_ok());
        let status = throttle.buyer_reserve("web", "b1").unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().and_then(|r| r.retry_delay).unwrap();
        assert!(
            retry > Duration::from_millis(900) && retry <= Duration::from_millis(1_001),
            "{retry:?}"
        );
        // Another storefront's buyer with the same reference is someone else.
        assert!(throttle.buyer_reserve("app", "b1").is_ok());
    }
}
