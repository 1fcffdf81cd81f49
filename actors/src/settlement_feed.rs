//! Live statement lines for creators watching their ledger (WatchSettlement): a projection
//! the ledger actors publish to once their batch is durable.

use domain::ledger::Entry;
use domain::CreatorId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Lines buffered per creator for live watchers; a watcher that falls further behind reads
/// the lines it missed from the ledger (nothing is lost, see `WatchSettlement`).
pub const SETTLEMENT_FEED_BUFFER: usize = 1_024;
/// Creators with live watchers at once.
pub const SETTLEMENT_FEEDS_MAX: usize = 100_000;

/// New statement lines, by creator, for WatchSettlement.
#[derive(Default)]
pub struct SettlementFeed {
    feeds: Mutex<HashMap<CreatorId, broadcast::Sender<Arc<Entry>>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("too many settlement watches ({SETTLEMENT_FEEDS_MAX} creators at most)")]
pub struct TooManyFeeds;

impl SettlementFeed {
    pub fn subscribe(&self, creator: &CreatorId) -> Result<broadcast::Receiver<Arc<Entry>>, TooManyFeeds> {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        if let Some(sender) = feeds.get(creator) {
            return Ok(sender.subscribe());
        }
        if feeds.len() >= SETTLEMENT_FEEDS_MAX {
            feeds.retain(|_, s| s.receiver_count() > 0);
            if feeds.len() >= SETTLEMENT_FEEDS_MAX {
                return Err(TooManyFeeds);
            }
        }
        let (sender, receiver) = broadcast::channel(SETTLEMENT_FEED_BUFFER);
        feeds.insert(creator.clone(), sender);
        Ok(receiver)
    }

    pub fn is_watched(&self, creator: &CreatorId) -> bool {
        self.feeds
            .lock()
            .expect("feeds lock")
            .get(creator)
            .is_some_and(|s| s.receiver_count() > 0)
    }

    pub fn publish(&self, creator: &CreatorId, entries: Vec<Arc<Entry>>) {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        let Some(sender) = feeds.get(creator) else { return };
        if sender.receiver_count() == 0 {
            feeds.remove(creator);
            return;
        }
        for entry in entries {
            let _ = sender.send(entry);
        }
    }
}
