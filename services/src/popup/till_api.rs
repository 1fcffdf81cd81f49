//! What the tills at the stall call: the platform's CheckoutService, served from the
//! edge's leases (Reserve, Confirm, Cancel, GetOrder, GetAvailability), and
//! `PopupService.GetStatus`. Every call needs the edge's storefront credential (compared by
//! hash, in constant time); a sale is answered once its event is synced in the edge's
//! journal. The buyer's proof is the receipt: its token is the receipt MAC the upstream
//! verifies, and its pickup code is what the stall hands the goods over against.

use super::Edge;
use crate::convert::{self, Check};
use crate::edge::receipt_fields;
use crate::limits::{CHECKOUT_MESSAGE_BYTES_MAX, GRPC_CONCURRENT_STREAMS_MAX, HTTP2_HEADER_LIST_BYTES_MAX};
use crate::status::from_command_error;
use actors::secrets::receipt_mac;
use domain::drop::SaleStatus;
use domain::till::{TillCommand, TillOrder, TillOrderState, TillReply, TillState, TillStock, TillTerms, Upload};
use domain::{DropId, OrderId, SkuId, UnixMillis};
use proto::checkout::v1::checkout_service_server::{CheckoutService, CheckoutServiceServer};
use proto::checkout::v1::*;
use proto::edge::v1::popup_service_server::{PopupService, PopupServiceServer};
use proto::edge::v1::{GetPopupStatusRequest, PopupStatus, RefundDue, SaleOutcome, TillStatus};
use std::future::Future;
use std::pin::Pin;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

/// Refunds listed per till in GetStatus (the latest).
const STATUS_REFUNDS_MAX: usize = 1_000;

