//! The load generator: a fixed pool of workers that together make a fixed number of calls.
//!
//! Every scenario, and the bare-tonic baseline it is compared with, runs through
//! [`run_burst`], so both sides of a comparison pay exactly the same client-side costs
//! (task scheduling, timing, recording) and differ only in the call itself; calls that
//! carry many requests each (ReserveStream's messages) go through [`run_batches`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

/// Highest latency the histogram tracks: a minute, far beyond any server timeout, so a
/// slow call is recorded as slow rather than clipped.
const LATENCY_MAX_US: u64 = 60_000_000;
/// Three significant digits: 0.1 % resolution at every latency.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// What a burst measured.
#[derive(Debug)]
pub struct BurstStats<O> {
    /// Calls made, successful or not.
    pub attempts: usize,
    /// Workers that made them.
    pub concurrency: usize,
    /// Wall time from the first call started to the last call answered.
    pub elapsed: Duration,
    /// Latency of every call (successful or not) in microseconds.
    pub latency_us: Histogram<u64>,
    /// Successful calls by the outcome the call reported.
    pub outcomes: BTreeMap<O, u64>,
    /// Failed calls by gRPC code (as `i32`, since `tonic::Code` is not `Ord`).
    pub errors: BTreeMap<i32, ErrorTally>,
}

/// Failed calls of one gRPC code.
#[derive(Debug, Clone)]
pub struct ErrorTally {
    pub count: u64,
    /// The first message seen, so a report can say *why* calls failed.
    pub example: String,
}

impl<O: Ord> BurstStats<O> {
    /// Calls that returned an outcome.
    pub fn successes(&self) -> u64 {
        self.outcomes.values().sum()
    }

    /// Calls that returned a gRPC error.
    pub fn error_count(&self) -> u64 {
        self.errors.values().map(|e| e.count).sum()
    }

    /// Successful calls that reported `outcome`.
    pub fn outcome(&self, outcome: &O) -> u64 {
        self.outcomes.get(outcome).copied().unwrap_or(0)
    }

    /// Throughput: successful calls per second of wall time. Failed calls do not count, so
    /// a server that answers fast with errors does not look fast.
    pub fn calls_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.successes() as f64 / seconds
        } else {
            0.0
        }
    }

    /// Latency at `quantile` (0.5 for p50) in milliseconds.
    pub fn latency_ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1_000.0
    }

    /// `"Unavailable 3, ResourceExhausted 1"`, or `"none"`.
    pub fn error_summary(&self) -> String {
        if self.errors.is_empty() {
            return "none".to_owned();
        }
        self.errors
            .iter()
            .map(|(code, tally)| format!("{:?} {}", tonic::Code::from(*code), tally.count))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One line per error code with its first message, for diagnosing failed calls.
    pub fn error_examples(&self) -> impl Iterator<Item = String> + '_ {
        self.errors
            .iter()
            .map(|(code, tally)| format!("  {:?}, e.g.: {}", tonic::Code::from(*code), tally.example))
    }
}

/// Makes `attempts` calls of `call(0)`, `call(1)`, … with `concurrency` workers, each
/// starting its next call as soon as its previous one is answered (a closed loop, so the
/// load never exceeds `concurrency` calls in flight).
///
/// `call(i)` performs call number `i` and reports its outcome; which connection it uses is
/// up to the caller. The index is handed out from one shared counter, so every index in
/// `0..attempts` is called exactly once whatever the workers' relative speeds.
pub async fn run_burst<O, F, Fut>(attempts: usize, concurrency: usize, call: F) -> anyhow::Result<BurstStats<O>>
where
    O: Ord + Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, tonic::Status>> + Send + 'static,
{
    ensure!(concurrency > 0, "concurrency must be at least 1");
    // One histogram behind a lock rather than one per worker: a 60 s, 3-digit histogram is
    // ~140 KiB, and the lock is held for nanoseconds per call, far below call latency.
    let tally = Arc::new(Mutex::new(Tally::new()?));
    let next = Arc::new(AtomicUsize::new(0));
    let call = Arc::new(call);
    let workers = concurrency.min(attempts);

    let started = Instant::now();
    let mut pool = JoinSet::new();
    for _ in 0..workers {
        let (tally, next, call) = (tally.clone(), next.clone(), call.clone());
        pool.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= attempts {
                    break;
                }
                let call_started = Instant::now();
                let result = call(index).await;
                let micros = u64::try_from(call_started.elapsed().as_micros()).unwrap_or(u64::MAX);
                tally
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(micros, result);
            }
        });
    }
    while let Some(joined) = pool.join_next().await {
        joined.context("a load worker panicked")?;
    }
    let elapsed = started.elapsed();

    let tally = Arc::into_inner(tally)
        .context("load workers still hold the tally after finishing")?
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(BurstStats {
        attempts,
        concurrency,
        elapsed,
        latency_us: tally.latency_us,
        outcomes: tally.outcomes,
        errors: tally.errors,
    })
}

