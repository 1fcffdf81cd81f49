//! The bus port: how commands reach the actor that owns a key, wherever it runs. The
//! embedded platform implements it in-process ([`crate::embedded::LocalActors`]); the
//! cluster implements it over NATS request/reply.

use crate::error::CommandError;
use crate::journal::BoxFuture;
use domain::drop::{DropCommand, DropView};
use domain::sku::{SkuCommand, SkuReply};
use domain::{DropId, SkuId};

pub trait CommandBus: Send + Sync + 'static {
    fn sku_command(
        &self,
        drop_id: DropId,
        sku_id: SkuId,
        command: SkuCommand,
    ) -> BoxFuture<'_, Result<SkuReply, CommandError>>;
    fn drop_command(&self, drop_id: DropId, command: DropCommand) -> BoxFuture<'_, Result<DropView, CommandError>>;
}
