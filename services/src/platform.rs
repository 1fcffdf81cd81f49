//! The running platform as the gRPC services see it: the command bus, the projections, the
//! clock and the secrets. `Platform::open_embedded` wires the embedded default (sled journal,
//! in-process actors).

use crate::auth::OperatorCredential;
use crate::status::from_command_error;
use actors::audit_log::AuditLog;
use actors::journal::AddressVault;
use actors::projections::CachedDrop;
use actors::secrets::BuyerHasher;
use actors::sled_journal::SledJournal;
use actors::CommandError;
use actors::{Clock, CommandBus, LocalActors, Projections, SystemClock};
use domain::drop::DropCommand;
use domain::hub::{Dispatch, HubCommand, HubReply};
use domain::registry::RegistryCommand;
use domain::sku::SkuCommand;
use domain::DropId;
use domain::HubId;
use futures::{StreamExt, TryStreamExt};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::Status;

/// SKU actors started at once to fill a drop's figures into the cache.
const FIGURES_LOAD_FAN_OUT: usize = 64;

#[derive(Clone)]
pub struct Platform {
    pub bus: Arc<dyn CommandBus>,
    pub projections: Arc<Projections>,
    pub clock: Arc<dyn Clock>,
    pub buyers: Arc<BuyerHasher>,
    pub addresses: Arc<dyn AddressVault>,
    pub journal: Arc<SledJournal>,
    pub actors: Arc<LocalActors>,
    pub audit: Arc<dyn AuditLog>,
    pub operator: OperatorCredential,
    /// A new operator credential made at this start (no token given, none stored): shown
    /// once by `dropline serve`.
    pub new_operator_token: Option<String>,
    /// Turns true when the server begins shutting down; long streams end on it.
    pub shutdown: watch::Receiver<bool>,
    shutdown_tx: Arc<watch::Sender<bool>>,
}

impl Platform {
    /// The embedded platform: journal and secrets under `data_dir`, actors in-process.
    /// `operator_token`: the operator credential to accept (see [`OperatorCredential::load`]).
    pub async fn open_embedded(data_dir: &Path, operator_token: Option<&str>) -> anyhow::Result<Platform> {
        std::fs::create_dir_all(data_dir)?;
        let journal = SledJournal::open(data_dir)?;
        let buyers = Arc::new(BuyerHasher::load_or_create(&data_dir.join("secrets"))?);
        let (operator, new_operator_token) = OperatorCredential::load(&data_dir.join("secrets"), operator_token)?;
        let projections = Arc::new(Projections::default());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let actors = LocalActors::new(journal.clone(), clock.clone(), projections.clone(), journal.clone())?;
        // The registry fills the partner directory (credential lookups) when it starts.
        actors
            .registry_command(RegistryCommand::Load)
            .await
            .map_err(|e| anyhow::anyhow!("loading the partner registry: {e}"))?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        Ok(Platform {
            audit: journal.clone(),
            operator,
            new_operator_token,
            bus: actors.clone(),
            projections,
            clock,
            buyers,
            addresses: journal.clone(),
            journal,
            actors,
            shutdown,
            shutdown_tx: Arc::new(shutdown_tx),
        })
    }

    /// A hub command whose reply is a dispatch.
    pub async fn hub_dispatch(&self, hub_id: HubId, command: HubCommand) -> Result<Dispatch, CommandError> {
        match self.bus.hub_command(hub_id, command).await? {
            HubReply::Dispatch(d) => Ok(*d),
            other => Err(CommandError::Unavailable(format!(
                "hub answered {other:?} instead of a dispatch"
            ))),
        }
    }

    /// A command to a creator's ledger, as a gRPC result.
    pub async fn ledger(
        &self,
        creator: &domain::CreatorId,
        command: domain::ledger::LedgerCommand,
    ) -> Result<domain::ledger::LedgerReply, Status> {
        self.bus
            .creator_command(creator.clone(), command)
            .await
            .map_err(from_command_error)
    }

    /// A drop as its actor knows it, as a gRPC result.
    pub async fn drop_view(&self, drop_id: DropId) -> Result<domain::drop::DropView, Status> {
        self.bus
            .drop_command(drop_id, DropCommand::Get)
            .await
            .map_err(from_command_error)
    }

    pub fn begin_shutdown(&self) {
        self.shutdown_tx.send_replace(true);
    }

    /// The cached drop, asking the drop actor once (which publishes it) on a cache miss.
    pub async fn cached_drop(&self, drop_id: &DropId) -> Result<CachedDrop, Status> {
        let cached = match self.projections.availability.get(drop_id) {
            Some(cached) => cached,
            None => {
                self.bus
                    .drop_command(drop_id.clone(), DropCommand::Get)
                    .await
                    .map_err(from_command_error)?;
                self.projections
                    .availability
                    .get(drop_id)
                    .ok_or_else(|| Status::unavailable("drop cache not ready; retry"))?
            }
        };
        if cached.missing.is_empty() {
            return Ok(cached);
        }
        // SKUs not seen since this process started (after a restart, or before first use):
        // start their actors, which publish their figures from the journal, and read again.
        let loads: Vec<_> = cached
            .missing
            .into_iter()
            .map(|sku_id| self.bus.sku_command(drop_id.clone(), sku_id, SkuCommand::GetFigures))
            .collect();
        futures::stream::iter(loads)
            .buffer_unordered(FIGURES_LOAD_FAN_OUT)
            .try_for_each(|_| async { Ok(()) })
            .await
            .map_err(from_command_error)?;
        self.projections
            .availability
            .get(drop_id)
            .ok_or_else(|| Status::unavailable("drop cache not ready; retry"))
    }
}
