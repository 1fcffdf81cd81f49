//! The bus port: how commands reach the actor that owns a key, wherever it runs. The
//! embedded platform implements it in-process ([`crate::embedded::LocalActors`]); the
//! cluster implements it over NATS request/reply.

use crate::error::CommandError;
use crate::journal::BoxFuture;
use domain::drop::{DropCommand, DropView, SaleStatus};
use domain::hub::{HubCommand, HubReply};
use domain::ledger::{LedgerCommand, LedgerReply};
use domain::registry::{HubSetup, RegistryCommand, RegistryReply};
use domain::sku::{SkuCommand, SkuReply};
use domain::{CreatorId, DropId, HubId, SkuId};

pub trait CommandBus: Send + Sync + 'static {
    fn sku_command(
        &self,
        drop_id: DropId,
        sku_id: SkuId,
        command: SkuCommand,
    ) -> BoxFuture<'_, Result<SkuReply, CommandError>>;
    fn drop_command(&self, drop_id: DropId, command: DropCommand) -> BoxFuture<'_, Result<DropView, CommandError>>;

    /// Tells the *running* SKU actors of a drop that its sale status changed (after the
    /// drop's journal recorded it). Actors that are not running are not started: every SKU
    /// actor asks its drop for the status when it starts, so it catches up then. Opening a
    /// 1,000-SKU drop therefore costs what its live SKUs cost, not 1,000 actor starts.
    /// Wakes the actor of a journal stream for its deadline (it runs its timer command);
    /// used for actors passivated with a deadline pending and after a restart.
    fn wake(&self, stream: String) -> BoxFuture<'_, Result<(), CommandError>>;

    fn sale_status_changed(&self, drop_id: DropId, status: SaleStatus) -> BoxFuture<'_, Result<(), CommandError>>;

    fn hub_command(&self, hub_id: HubId, command: HubCommand) -> BoxFuture<'_, Result<HubReply, CommandError>>;

    /// The partner registry (one actor: hubs' configuration, partners, assignments).
    fn registry_command(&self, command: RegistryCommand) -> BoxFuture<'_, Result<RegistryReply, CommandError>>;

    /// Gives a hub's new setup to its actor if it is running; a hub actor that is not
    /// running reads its setup from the registry when it starts.
    fn hub_setup_changed(&self, setup: HubSetup) -> BoxFuture<'_, Result<(), CommandError>>;

    /// A creator's settlement ledger.
    fn creator_command(
        &self,
        creator_id: CreatorId,
        command: LedgerCommand,
    ) -> BoxFuture<'_, Result<LedgerReply, CommandError>>;
}
