//! dropline.dispatch.v1.DispatchService: what courier partners call, with their own
//! credential. A partner sees and acts on its own dispatches only.

use crate::auth::require_partner;
use crate::convert::{timestamp, Check};
use crate::limits::WATCH_STREAM_MAX_MS;
use crate::platform::Platform;
use crate::status::{from_command_error, invalid_argument};
use actors::fulfilment::CourierUpdate;
use domain::hub::{CourierAction, Dispatch, HubCommand, HubState, Stage};
use domain::registry::PartnerRecord;
use domain::sku::Fulfilment;
use domain::{FieldViolation, HubId, OrderId, PartnerId};
use proto::dispatch::v1 as pb;
use proto::dispatch::v1::dispatch_service_server::DispatchService;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::warn;

pub struct Couriers {
    platform: Platform,
}

impl Couriers {
    pub fn new(platform: Platform) -> Couriers {
        Couriers { platform }
    }

    fn partner<T>(&self, request: &Request<T>, call: &str) -> Result<Arc<PartnerRecord>, Status> {
        require_partner(request, self.platform.audit.as_ref(), self.platform.clock.now(), call)
    }

    async fn act(
        &self,
        partner: &PartnerId,
        dispatch_id: &str,
        action: CourierAction,
    ) -> Result<Response<pb::Dispatch>, Status> {
        let (hub_id, order_id) = parse_dispatch_id(dispatch_id)?;
        let d = self
            .platform
            .hub_dispatch(
                hub_id.clone(),
                HubCommand::Courier {
                    partner: partner.clone(),
                    order_id,
                    action,
                },
            )
            .await
            .map_err(from_command_error)?;
        Ok(Response::new(self.view(&hub_id, &d, partner).await))
    }

    /// A dispatch as its partner sees it: the address only once it accepted a delivery.
    async fn view(&self, hub_id: &HubId, d: &Dispatch, partner: &PartnerId) -> pb::Dispatch {
        let mut view = dispatch(hub_id, d);
        let holds =
            d.stage.holder() == Some(partner) && matches!(d.stage, Stage::Accepted { .. } | Stage::PickedUp { .. });
        if holds && d.order.fulfilment == Fulfilment::Delivery {
            view.address = self.delivery_address(&d.order.order_id).await;
        }
        view
    }

    /// The buyer's address from the vault, for the partner delivering the order.
    async fn delivery_address(&self, order_id: &OrderId) -> Option<pb::DeliveryAddress> {
        let bytes = match self.platform.address(order_id).await {
            Ok(bytes) => bytes?,
            Err(e) => {
                warn!(%order_id, error = %e, "address vault read failed");
                return None;
            }
        };
        let a = <proto::checkout::v1::Address as prost::Message>::decode(bytes.as_slice()).ok()?;
        Some(pb::DeliveryAddress {
            line1: a.line1,
            line2: a.line2,
            postal_code: a.postal_code,
            city: a.city,
            country: a.country,
            recipient_name: a.recipient_name,
            phone: a.phone,
        })
    }
}

pub fn dispatch_id(hub_id: &HubId, order_id: &OrderId) -> String {
    format!("{hub_id}/{order_id}")
}

fn parse_dispatch_id(value: &str) -> Result<(HubId, OrderId), Status> {
    let bad = || {
        invalid_argument(vec![FieldViolation::new(
            "dispatch_id",
            "must look like <hub_id>/<order_id>",
        )])
    };
    let (hub, order) = value.split_once('/').ok_or_else(bad)?;
    let mut check = Check::default();
    let hub = check.parse("dispatch_id", hub, HubId::parse);
    let order = check.parse("dispatch_id", order, OrderId::parse);
    check.finish(|| Some((hub?, order?)))
}

