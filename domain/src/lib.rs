//! The pure Dropline domain: ids, money, and the event-sourced state machines of drops and
//! SKUs. Nothing here does IO or knows about tokio, kameo, tonic, sled or NATS; time is
//! passed in. Every state machine follows `decide(&state, command, now) -> Result<(events,
//! reply), Rejection>` and `apply(&mut state, &event)`, so it can be property-tested and
//! replayed deterministically.

pub mod aggregate;
pub mod drop;
pub mod facts;
pub mod hub;
pub mod ids;
pub mod keymap;
pub mod ledger;
pub mod limits;
pub mod money;
pub mod registry;
pub mod rejection;
pub mod reply;
pub mod sku;
pub mod till;
pub mod time;

pub use aggregate::Aggregate;
pub use ids::{
    BuyerRef, CityName, CreatorId, DropId, HubId, IdError, IdempotencyKey, OrderId, PartnerId, SkuId, StorefrontId,
};
pub use money::{Currency, Money};
pub use rejection::{FieldViolation, Rejection};
pub use time::UnixMillis;
