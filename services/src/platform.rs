//! The running platform as the gRPC services see it: the command bus, the projections, the
//! clock and the secrets. `Platform::open_embedded` wires the embedded default (sled journal,
//! in-process actors).

use crate::auth::OperatorCredential;
use crate::limits::{ADDRESS_SHRED_BATCH_MAX, ADDRESS_SHRED_INTERVAL_MS, DIRECTORY_WAIT, FIGURES_LOAD_FAN_OUT};
use crate::status::from_command_error;
use actors::audit_log::AuditLog;
use actors::cluster::node::KvAddresses;
use actors::cluster::{ClusterConfig, ClusterNode};
use actors::journal::AddressVault;
use actors::journal::{Journal, JournalError};
use actors::limits::ADDRESS_RETENTION_MAX_MS;
use actors::projections::CachedDrop;
use actors::secrets::PlatformKeys;
use actors::sled_journal::{JournalOptions, SledJournal};
use actors::CommandError;
use actors::{Clock, CommandBus, LocalActors, Projections, SystemClock};
use domain::drop::{DropCommand, DropState};
use domain::hub::{Dispatch, HubCommand, HubState};
use domain::ledger::{LedgerReply, LedgerState};
use domain::registry::{Directory, RegistryCommand, RegistryState};
use domain::reply::FromReply;
use domain::sku::{SkuCommand, SkuFigures, SkuState};
use domain::HubId;
use domain::{DropId, Rejection};
use futures::{StreamExt, TryStreamExt};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::Status;

/// The shared setting holding the operator credential's hash.
const OPERATOR_HASH_KEY: &str = "operator-token-hash";

/// Where an embedded platform keeps its journal, audit trail and delivery addresses: the
/// sled journal holds all three (`Platform::open_embedded`), and so does the in-memory one
/// tests use (`actors::memory_journal`).
pub struct EmbeddedStorage {
    pub journal: Arc<dyn Journal>,
    pub audit: Arc<dyn AuditLog>,
    pub addresses: Arc<dyn AddressVault>,
}

impl EmbeddedStorage {
    /// All three in one store.
    pub fn all_in<S: Journal + AuditLog + AddressVault>(store: Arc<S>) -> EmbeddedStorage {
        EmbeddedStorage {
            journal: store.clone(),
            audit: store.clone(),
            addresses: store,
        }
    }
}

#[derive(Clone)]
pub struct Platform {
    pub bus: Arc<dyn CommandBus>,
    /// The actors running in this process (all of them on the embedded platform, this
    /// node's on a cluster).
    pub actors: Arc<LocalActors>,
    pub projections: Arc<Projections>,
    pub clock: Arc<dyn Clock>,
    pub keys: Arc<PlatformKeys>,
    pub addresses: Arc<dyn AddressVault>,
    pub journal: Arc<dyn Journal>,
    /// This node, when the platform runs as one node of a cluster.
    pub cluster: Option<Arc<ClusterNode>>,
    pub audit: Arc<dyn AuditLog>,
    pub operator: OperatorCredential,
    /// Checkout's call-rate bounds per storefront and per buyer.
    pub throttle: Arc<crate::throttle::CheckoutThrottle>,
    /// What the gRPC layer and checkout count for `/metrics` (`Metrics::new(false)`:
    /// nothing, and calls get no span).
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// A new operator credential made at this start (no token given, none stored): shown
    /// once by `dropline serve`.
    pub new_operator_token: Option<String>,
    /// Turns true when the server begins shutting down; long streams end on it.
    pub shutdown: watch::Receiver<bool>,
    shutdown_tx: Arc<watch::Sender<bool>>,
}

impl Platform {
    /// The embedded platform: journal and secrets under `data_dir`, actors in-process.
    /// `operator_token`: the operator credential to accept (see [`OperatorCredential::load`]);
    /// `live_actors_max`: running actors of each kind kept at most
    /// (`actors::limits::LIVE_ACTORS_MAX_DEFAULT`).
    pub async fn open_embedded(
        data_dir: &Path,
        operator_token: Option<&str>,
        live_actors_max: usize,
    ) -> anyhow::Result<Platform> {
        Platform::open_embedded_with(data_dir, operator_token, live_actors_max, JournalOptions::default()).await
    }