/// A dispatch for couriers: never the pickup code (the partner must present it), and no
/// item name for a discreet order.
pub fn dispatch(hub_id: &HubId, d: &Dispatch) -> pb::Dispatch {
    let (stage, deadline, offered_at) = match &d.stage {
        Stage::Placing | Stage::Waiting => (pb::DispatchStage::Waiting, None, None),
        Stage::Offered {
            deadline, offered_at, ..
        } => (pb::DispatchStage::Offered, Some(*deadline), Some(*offered_at)),
        Stage::Accepted { deadline, .. } => (pb::DispatchStage::Accepted, Some(*deadline), None),
        Stage::PickedUp { deadline, .. } => (pb::DispatchStage::PickedUp, Some(*deadline), None),
        Stage::Delivered { .. } => (pb::DispatchStage::Delivered, None, None),
        Stage::Failed { .. } => (pb::DispatchStage::Failed, None, None),
        Stage::Cancelled { .. } => (pb::DispatchStage::Cancelled, None, None),
    };
    pb::Dispatch {
        dispatch_id: dispatch_id(hub_id, &d.order.order_id),
        hub_id: hub_id.to_string(),
        order_id: d.order.order_id.to_string(),
        stage: stage as i32,
        fulfilment: match d.order.fulfilment {
            Fulfilment::Delivery => pb::FulfilmentKind::Delivery,
            Fulfilment::Pickup | Fulfilment::AtStall => pb::FulfilmentKind::Pickup,
        } as i32,
        item: if d.order.discreet {
            String::new()
        } else {
            d.order.item.clone()
        },
        quantity: d.order.quantity,
        discreet: d.order.discreet,
        deadline: deadline.map(timestamp),
        window_from: Some(timestamp(d.promised_from)),
        window_by: Some(timestamp(d.promised_by)),
        offered_at: offered_at.map(timestamp),
        attempt: d.attempt(),
        previous_deadline_missed: d.swaps.last().and_then(|s| s.missed_deadline).map(timestamp),
        address: None,
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::DispatchUpdate, Status>> + Send>>;

fn text(field: &str, value: &str, required: bool) -> Result<String, Status> {
    let mut check = Check::default();
    check.text(field, value, required);
    check.finish(|| Some(value.to_string()))
}

#[tonic::async_trait]
impl DispatchService for Couriers {
    type SubscribeStream = UpdateStream;

    async fn subscribe(&self, request: Request<pb::SubscribeRequest>) -> Result<Response<UpdateStream>, Status> {
        let partner = self.partner(&request, "Subscribe")?;
        let partner_id = partner.spec.partner_id.clone();
        // Subscribe first, then read what is pending, so no offer falls in between (one
        // may come twice; `dispatch_id` and `attempt` identify it).
        let mut live = self
            .platform
            .projections
            .couriers
            .subscribe(&partner_id)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let mut pending = Vec::new();
        for hub_id in partner.hubs.keys() {
            match self
                .platform
                .bus
                .ask_for::<HubState, Vec<Dispatch>>(hub_id.clone(), HubCommand::PendingOffers(partner_id.clone()))
                .await
            {
                Ok(offers) => pending.extend(offers.into_iter().map(|d| (hub_id.clone(), d))),
                Err(e) => warn!(%hub_id, error = %e, "pending offers not read"),
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut shutdown = self.platform.shutdown.clone();
        tokio::spawn(async move {
            for (hub_id, d) in pending {
                let update = pb::dispatch_update::Update::Offer(dispatch(&hub_id, &d));
                if tx.send(Ok(pb::DispatchUpdate { update: Some(update) })).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(Duration::from_millis(WATCH_STREAM_MAX_MS));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    update = live.recv() => {
                        let Some(update) = update else {
                            let _ = tx.send(Err(Status::resource_exhausted("fell too far behind; reconnect to get pending offers"))).await;
                            return;
                        };
                        let update = match update {
                            CourierUpdate::Offer { hub_id, dispatch: d } => pb::dispatch_update::Update::Offer(dispatch(&hub_id, &d)),
                            CourierUpdate::Withdrawn { hub_id, order_id, reason } => {
                                pb::dispatch_update::Update::Withdrawn(pb::Withdrawal {
                                    dispatch_id: dispatch_id(&hub_id, &order_id),
                                    reason,
                                })
                            }
                        };
                        if tx.send(Ok(pb::DispatchUpdate { update: Some(update) })).await.is_err() {
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => {
                        let _ = tx.send(Err(Status::unavailable("server shutting down; reconnect"))).await;
                        return;
                    }
                    _ = &mut deadline => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn accept(&self, request: Request<pb::AcceptRequest>) -> Result<Response<pb::Dispatch>, Status> {
        let partner = self.partner(&request, "Accept")?;
        self.act(
            &partner.spec.partner_id,
            &request.get_ref().dispatch_id,
            CourierAction::Accept,
        )
        .await
    }

    async fn decline(&self, request: Request<pb::DeclineRequest>) -> Result<Response<pb::Dispatch>, Status> {
        let partner = self.partner(&request, "Decline")?;
        let r = request.get_ref();
        let reason = text("reason", &r.reason, false)?;
        self.act(
            &partner.spec.partner_id,
            &r.dispatch_id,
            CourierAction::Decline { reason },
        )
        .await
    }

    async fn mark_picked_up(
        &self,
        request: Request<pb::MarkPickedUpRequest>,
    ) -> Result<Response<pb::Dispatch>, Status> {
        let partner = self.partner(&request, "MarkPickedUp")?;
        let r = request.get_ref();
        let pickup_code = text("pickup_code", &r.pickup_code, true)?;
        self.act(
            &partner.spec.partner_id,
            &r.dispatch_id,
            CourierAction::PickedUp { pickup_code },
        )
        .await
    }

    async fn mark_delivered(
        &self,
        request: Request<pb::MarkDeliveredRequest>,
    ) -> Result<Response<pb::Dispatch>, Status> {
        let partner = self.partner(&request, "MarkDelivered")?;
        let r = request.get_ref();
        let proof = text("proof_reference", &r.proof_reference, true)?;
        self.act(
            &partner.spec.partner_id,
            &r.dispatch_id,
            CourierAction::Delivered { proof },
        )
        .await
    }

    async fn report_failure(
        &self,
        request: Request<pb::ReportFailureRequest>,
    ) -> Result<Response<pb::Dispatch>, Status> {
        let partner = self.partner(&request, "ReportFailure")?;
        let r = request.get_ref();
        let reason = text("reason", &r.reason, true)?;
        self.act(
            &partner.spec.partner_id,
            &r.dispatch_id,
            CourierAction::Failure { reason },
        )
        .await
    }

    async fn get_dispatch(&self, request: Request<pb::GetDispatchRequest>) -> Result<Response<pb::Dispatch>, Status> {
        let partner = self.partner(&request, "GetDispatch")?;
        let (hub_id, order_id) = parse_dispatch_id(&request.get_ref().dispatch_id)?;
        let d = self
            .platform
            .hub_dispatch(hub_id.clone(), HubCommand::GetDispatch(order_id.clone()))
            .await
            .map_err(from_command_error)?;
        if !d.partners.contains(&partner.spec.partner_id) {
            return Err(Status::permission_denied(format!(
                "dispatch {} was never offered to {}",
                dispatch_id(&hub_id, &order_id),
                partner.spec.partner_id
            )));
        }
        Ok(Response::new(self.view(&hub_id, &d, &partner.spec.partner_id).await))
    }
}
