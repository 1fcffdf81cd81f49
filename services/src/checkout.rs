//! dropline.checkout.v1.CheckoutService: what buyers call during a live drop, through
//! their storefront (Reserve and ReserveStream need a storefront credential) or, for one
//! order, with that order's token. A storefront sees only the orders it made.
//! ReserveStream's own machinery (bounds, backpressure) is in `reserve_stream`.

use crate::auth::{order_access, require_storefront, Authenticator, OrderAccess};
use crate::convert::{self, opaque_id, Check};
use crate::limits::{ADDRESS_STORE_RETRY_MS, WATCH_STREAM_MAX_MS};
use crate::platform::Platform;
use crate::status::{from_command_error, invalid_argument};
use domain::hub::{Dispatch, HubCommand};
use domain::limits::PER_BUYER_LIMIT_MAX;
use domain::sku::OrderStatus;
use domain::sku::{
    ConfirmCommand, Fulfilment, OrderView, Reservation, ReserveCommand, ReserveParams, SkuCommand, SkuState,
};
use domain::{CityName, DropId, FieldViolation, HubId, IdempotencyKey, OrderId, SkuId, StorefrontId};
use proto::checkout::v1::checkout_service_server::CheckoutService;
use proto::checkout::v1::*;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

pub struct Checkout {
    platform: Platform,
    /// Resolves each call's caller (the other services do it in an interceptor).
    auth: Authenticator,
    /// The open ReserveStreams, counted per connection and in all.
    streams: crate::reserve_stream::ReserveStreams,
}

impl Checkout {
    /// Reserve's work: the caller, its call rate, the command, the SKU's answer.
    async fn reserve_one(&self, request: Request<ReserveRequest>) -> Result<Reservation, Status> {
        let storefront = require_storefront(&self.auth.resolve(&request)?)?;
        self.platform
            .throttle
            .storefront_call(storefront.storefront_id.as_str())?;
        let (key, command) = reserve_command(&self.platform, &storefront.storefront_id, request.into_inner())?;
        self.platform
            .bus
            .ask_for::<SkuState, _>(key, SkuCommand::Reserve(command))
            .await
            .map_err(from_command_error)
    }

    pub fn new(platform: Platform) -> Checkout {
        let auth = Authenticator {
            operator: platform.operator.clone(),
            projections: platform.projections.clone(),
        };
        Checkout {
            platform,
            auth,
            streams: crate::reserve_stream::ReserveStreams::default(),
        }
    }

    async fn order_view(&self, order_id: &OrderId) -> Result<domain::sku::OrderView, Status> {
        let (drop_id, sku_id) = order_id.owner();
        self.platform
            .bus
            .ask_for::<SkuState, OrderView>(
                (drop_id, sku_id),
                SkuCommand::GetOrder {
                    order_id: order_id.clone(),
                },
            )
            .await
            .map_err(from_command_error)
    }

    /// Takes one write from the caller's bound: its storefront's, or the order token's.
    fn write_allowed(&self, storefront: Option<&StorefrontId>, order_id: &OrderId) -> Result<(), Status> {
        match storefront {
            Some(storefront) => self.platform.throttle.storefront_call(storefront.as_str()),
            None => self.platform.throttle.order_token_call(order_id.as_str()),
        }
    }

    /// Takes one read from the caller's bound, as a write would (the operator's reads are
    /// not bounded here).
    fn read_allowed(&self, access: &OrderAccess, order_id: &OrderId) -> Result<(), Status> {
        match access {
            OrderAccess::Storefront(storefront) => self.write_allowed(Some(storefront), order_id),
            OrderAccess::Token => self.write_allowed(None, order_id),
            OrderAccess::Operator => Ok(()),
        }
    }

    /// The order's dispatch, if its hub has one (confirmed orders).
    async fn dispatch_of(&self, view: &domain::sku::OrderView) -> Option<Dispatch> {
        view.confirmation.as_ref()?;
        let hub_id = view.hub_id.clone()?;
        self.platform
            .hub_dispatch(hub_id, HubCommand::GetDispatch(view.order_id.clone()))
            .await
            .ok()
    }
}

/// An order stream ends when nothing more will happen to it: a hold or waitlist place that
/// ended, or a confirmed order delivered or failed.
fn finished(view: &domain::sku::OrderView, dispatch: Option<&Dispatch>) -> bool {
    match view.status {
        OrderStatus::Confirmed => dispatch.is_some_and(|d| d.stage.is_finished()),
        status => status.is_final(),
    }
}