    /// [`Platform::open_embedded`] with the journal's `options` (its log segment size).
    pub async fn open_embedded_with(
        data_dir: &Path,
        operator_token: Option<&str>,
        live_actors_max: usize,
        options: JournalOptions,
    ) -> anyhow::Result<Platform> {
        std::fs::create_dir_all(data_dir)?;
        let storage = EmbeddedStorage::all_in(SledJournal::open_with(data_dir, options)?);
        Platform::open_embedded_on(
            data_dir,
            operator_token,
            live_actors_max,
            storage,
            Arc::new(SystemClock),
        )
        .await
    }

    /// [`Platform::open_embedded`] over the given storage (an in-memory journal in tests)
    /// and clock (one the test drives); only the secrets are kept under `data_dir`.
    pub async fn open_embedded_on(
        data_dir: &Path,
        operator_token: Option<&str>,
        live_actors_max: usize,
        storage: EmbeddedStorage,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Platform> {
        std::fs::create_dir_all(data_dir)?;
        let EmbeddedStorage {
            journal,
            audit,
            addresses,
        } = storage;
        let keys = Arc::new(PlatformKeys::load_or_create(&data_dir.join("secrets"))?);
        let (operator, new_operator_token) = OperatorCredential::load(&data_dir.join("secrets"), operator_token)?;
        let projections = Arc::new(Projections::default());
        let actors = LocalActors::new(
            journal.clone(),
            clock.clone(),
            projections.clone(),
            audit.clone(),
            live_actors_max,
        )?;
        // The registry fills the partner directory (credential lookups) when it starts.
        (actors.clone() as Arc<dyn CommandBus>)
            .ask::<RegistryState>((), RegistryCommand::Load)
            .await
            .map_err(|e| anyhow::anyhow!("loading the partner registry: {e}"))?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let platform = Platform {
            audit,
            operator,
            throttle: Arc::default(),
            metrics: Arc::default(),
            new_operator_token,
            bus: actors.clone(),
            actors,
            projections,
            clock,
            keys,
            addresses,
            journal,
            cluster: None,
            shutdown,
            shutdown_tx: Arc::new(shutdown_tx),
        };
        platform.spawn_address_shredder();
        platform.follow_fulfilment_for_addresses();
        Ok(platform)
    }

    /// One node of a cluster: journals in JetStream, actors spread over the nodes by
    /// partition leases, commands routed over NATS. Local state (snapshots, this node's
    /// audit trail) lives under the config's `data_dir`; secrets are shared by the nodes
    /// through the cluster's key-value bucket (`operator_token`: as for the embedded
    /// platform, but for every node at once).
    pub async fn open_cluster(config: &ClusterConfig, operator_token: Option<&str>) -> anyhow::Result<Platform> {
        std::fs::create_dir_all(&config.data_dir)?;
        let local = SledJournal::open(&config.data_dir.join("local"))?;
        let projections = Arc::new(Projections::default());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let node = ClusterNode::join(config, clock.clone(), projections.clone(), local.clone()).await?;
        let key = node
            .shared("buyer-hash-key", || rand::random::<[u8; 32]>().to_vec())
            .await?;
        let keys =
            Arc::new(PlatformKeys::from_key(key.try_into().map_err(|_| {
                anyhow::anyhow!("the cluster's buyer-hash key is not 32 bytes")
            })?));
        let (operator, new_operator_token) = match operator_token {
            Some(token) => {
                OperatorCredential::check_token(token)?;
                let hash = crate::auth::hash(token);
                node.put_shared(OPERATOR_HASH_KEY, hash.clone().into_bytes()).await?;
                (OperatorCredential::from_hash(hash)?, None)
            }
            None => {
                let mut made = None;
                let stored = node
                    .shared(OPERATOR_HASH_KEY, || {
                        let token = OperatorCredential::new_token();
                        let hash = crate::auth::hash(&token);
                        made = Some((token, hash.clone()));
                        hash.into_bytes()
                    })
                    .await?;
                let stored = String::from_utf8(stored)?;
                // Shown only by the node whose token was kept (the first to ask).
                let shown = made.and_then(|(token, hash)| (hash == stored).then_some(token));
                (OperatorCredential::from_hash(stored)?, shown)
            }
        };
        let addresses = Arc::new(
            actors::cluster::node::patiently("opening the address vault", || async {
                Ok(KvAddresses::open(node.jetstream()).await?)
            })
            .await?,
        );
        let bus: Arc<dyn CommandBus> = node.clone();
        // The directory (credential lookups) from the registry, wherever it runs; updates
        // after this come with the projection updates, which this node already receives.
        let until = std::time::Instant::now() + DIRECTORY_WAIT;
        loop {
            match bus
                .ask_for::<RegistryState, Directory>((), RegistryCommand::Directory)
                .await
            {
                Ok(directory) => {
                    projections.directory.load(directory);
                    break;
                }
                Err(e) if std::time::Instant::now() < until => {
                    tracing::info!(error = %e, "waiting for the registry's partition to be served");
                }
                Err(e) => anyhow::bail!("loading the partner directory: {e}"),
            }
        }
        let (shutdown_tx, shutdown) = watch::channel(false);
        let platform = Platform {
            audit: Arc::new(actors::projections::SharedAudit {
                projections: projections.clone(),
                local: local.clone(),
            }),
            operator,
            throttle: Arc::default(),
            metrics: Arc::default(),
            new_operator_token,
            bus,
            projections,
            clock,
            keys,
            addresses,
            journal: node.journal().clone(),
            actors: node.local().clone(),
            cluster: Some(node),
            shutdown,
            shutdown_tx: Arc::new(shutdown_tx),
        };
        platform.spawn_address_shredder();
        platform.follow_fulfilment_for_addresses();
        Ok(platform)
    }

    /// A hub command whose reply is a dispatch.
    pub async fn hub_dispatch(&self, hub_id: HubId, command: HubCommand) -> Result<Dispatch, CommandError> {
        self.bus
            .ask_for::<HubState, Result<Dispatch, Rejection>>(hub_id, command)
            .await?
            .map_err(CommandError::Rejected)
    }

    /// A command to a creator's ledger, as a gRPC result in the shape the command answers
    /// with.
    pub async fn ledger<T: FromReply<LedgerReply>>(
        &self,
        creator: &domain::CreatorId,
        command: domain::ledger::LedgerCommand,
    ) -> Result<T, Status> {
        self.bus
            .ask_for::<LedgerState, T>(creator.clone(), command)
            .await
            .map_err(from_command_error)
    }

    /// A drop as its actor knows it, as a gRPC result.
    pub async fn drop_view(&self, drop_id: DropId) -> Result<domain::drop::DropView, Status> {
        self.bus
            .ask::<DropState>(drop_id, DropCommand::Get)
            .await
            .map_err(from_command_error)
    }

    /// Seals and stores an order's delivery address, unless one is stored already (a retry
    /// of the confirmation that stored it). Durable when it returns.
    /// The retention bound counts from `confirmed_at`, the confirmation's own time.
    pub async fn store_address(
        &self,
        order_id: &domain::OrderId,
        encoded: &[u8],
        confirmed_at: domain::UnixMillis,
    ) -> Result<(), JournalError> {
        let sealed = self.keys.seal_address(order_id.as_str(), encoded);
        let shred_at = confirmed_at.plus_ms(ADDRESS_RETENTION_MAX_MS);
        self.addresses.put_new(order_id.as_str(), &sealed, shred_at).await?;
        Ok(())
    }

    /// An order's delivery address (encoded), if it is still kept.
    pub async fn address(&self, order_id: &domain::OrderId) -> Result<Option<Vec<u8>>, JournalError> {
        let Some(sealed) = self.addresses.get(order_id.as_str()).await? else {
            return Ok(None);
        };
        self.keys
            .open_address(order_id.as_str(), &sealed)
            .map(Some)
            .map_err(|e| JournalError::Corrupt(format!("address of order {order_id}: {e}")))
    }

    /// The address is needed `for_ms` more at most (0: shred it at the next pass). A failure
    /// is logged, not returned: the retention bound still shreds it.
    pub async fn keep_address_for(&self, order_id: &domain::OrderId, for_ms: u64) {
        let at = self.clock.now().plus_ms(for_ms);
        if let Err(e) = self.addresses.shred_by(order_id.as_str(), at).await {
            tracing::warn!(%order_id, error = %e, "address shred time not brought forward; the retention bound still applies");
        }
    }

    /// Brings an address's shred time forward when its order's hub ends the fulfilment,
    /// however it ends (a courier's call, the hub's own give-up timer, a withdrawal by a
    /// cancel, a refund, the SKU's outbox or reconciliation): once delivered, kept for the
    /// drop's return window (a return is collected from it); otherwise not at all.
    fn follow_fulfilment_for_addresses(&self) {
        let addresses = self.addresses.clone();
        let clock = self.clock.clone();
        // Weak: the hook lives in the projections it reads.
        let projections = Arc::downgrade(&self.projections);
        let runtime = tokio::runtime::Handle::current();
        self.projections
            .set_fulfilment_ended(Arc::new(move |order_id: &domain::OrderId, delivered: bool| {
                let keep_ms = if delivered {
                    let (drop_id, _) = order_id.owner();
                    projections
                        .upgrade()
                        .and_then(|p| p.availability.spec(&drop_id))
                        .map_or(domain::limits::RETURN_WINDOW_MS_MAX, |spec| spec.terms.return_window_ms)
                } else {
                    0
                };
                let at = clock.now().plus_ms(keep_ms);
                let (addresses, order_id) = (addresses.clone(), order_id.clone());
                runtime.spawn(async move {
                    if let Err(e) = addresses.shred_by(order_id.as_str(), at).await {
                        tracing::warn!(%order_id, error = %e, "address shred time not brought forward; the retention bound still applies");
                    }
                });
            }));
    }

    /// Shreds due addresses every `ADDRESS_SHRED_INTERVAL_MS` until shutdown.
    fn spawn_address_shredder(&self) {
        let (addresses, clock, mut shutdown) = (self.addresses.clone(), self.clock.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(ADDRESS_SHRED_INTERVAL_MS));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = shutdown.changed() => return,
                }
                match addresses.shred_due(clock.now(), ADDRESS_SHRED_BATCH_MAX).await {
                    Ok(0) => {}
                    Ok(shredded) => tracing::info!(shredded, "delivery addresses shredded"),
                    Err(e) => {
                        tracing::warn!(error = %e, "shredding delivery addresses failed; retried at the next pass")
                    }
                }
            }
        });
    }

    /// The oversell audit of a drop (`actors::audit::audit_drop`: every SKU rebuilt from its
    /// whole journal, invariants checked), its result recorded for `/metrics`.
    pub async fn audit_drop(&self, drop_id: &DropId) -> Result<Vec<actors::audit::SkuAudit>, String> {
        let audits = actors::audit::audit_drop(self.journal.as_ref(), drop_id).await?;
        let oversold = audits.iter().map(|a| a.oversold).sum();
        let failures = audits.iter().filter(|a| a.invariants.is_err()).count() as u64;
        let at = u64::try_from(self.clock.now().0 / 1_000).unwrap_or(0);
        self.metrics.audited(audits.len() as u64, oversold, failures, at);
        Ok(audits)
    }

    /// After a shutdown: closes the journal (queued writes answered, the embedded log
    /// checkpointed, its writer ended), so the data directory may go. Actors still running
    /// get `Closed` for any write after this.
    pub async fn close(&self) {
        self.begin_shutdown();
        let journal = self.journal.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || journal.close()).await {
            tracing::warn!(error = %e, "the journal did not close cleanly");
        }
    }

    pub fn begin_shutdown(&self) {
        self.shutdown_tx.send_replace(true);
    }

    /// The cached drop, asking the drop actor once (which publishes it) on a cache miss.
    pub async fn cached_drop(&self, drop_id: &DropId) -> Result<CachedDrop, Status> {
        let cached = match self.projections.availability.get(drop_id) {
            Some(cached) => cached,
            None => {
                // The actor publishes the drop as it starts; in a cluster it may run on
                // another node and be running already, so the reply fills the cache too.
                let view = self
                    .bus
                    .ask::<DropState>(drop_id.clone(), DropCommand::Get)
                    .await
                    .map_err(from_command_error)?;
                if self.projections.availability.get(drop_id).is_none() {
                    self.projections
                        .availability
                        .put_drop(view.spec.clone(), view.recorded_status, false);
                }
                self.projections
                    .availability
                    .get(drop_id)
                    .ok_or_else(|| Status::unavailable("drop cache not ready; retry"))?
            }
        };
        if cached.missing.is_empty() {
            return Ok(cached);
        }
        // SKUs not seen since this process started (after a restart, before first use, or
        // whose actors run on another node): ask their actors, and read again.
        let loads: Vec<_> = cached
            .missing
            .into_iter()
            .map(|sku_id| {
                self.bus
                    .ask_for::<SkuState, SkuFigures>((drop_id.clone(), sku_id), SkuCommand::GetFigures)
            })
            .collect();
        let availability = &self.projections.availability;
        futures::stream::iter(loads)
            .buffer_unordered(FIGURES_LOAD_FAN_OUT)
            .try_for_each(|figures| async move {
                availability.put_sku(figures);
                Ok(())
            })
            .await
            .map_err(from_command_error)?;
        self.projections
            .availability
            .get(drop_id)
            .ok_or_else(|| Status::unavailable("drop cache not ready; retry"))
    }
}
