//! One node of a Dropline cluster: the actors of the partitions it holds, the [`CommandBus`]
//! that routes every command to the node owning its actor (NATS request/reply with a
//! deadline), the server side answering the commands of its partitions, and the projection
//! updates it exchanges with the other nodes.

use super::journal::JetStreamJournal;
use super::leases::{LeaseTimings, Leases, PartitionHost};
use super::placement::{self, partition_of};
use crate::audit_log::AuditLog;
use crate::bus::{AnyReply, CommandBus, Parcel};
use crate::clock::Clock;
use crate::embedded::LocalActors;
use crate::error::CommandError;
use crate::journal::{AddressVault, BoxFuture, JournalError};
use crate::limits::{
    ADDRESS_RETENTION_MAX_MS, ADDRESS_SHRED_SCAN_FACTOR, COMMAND_TIMEOUT_MS, DIRECTORY_RELOAD_WAIT,
    EVENTS_ACK_PENDING_MAX, EVENTS_CONSUMER_CHECK, EVENTS_MAX_AGE, EVENTS_MAX_BYTES, EVENTS_PULL_EXPIRES,
    EVENTS_PULL_HEARTBEAT, EVENTS_REFOLLOW_WAIT, PROJECTION_ACKS_PENDING, PROJECTION_BATCH_MAX, PROJECTION_LINGER,
    PROJECTION_QUEUE_MAX, PROJECTION_RESYNC, PROJECTION_RESYNC_WINDOW, PROJECTION_RETRY, REMOTE_COMMANDS_MAX,
    ROUTE_BACKOFF_MAX, ROUTE_BACKOFF_MIN, ROUTE_BATCHES_IN_FLIGHT, ROUTE_BATCH_MAX, ROUTE_QUEUE_MAX, STORAGE_WAIT,
};
use crate::projections::{ProjectionUpdate, Projections, RemoteProjections};
use crate::secrets::SealedAddress;
use crate::telemetry::ClusterStats;
use async_nats::jetstream::{self, kv, stream::StorageType};
use domain::registry::{Directory as RegistryDirectory, RegistryCommand, RegistryState};
use domain::UnixMillis;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

/// How a node joins its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// This node's name, unique in the cluster (the StatefulSet pod name, say).
    pub node: String,
    pub partitions: u32,
    /// Replicas of the journal stream and buckets (3 on a 3-server JetStream cluster).
    pub replicas: usize,
    pub timings: LeaseTimings,
    /// Local directory for snapshots.
    pub data_dir: PathBuf,
    /// Running actors of each kind on this node (see `LIVE_ACTORS_MAX_DEFAULT`).
    pub live_actors_max: usize,
}

