//! Refunds that stop parcels: the one way RefundOrder and reconciliation refund an order,
//! with its hub asked first.

use crate::platform::Platform;
use crate::status::{from_command_error, from_rejection};
use actors::CommandError;
use domain::hub::{DispatchOrder, HubCommand};
use domain::ledger::{LedgerCommand, OrderBooking, RefundReason};
use domain::{CreatorId, HubId, OrderId, Rejection};
use tonic::Status;

/// Refunds an order in its creator's ledger once its hub has withdrawn the dispatch
/// (`dispatch`: the order's hub and what it needs, for an order a SKU confirmed). The hub
/// goes first and alone decides whether the parcel can still be stopped: once it has been
/// picked up the refund is refused (FAILED_PRECONDITION) and nothing is booked, and no pickup
/// can follow a withdrawal. An order already reversed (a return recorded, a refund retried)
/// or one that failed (its remedies refunded the buyer) needs no withdrawal: the ledger
/// answers for it.
pub async fn withdraw_and_refund(
    platform: &Platform,
    creator: &CreatorId,
    order_id: &OrderId,
    reason: RefundReason,
    dispatch: Option<(HubId, DispatchOrder, bool)>,
) -> Result<OrderBooking, Status> {
    let booking: OrderBooking = platform
        .ledger(creator, LedgerCommand::GetOrder(order_id.clone()))
        .await?;
    if booking.reversed.is_none() && booking.delivered_at.is_some() {
        // The ledger knows the parcel reached the buyer: only its return refunds it.
        return Err(Status::failed_precondition(format!(
            "order {order_id} was delivered; nothing was refunded (a parcel that comes back is refunded by recording its return)"
        )));
    }
    if let (None, None, Some((hub_id, order, handed_over))) = (&booking.reversed, booking.failed_at, dispatch) {
        platform
            .hub_dispatch(hub_id, HubCommand::Cancel { order, handed_over })
            .await
            .map_err(|e| match e {
                CommandError::Rejected(Rejection::FailedPrecondition(why)) => {
                    from_rejection(Rejection::FailedPrecondition(format!(
                        "{why}; nothing was refunded (a parcel that comes back is refunded by recording its return)"
                    )))
                }
                e => from_command_error(e),
            })?;
    }
    let command = LedgerCommand::Refund {
        order_id: order_id.clone(),
        reason,
    };
    let booking = platform.ledger(creator, command).await?;
    // Refunded: nothing will be delivered (or the parcel came back), so the buyer's address
    // is not needed any more.
    platform.keep_address_for(order_id, 0).await;
    Ok(booking)
}
