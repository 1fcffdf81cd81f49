//! Partition leases in a JetStream key-value bucket.
//!
//! Every node heartbeats its name into the nodes bucket and holds partitions by keys of the
//! leases bucket (`p<n>` = node name). Both buckets expire entries `ttl` after their last
//! write, so a node that stops renewing (killed, paused, cut off) loses its partitions and
//! its membership at once. Each round (every `renew`):
//!
//! 1. heartbeat, and renew every held lease with a revision-checked update: a lease another
//!    node took meanwhile fails its update and is dropped at once;
//! 2. a lease not renewed for `ttl - margin` is dropped by the node itself before the bucket
//!    lets another node take it (self-fencing; the journal's sequence check fences anyway);
//! 3. fair share = ceil(partitions / live nodes): a node over it releases the surplus
//!    (stopping their actors first), a node under it creates leases of free partitions.
//!
//! A node taking a partition recovers nothing eagerly: actors start on their first command
//! (from the journal), and the partition's recorded deadlines are scheduled.

use super::placement::lease_key;
use crate::journal::BoxFuture;
use crate::limits::{LEASE_FENCE_MARGIN_MS_MIN, LEASE_RENEW_MS_DEFAULT, LEASE_TTL_MS_DEFAULT, LEASE_TTL_RENEWALS_MIN};
use async_nats::jetstream::kv;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Lease timings. Takeover after a node dies takes about `ttl + renew`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// A lease (and a node's membership) lapses this long after its last renewal.
    pub ttl: Duration,
    /// How often leases are renewed and the share is rebalanced.
    pub renew: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings {
            ttl: Duration::from_millis(LEASE_TTL_MS_DEFAULT),
            renew: Duration::from_millis(LEASE_RENEW_MS_DEFAULT),
        }
    }
}

impl LeaseTimings {
    /// A held lease is given up this long after its last successful renewal, before the
    /// bucket can hand it to another node.
    pub fn self_fence_after(&self) -> Duration {
        self.ttl
            .saturating_sub(self.renew.max(Duration::from_millis(LEASE_FENCE_MARGIN_MS_MIN)))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.renew.is_zero() || self.ttl < self.renew * LEASE_TTL_RENEWALS_MIN {
            return Err(format!(
                "lease ttl ({:?}) must be at least {LEASE_TTL_RENEWALS_MIN} renewal intervals ({:?})",
                self.ttl, self.renew
            ));
        }
        Ok(())
    }
}

/// What the node does as it gains and loses partitions.
pub trait PartitionHost: Send + Sync + 'static {
    /// The node now owns `partition`: serve it.
    fn acquired(&self, partition: u32) -> BoxFuture<'_, ()>;
    /// The node no longer owns `partition` (released or lost): stop serving it.
    fn released(&self, partition: u32) -> BoxFuture<'_, ()>;
}

struct Held {
    revision: u64,
    /// When the last successful renewal was sent.
    renewed: Instant,
}

pub struct Leases {
    pub node: String,
    pub partitions: u32,
    pub timings: LeaseTimings,
    pub leases: kv::Store,
    pub nodes: kv::Store,
    pub host: Weak<dyn PartitionHost>,
    /// When this node last wrote its heartbeat: a node that cannot has lost NATS (a
    /// partition leaves its connection looking alive) and is not ready.
    pub heartbeat: Arc<Mutex<Instant>>,
    held: BTreeMap<u32, Held>,
}

impl Leases {
    pub fn new(
        node: String,
        partitions: u32,
        timings: LeaseTimings,
        leases: kv::Store,
        nodes: kv::Store,
        host: Weak<dyn PartitionHost>,
    ) -> Leases {
        Leases {
            node,
            partitions,
            timings,
            leases,
            nodes,
            host,
            heartbeat: Arc::new(Mutex::new(Instant::now())),
            held: BTreeMap::new(),
        }
    }

    /// Runs rounds until `stop` turns true, then releases every partition and leaves.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            // A round waits on NATS; one that cannot finish (a server gone mid-call) must
            // not keep the node from fencing itself.
            if tokio::time::timeout(self.timings.ttl, self.round()).await.is_err() {
                warn!(node = %self.node, "a lease round did not finish within the TTL");
            }
            self.fence_stale().await;
            tokio::select! {
                _ = tokio::time::sleep(self.timings.renew) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let held: Vec<u32> = self.held.keys().copied().collect();
        for partition in held {
            self.release(partition).await;
        }
        if let Err(e) = self.nodes.purge(&self.node).await {
            debug!(error = %e, "leaving the cluster: node key not removed (it expires)");
        }
        info!(node = %self.node, "left the cluster");
    }

