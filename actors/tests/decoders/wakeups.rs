//! Wake-up records hold any 8 bytes (a deadline in Unix ms, from sled or the cluster's
//! bucket): the scheduler takes every one of them, however far in the past or future.

use actors::bus::{AnyReply, BatchParcel, CommandBus, Parcel};
use actors::journal::BoxFuture;
use actors::wakeups::Wakeups;
use actors::{Clock, CommandError, ManualClock};
use domain::UnixMillis;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A bus that only records the streams it is asked to wake.
struct WakeRecorder(mpsc::UnboundedSender<String>);

impl CommandBus for WakeRecorder {
    fn ask_parcel(&self, _: Box<dyn Parcel>) -> BoxFuture<'_, Result<AnyReply, CommandError>> {
        Box::pin(async { Err(CommandError::Unavailable("only wakes here".into())) })
    }

    fn ask_batch_parcel(&self, batch: Box<dyn BatchParcel>) -> BoxFuture<'_, Vec<Result<AnyReply, CommandError>>> {
        let count = batch.count();
        Box::pin(async move {
            (0..count)
                .map(|_| Err(CommandError::Unavailable("only wakes here".into())))
                .collect()
        })
    }

    fn tell_parcel(&self, _: Box<dyn Parcel>) -> BoxFuture<'_, Result<(), CommandError>> {
        Box::pin(async { Err(CommandError::Unavailable("only wakes here".into())) })
    }

    fn wake(&self, stream: String) -> BoxFuture<'_, Result<(), CommandError>> {
        let _ = self.0.send(stream);
        Box::pin(async { Ok(()) })
    }
}

/// Regression: a deadline of `i64::MIN` (a corrupt record) overflowed the scheduler's
/// "how long until the next one" (`at - now`): its task died in a debug build and slept
/// for ages in a release one, and no actor was woken again. Now the earliest deadline is
/// simply due, and a far-future one waits without disturbing the others.
#[tokio::test]
async fn deadlines_from_any_eight_bytes_are_scheduled() {
    let (tx, mut woken) = mpsc::unbounded_channel();
    let bus: Arc<dyn CommandBus> = Arc::new(WakeRecorder(tx));
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(UnixMillis(1_800_000_000_000)));
    let _wakeups = Wakeups::start(
        Arc::downgrade(&bus),
        clock,
        vec![
            ("sku/d/never".into(), UnixMillis(i64::MAX)),
            ("sku/d/past".into(), UnixMillis(i64::MIN)),
            ("sku/d/epoch".into(), UnixMillis(0)),
        ],
    );
    let mut seen = Vec::new();
    for _ in 0..2 {
        let stream = tokio::time::timeout(Duration::from_secs(10), woken.recv())
            .await
            .expect("due deadlines are woken")
            .unwrap();
        seen.push(stream);
    }
    seen.sort();
    assert_eq!(seen, ["sku/d/epoch", "sku/d/past"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), woken.recv())
            .await
            .is_err(),
        "a deadline at the end of time is not due"
    );
}
