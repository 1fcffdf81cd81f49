//! Deadlines of actors that are not running. A running SKU actor keeps its own timer for
//! its next deadline (a hold expiring). An idle actor is passivated like any other, holds
//! or not: before it stops, its next deadline is durable in the journal (`w/<stream>`)
//! and registered here, and when it comes due this scheduler wakes the actor through the
//! bus (which starts it from its snapshot and journal; it then expires what is due).
//!
//! The same durable deadlines are loaded at start-up, so holds of a process that crashed or
//! was restarted still expire on time and their waitlists are promoted, even if no buyer
//! touches the SKU again. Nothing polls storage: one task sleeps until the earliest entry.
//!
//! Bounds: at most one entry per stream (a new deadline replaces the old one); the entries
//! therefore never outnumber the SKUs. Wakes run at most `WAKE_CONCURRENCY` at a time.

use crate::bus::CommandBus;
use crate::clock::Clock;
use crate::limits::{WAKEUP_QUEUE_MAX, WAKEUP_RETRY_MS, WAKE_CONCURRENCY};
use domain::UnixMillis;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, warn};

pub struct Wakeups {
    tx: mpsc::Sender<(String, UnixMillis)>,
}

impl Wakeups {
    /// Starts the scheduler with the deadlines found in the journal.
    pub fn start(bus: Weak<dyn CommandBus>, clock: Arc<dyn Clock>, initial: Vec<(String, UnixMillis)>) -> Wakeups {
        let (tx, rx) = mpsc::channel(WAKEUP_QUEUE_MAX);
        let mut schedule = Schedule::default();
        for (stream, at) in initial {
            schedule.set(stream, at);
        }
        tokio::spawn(run(schedule, rx, tx.downgrade(), bus, clock));
        Wakeups { tx }
    }

    /// Wakes `stream`'s actor at `at`, replacing an earlier registration. False when the
    /// queue is full: the caller stays running and keeps its own timer.
    pub fn register(&self, stream: String, at: UnixMillis) -> bool {
        self.tx.try_send((stream, at)).is_ok()
    }
}

#[derive(Default)]
struct Schedule {
    due: BTreeSet<(UnixMillis, String)>,
    by_stream: HashMap<String, UnixMillis>,
}

impl Schedule {
    fn set(&mut self, stream: String, at: UnixMillis) {
        if let Some(old) = self.by_stream.insert(stream.clone(), at) {
            self.due.remove(&(old, stream.clone()));
        }
        self.due.insert((at, stream));
        // One entry per stream: the bound on entries (no more than streams) rests on it.
        debug_assert_eq!(self.due.len(), self.by_stream.len());
    }

    fn next(&self) -> Option<UnixMillis> {
        self.due.first().map(|(at, _)| *at)
    }

    fn pop_due(&mut self, now: UnixMillis) -> Vec<String> {
        let mut streams = Vec::new();
        while let Some((at, _)) = self.due.first() {
            if *at > now {
                break;
            }
            let (_, stream) = self.due.pop_first().expect("first exists");
            self.by_stream.remove(&stream);
            streams.push(stream);
        }
        debug_assert_eq!(self.due.len(), self.by_stream.len());
        streams
    }
}

async fn run(
    mut schedule: Schedule,
    mut rx: mpsc::Receiver<(String, UnixMillis)>,
    retry: mpsc::WeakSender<(String, UnixMillis)>,
    bus: Weak<dyn CommandBus>,
    clock: Arc<dyn Clock>,
) {
    let running = Arc::new(Semaphore::new(WAKE_CONCURRENCY));
    loop {
        let sleep = match schedule.next() {
            // Deadlines come from stored records (any 8 bytes): saturating, so one at
            // `i64::MIN` is simply due and one at `i64::MAX` waits, neither an overflow.
            Some(at) => Duration::from_millis(at.0.saturating_sub(clock.now().0).max(0) as u64),
            None => Duration::from_secs(3_600),
        };
        tokio::select! {
            registration = rx.recv() => match registration {
                Some((stream, at)) => schedule.set(stream, at),
                None => return,
            },
            _ = tokio::time::sleep(sleep) => {
                for stream in schedule.pop_due(clock.now()) {
                    let (bus, running, retry, clock) = (bus.clone(), running.clone(), retry.clone(), clock.clone());
                    tokio::spawn(async move {
                        let Ok(_permit) = running.acquire_owned().await else { return };
                        let Some(bus) = bus.upgrade() else { return };
                        debug!(%stream, "waking a passivated actor for its deadline");
                        if let Err(e) = bus.wake(stream.clone()).await {
                            warn!(%stream, error = %e, "wake failed; retrying");
                            let at = UnixMillis(clock.now().0 + WAKEUP_RETRY_MS as i64);
                            if let Some(retry) = retry.upgrade() {
                                let _ = retry.try_send((stream, at));
                            }
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_per_stream_and_due_in_order() {
        let mut schedule = Schedule::default();
        schedule.set("a".into(), UnixMillis(30));
        schedule.set("b".into(), UnixMillis(10));
        schedule.set("a".into(), UnixMillis(20));
        assert_eq!(schedule.due.len(), 2);
        assert_eq!(schedule.next(), Some(UnixMillis(10)));
        assert_eq!(schedule.pop_due(UnixMillis(5)), Vec::<String>::new());
        assert_eq!(schedule.pop_due(UnixMillis(25)), vec!["b".to_string(), "a".to_string()]);
        assert_eq!(schedule.next(), None);
        assert!(schedule.by_stream.is_empty());
    }
}