/// An order as a caller already checked may see it: the operator without its pickup code.
fn shown_to(access: &OrderAccess, mut order: Order) -> Order {
    if matches!(access, OrderAccess::Operator) {
        order.pickup_code.clear();
    }
    order
}

fn check_owner(storefront: &StorefrontId, view: &domain::sku::OrderView) -> Result<(), Status> {
    if &view.storefront != storefront {
        return Err(Status::permission_denied(format!(
            "order {} belongs to another storefront",
            view.order_id
        )));
    }
    Ok(())
}

/// The storefront to hand to the SKU for an ownership check (a token was checked already).
fn acting_storefront(access: OrderAccess) -> Option<StorefrontId> {
    match access {
        OrderAccess::Storefront(storefront) => Some(storefront),
        OrderAccess::Token | OrderAccess::Operator => None,
    }
}

fn parse_order_id(value: &str) -> Result<OrderId, Status> {
    let mut check = Check::default();
    let id = check.parse("order_id", value, OrderId::parse);
    check.finish(|| id)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Order, Status>> + Send>>;

#[tonic::async_trait]
impl CheckoutService for Checkout {
    async fn reserve(&self, request: Request<ReserveRequest>) -> Result<Response<ReserveResponse>, Status> {
        let reserved = self.reserve_one(request).await;
        self.platform
            .metrics
            .reserve(reserved.as_ref().ok().map(|reservation| reservation.outcome));
        let reservation = reserved?;
        Ok(Response::new(convert::reservation(&reservation, |id| {
            self.platform.keys.order_token(id)
        })))
    }

    type ReserveStreamStream = crate::reserve_stream::Replies;

    async fn reserve_stream(
        &self,
        request: Request<Streaming<ReserveStreamRequest>>,
    ) -> Result<Response<Self::ReserveStreamStream>, Status> {
        let storefront = require_storefront(&self.auth.resolve(&request)?)?;
        let replies = self.streams.open(&self.platform, &storefront, request)?;
        Ok(Response::new(replies))
    }

    async fn confirm(&self, request: Request<ConfirmRequest>) -> Result<Response<ConfirmResponse>, Status> {
        let caller = self.auth.resolve(&request)?;
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        // Confirm records a payment: only the storefront, which took the payment, may say it
        // was made. The order's token sits on the buyer's device, which is not to be trusted
        // with that (it may read, watch and cancel).
        let storefront = match order_access(&caller, &self.platform.keys, &order_id, false)? {
            OrderAccess::Storefront(storefront) => storefront,
            OrderAccess::Token | OrderAccess::Operator => {
                return Err(Status::permission_denied(
                    "Confirm records a payment: it is for the order's storefront, not its token",
                ))
            }
        };
        self.write_allowed(Some(&storefront), &order_id)?;
        let storefront = Some(storefront);
        let r = request.into_inner();
        let mut check = Check::default();
        check.text("payment_reference", &r.payment_reference, true);
        let amount = check.money("amount", r.amount.as_ref());
        let (fulfilment, address) = match &r.fulfilment {
            None => {
                check.fail("fulfilment", "choose delivery (with an address) or pickup");
                (None, None)
            }
            Some(confirm_request::Fulfilment::Pickup(_)) => (Some(Fulfilment::Pickup), None),
            Some(confirm_request::Fulfilment::Delivery(delivery)) => match &delivery.address {
                None => {
                    check.fail("delivery.address", "is required for delivery");
                    (None, None)
                }
                Some(a) => {
                    for (field, value, required) in [
                        ("delivery.address.recipient_name", &a.recipient_name, true),
                        ("delivery.address.line1", &a.line1, true),
                        ("delivery.address.line2", &a.line2, false),
                        ("delivery.address.postal_code", &a.postal_code, true),
                        ("delivery.address.city", &a.city, true),
                        ("delivery.address.country", &a.country, true),
                        ("delivery.address.phone", &a.phone, false),
                    ] {
                        check.text(field, value, required);
                    }
                    (Some(Fulfilment::Delivery), Some(a.clone()))
                }
            },
        };
        let (amount, fulfilment) = check.finish(|| Some((amount?, fulfilment?)))?;
        // The address itself is kept apart from the journal, for fulfilment only; the SKU
        // gets a keyed digest of it, so another address on a later Confirm is refused.
        let address = address.map(|a| prost::Message::encode_to_vec(&a));
        let receipt_token = format!("{:032x}", rand::random::<u128>());
        let command = ConfirmCommand {
            order_id: order_id.clone(),
            storefront,
            address_digest: address
                .as_deref()
                .map(|a| self.platform.keys.address_digest(order_id.as_str(), a)),
            payment_reference: r.payment_reference,
            amount,
            fulfilment,
            discreet: r.discreet,
            pickup_code: new_pickup_code(),
            receipt_token: receipt_token.clone(),
        };
        let (drop_id, sku_id) = order_id.owner();
        let view: OrderView = self
            .platform
            .bus
            .ask_for::<SkuState, _>((drop_id, sku_id), SkuCommand::Confirm(command))
            .await
            .map_err(from_command_error)?;
        let confirmation = view
            .confirmation
            .as_ref()
            .expect("a confirmed order has its confirmation");
        // This call made the confirmation (its fresh receipt token was taken), or retries one
        // made moments ago whose address may not have been stored.
        let made_here = confirmation.receipt_token == receipt_token;
        let prompt_retry = self.platform.clock.now() < confirmation.confirmed_at.plus_ms(ADDRESS_STORE_RETRY_MS);
        if let (Some(address), true) = (address, made_here || prompt_retry) {
            // Only now that the confirmation is durable, and only once: a retry of the same
            // confirmation finds it stored and changes nothing. A later replay stores nothing,
            // so an address shredded after delivery or a refund does not come back.
            self.platform
                .store_address(&order_id, &address, confirmation.confirmed_at)
                .await
                .map_err(|e| {
                    Status::unavailable(format!(
                        "order {order_id} is confirmed but its delivery address was not stored; send the same Confirm again: {e}"
                    ))
                })?;
        }
        debug!(order_id = %view.order_id, quantity = view.quantity, "order confirmed");
        // The hub promises the delivery window now, so the buyer hears it at Confirm. The
        // SKU's outbox hands the order over too (and again after a crash); the hub keeps
        // one dispatch per order whoever comes first.
        // Once the hub acknowledged the hand-over it is only asked: a hub that has forgotten
        // a finished dispatch must not be handed the order again (a second parcel).
        let command = |order: domain::hub::DispatchOrder| match view.handed_over {
            false => HubCommand::Dispatch(order),
            true => HubCommand::GetDispatch(order.order_id),
        };
        let dispatch = match view.dispatch_order() {
            Some((hub_id, order)) => match self.platform.hub_dispatch(hub_id, command(order)).await {
                Ok(d) => Some(d),
                Err(e) => {
                    debug!(error = %e, "hub did not answer at confirm; the order reaches it through the outbox");
                    None
                }
            },
            None => None,
        };
        Ok(Response::new(ConfirmResponse {
            order: Some(convert::order(&view, dispatch.as_ref())),
            receipt: convert::receipt(&view),
        }))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let caller = self.auth.resolve(&request)?;
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        let storefront = acting_storefront(order_access(&caller, &self.platform.keys, &order_id, false)?);
        self.write_allowed(storefront.as_ref(), &order_id)?;
        // A confirmed order is withdrawn from its hub before the SKU cancels it: the hub
        // decides whether the parcel can still be stopped (after pickup: FAILED_PRECONDITION,
        // nothing changed), and once it has withdrawn the dispatch no pickup can follow. A hub
        // that has not got the order yet records it as cancelled, so a hand-over in flight
        // creates no dispatch. If the SKU cancel then fails, a retry finds the dispatch
        // withdrawn already and finishes it. The SKU cancels a confirmed order only when told
        // the hub withdrew it: an order confirmed between the read below and the cancel is
        // refused there, read again and withdrawn first (bounded attempts).
        let mut dispatch = None;
        let mut attempt = 0;
        let view: OrderView = loop {
            attempt += 1;
            let before = self.order_view(&order_id).await?;
            if let Some(storefront) = &storefront {
                check_owner(storefront, &before)?;
            }
            let mut withdrawn = before.status != OrderStatus::Confirmed;
            if before.status == OrderStatus::Confirmed {
                match before.dispatch_order() {
                    Some((hub_id, order)) => {
                        let command = HubCommand::Cancel {
                            order,
                            handed_over: before.handed_over,
                        };
                        let answer = self
                            .platform
                            .hub_dispatch(hub_id, command)
                            .await
                            .map_err(from_command_error)?;
                        dispatch = Some(answer);
                        withdrawn = true;
                    }
                    // Nothing to withdraw.
                    None => withdrawn = true,
                }
            }
            let (drop_id, sku_id) = order_id.owner();
            match self
                .platform
                .bus
                .ask_for::<SkuState, OrderView>(
                    (drop_id, sku_id),
                    SkuCommand::Cancel {
                        order_id: order_id.clone(),
                        storefront: storefront.clone(),
                        withdrawn,
                    },
                )
                .await
            {
                Ok(view) => break view,
                // Confirmed since it was read: withdraw it from its hub first.
                Err(actors::CommandError::Rejected(domain::Rejection::FailedPrecondition(_)))
                    if !withdrawn && attempt < CANCEL_ATTEMPTS_MAX => {}
                Err(e) => return Err(from_command_error(e)),
            }
        };
        // Cancelled before (a retry): show the dispatch as the hub has it now.
        if dispatch.is_none() {
            dispatch = self.dispatch_of(&view).await;
        }
        Ok(Response::new(CancelResponse {
            order: Some(convert::order(&view, dispatch.as_ref())),
        }))
    }

    async fn get_availability(
        &self,
        request: Request<GetAvailabilityRequest>,
    ) -> Result<Response<GetAvailabilityResponse>, Status> {
        // Public, but an unknown or malformed credential is refused as on every call.
        self.auth.resolve(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let drop_id = check.parse("drop_id", &r.drop_id, DropId::parse);
        let city = check.optional("city", &r.city, CityName::parse);
        let drop_id = check.finish(|| drop_id)?;
        let cached = self.platform.cached_drop(&drop_id).await?;
        let now = self.platform.clock.now();
        let mut skus = Vec::new();
        let mut as_of = domain::UnixMillis(0);
        for figures in &cached.skus {
            as_of = as_of.max(figures.changed_at);
            let sale = figures.sale.effective(cached.spec.opens_at, cached.spec.closes_at, now);
            let mut cities: Vec<&CityName> = figures.pools.iter().map(|p| &p.pool.city).collect();
            cities.sort();
            cities.dedup();
            for c in cities
                .into_iter()
                .filter(|c| city.as_ref().is_none_or(|wanted| wanted == *c))
            {
                let pools = figures.pools.iter().filter(|p| &p.pool.city == c);
                let (allocated, available, held) = pools.fold((0u64, 0u64, 0u64), |acc, p| {
                    (
                        acc.0 + u64::from(p.pool.allocated),
                        acc.1 + u64::from(p.pool.available),
                        acc.2 + u64::from(p.pool.held),
                    )
                });
                let level = crate::levels::level(sale, allocated, available, held);
                skus.push(SkuAvailability {
                    sku_id: figures.sku_id.to_string(),
                    city: c.to_string(),
                    level: level as i32,
                });
            }
        }
        if skus.is_empty() {
            if let Some(city) = city {
                return Err(invalid_argument(vec![FieldViolation::new(
                    "city",
                    format!("drop {drop_id} sells nothing in {city}"),
                )]));
            }
        }
        Ok(Response::new(GetAvailabilityResponse {
            drop_id: drop_id.to_string(),
            skus,
            as_of: Some(convert::timestamp(as_of)),
        }))
    }

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        let caller = self.auth.resolve(&request)?;
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        let access = order_access(&caller, &self.platform.keys, &order_id, true)?;
        self.read_allowed(&access, &order_id)?;
        let view = self.order_view(&order_id).await?;
        if let OrderAccess::Storefront(storefront) = &access {
            check_owner(storefront, &view)?;
        }
        let dispatch = self.dispatch_of(&view).await;
        Ok(Response::new(shown_to(
            &access,
            convert::order(&view, dispatch.as_ref()),
        )))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(&self, request: Request<WatchOrderRequest>) -> Result<Response<WatchStream>, Status> {
        let caller = self.auth.resolve(&request)?;
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        let access = order_access(&caller, &self.platform.keys, &order_id, true)?;
        self.read_allowed(&access, &order_id)?;
        let watchers = self.platform.projections.clone();
        // Subscribe before reading the current state, so no change falls in between.
        let mut updates = watchers
            .orders
            .subscribe(&order_id)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let current = match self.order_view(&order_id).await.and_then(|view| {
            if let OrderAccess::Storefront(storefront) = &access {
                check_owner(storefront, &view)?;
            }
            Ok(view)
        }) {
            Ok(view) => view,
            Err(status) => {
                drop(updates);
                watchers.orders.release(&order_id);
                return Err(status);
            }
        };
        let dispatch = self.dispatch_of(&current).await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut shutdown = self.platform.shutdown.clone();
        tokio::spawn(async move {
            let order_id = current.order_id.clone();
            let mut last = (current, dispatch.map(Arc::new));
            let deadline = tokio::time::sleep(Duration::from_millis(WATCH_STREAM_MAX_MS));
            tokio::pin!(deadline);
            // The owner was checked above.
            let shown = move |order: Order| shown_to(&access, order);
            let first = shown(convert::order(&last.0, last.1.as_deref()));
            if tx.send(Ok(first)).await.is_ok() && !finished(&last.0, last.1.as_deref()) {
                loop {
                    tokio::select! {
                        changed = updates.changed() => {
                            if changed.is_err() { break; }
                            let watched = updates.borrow_and_update().clone();
                            let view = watched.order.unwrap_or_else(|| last.0.clone());
                            let tracking = watched.tracking.or_else(|| last.1.clone());
                            if view == last.0 && tracking == last.1 { continue; }
                            last = (view, tracking);
                            let message = shown(convert::order(&last.0, last.1.as_deref()));
                            if tx.send(Ok(message)).await.is_err() || finished(&last.0, last.1.as_deref()) { break; }
                        }
                        _ = tx.closed() => break,
                        _ = shutdown.changed() => {
                            let _ = tx.send(Err(Status::unavailable("server shutting down; reconnect"))).await;
                            break;
                        }
                        _ = &mut deadline => break,
                    }
                }
            }
            drop(updates);
            watchers.orders.release(&order_id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn reissue_pickup_code(&self, request: Request<ReissuePickupCodeRequest>) -> Result<Response<Order>, Status> {
        let caller = self.auth.resolve(&request)?;
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        let access = order_access(&caller, &self.platform.keys, &order_id, false)?;
        let storefront = match &access {
            OrderAccess::Storefront(storefront) => Some(storefront),
            OrderAccess::Token | OrderAccess::Operator => None,
        };
        self.write_allowed(storefront, &order_id)?;
        let view = self.order_view(&order_id).await?;
        if let OrderAccess::Storefront(storefront) = &access {
            check_owner(storefront, &view)?;
        }
        let hub_id = match (&view.confirmation, &view.hub_id) {
            (Some(_), Some(hub_id)) => hub_id.clone(),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "order {order_id} is not confirmed: it has no pickup code yet"
                )))
            }
        };
        let dispatch = self
            .platform
            .hub_dispatch(
                hub_id,
                HubCommand::ReissuePickupCode {
                    order_id: order_id.clone(),
                    pickup_code: new_pickup_code(),
                },
            )
            .await
            .map_err(|e| match e {
                actors::CommandError::Rejected(domain::Rejection::NotFound { .. }) => Status::unavailable(format!(
                    "order {order_id} has not reached its hub yet; retry in a moment"
                )),
                e => from_command_error(e),
            })?;
        Ok(Response::new(convert::order(&view, Some(&dispatch))))
    }
}

/// A Reserve of `storefront` checked and made a command for its SKU (Reserve and each
/// request of ReserveStream): its fields (all problems at once), then the buyer's call rate;
/// the order id is fresh. The storefront's own call rate is the caller's to take.
pub(crate) fn reserve_command(
    platform: &Platform,
    storefront: &StorefrontId,
    r: ReserveRequest,
) -> Result<((DropId, SkuId), ReserveCommand), Status> {
    let mut check = Check::default();
    let drop_id = check.parse("drop_id", &r.drop_id, DropId::parse);
    let sku_id = check.parse("sku_id", &r.sku_id, SkuId::parse);
    let buyer_id = check.parse("buyer_id", &r.buyer_id, opaque_id);
    let city = check.parse("city", &r.city, CityName::parse);
    let hub_id = check.optional("hub_id", &r.hub_id, HubId::parse);
    let key = check.optional("idempotency_key", &r.idempotency_key, IdempotencyKey::parse);
    if r.quantity == 0 || r.quantity > PER_BUYER_LIMIT_MAX {
        check.fail("quantity", format!("must be between 1 and {PER_BUYER_LIMIT_MAX}"));
    }
    let (drop_id, sku_id, buyer_id, city) = check.finish(|| Some((drop_id?, sku_id?, buyer_id?, city?)))?;
    let buyer = platform.keys.buyer_ref(&buyer_id);
    platform.throttle.buyer_reserve(storefront.as_str(), buyer.as_str())?;
    let command = ReserveCommand {
        order_id: OrderId::new(&drop_id, &sku_id, rand::random()),
        params: ReserveParams {
            storefront: storefront.clone(),
            buyer,
            city,
            hub_id,
            quantity: r.quantity,
            allow_partial: r.allow_partial,
            join_waitlist: !r.skip_waitlist,
        },
        idempotency_key: key,
    };
    Ok(((drop_id, sku_id), command))
}

/// Reads of an order a cancel makes before giving up on an order confirmed meanwhile.
const CANCEL_ATTEMPTS_MAX: u32 = 3;

/// A six-digit pickup code, uniformly random.
fn new_pickup_code() -> String {
    format!("{:06}", rand::random_range(0..1_000_000u32))
}
