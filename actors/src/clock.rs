//! The clock port: the shell reads time here and passes it into the domain, so tests can
//! control it.
//!
//! Three clocks:
//! - [`SystemClock`], wall-clock time, for production.
//! - [`TokioClock`], a start time plus the time tokio's clock has moved since: the clock for
//!   tests of anything that waits. The actor shell (`entity`, `wakeups`) reads `now()` to
//!   compute how long to wait, then waits with tokio timers; with this clock both are the
//!   same time. Under `#[tokio::test(start_paused = true)]` (or `tokio::time::pause()`),
//!   tokio moves its clock straight to the next timer whenever every task is waiting, so a
//!   hold of ten minutes expires at exactly its deadline, in microseconds of real time, and
//!   `tokio::time::advance` or a plain `tokio::time::sleep` in the test moves both.
//! - [`ManualClock`], which moves only when a test sets or advances it: for code that reads
//!   the time but never waits on it (a handler's decision, the address vault's shredding).
//!   It is a poor fit for the actor shell: an actor waiting on a tokio timer for a deadline
//!   does not notice the manual clock jumping past it until its timer or its next message
//!   wakes it, and with paused tokio time such an actor would see its timer fire again and
//!   again before its deadline.

use domain::UnixMillis;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> UnixMillis;
}

/// Wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        UnixMillis(since_epoch.as_millis() as i64)
    }
}

/// `start` plus the time tokio's clock has moved since this clock was made (see the module
/// documentation). Made outside a runtime, or in one whose time is not paused, it follows
/// real time like [`SystemClock`], without its jumps.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: UnixMillis,
    started: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `start` now.
    pub fn starting_at(start: UnixMillis) -> TokioClock {
        TokioClock {
            start,
            started: tokio::time::Instant::now(),
        }
    }

    /// A clock reading the wall-clock time now (so a drop opened "now" by wall-clock time
    /// in a test is open by this clock too).
    pub fn from_system() -> TokioClock {
        TokioClock::starting_at(SystemClock.now())
    }
}

impl Clock for TokioClock {
    fn now(&self) -> UnixMillis {
        self.start.plus_ms(self.started.elapsed().as_millis() as u64)
    }
}

/// A clock that moves only when told (see the module documentation for when to use it).
#[derive(Debug)]
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    pub fn new(now: UnixMillis) -> ManualClock {
        ManualClock {
            now_ms: AtomicI64::new(now.0),
        }
    }

    pub fn set(&self, now: UnixMillis) {
        self.now_ms.store(now.0, Ordering::SeqCst);
    }

    /// Moves the clock `ms` forward; answers the new time.
    pub fn advance(&self, ms: u64) -> UnixMillis {
        let ms = ms.min(i64::MAX as u64) as i64;
        UnixMillis(self.now_ms.fetch_add(ms, Ordering::SeqCst).saturating_add(ms))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        UnixMillis(self.now_ms.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(UnixMillis(1_000));
        assert_eq!(clock.now(), UnixMillis(1_000));
        assert_eq!(clock.advance(250), UnixMillis(1_250));
        assert_eq!(clock.now(), UnixMillis(1_250));
        clock.set(UnixMillis(7));
        assert_eq!(clock.now(), UnixMillis(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_follows_paused_time_to_the_millisecond() {
        let clock = TokioClock::starting_at(UnixMillis(1_000_000));
        assert_eq!(clock.now(), UnixMillis(1_000_000));
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(clock.now(), UnixMillis(1_001_500));
        // Auto-advance: a ten-minute sleep ends at once, the clock ten minutes on.
        let real = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(clock.now(), UnixMillis(1_601_500));
        assert!(real.elapsed() < Duration::from_secs(1));
    }
}