/// A command for the actor of another node, as it travels: the same envelope for every
/// kind, decoded by the kind on the serving side (`LocalActors::serve`).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Request {
    Command {
        /// The actor's kind (`Hosted::KIND`).
        kind: String,
        /// The actor's journal stream, which names its key.
        stream: String,
        /// The command, encoded by the kind.
        command: Vec<u8>,
        /// Hand it to the actor if it runs, without starting it or waiting for its reply
        /// (`CommandBus::tell_parcel`); the reply is then empty.
        tell: bool,
    },
    /// Run the timer command of the actor of this stream.
    Wake(String),
    /// Commands for one partition, sent together (answered by `Response::Batch`); never a
    /// batch in turn (see [`Unbatched`]).
    Batch(#[serde(deserialize_with = "unbatched_requests")] Vec<Request>),
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    /// The reply, encoded by the kind (empty for a tell or a wake).
    Reply(Vec<u8>),
    /// The receiving node does not own the partition (any more): ask again.
    NotOwner,
    /// The answers to a `Request::Batch`, in its order; never a batch in turn.
    Batch(#[serde(deserialize_with = "unbatched_responses")] Vec<Result<Response, CommandError>>),
}

/// A request in a batch as it is decoded: a command or a wake, never another batch. postcard
/// decodes nested values by recursion, so a message nesting batches in batches would take
/// the decoding task's stack as deep as its length says (a stack overflow aborts the
/// process); this way nesting ends at the second level. The variants are `Request`'s first
/// two, in its order: the bytes are the same.
#[derive(Deserialize)]
enum Unbatched {
    Command {
        kind: String,
        stream: String,
        command: Vec<u8>,
        tell: bool,
    },
    Wake(String),
}

fn unbatched_requests<'de, D: serde::Deserializer<'de>>(decoder: D) -> Result<Vec<Request>, D::Error> {
    let requests = Vec::<Unbatched>::deserialize(decoder)?;
    Ok(requests
        .into_iter()
        .map(|request| match request {
            Unbatched::Command {
                kind,
                stream,
                command,
                tell,
            } => Request::Command {
                kind,
                stream,
                command,
                tell,
            },
            Unbatched::Wake(stream) => Request::Wake(stream),
        })
        .collect())
}

/// An answer in a batch as it is decoded: `Response`'s first two variants (see
/// [`Unbatched`]).
#[derive(Deserialize)]
enum UnbatchedResponse {
    Reply(Vec<u8>),
    NotOwner,
}

fn unbatched_responses<'de, D: serde::Deserializer<'de>>(
    decoder: D,
) -> Result<Vec<Result<Response, CommandError>>, D::Error> {
    let responses = Vec::<Result<UnbatchedResponse, CommandError>>::deserialize(decoder)?;
    Ok(responses
        .into_iter()
        .map(|response| {
            response.map(|response| match response {
                UnbatchedResponse::Reply(bytes) => Response::Reply(bytes),
                UnbatchedResponse::NotOwner => Response::NotOwner,
            })
        })
        .collect())
}

type Pending = (Request, oneshot::Sender<Result<Response, CommandError>>);

/// Projection updates as they travel, with the node that made them.
#[derive(Serialize, Deserialize)]
struct ProjectionBatch {
    origin: String,
    updates: Vec<ProjectionUpdate>,
}

struct NatsProjections {
    tx: mpsc::Sender<Vec<ProjectionUpdate>>,
}

impl RemoteProjections for NatsProjections {
    fn publish(&self, updates: &[ProjectionUpdate]) {
        if self.tx.try_send(updates.to_vec()).is_err() {
            debug!("projection queue full; an update is not shared");
        }
    }
}

/// Publishes queued projection updates to the events stream, as few messages as possible:
/// whatever is queued goes as one message (up to `PROJECTION_BATCH_MAX` publications), with
/// only the latest figures of each SKU (a hot SKU changes them on every reserve; readers
/// want the last). Acknowledgements are awaited in windows of `PROJECTION_ACKS_PENDING`
/// (unawaited JetStream publishes stall the client once too many are pending).
///
/// A message the stream did not store (no leader for a while, a server restarting) is not
/// simply lost: its SKU figures are published again, as this node's cache has them then
/// (never older than what it sent since), and its audit entries as they were (facts, in any
/// order), after `PROJECTION_RETRY`; other updates (order and dispatch views, live statement
/// lines) are superseded by the next change or read from their actors. Without it a node
/// could show a SKU's figures from before the fault until the SKU next changed — found by
/// the nemesis on a sold-out SKU.
///
/// And now and then (`PROJECTION_RESYNC`) it publishes again the figures of the SKUs whose
/// partitions it owns and that changed lately (`PROJECTION_RESYNC_WINDOW`), as its cache has
/// them: a node that missed updates anyway (its consumer interrupted while the events stream
/// changed leaders, a memory replica restarted) catches up within that time rather than at
/// the SKU's next change, which for a sold-out SKU may never come.
async fn publish_projections(
    js: jetstream::Context,
    node: String,
    mut rx: mpsc::Receiver<Vec<ProjectionUpdate>>,
    projections: Weak<Projections>,
    this: Weak<ClusterNode>,
) {
    let subject = placement::events_subject(&node);
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut queued = Vec::with_capacity(PROJECTION_BATCH_MAX);
    // What failed, to send again: SKUs (by key, refreshed from the cache) and audit entries.
    let mut retry_skus: BTreeSet<(domain::DropId, domain::SkuId)> = BTreeSet::new();
    let mut retry_audit: Vec<ProjectionUpdate> = Vec::new();
    let mut resynced = Instant::now();
    loop {
        let received =
            match tokio::time::timeout(PROJECTION_RETRY, rx.recv_many(&mut queued, PROJECTION_BATCH_MAX)).await {
                Ok(0) => return,
                Ok(n) => n,
                Err(_) => 0,
            };
        if resynced.elapsed() >= PROJECTION_RESYNC {
            resynced = Instant::now();
            if let (Some(cluster), Some(projections)) = (this.upgrade(), projections.upgrade()) {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let since = UnixMillis(now - PROJECTION_RESYNC_WINDOW.as_millis() as i64);
                let owned = projections.availability.changed_since(since, |drop_id, sku_id| {
                    cluster.owns(partition_of(&format!("sku/{drop_id}/{sku_id}"), cluster.partitions))
                });
                if !owned.is_empty() {
                    debug!(skus = owned.len(), "owned SKUs' figures published again");
                }
                for figures in owned {
                    retry_skus.insert((figures.drop_id.clone(), figures.sku_id.clone()));
                }
            }
        }
        // Linger a moment: under load this turns a message per reserve into a few per
        // second, which matters with every message replicated to three servers.
        if received > 0 && queued.len() < PROJECTION_BATCH_MAX {
            tokio::time::sleep(PROJECTION_LINGER).await;
            // Only what is queued by now: `recv_many` would wait for one more update, and a
            // lone update (a storefront registered on a quiet cluster) would wait with it.
            while queued.len() < PROJECTION_BATCH_MAX {
                match rx.try_recv() {
                    Ok(update) => queued.push(update),
                    Err(_) => break,
                }
            }
        }
        // What is sent again goes first: anything newer in this batch replaces it.
        let mut updates: Vec<ProjectionUpdate> = std::mem::take(&mut retry_audit);
        if !retry_skus.is_empty() {
            if let (Some(projections), Some(cluster)) = (projections.upgrade(), this.upgrade()) {
                for (drop_id, sku_id) in std::mem::take(&mut retry_skus) {
                    // Only the SKU's owner speaks for it: a node that lost the partition while
                    // its figures waited here would spread what its cache held before the
                    // new owner's changes (the nemesis saw every node show them).
                    if !cluster.owns(partition_of(&format!("sku/{drop_id}/{sku_id}"), cluster.partitions)) {
                        continue;
                    }
                    let figures = projections
                        .availability
                        .get(&drop_id)
                        .and_then(|drop| drop.skus.iter().find(|f| f.sku_id == sku_id).cloned());
                    if let Some(figures) = figures {
                        updates.push(ProjectionUpdate::Sku((*figures).clone()));
                    }
                }
            }
        }
        updates.extend(queued.drain(..).flatten());
        if updates.is_empty() {
            continue;
        }
        let mut seen = std::collections::HashSet::new();
        let mut keep = vec![true; updates.len()];
        for (i, update) in updates.iter().enumerate().rev() {
            if let ProjectionUpdate::Sku(figures) = update {
                keep[i] = seen.insert((figures.drop_id.clone(), figures.sku_id.clone()));
            }
        }
        let mut flags = keep.into_iter();
        updates.retain(|_| flags.next().unwrap_or(true));
        // What to send again should this message not be stored.
        let again: Vec<ProjectionUpdate> = updates
            .iter()
            .filter(|u| matches!(u, ProjectionUpdate::Sku(_) | ProjectionUpdate::Audit(_)))
            .cloned()
            .collect();
        let batch = ProjectionBatch {
            origin: node.clone(),
            updates,
        };
        let bytes = match postcard::to_stdvec(&batch) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "projection update not encodable");
                continue;
            }
        };
        let mut failed = |again: Vec<ProjectionUpdate>, error: &dyn std::fmt::Display| {
            warn!(%error, "projection update not stored; its figures and audit entries are sent again");
            for update in again {
                match update {
                    ProjectionUpdate::Sku(figures) => {
                        retry_skus.insert((figures.drop_id.clone(), figures.sku_id.clone()));
                    }
                    audit if retry_audit.len() < PROJECTION_QUEUE_MAX => retry_audit.push(audit),
                    _ => warn!("projection retry queue full; an audit entry reaches other nodes only from its journal"),
                }
            }
        };
        while acks.len() >= PROJECTION_ACKS_PENDING {
            if let Some((Err(e), again)) = acks.next().await {
                failed(again, &e);
            }
        }
        match js.publish(subject.clone(), bytes.into()).await {
            Ok(ack) => acks.push(async move { (std::future::IntoFuture::into_future(ack).await, again) }),
            Err(e) => failed(again, &e),
        }
        // Collect the acknowledgements that are already in.
        while let Some(Some((done, again))) = futures::FutureExt::now_or_never(acks.next()) {
            if let Err(e) = done {
                failed(again, &e);
            }
        }
    }
}