/// Serves the tills on `listener` until `shutdown` resolves.
pub(super) async fn serve(
    edge: Edge,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CheckoutServiceServer<TillCheckout>>().await;
    health.set_serving::<PopupServiceServer<PopupStatusService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let checkout = CheckoutServiceServer::new(TillCheckout { edge: edge.clone() })
        .max_decoding_message_size(CHECKOUT_MESSAGE_BYTES_MAX);
    let status = PopupServiceServer::new(PopupStatusService { edge });
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .max_concurrent_streams(GRPC_CONCURRENT_STREAMS_MAX)
        .http2_max_header_list_size(HTTP2_HEADER_LIST_BYTES_MAX)
        .layer(crate::metadata_bounds::layer())
        .add_service(health_service)
        .add_service(reflection)
        .add_service(checkout)
        .add_service(status)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// UNAUTHENTICATED without a credential, PERMISSION_DENIED with another one.
fn authorize<T>(edge: &Edge, request: &Request<T>) -> Result<(), Status> {
    let Some(value) = request.metadata().get("authorization") else {
        return Err(Status::unauthenticated(
            "this call needs the edge's storefront credential",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <credential>`"))?;
    // blake3::Hash compares in constant time.
    if blake3::hash(token.as_bytes()) != blake3::hash(edge.config.token.as_bytes()) {
        return Err(Status::permission_denied("not this edge's credential"));
    }
    Ok(())
}

fn till_of(edge: &Edge, drop_id: &DropId, sku_id: &SkuId) -> Result<(DropId, SkuId), Status> {
    if !edge.tills.contains(drop_id, sku_id) {
        return Err(Status::not_found(format!(
            "this edge has no lease of {drop_id}/{sku_id}"
        )));
    }
    Ok((drop_id.clone(), sku_id.clone()))
}

fn parse_order_id(edge: &Edge, order_id: &str) -> Result<(OrderId, (DropId, SkuId)), Status> {
    let mut check = Check::default();
    let order_id = check.parse("order_id", order_id, OrderId::parse);
    let order_id = check.finish(|| order_id)?;
    let (drop_id, sku_id) = order_id.owner();
    let key = till_of(edge, &drop_id, &sku_id).map_err(|_| Status::not_found(format!("order {order_id} not found")))?;
    Ok((order_id, key))
}

fn order_status(order: &TillOrder) -> OrderStatus {
    match &order.state {
        TillOrderState::Held { .. } => OrderStatus::Held,
        TillOrderState::Released {
            why: domain::till::Released::Cancelled,
            ..
        } => OrderStatus::Cancelled,
        TillOrderState::Released { .. } => OrderStatus::Expired,
        // A sale the upstream refused is refunded: cancelled for the buyer.
        TillOrderState::Sold(sale) if sale.upload.is_refund() => OrderStatus::Cancelled,
        TillOrderState::Sold(_) => OrderStatus::Confirmed,
    }
}

fn order_message(key: &(DropId, SkuId), order_id: &OrderId, order: &TillOrder, terms: Option<&TillTerms>) -> Order {
    let (amount, pickup_code, updated_at, expires_at) = match &order.state {
        TillOrderState::Held { expires_at } => (None, String::new(), order.created_at, Some(*expires_at)),
        TillOrderState::Released { at, .. } => (None, String::new(), *at, None),
        TillOrderState::Sold(sale) => (Some(sale.amount), sale.pickup_code.clone(), sale.sold_at, None),
    };
    Order {
        order_id: order_id.to_string(),
        drop_id: key.0.to_string(),
        sku_id: key.1.to_string(),
        status: order_status(order) as i32,
        hub_id: terms.map(|t| t.hub_id.to_string()).unwrap_or_default(),
        city: terms.map(|t| t.city.to_string()).unwrap_or_default(),
        quantity: order.quantity,
        amount: amount.map(convert::money),
        expires_at: expires_at.map(convert::timestamp),
        waitlist_position: 0,
        fulfilment: if matches!(order.state, TillOrderState::Sold(_)) {
            FulfilmentKind::AtStall as i32
        } else {
            FulfilmentKind::Unspecified as i32
        },
        discreet: false,
        pickup_code,
        updated_at: Some(convert::timestamp(updated_at)),
        tracking: None,
    }
}

/// An order a till answered with (`None`: nothing free for a reserve).
type OneOrder = Option<(OrderId, TillOrder)>;

pub struct TillCheckout {
    edge: Edge,
}

impl TillCheckout {
    async fn ask(&self, key: (DropId, SkuId), command: TillCommand) -> Result<TillReply, Status> {
        self.edge
            .bus
            .ask::<TillState>(key, command)
            .await
            .map_err(from_command_error)
    }

    async fn stock(&self, key: &(DropId, SkuId)) -> Result<TillStock, Status> {
        match self.ask(key.clone(), TillCommand::Stock).await? {
            TillReply::Stock(stock) => Ok(stock),
            other => Err(Status::internal(format!("a till answered {other:?} to Stock"))),
        }
    }

    /// An order command's answer: the order, and the till's lease as mirrored (what an
    /// answer names: hub, city).
    fn one_order(reply: TillReply) -> Result<(OneOrder, Option<TillTerms>), Status> {
        match reply {
            TillReply::Order { order, terms } => Ok((order, terms)),
            other => Err(Status::internal(format!(
                "a till answered {other:?} to an order command"
            ))),
        }
    }
}

#[tonic::async_trait]
impl CheckoutService for TillCheckout {
    async fn reserve(&self, request: Request<ReserveRequest>) -> Result<Response<ReserveResponse>, Status> {
        authorize(&self.edge, &request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let drop_id = check.parse("drop_id", &r.drop_id, DropId::parse);
        let sku_id = check.parse("sku_id", &r.sku_id, SkuId::parse);
        check.text("idempotency_key", &r.idempotency_key, false);
        let (drop_id, sku_id) = check.finish(|| Some((drop_id?, sku_id?)))?;
        let key = till_of(&self.edge, &drop_id, &sku_id)?;
        let order_id = OrderId::new(&drop_id, &sku_id, rand::random());
        let reply = self
            .ask(
                key.clone(),
                TillCommand::Reserve {
                    order_id,
                    quantity: r.quantity,
                    idempotency_key: (!r.idempotency_key.is_empty()).then(|| r.idempotency_key.clone()),
                    hold_ttl_ms: self.edge.config.timings.hold_ttl.as_millis() as u64,
                },
            )
            .await?;
        let (order, terms) = Self::one_order(reply)?;
        let hub_id = terms.map(|t| t.hub_id.to_string()).unwrap_or_default();
        Ok(Response::new(match order {
            None => ReserveResponse {
                outcome: ReserveOutcome::SoldOut as i32,
                quantity_requested: r.quantity,
                hub_id,
                ..ReserveResponse::default()
            },
            Some((order_id, order)) => ReserveResponse {
                outcome: ReserveOutcome::Held as i32,
                order_id: order_id.to_string(),
                quantity_held: order.quantity,
                quantity_requested: r.quantity,
                hub_id,
                expires_at: match order.state {
                    TillOrderState::Held { expires_at } => Some(convert::timestamp(expires_at)),
                    _ => None,
                },
                waitlist_position: 0,
                // The till is the buyer's side at a stall: no token for a buyer's device.
                order_token: String::new(),
            },
        }))
    }

    type ReserveStreamStream = Pin<Box<dyn futures::Stream<Item = Result<ReserveStreamResponse, Status>> + Send>>;

    async fn reserve_stream(
        &self,
        request: Request<Streaming<ReserveStreamRequest>>,
    ) -> Result<Response<Self::ReserveStreamStream>, Status> {
        authorize(&self.edge, &request)?;
        Err(Status::unimplemented(
            "a pop-up edge serves Reserve, Confirm, Cancel, GetOrder and GetAvailability",
        ))
    }

    async fn confirm(&self, request: Request<ConfirmRequest>) -> Result<Response<ConfirmResponse>, Status> {
        authorize(&self.edge, &request)?;
        let r = request.into_inner();
        let (order_id, key) = parse_order_id(&self.edge, &r.order_id)?;
        let mut check = Check::default();
        let amount = check.money("amount", r.amount.as_ref());
        check.text("payment_reference", &r.payment_reference, true);
        if matches!(r.fulfilment, Some(confirm_request::Fulfilment::Delivery(_))) {
            check.fail(
                "delivery",
                "a pop-up edge sells for pickup at the stall; delivery orders go through the platform's checkout",
            );
        }
        let amount = check.finish(|| amount)?;
        let pickup_code = format!("{:06}", rand::random_range(0..1_000_000u32));
        let reply = self
            .ask(
                key.clone(),
                TillCommand::Confirm {
                    order_id,
                    payment_reference: r.payment_reference,
                    amount,
                    pickup_code,
                    offline: !self.edge.uplink.is_online(),
                },
            )
            .await?;
        let (Some((order_id, order)), terms) = Self::one_order(reply)? else {
            return Err(Status::internal("a confirm answered no order"));
        };
        let TillOrderState::Sold(sale) = &order.state else {
            return Err(Status::internal("a confirm answered an order not sold"));
        };
        self.edge.uplink.sold.notify_one();
        let receipt_token = self
            .edge
            .keys
            .get(&sale.key_id)
            .map(|k| {
                receipt_mac(
                    &k,
                    &receipt_fields(&key.0, &key.1, &TillState::edge_sale(&order_id, sale)),
                )
            })
            .unwrap_or_default();
        let receipt = Receipt {
            order_id: order_id.to_string(),
            receipt_token,
            description: format!("{} x{}", key.1, order.quantity),
            quantity: order.quantity,
            amount: Some(convert::money(sale.amount)),
            pickup_code: sale.pickup_code.clone(),
            confirmed_at: Some(convert::timestamp(sale.sold_at)),
        };
        Ok(Response::new(ConfirmResponse {
            order: Some(order_message(&key, &order_id, &order, terms.as_ref())),
            receipt: Some(receipt),
        }))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        authorize(&self.edge, &request)?;
        let (order_id, key) = parse_order_id(&self.edge, &request.get_ref().order_id)?;
        let reply = self.ask(key.clone(), TillCommand::Cancel { order_id }).await?;
        let (order, terms) = Self::one_order(reply)?;
        let order = order.map(|(id, order)| order_message(&key, &id, &order, terms.as_ref()));
        Ok(Response::new(CancelResponse { order }))
    }

    async fn get_availability(
        &self,
        request: Request<GetAvailabilityRequest>,
    ) -> Result<Response<GetAvailabilityResponse>, Status> {
        authorize(&self.edge, &request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let drop_id = check.parse("drop_id", &r.drop_id, DropId::parse);
        let drop_id = check.finish(|| drop_id)?;
        let state = self.edge.uplink.state();
        // The platform's levels as last fetched (what the stall's screens show of other
        // cities), with the stall's own stock in place of its leases' pools.
        let (mut skus, mut as_of) = match state.availability {
            Some((cached, at)) if cached.drop_id == drop_id.as_str() => (cached.skus, Some(at)),
            _ => (Vec::new(), None),
        };
        for (till_drop, sku_id) in self.edge.tills.all() {
            if till_drop != drop_id {
                continue;
            }
            let figures = self.stock(&(till_drop, sku_id.clone())).await?;
            let Some(terms) = figures.terms.as_ref() else { continue };
            let open = !terms.ended && self.edge.clock.now() < terms.expires_at;
            let level = crate::levels::level(
                if open { SaleStatus::Open } else { SaleStatus::Closed },
                u64::from(terms.granted.saturating_sub(terms.returned)),
                u64::from(figures.free),
                u64::from(figures.held),
            );
            let stall = format!("{} (pop-up)", terms.city);
            skus.retain(|s| !(s.sku_id == sku_id.as_str() && s.city == stall));
            skus.push(SkuAvailability {
                sku_id: sku_id.to_string(),
                city: stall,
                level: level as i32,
            });
            as_of = Some(as_of.map_or(self.edge.clock.now(), |t: UnixMillis| t.max(self.edge.clock.now())));
        }
        if let Some(city) = (!r.city.is_empty()).then_some(&r.city) {
            skus.retain(|s| s.city == *city || s.city == format!("{city} (pop-up)"));
        }
        Ok(Response::new(GetAvailabilityResponse {
            drop_id: drop_id.to_string(),
            skus,
            as_of: as_of.map(convert::timestamp),
        }))
    }

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        authorize(&self.edge, &request)?;
        let (order_id, key) = parse_order_id(&self.edge, &request.get_ref().order_id)?;
        let reply = self.ask(key.clone(), TillCommand::GetOrder { order_id }).await?;
        let (order, terms) = Self::one_order(reply)?;
        let (order_id, order) = order.ok_or_else(|| Status::not_found("order not found"))?;
        Ok(Response::new(order_message(&key, &order_id, &order, terms.as_ref())))
    }

    type WatchOrderStream = Pin<Box<dyn futures::Stream<Item = Result<Order, Status>> + Send>>;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        authorize(&self.edge, &request)?;
        Err(Status::unimplemented(
            "a pop-up edge serves Reserve, Confirm, Cancel, GetOrder and GetAvailability",
        ))
    }

    async fn reissue_pickup_code(&self, request: Request<ReissuePickupCodeRequest>) -> Result<Response<Order>, Status> {
        authorize(&self.edge, &request)?;
        Err(Status::unimplemented(
            "a pop-up edge serves Reserve, Confirm, Cancel, GetOrder and GetAvailability",
        ))
    }
}

pub struct PopupStatusService {
    edge: Edge,
}

fn refund_of(order_id: &OrderId, order: &TillOrder) -> Option<RefundDue> {
    let TillOrderState::Sold(sale) = &order.state else {
        return None;
    };
    let (outcome, reason) = match sale.upload {
        Upload::Refunded(reason) => (SaleOutcome::Refunded, convert::edge_refund_reason(reason) as i32),
        Upload::Conflict => (SaleOutcome::Conflict, 0),
        Upload::ReceiptInvalid => (SaleOutcome::ReceiptInvalid, 0),
        Upload::Pending | Upload::Booked => return None,
    };
    Some(RefundDue {
        order_id: order_id.to_string(),
        quantity: sale.quantity,
        amount: Some(convert::money(sale.amount)),
        payment_reference: sale.payment_reference.clone(),
        outcome: outcome as i32,
        refund_reason: reason,
    })
}

#[tonic::async_trait]
impl PopupService for PopupStatusService {
    async fn get_status(&self, request: Request<GetPopupStatusRequest>) -> Result<Response<PopupStatus>, Status> {
        authorize(&self.edge, &request)?;
        let link = self.edge.uplink.state();
        let mut tills = Vec::new();
        for key in self.edge.tills.all() {
            let figures = match self.edge.bus.ask::<TillState>(key.clone(), TillCommand::Figures).await {
                Ok(TillReply::Figures(f)) => f,
                Ok(_) => continue,
                Err(e) => return Err(from_command_error(e)),
            };
            let refunds: Vec<RefundDue> = if figures.refunded_sales == 0 {
                Vec::new()
            } else {
                match self
                    .edge
                    .bus
                    .ask::<TillState>(
                        key.clone(),
                        TillCommand::Refunds {
                            max: STATUS_REFUNDS_MAX,
                        },
                    )
                    .await
                {
                    Ok(TillReply::Orders(orders)) => orders.iter().filter_map(|(id, o)| refund_of(id, o)).collect(),
                    Ok(_) => Vec::new(),
                    Err(e) => return Err(from_command_error(e)),
                }
            };
            let terms = figures.terms.clone();
            tills.push(TillStatus {
                drop_id: key.0.to_string(),
                sku_id: key.1.to_string(),
                hub_id: terms.as_ref().map(|t| t.hub_id.to_string()).unwrap_or_default(),
                city: terms.as_ref().map(|t| t.city.to_string()).unwrap_or_default(),
                key_id: terms.as_ref().map(|t| t.key_id.clone()).unwrap_or_default(),
                granted: terms.as_ref().map_or(0, |t| t.granted),
                returned: terms.as_ref().map_or(0, |t| t.returned),
                free: figures.free,
                held: figures.held,
                sold: figures.sold,
                sales_offline: figures.offline_sales,
                sales_pending: figures.pending_sales,
                sales_overdue: figures.overdue_sales,
                sales_booked: figures.booked_sales,
                sales_refunded: figures.refunded_sales,
                expires_at: terms.as_ref().map(|t| convert::timestamp(t.expires_at)),
                ended: terms.as_ref().is_some_and(|t| t.ended),
                refunds,
                oldest_pending: figures.oldest_pending.map(convert::timestamp),
            });
        }
        Ok(Response::new(PopupStatus {
            edge_id: link.edge_id.clone().unwrap_or_default(),
            upstream: self.edge.config.upstream_url.clone(),
            online: link.online,
            offline_reason: link.reason.clone().unwrap_or_default(),
            offline_since: link.offline_since.map(convert::timestamp),
            last_sync: link.last_sync.map(convert::timestamp),
            availability_as_of: link.availability.as_ref().map(|(_, at)| convert::timestamp(*at)),
            tills,
        }))
    }
}