/// [`run_burst`] for calls that each carry a batch of `batch` requests (the last one
/// fewer): `call(range)` makes one call for the requests numbered `range` and reports each
/// one's outcome, in order, or the error of the whole call. `concurrency` is the number of
/// calls in flight; the stats count requests, each with its call's latency.
pub async fn run_batches<O, F, Fut>(
    attempts: usize,
    batch: usize,
    concurrency: usize,
    call: F,
) -> anyhow::Result<BurstStats<O>>
where
    O: Ord + Send + 'static,
    F: Fn(std::ops::Range<usize>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<O, tonic::Status>>, tonic::Status>> + Send + 'static,
{
    ensure!(concurrency > 0, "concurrency must be at least 1");
    ensure!(batch > 0, "a batch holds at least one request");
    let tally = Arc::new(Mutex::new(Tally::new()?));
    let next = Arc::new(AtomicUsize::new(0));
    let call = Arc::new(call);
    let workers = concurrency.min(attempts.div_ceil(batch));

    let started = Instant::now();
    let mut pool = JoinSet::new();
    for _ in 0..workers {
        let (tally, next, call) = (tally.clone(), next.clone(), call.clone());
        pool.spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= attempts {
                    break;
                }
                let range = first..(first + batch).min(attempts);
                let count = range.len();
                let call_started = Instant::now();
                let result = call(range).await;
                let micros = u64::try_from(call_started.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
                match result {
                    Ok(outcomes) if outcomes.len() == count => {
                        outcomes.into_iter().for_each(|outcome| tally.record(micros, outcome));
                    }
                    Ok(outcomes) => {
                        let wrong = tonic::Status::internal(format!("{} results for {count} requests", outcomes.len()));
                        (0..count).for_each(|_| tally.record(micros, Err(wrong.clone())));
                    }
                    Err(status) => (0..count).for_each(|_| tally.record(micros, Err(status.clone()))),
                }
            }
        });
    }
    while let Some(joined) = pool.join_next().await {
        joined.context("a load worker panicked")?;
    }
    let elapsed = started.elapsed();

    let tally = Arc::into_inner(tally)
        .context("load workers still hold the tally after finishing")?
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(BurstStats {
        attempts,
        concurrency: workers * batch,
        elapsed,
        latency_us: tally.latency_us,
        outcomes: tally.outcomes,
        errors: tally.errors,
    })
}

/// The counters workers add to while a burst runs.
struct Tally<O> {
    latency_us: Histogram<u64>,
    outcomes: BTreeMap<O, u64>,
    errors: BTreeMap<i32, ErrorTally>,
}

impl<O: Ord> Tally<O> {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency_us: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGNIFICANT_DIGITS)
                .context("latency histogram bounds")?,
            outcomes: BTreeMap::new(),
            errors: BTreeMap::new(),
        })
    }

    fn record(&mut self, micros: u64, result: Result<O, tonic::Status>) {
        // Sub-microsecond calls still count, as 1 µs (the histogram's floor).
        self.latency_us.saturating_record(micros.max(1));
        match result {
            Ok(outcome) => *self.outcomes.entry(outcome).or_default() += 1,
            Err(status) => {
                self.errors
                    .entry(status.code() as i32)
                    .or_insert_with(|| ErrorTally {
                        count: 0,
                        example: status.message().to_owned(),
                    })
                    .count += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_index_is_called_once_and_counted() {
        let seen = Arc::new(Mutex::new(vec![0u32; 1_000]));
        let seen_by_calls = seen.clone();
        let stats = run_burst(1_000, 16, move |i| {
            let seen = seen_by_calls.clone();
            async move {
                seen.lock().unwrap_or_else(PoisonError::into_inner)[i] += 1;
                if i % 10 == 0 {
                    Err(tonic::Status::unavailable("down"))
                } else {
                    Ok(i % 2 == 0)
                }
            }
        })
        .await
        .expect("burst runs");

        assert!(seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .all(|&n| n == 1));
        assert_eq!(stats.successes(), 900);
        assert_eq!(stats.error_count(), 100);
        assert_eq!(stats.outcome(&true), 400);
        assert_eq!(stats.outcome(&false), 500);
        assert_eq!(stats.latency_us.len(), 1_000);
        assert_eq!(stats.error_summary(), "Unavailable 100");
    }

    #[tokio::test]
    async fn batches_cover_every_index_once_and_count_requests() {
        let seen = Arc::new(Mutex::new(vec![0u32; 1_000]));
        let seen_by_calls = seen.clone();
        let stats = run_batches(1_000, 64, 4, move |range| {
            let seen = seen_by_calls.clone();
            async move {
                if range.start == 0 {
                    return Err(tonic::Status::unavailable("down"));
                }
                let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                Ok(range
                    .map(|i| {
                        seen[i] += 1;
                        Ok(i % 2 == 0)
                    })
                    .collect())
            }
        })
        .await
        .expect("burst runs");
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(seen[..64].iter().all(|&n| n == 0) && seen[64..].iter().all(|&n| n == 1));
        assert_eq!(stats.successes(), 1_000 - 64);
        assert_eq!(stats.error_count(), 64);
        assert_eq!(stats.latency_us.len(), 1_000);
    }

    #[tokio::test]
    async fn fewer_attempts_than_workers() {
        let stats = run_burst(3, 64, |_| async { Ok::<_, tonic::Status>(()) })
            .await
            .expect("burst runs");
        assert_eq!(stats.successes(), 3);
    }
}