    async fn round(&mut self) {
        let Some(host) = self.host.upgrade() else { return };
        let started = Instant::now();
        let sent = Instant::now();
        match self.nodes.put(&self.node, self.node.clone().into()).await {
            Ok(_) => *self.heartbeat.lock().expect("heartbeat lock") = sent,
            Err(e) => warn!(error = %e, "heartbeat not written"),
        }
        // Renew.
        let partitions: Vec<u32> = self.held.keys().copied().collect();
        for partition in partitions {
            let revision = self.held[&partition].revision;
            let sent = Instant::now();
            match self
                .leases
                .update(lease_key(partition), self.node.clone().into(), revision)
                .await
            {
                Ok(revision) => {
                    self.held.insert(
                        partition,
                        Held {
                            revision,
                            renewed: sent,
                        },
                    );
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    warn!(partition, "lease taken by another node; dropping the partition");
                    self.held.remove(&partition);
                    host.released(partition).await;
                }
                Err(e) => {
                    if self.held[&partition].renewed.elapsed() >= self.timings.self_fence_after() {
                        warn!(partition, error = %e, "lease not renewed in time; dropping the partition");
                        self.held.remove(&partition);
                        host.released(partition).await;
                    } else {
                        debug!(partition, error = %e, "lease renewal failed; retrying next round");
                    }
                }
            }
        }
        // Rebalance.
        let members = match self.members().await {
            Ok(members) => members,
            Err(e) => {
                debug!(error = %e, "membership unknown this round");
                return;
            }
        };
        let fair = self.partitions.div_ceil(members.len().max(1) as u32) as usize;
        if self.held.len() > fair {
            let surplus: Vec<u32> = self.held.keys().rev().take(self.held.len() - fair).copied().collect();
            for partition in surplus {
                self.release(partition).await;
            }
        } else if self.held.len() < fair {
            // Start at a node-specific offset so that joining nodes do not all race for
            // the same partitions.
            let offset = super::placement::partition_of(&self.node, self.partitions);
            for step in 0..self.partitions {
                if self.held.len() >= fair {
                    break;
                }
                let partition = (offset + step) % self.partitions;
                if self.held.contains_key(&partition) {
                    continue;
                }
                let sent = Instant::now();
                if let Ok(revision) = self.leases.create(lease_key(partition), self.node.clone().into()).await {
                    self.held.insert(
                        partition,
                        Held {
                            revision,
                            renewed: sent,
                        },
                    );
                    info!(partition, node = %self.node, "partition acquired");
                    host.acquired(partition).await;
                }
            }
        }
        debug!(held = self.held.len(), fair, members = members.len(), took = ?started.elapsed(), "lease round");
    }

    /// Gives up every lease not renewed for `ttl - renew`: another node may take it soon.
    async fn fence_stale(&mut self) {
        let stale: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.renewed.elapsed() >= self.timings.self_fence_after())
            .map(|(p, _)| *p)
            .collect();
        let Some(host) = self.host.upgrade() else { return };
        for partition in stale {
            warn!(partition, "lease not renewed in time; dropping the partition");
            self.held.remove(&partition);
            host.released(partition).await;
        }
    }

    /// Stops serving a partition, then frees its lease for another node.
    async fn release(&mut self, partition: u32) {
        let Some(held) = self.held.remove(&partition) else {
            return;
        };
        if let Some(host) = self.host.upgrade() {
            host.released(partition).await;
        }
        match self
            .leases
            .delete_expect_revision(lease_key(partition), Some(held.revision))
            .await
        {
            Ok(()) => info!(partition, node = %self.node, "partition released"),
            Err(e) => debug!(partition, error = %e, "lease not deleted; it expires"),
        }
    }

    async fn members(&self) -> Result<BTreeSet<String>, String> {
        let mut keys = self.nodes.keys().await.map_err(|e| e.to_string())?;
        let mut members = BTreeSet::new();
        while let Some(key) = keys.next().await {
            members.insert(key.map_err(|e| e.to_string())?);
        }
        members.insert(self.node.clone());
        Ok(members)
    }
}