pub struct ClusterNode {
    pub node: String,
    pub partitions: u32,
    client: async_nats::Client,
    js: jetstream::Context,
    local: Arc<LocalActors>,
    journal: Arc<JetStreamJournal>,
    /// Owned partitions and the task answering each one's commands.
    owned: RwLock<HashMap<u32, tokio::task::JoinHandle<()>>>,
    remote_commands: Arc<Semaphore>,
    /// Per partition: commands waiting to travel to its owner.
    outboxes: Mutex<HashMap<u32, mpsc::Sender<Pending>>>,
    stop: watch::Sender<bool>,
    left: Mutex<Option<tokio::task::JoinHandle<()>>>,
    this: Weak<ClusterNode>,
    /// When the lease task last wrote this node's heartbeat (`Leases::heartbeat`).
    heartbeat: Mutex<Option<Arc<Mutex<Instant>>>>,
    timings: super::leases::LeaseTimings,
    stats: Arc<ClusterStats>,
}

/// The journal stream and the buckets, created if missing (any node may be first).
pub async fn ensure_storage(js: &jetstream::Context, replicas: usize, ttl: Duration) -> Result<(), JournalError> {
    let io = |e: &dyn std::fmt::Display| JournalError::Io(e.to_string());
    js.get_or_create_stream(jetstream::stream::Config {
        name: placement::JOURNAL_STREAM.into(),
        subjects: vec![placement::JOURNAL_SUBJECTS.into()],
        storage: StorageType::File,
        num_replicas: replicas,
        allow_direct: true,
        description: Some("Dropline actor journals, one subject per actor".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| io(&e))?;
    // Projection updates: replayable for a while (a node that was cut off catches up), then
    // gone. In memory, replicated but not fsynced: they are derived from the journals (the
    // truth), and a cache that misses one refills from the actors.
    js.get_or_create_stream(jetstream::stream::Config {
        name: placement::EVENTS_STREAM.into(),
        subjects: vec![placement::EVENTS_SUBJECTS.into()],
        storage: StorageType::Memory,
        num_replicas: replicas,
        max_age: EVENTS_MAX_AGE,
        max_bytes: EVENTS_MAX_BYTES,
        discard: jetstream::stream::DiscardPolicy::Old,
        description: Some("Dropline projection updates, one subject per node".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| io(&e))?;
    let bucket = |name: &str, max_age: Duration, history: i64| kv::Config {
        bucket: name.into(),
        history,
        max_age,
        storage: StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    for config in [
        bucket(placement::LEASES_BUCKET, ttl, 1),
        bucket(placement::NODES_BUCKET, ttl, 1),
        bucket(placement::WAKEUPS_BUCKET, Duration::ZERO, 1),
        // Addresses never outlive the retention bound, whatever happens to a shredding pass.
        bucket(
            placement::ADDRESSES_BUCKET,
            Duration::from_millis(ADDRESS_RETENTION_MAX_MS),
            1,
        ),
        bucket(placement::CLUSTER_BUCKET, Duration::ZERO, 1),
    ] {
        if js.get_key_value(config.bucket.clone()).await.is_err() {
            if let Err(e) = js.create_key_value(config.clone()).await {
                // Another node may have made it meanwhile.
                js.get_key_value(config.bucket.clone()).await.map_err(|_| io(&e))?;
            }
        }
    }
    Ok(())
}

impl ClusterNode {
    /// Connects, checks the cluster's settings, starts the actors and joins: partitions are
    /// taken in the background, a first round at once.
    pub async fn join(
        config: &ClusterConfig,
        clock: Arc<dyn Clock>,
        projections: Arc<Projections>,
        audit: Arc<dyn AuditLog>,
    ) -> anyhow::Result<Arc<ClusterNode>> {
        config.timings.validate().map_err(anyhow::Error::msg)?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("dropline-{}", config.node))
            .request_timeout(Some(Duration::from_millis(COMMAND_TIMEOUT_MS)))
            .retry_on_initial_connect()
            .connect(
                config
                    .nats_url
                    .split(',')
                    .map(|url| url.trim().parse::<async_nats::ServerAddr>())
                    .collect::<Result<Vec<_>, _>>()?,
            )
            .await?;
        let js = jetstream::new(client.clone());
        let recorded = patiently("setting up JetStream", || async {
            ensure_storage(&js, config.replicas, config.timings.ttl).await?;
            let cluster = js.get_key_value(placement::CLUSTER_BUCKET).await?;
            shared_value(&cluster, "partitions", || config.partitions.to_string().into_bytes()).await
        })
        .await?;
        if recorded != config.partitions.to_string().into_bytes() {
            anyhow::bail!(
                "this cluster runs {} partitions; the node was started with {}",
                String::from_utf8_lossy(&recorded),
                config.partitions
            );
        }
        let journal = patiently("opening the journal", || async {
            Ok(JetStreamJournal::open(&js, &config.data_dir.join("snapshots"), config.partitions).await?)
        })
        .await?;
        let (stop, _) = watch::channel(false);
        let node = Arc::new_cyclic(|this: &Weak<ClusterNode>| {
            let bus: Weak<dyn CommandBus> = this.clone();
            let local = Arc::new(LocalActors::with_bus(
                journal.clone(),
                clock,
                projections.clone(),
                audit,
                bus,
                Vec::new(),
                config.live_actors_max,
            ));
            ClusterNode {
                node: config.node.clone(),
                partitions: config.partitions,
                client: client.clone(),
                js: js.clone(),
                local,
                journal,
                owned: RwLock::new(HashMap::new()),
                remote_commands: Arc::new(Semaphore::new(REMOTE_COMMANDS_MAX)),
                outboxes: Mutex::new(HashMap::new()),
                stop,
                left: Mutex::new(None),
                this: this.clone(),
                heartbeat: Mutex::new(None),
                timings: config.timings,
                stats: Arc::default(),
            }
        });
        LocalActors::start_sweeper(&node.local);
        node.share_projections(&projections).await?;
        let host: Weak<dyn PartitionHost> = node.this.clone();
        let (leases_bucket, nodes_bucket) = patiently("opening the lease buckets", || async {
            Ok((
                js.get_key_value(placement::LEASES_BUCKET).await?,
                js.get_key_value(placement::NODES_BUCKET).await?,
            ))
        })
        .await?;
        let leases = Leases::new(
            config.node.clone(),
            config.partitions,
            config.timings,
            leases_bucket,
            nodes_bucket,
            host,
        );
        *node.heartbeat.lock().expect("heartbeat lock") = Some(leases.heartbeat.clone());
        let running = tokio::spawn(leases.run(node.stop.subscribe()));
        *node.left.lock().expect("left lock") = Some(running);
        info!(node = %config.node, partitions = config.partitions, "joined the cluster");
        Ok(node)
    }

    pub fn local(&self) -> &Arc<LocalActors> {
        &self.local
    }

    /// What this node counts for the server's metrics: lease changes, routed commands'
    /// latency, projection lag.
    pub fn stats(&self) -> &Arc<ClusterStats> {
        &self.stats
    }

    /// The partitions this node holds now.
    pub fn owned_count(&self) -> usize {
        self.owned.read().expect("owned lock").len()
    }

    pub fn journal(&self) -> &Arc<JetStreamJournal> {
        &self.journal
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// A setting or secret all nodes share (the buyer-hash key, the operator credential's
    /// hash): the first node to ask makes it.
    pub async fn shared(&self, key: &str, make: impl FnOnce() -> Vec<u8>) -> anyhow::Result<Vec<u8>> {
        // Made up-front (it is cheap); kept only if no node made one before.
        let made = make();
        patiently("reading a shared setting", || async {
            let store = self.js.get_key_value(placement::CLUSTER_BUCKET).await?;
            let made = made.clone();
            shared_value(&store, key, move || made).await
        })
        .await
    }

    /// Replaces a shared setting.
    pub async fn put_shared(&self, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        patiently("writing a shared setting", || async {
            let store = self.js.get_key_value(placement::CLUSTER_BUCKET).await?;
            store.put(key, value.clone().into()).await?;
            Ok(())
        })
        .await
    }

    /// Partitions this node owns now.
    pub fn owned(&self) -> BTreeSet<u32> {
        self.owned.read().expect("owned lock").keys().copied().collect()
    }

    fn owns(&self, partition: u32) -> bool {
        self.owned.read().expect("owned lock").contains_key(&partition)
    }

    /// Waits until the node owns at least one partition or `within` passes.
    pub async fn wait_for_partitions(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if !self.owned.read().expect("owned lock").is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Leaves the cluster: releases every partition (stopping their actors) so the others
    /// take them at once instead of after the lease TTL.
    /// Whether this node's NATS connection is up: without it the node can neither journal nor
    /// route, so the server reports NOT_SERVING to readiness checks until it is back.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Why this node cannot serve writes now, if it cannot: its NATS connection is down, or
    /// it is up but nothing gets through (a network partition leaves a connection looking
    /// alive until pings time out): the heartbeat has not been written for a lease TTL, so
    /// the node holds no partition any more and cannot route to the nodes that do.
    pub fn unreachable(&self) -> Option<String> {
        if !self.connected() {
            return Some("NATS connection lost".into());
        }
        let heartbeat = self.heartbeat.lock().expect("heartbeat lock").clone()?;
        let since = heartbeat.lock().expect("heartbeat lock").elapsed();
        (since > self.timings.ttl).then(|| {
            format!(
                "NATS unreachable: no heartbeat written for {} ms (lease TTL {} ms)",
                since.as_millis(),
                self.timings.ttl.as_millis()
            )
        })
    }

    pub async fn leave(&self) {
        self.stop.send_replace(true);
        let running = self.left.lock().expect("left lock").take();
        if let Some(running) = running {
            let _ = running.await;
        }
        let _ = self.client.flush().await;
    }

    /// Sends this node's projection updates to the others and applies theirs here: through
    /// the events stream, followed by this node's durable consumer with explicit acks (at
    /// least once: every update is an idempotent upsert, except audit entries, which a
    /// redelivery after a crash may repeat).
    async fn share_projections(&self, projections: &Arc<Projections>) -> anyhow::Result<()> {
        // Created now, so that updates published from here on are delivered to this node.
        let first = patiently("following the projection updates", || {
            follow_events(&self.js, &self.node)
        })
        .await?;
        let (tx, rx) = mpsc::channel(PROJECTION_QUEUE_MAX);
        tokio::spawn(publish_projections(
            self.js.clone(),
            self.node.clone(),
            rx,
            Arc::downgrade(projections),
            self.this.clone(),
        ));
        let (js, me) = (self.js.clone(), self.node.clone());
        let stats = self.stats.clone();
        let weak = Arc::downgrade(projections);
        tokio::spawn(async move {
            // The consumer's message stream ends or fails when its server goes away (a
            // restart, a leader change): follow it again, from where this node stopped.
            let mut next = Some(Ok::<_, anyhow::Error>(first));
            loop {
                let following = match next.take() {
                    Some(first) => first,
                    None => follow_events(&js, &me).await,
                };
                match following {
                    Ok(mut incoming) => {
                        while let Some(message) = incoming.next().await {
                            let message = match message {
                                Ok(message) => message,
                                Err(e) => {
                                    debug!(error = %e, "projection updates: consumer interrupted");
                                    break;
                                }
                            };
                            let Some(projections) = weak.upgrade() else { return };
                            match postcard::from_bytes::<ProjectionBatch>(&message.payload) {
                                Ok(batch) if batch.origin != me => {
                                    for update in batch.updates {
                                        projections.apply(update);
                                    }
                                    if let Ok(info) = message.info() {
                                        let lag = time::OffsetDateTime::now_utc() - info.published;
                                        stats
                                            .projection_lag_us
                                            .observe(u64::try_from(lag.whole_microseconds()).unwrap_or(0));
                                        stats.projection_pending.store(info.pending, Ordering::Relaxed);
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => warn!(error = %e, "undecodable projection update"),
                            }
                            if let Err(e) = message.ack().await {
                                debug!(error = %e, "projection update not acknowledged; it comes again");
                            }
                        }
                    }
                    Err(e) => debug!(error = %e, "projection updates: consumer not available yet"),
                }
                if weak.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        tokio::spawn(watch_events_consumer(
            self.js.clone(),
            self.node.clone(),
            Arc::downgrade(projections),
            self.this.clone(),
        ));
        projections.set_remote(Arc::new(NatsProjections { tx }));
        Ok(())
    }

    async fn route_to(&self, partition: u32, request: Request) -> Result<Response, CommandError> {
        if self.owns(partition) {
            return self.serve(request).await;
        }
        let outbox = {
            let mut outboxes = self.outboxes.lock().expect("outboxes lock");
            outboxes
                .entry(partition)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(ROUTE_QUEUE_MAX);
                    tokio::spawn(send_batches(self.this.clone(), partition, rx));
                    tx
                })
                .clone()
        };
        let (tx, rx) = oneshot::channel();
        outbox
            .try_send((request, tx))
            .map_err(|_| CommandError::Overloaded("too many commands waiting for another node".into()))?;
        rx.await
            .map_err(|_| CommandError::Unavailable("the node is shutting down".into()))?
    }

    /// Sends commands to the owner of `partition` as one request, waiting out a partition
    /// without owner until the command deadline; runs them here if this node took it.
    async fn send_batch(&self, partition: u32, requests: Vec<Request>) -> Vec<Result<Response, CommandError>> {
        let count = requests.len();
        let fail = |e: CommandError| (0..count).map(|_| Err(e.clone())).collect();
        let request = if count == 1 {
            requests.into_iter().next().expect("one request")
        } else {
            Request::Batch(requests)
        };
        match self.send(partition, request).await {
            Ok(Response::Batch(results)) if results.len() == count => results,
            Ok(Response::Batch(_)) => fail(CommandError::Unavailable("a batch reply of the wrong length".into())),
            Ok(response) if count == 1 => vec![Ok(response)],
            Ok(_) => fail(CommandError::Unavailable("one reply to a batch of commands".into())),
            Err(e) => fail(e),
        }
    }

    async fn send(&self, partition: u32, request: Request) -> Result<Response, CommandError> {
        let deadline = Instant::now() + Duration::from_millis(COMMAND_TIMEOUT_MS);
        let mut backoff = ROUTE_BACKOFF_MIN;
        let payload: bytes::Bytes = postcard::to_stdvec(&request)
            .map_err(|e| CommandError::Unavailable(format!("command not encodable: {e}")))?
            .into();
        loop {
            if self.owns(partition) {
                return self.serve_any(request).await;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(CommandError::Unavailable(format!(
                    "partition {partition} has had no owner for {COMMAND_TIMEOUT_MS} ms"
                )));
            }
            let asked = self
                .client
                .request(placement::command_subject(partition), payload.clone());
            let started = Instant::now();
            let answer = tokio::time::timeout(remaining, asked).await;
            self.stats.request_latency_us.observe_duration(started.elapsed());
            // Falling through: nobody owns the partition right now; ask again shortly.
            match answer {
                Err(_) => return Err(CommandError::Timeout(COMMAND_TIMEOUT_MS)),
                Ok(Err(e)) => match e.kind() {
                    async_nats::client::RequestErrorKind::NoResponders => {}
                    async_nats::client::RequestErrorKind::TimedOut => {
                        return Err(CommandError::Timeout(COMMAND_TIMEOUT_MS))
                    }
                    _ => return Err(CommandError::Unavailable(format!("NATS request failed: {e}"))),
                },
                Ok(Ok(message)) => match postcard::from_bytes::<Result<Response, CommandError>>(&message.payload) {
                    Ok(Ok(Response::NotOwner)) => {}
                    Ok(result) => return result,
                    Err(e) => return Err(CommandError::Unavailable(format!("undecodable reply: {e}"))),
                },
            }
            tokio::time::sleep(backoff.min(remaining)).await;
            backoff = (backoff * 2).min(ROUTE_BACKOFF_MAX);
        }
    }

    /// Runs a command, or a batch of them at once, on this node's actors.
    async fn serve_any(&self, request: Request) -> Result<Response, CommandError> {
        match request {
            Request::Batch(requests) => Ok(Response::Batch(
                futures::future::join_all(requests.into_iter().map(|r| self.serve(r))).await,
            )),
            request => self.serve(request).await,
        }
    }

    /// Runs a command on this node's actors.
    async fn serve(&self, request: Request) -> Result<Response, CommandError> {
        match request {
            Request::Command {
                kind,
                stream,
                command,
                tell,
            } => Ok(Response::Reply(self.local.serve(&kind, &stream, &command, tell).await?)),
            Request::Wake(stream) => {
                self.local.wake(stream).await?;
                Ok(Response::Reply(Vec::new()))
            }
            Request::Batch(_) => Err(CommandError::Unavailable("a batch inside a batch".into())),
        }
    }

    /// Answers the commands of `partition` sent by other nodes.
    async fn answer(self: Arc<Self>, partition: u32) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut commands = self
            .client
            .queue_subscribe(placement::command_subject(partition), placement::COMMAND_QUEUE.into())
            .await?;
        let weak = self.this.clone();
        Ok(tokio::spawn(async move {
            while let Some(message) = commands.next().await {
                let Some(node) = weak.upgrade() else { return };
                let Some(reply) = message.reply.clone() else { continue };
                let client = node.client.clone();
                let Ok(permit) = node.remote_commands.clone().try_acquire_owned() else {
                    let busy: Result<Response, CommandError> = Err(CommandError::Overloaded(
                        "the owning node has too many commands in flight".into(),
                    ));
                    if let Ok(bytes) = postcard::to_stdvec(&busy) {
                        let _ = client.publish(reply, bytes.into()).await;
                    }
                    continue;
                };
                tokio::spawn(async move {
                    let _permit = permit;
                    let result = match postcard::from_bytes::<Request>(&message.payload) {
                        Ok(_) if !node.owns(partition) => Ok(Response::NotOwner),
                        Ok(request) => node.serve_any(request).await,
                        Err(e) => Err(CommandError::Unavailable(format!("undecodable command: {e}"))),
                    };
                    match postcard::to_stdvec(&result) {
                        Ok(bytes) => {
                            if let Err(e) = client.publish(reply, bytes.into()).await {
                                debug!(error = %e, "reply not sent");
                            }
                        }
                        Err(e) => warn!(error = %e, "reply not encodable"),
                    }
                });
            }
        }))
    }
}

/// This node's durable consumer of the events stream (created on first use), as a stream
/// of messages from where the node last acknowledged.
/// Follows this node's consumer of the events stream again from the stream's end when the
/// stream has gone back behind it. The stream keeps its messages in memory (R3): a replica
/// that restarted empty and became leader before it caught up starts numbering again below
/// what the consumer delivered, and the consumer then passes over every new message as
/// already delivered, so this node's projections stop following the others' for good (the
/// nemesis saw two nodes' figures of a SKU stay stale after kill -9 of a NATS server while
/// the others were cut from their peers). Deleting the consumer ends its message stream;
/// the follower creates it again, new from the stream's end, and the owners' periodic
/// re-publication of recent figures (`PROJECTION_RESYNC`) brings back the SKU figures that
/// were missed. The directory (credentials, partners, hubs, creators) is read again from the
/// registry once the new consumer is there (`reload_directory`): a credential reset missed
/// meanwhile must not leave the old credential accepted here. Other updates missed (a
/// drop's status, hub load, audit entries) are not brought back until their next change.
async fn watch_events_consumer(
    js: jetstream::Context,
    node: String,
    projections: Weak<Projections>,
    this: Weak<ClusterNode>,
) {
    let name = placement::events_consumer(&node);
    loop {
        tokio::time::sleep(EVENTS_CONSUMER_CHECK).await;
        if projections.strong_count() == 0 {
            return;
        }
        let Ok(stream) = js.get_stream(placement::EVENTS_STREAM).await else {
            continue;
        };
        let Ok(stream_info) = stream.get_info().await else {
            continue;
        };
        let Ok(consumer) = stream.get_consumer::<jetstream::consumer::pull::Config>(&name).await else {
            continue;
        };
        let Ok(consumer_info) = consumer.get_info().await else {
            continue;
        };
        let (last, delivered) = (stream_info.state.last_sequence, consumer_info.delivered.stream_sequence);
        if delivered > last {
            warn!(
                delivered,
                last,
                "the events stream went back behind this node's consumer (a replica lost messages); following it again from its end"
            );
            match stream.delete_consumer(&name).await {
                Ok(_) => reload_directory(&stream, &name, &this, &projections).await,
                Err(e) => warn!(error = %e, "the stale events consumer was not deleted; trying again"),
            }
        }
    }
}

/// Reads the registry's directory again into this node's, once this node's events consumer
/// `consumer` exists again: an update published after that is delivered to this node, one
/// published before is in the registry's answer.
async fn reload_directory(
    stream: &jetstream::stream::Stream,
    consumer: &str,
    this: &Weak<ClusterNode>,
    projections: &Weak<Projections>,
) {
    let until = Instant::now() + EVENTS_REFOLLOW_WAIT;
    while stream
        .get_consumer::<jetstream::consumer::pull::Config>(consumer)
        .await
        .is_err()
    {
        if Instant::now() >= until {
            warn!("the events consumer is not back yet; reading the directory again anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let until = Instant::now() + DIRECTORY_RELOAD_WAIT;
    loop {
        let Some(node) = this.upgrade() else { return };
        let bus: &dyn CommandBus = &*node;
        match bus
            .ask_for::<RegistryState, RegistryDirectory>((), RegistryCommand::Directory)
            .await
        {
            Ok(directory) => {
                let Some(projections) = projections.upgrade() else {
                    return;
                };
                projections.directory.load(directory);
                info!("the directory was read again from the registry after the events stream went back");
                return;
            }
            Err(e) if Instant::now() < until => {
                debug!(error = %e, "the registry did not answer for the directory; asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                warn!(error = %e, "the directory was not read again; updates of it missed meanwhile stay missing until their next change");
                return;
            }
        }
    }
}

async fn follow_events(js: &jetstream::Context, node: &str) -> anyhow::Result<jetstream::consumer::pull::Stream> {
    let stream = js.get_stream(placement::EVENTS_STREAM).await?;
    let consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> = stream
        .get_or_create_consumer(
            &placement::events_consumer(node),
            jetstream::consumer::pull::Config {
                durable_name: Some(placement::events_consumer(node)),
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: EVENTS_ACK_PENDING_MAX,
                inactive_threshold: EVENTS_MAX_AGE,
                ..Default::default()
            },
        )
        .await?;
    // Short pull expiries and heartbeats: a consumer whose server went away (a restart, a
    // leader change) is noticed within seconds and followed again, not after the 30 s
    // default.
    Ok(consumer
        .stream()
        .expires(EVENTS_PULL_EXPIRES)
        .heartbeat(EVENTS_PULL_HEARTBEAT)
        .messages()
        .await?)
}

/// A partition's sender: whatever commands queued while earlier batches travel go together.
async fn send_batches(node: Weak<ClusterNode>, partition: u32, mut rx: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(ROUTE_BATCHES_IN_FLIGHT));
    let mut queued = Vec::with_capacity(ROUTE_BATCH_MAX);
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut queued, ROUTE_BATCH_MAX).await == 0 {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let (requests, replies): (Vec<Request>, Vec<_>) = queued.drain(..).unzip();
        tokio::spawn(async move {
            let _permit = permit;
            let results = node.send_batch(partition, requests).await;
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        });
    }
}

impl PartitionHost for ClusterNode {
    fn acquired(&self, partition: u32) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(this) = self.this.upgrade() else { return };
            self.stats.partitions_acquired.fetch_add(1, Ordering::Relaxed);
            // Owned first, so this node's own commands for it run here at once.
            self.owned
                .write()
                .expect("owned lock")
                .insert(partition, tokio::spawn(async {}));
            match this.answer(partition).await {
                Ok(task) => {
                    if let Some(old) = self.owned.write().expect("owned lock").insert(partition, task) {
                        old.abort();
                    }
                }
                Err(e) => warn!(partition, error = %e, "not answering the partition's commands from other nodes"),
            }
            match self.journal.wakeups_of(partition).await {
                Ok(deadlines) => {
                    let count = deadlines.len();
                    for (stream, at) in deadlines {
                        let mut tries = 0;
                        while !self.local.env().wakeups.register(stream.clone(), UnixMillis(at)) && tries < 100 {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    debug!(partition, count, "deadlines of the partition scheduled");
                }
                Err(e) => warn!(partition, error = %e, "deadlines of the partition not read"),
            }
        })
    }

    fn released(&self, partition: u32) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(task) = self.owned.write().expect("owned lock").remove(&partition) {
                task.abort();
                self.stats.partitions_released.fetch_add(1, Ordering::Relaxed);
            }
            let partitions = self.partitions;
            let stopped = self
                .local
                .stop_streams(|stream| partition_of(stream, partitions) == partition);
            self.journal.forget_partition(partition);
            info!(partition, stopped, "partition no longer served here");
        })
    }
}

/// Runs `step` until it succeeds or `STORAGE_WAIT` passes: a JetStream cluster that just
/// started (or lost a server) elects its stream leaders first and answers "no responders"
/// meanwhile.
pub async fn patiently<T, F, Fut>(what: &str, mut step: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let until = Instant::now() + STORAGE_WAIT;
    loop {
        match step().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() < until => {
                debug!(error = %e, "{what}: JetStream not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => anyhow::bail!("{what}: JetStream not ready after {STORAGE_WAIT:?}: {e}"),
        }
    }
}

/// A value every node must agree on: created by the first node, read by the others.
pub async fn shared_value(store: &kv::Store, key: &str, make: impl FnOnce() -> Vec<u8>) -> anyhow::Result<Vec<u8>> {
    if let Some(value) = store.get(key).await? {
        return Ok(value.to_vec());
    }
    match store.create(key, make().into()).await {
        Ok(_) => {}
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    store
        .get(key)
        .await?
        .map(|v| v.to_vec())
        .ok_or_else(|| anyhow::anyhow!("cluster setting {key} vanished"))
}

impl ClusterNode {
    /// Runs a parcel here if this node owns its partition (as it is, nothing encoded), else
    /// sends it to the owner as an envelope. A tell's reply is `()`.
    async fn deliver(&self, parcel: Box<dyn Parcel>, tell: bool) -> Result<AnyReply, CommandError> {
        let stream = parcel.stream();
        let partition = partition_of(&stream, self.partitions);
        if self.owns(partition) {
            if tell {
                self.local.tell_parcel(parcel).await?;
                return Ok(Box::new(()));
            }
            return self.local.ask_parcel(parcel).await;
        }
        let request = Request::Command {
            kind: parcel.kind().to_owned(),
            stream,
            command: parcel.encode_command()?,
            tell,
        };
        match self.route_to(partition, request).await? {
            Response::Reply(_) if tell => Ok(Box::new(())),
            Response::Reply(bytes) => parcel.decode_reply(&bytes, &self.local.env().projections),
            Response::NotOwner | Response::Batch(_) => {
                Err(CommandError::Unavailable("the owning node answered out of turn".into()))
            }
        }
    }
}

impl CommandBus for ClusterNode {
    fn ask_parcel(&self, parcel: Box<dyn Parcel>) -> BoxFuture<'_, Result<AnyReply, CommandError>> {
        Box::pin(self.deliver(parcel, false))
    }

    fn tell_parcel(&self, parcel: Box<dyn Parcel>) -> BoxFuture<'_, Result<(), CommandError>> {
        Box::pin(async move { self.deliver(parcel, true).await.map(drop) })
    }

    fn wake(&self, stream: String) -> BoxFuture<'_, Result<(), CommandError>> {
        Box::pin(async move {
            let partition = partition_of(&stream, self.partitions);
            self.route_to(partition, Request::Wake(stream)).await.map(drop)
        })
    }
}

/// Buyers' addresses in a key-value bucket, readable by the node delivering the order.
pub struct KvAddresses {
    store: kv::Store,
}

impl KvAddresses {
    pub async fn open(js: &jetstream::Context) -> Result<KvAddresses, JournalError> {
        Ok(KvAddresses {
            store: js
                .get_key_value(placement::ADDRESSES_BUCKET)
                .await
                .map_err(|e| JournalError::Io(e.to_string()))?,
        })
    }
}

/// A vault record in the bucket: salt (32 bytes), shred time (8, big-endian), ciphertext.
fn vault_record(sealed: &SealedAddress, shred_at: UnixMillis) -> bytes::Bytes {
    let mut record = Vec::with_capacity(40 + sealed.ciphertext.len());
    record.extend_from_slice(&sealed.salt);
    record.extend_from_slice(&shred_at.0.to_be_bytes());
    record.extend_from_slice(&sealed.ciphertext);
    record.into()
}

fn parse_vault_record(order_id: &str, record: &[u8]) -> Result<(SealedAddress, UnixMillis), JournalError> {
    if record.len() < 40 {
        return Err(JournalError::Corrupt(format!(
            "address record of {order_id} is too short"
        )));
    }
    let salt = record[..32].try_into().expect("32 bytes");
    let shred_at = UnixMillis(i64::from_be_bytes(record[32..40].try_into().expect("8 bytes")));
    Ok((
        SealedAddress {
            salt,
            ciphertext: record[40..].to_vec(),
        },
        shred_at,
    ))
}

impl AddressVault for KvAddresses {
    fn put_new<'a>(
        &'a self,
        order_id: &'a str,
        sealed: &'a SealedAddress,
        shred_at: UnixMillis,
    ) -> BoxFuture<'a, Result<bool, JournalError>> {
        Box::pin(async move {
            // JetStream acknowledges a KV write once it is stored on a quorum.
            match self
                .store
                .create(placement::address_key(order_id), vault_record(sealed, shred_at))
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(JournalError::Io(e.to_string())),
            }
        })
    }

    fn get<'a>(&'a self, order_id: &'a str) -> BoxFuture<'a, Result<Option<SealedAddress>, JournalError>> {
        Box::pin(async move {
            let record = self
                .store
                .get(placement::address_key(order_id))
                .await
                .map_err(|e| JournalError::Io(e.to_string()))?;
            match record {
                Some(record) => Ok(Some(parse_vault_record(order_id, &record)?.0)),
                None => Ok(None),
            }
        })
    }

    fn shred_by<'a>(&'a self, order_id: &'a str, at: UnixMillis) -> BoxFuture<'a, Result<(), JournalError>> {
        Box::pin(async move {
            let key = placement::address_key(order_id);
            let io = |e: &dyn std::fmt::Display| JournalError::Io(e.to_string());
            let Some(entry) = self.store.entry(key.clone()).await.map_err(|e| io(&e))? else {
                return Ok(());
            };
            if entry.operation != kv::Operation::Put {
                return Ok(());
            }
            let (sealed, current) = parse_vault_record(order_id, &entry.value)?;
            if current <= at {
                return Ok(());
            }
            // Revision-checked: a concurrent change is read again by the next pass.
            self.store
                .update(key, vault_record(&sealed, at), entry.revision)
                .await
                .map(|_| ())
                .map_err(|e| io(&e))
        })
    }

    fn shred_due(&self, now: UnixMillis, limit: usize) -> BoxFuture<'_, Result<usize, JournalError>> {
        Box::pin(async move {
            let io = |e: &dyn std::fmt::Display| JournalError::Io(e.to_string());
            let mut keys = self.store.keys().await.map_err(|e| io(&e))?;
            let (mut looked, mut shredded) = (0usize, 0usize);
            while let Some(key) = keys.next().await {
                let key = key.map_err(|e| io(&e))?;
                looked += 1;
                if shredded >= limit || looked > limit.saturating_mul(ADDRESS_SHRED_SCAN_FACTOR) {
                    break;
                }
                let Some(record) = self.store.get(key.clone()).await.map_err(|e| io(&e))? else {
                    continue;
                };
                if parse_vault_record(&key, &record).map_or(true, |(_, at)| at <= now) {
                    // Purge, not delete: no earlier revision of the record stays behind.
                    self.store.purge(key).await.map_err(|e| io(&e))?;
                    shredded += 1;
                }
            }
            Ok(shredded)
        })
    }
}

#[cfg(test)]
mod decoders;
