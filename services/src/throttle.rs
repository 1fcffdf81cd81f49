//! Call-rate bounds for checkout: per storefront (one misbehaving backend cannot take the
//! platform for itself) and per buyer (bots are a drop's first visitors, and a bot that
//! hammers Reserve with one buyer id is slowed to a human's pace). A bound that is reached
//! answers RESOURCE_EXHAUSTED with a RetryInfo saying when to come back; nothing changed.
//!
//! Each key has a GCRA bucket (the "theoretical arrival time" form of a token bucket: one
//! instant per key, no refill timer). Time is tokio's, so paused-time tests drive it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Default sustained checkout calls per second for one storefront: well above what one
/// node serves (the hot-SKU benchmark peaks near 60,000/s), so it only stops a runaway.
pub const STOREFRONT_CALLS_PER_SEC_DEFAULT: u32 = 200_000;
/// Default sustained reserves per second for one buyer of one storefront, and the burst a
/// buyer may use at once (a person reserving several SKUs the second a drop opens).
pub const BUYER_RESERVES_PER_SEC_DEFAULT: u32 = 5;
pub const BUYER_RESERVE_BURST_DEFAULT: u32 = 20;
/// Buyers tracked at once per node. When the table is full, buckets that have refilled are
/// dropped (they hold no information); if none has, a new buyer is let through untracked
/// rather than refused: the storefront bound still applies, and an attacker flooding fresh
/// buyer ids must not lock real buyers out.
pub const BUYER_BUCKETS_MAX: usize = 500_000;

/// Keyed GCRA buckets with a bounded table.
pub struct Buckets<K> {
    interval: Duration,
    tolerance: Duration,
    capacity: usize,
    arrivals: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// `per_sec` calls a second on average, up to `burst` at once; at most `capacity` keys.
    pub fn new(per_sec: u32, burst: u32, capacity: usize) -> Buckets<K> {
        let interval = Duration::from_secs(1) / per_sec.max(1);
        Buckets {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            capacity,
            arrivals: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call for `key`, or says how long until one is allowed.
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut arrivals = self.arrivals.lock().expect("throttle lock");
        if !arrivals.contains_key(key) && arrivals.len() >= self.capacity {
            arrivals.retain(|_, at| *at > now);
            if arrivals.len() >= self.capacity {
                return Ok(());
            }
        }
        let arrival = arrivals.get(key).copied().unwrap_or(now).max(now);
        let wait = arrival.saturating_duration_since(now);
        if wait > self.tolerance {
            return Err(wait - self.tolerance);
        }
        arrivals.insert(key.clone(), arrival + self.interval);
        Ok(())
    }
}

/// The checkout bounds of one node.
pub struct CheckoutThrottle {
    storefronts: Buckets<String>,
    buyers: Buckets<(String, String)>,
}

impl CheckoutThrottle {
    pub fn new(storefront_per_sec: u32, buyer_per_sec: u32, buyer_burst: u32) -> CheckoutThrottle {
        CheckoutThrottle {
            // A storefront may spend one second's worth at once.
            storefronts: Buckets::new(storefront_per_sec, storefront_per_sec, usize::MAX),
            buyers: Buckets::new(buyer_per_sec, buyer_burst, BUYER_BUCKETS_MAX),
        }
    }

    /// One checkout call by `storefront`.
    pub fn storefront_call(&self, storefront: &str) -> Result<(), Status> {
        self.storefronts
            .take(&storefront.to_string())
            .map_err(|wait| exhausted(format!("storefront {storefront} is over its call rate"), wait))
    }

    /// One write by the holder of an order's token (a buyer's device): bounded like a
    /// buyer's reserves, per order.
    pub fn order_token_call(&self, order_id: &str) -> Result<(), Status> {
        self.buyers
            .take(&(String::new(), order_id.to_string()))
            .map_err(|wait| exhausted(format!("too many calls for order {order_id}"), wait))
    }

    /// One reserve for `buyer` (the opaque buyer reference, never the buyer id itself).
    pub fn buyer_reserve(&self, storefront: &str, buyer: &str) -> Result<(), Status> {
        self.buyers
            .take(&(storefront.to_string(), buyer.to_string()))
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
        for _ in 0..3 {
            assert_eq!(buckets.take(&"a"), Ok(()));
        }
        let wait = buckets.take(&"a").unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        assert_eq!(buckets.take(&"b"), Ok(()));
        tokio::time::advance(wait).await;
        assert_eq!(buckets.take(&"a"), Ok(()));
        assert!(buckets.take(&"a").is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..3 {
            assert_eq!(buckets.take(&"a"), Ok(()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_drops_refilled_buckets_and_never_locks_newcomers_out() {
        let buckets = Buckets::new(1, 1, 2);
        assert_eq!(buckets.take(&1), Ok(()));
        assert_eq!(buckets.take(&2), Ok(()));
        // Full, and nobody has refilled: a newcomer passes untracked, again and again.
        assert_eq!(buckets.take(&3), Ok(()));
        assert_eq!(buckets.take(&3), Ok(()));
        assert!(buckets.take(&1).is_err());
        tokio::time::advance(Duration::from_secs(2)).await;
        // Refilled buckets make room: the newcomer is tracked now.
        assert_eq!(buckets.take(&3), Ok(()));
        assert!(buckets.take(&3).is_err());
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
