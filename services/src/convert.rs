//! Validation of requests and conversion between protobuf messages and domain types. Only
//! this crate knows protobuf; everything past here is validated domain values.

use crate::status::invalid_argument;
use actors::fulfilment::HubLoad;
use domain::drop::{DropView, SaleStatus};
use domain::hub::Dispatch;
use domain::limits::{ID_LEN_MAX, TEXT_LEN_MAX};
use domain::sku::{self, OrderView, Reservation, SkuFigures};
use domain::{Currency, FieldViolation, IdError, Money, UnixMillis};
use proto::checkout::v1 as checkout;
use proto::common::v1 as common;
use proto::operator::v1 as operator;
use std::collections::HashMap;
use tonic::Status;

/// Collects every problem of a request, so a client learns them all at once.
#[derive(Default)]
pub struct Check {
    violations: Vec<FieldViolation>,
}

impl Check {
    pub fn parse<T>(&mut self, field: &str, value: &str, parse: impl FnOnce(&str) -> Result<T, IdError>) -> Option<T> {
        match parse(value) {
            Ok(parsed) => Some(parsed),
            Err(e) => {
                self.violations.push(FieldViolation::new(field, e.to_string()));
                None
            }
        }
    }

    /// Like `parse`, for a value that recurs across a request (a hub or city in every SKU's
    /// pools): each distinct value is parsed once and then shared from `seen` (an `Arc`
    /// clone), so the spec and every SKU state hold one allocation per name.
    pub fn parse_shared<'a, T: Clone>(
        &mut self,
        seen: &mut HashMap<&'a str, T>,
        field: &str,
        value: &'a str,
        parse: impl FnOnce(&str) -> Result<T, IdError>,
    ) -> Option<T> {
        if let Some(parsed) = seen.get(value) {
            return Some(parsed.clone());
        }
        let parsed = self.parse(field, value, parse)?;
        seen.insert(value, parsed.clone());
        Some(parsed)
    }

    pub fn optional<T>(
        &mut self,
        field: &str,
        value: &str,
        parse: impl FnOnce(&str) -> Result<T, IdError>,
    ) -> Option<T> {
        if value.is_empty() {
            None
        } else {
            self.parse(field, value, parse)
        }
    }

    pub fn text(&mut self, field: &str, value: &str, required: bool) {
        if required && value.trim().is_empty() {
            self.violations.push(FieldViolation::new(field, "must not be empty"));
        } else if value.chars().count() > TEXT_LEN_MAX {
            self.violations.push(FieldViolation::new(
                field,
                format!("must be at most {TEXT_LEN_MAX} characters"),
            ));
        } else if value.chars().any(char::is_control) {
            self.violations
                .push(FieldViolation::new(field, "must not contain control characters"));
        }
    }

    pub fn fail(&mut self, field: &str, description: impl Into<String>) {
        self.violations.push(FieldViolation::new(field, description));
    }

    pub fn money(&mut self, field: &str, value: Option<&common::Money>) -> Option<Money> {
        let Some(value) = value else {
            self.fail(field, "is required");
            return None;
        };
        match Currency::parse(&value.currency) {
            Ok(currency) => Some(Money::new(value.minor_units, currency)),
            Err(e) => {
                self.fail(&format!("{field}.currency"), e);
                None
            }
        }
    }

    pub fn timestamp(&mut self, field: &str, value: Option<&prost_types::Timestamp>) -> Option<UnixMillis> {
        match value {
            None => {
                self.fail(field, "is required");
                None
            }
            Some(ts) if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) || ts.seconds > 253_402_300_799 => {
                self.fail(field, "must be a valid time after 1970 and before 10000");
                None
            }
            Some(ts) => Some(UnixMillis(ts.seconds * 1_000 + i64::from(ts.nanos) / 1_000_000)),
        }
    }

    /// A required positive duration of at most a year, in milliseconds.
    pub fn duration(&mut self, field: &str, value: Option<&prost_types::Duration>) -> Option<u64> {
        match value {
            None => {
                self.fail(field, "is required");
                None
            }
            Some(d) if d.seconds < 0 || d.nanos < 0 || d.seconds > 365 * 86_400 => {
                self.fail(field, "must be a positive duration of at most a year");
                None
            }
            Some(d) => Some(d.seconds as u64 * 1_000 + d.nanos as u64 / 1_000_000),
        }
    }

    /// The checked values, or INVALID_ARGUMENT with every violation.
    pub fn finish<T>(self, value: impl FnOnce() -> Option<T>) -> Result<T, Status> {
        if !self.violations.is_empty() {
            return Err(invalid_argument(self.violations));
        }
        // With no violation every parsed part is present.
        value().ok_or_else(|| Status::internal("request check lost a field"))
    }
}

/// Opaque ids chosen by clients that we never parse (buyer ids): bounded, printable.
pub fn opaque_id(s: &str) -> Result<String, IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > 2 * ID_LEN_MAX {
        return Err(IdError::TooLong {
            len: s.len(),
            max: 2 * ID_LEN_MAX,
        });
    }
    if s.chars().any(char::is_control) {
        return Err(IdError::ControlCharacter);
    }
    Ok(s.to_string())
}

pub fn timestamp(t: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1_000),
        nanos: (t.0.rem_euclid(1_000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the Unix epoch of a protobuf timestamp.
pub fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1_000 + i64::from(t.nanos) / 1_000_000
}

pub fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1_000) as i64,
        nanos: ((ms % 1_000) * 1_000_000) as i32,
    }
}

pub fn money(m: Money) -> common::Money {
    common::Money {
        minor_units: m.minor_units,
        currency: m.currency.to_string(),
    }
}

pub fn order_status(s: sku::OrderStatus) -> checkout::OrderStatus {
    match s {
        sku::OrderStatus::Waitlisted => checkout::OrderStatus::Waitlisted,
        sku::OrderStatus::Held => checkout::OrderStatus::Held,
        sku::OrderStatus::Confirmed => checkout::OrderStatus::Confirmed,
        sku::OrderStatus::Expired => checkout::OrderStatus::Expired,
        sku::OrderStatus::Cancelled => checkout::OrderStatus::Cancelled,
    }
}

/// What the buyer sees of a dispatch: stage, promised window, ETA, swaps (with a neutral
/// reason, never a partner's identity) and credits owed.
pub fn tracking(d: &Dispatch) -> checkout::Tracking {
    use domain::hub::Stage;
    let stage = match &d.stage {
        Stage::Placing | Stage::Waiting | Stage::Offered { .. } => checkout::TrackingStage::Preparing,
        Stage::Accepted { .. } => checkout::TrackingStage::Assigned,
        Stage::PickedUp { .. } => checkout::TrackingStage::OnItsWay,
        Stage::Delivered { .. } => checkout::TrackingStage::Delivered,
        Stage::Failed { .. } => checkout::TrackingStage::Failed,
        Stage::Cancelled { .. } => checkout::TrackingStage::Cancelled,
    };
    let credit: i64 = d.remedies.iter().map(|r| r.amount.minor_units).sum();
    checkout::Tracking {
        stage: stage as i32,
        window_from: Some(timestamp(d.promised_from)),
        window_by: Some(timestamp(d.promised_by)),
        throttled: d.throttled,
        eta: Some(timestamp(d.eta)),
        partner_swaps: d.swaps.len() as u32,
        last_swap_reason: d
            .swaps
            .last()
            .map(|s| match s.reason {
                domain::hub::SwapReason::MissedAcceptDeadline | domain::hub::SwapReason::MissedPickupDeadline => {
                    "the first partner did not respond in time; another partner took over"
                }
                domain::hub::SwapReason::Declined(_) | domain::hub::SwapReason::PartnerUnavailable => {
                    "handed to another partner"
                }
                domain::hub::SwapReason::Failed(_) => "the partner could not complete it; another partner took over",
            })
            .unwrap_or_default()
            .to_string(),
        remedy_credit: (credit > 0).then(|| money(Money::new(credit, d.order.amount.currency))),
        delivered_at: match &d.stage {
            Stage::Delivered { at, .. } => Some(timestamp(*at)),
            _ => None,
        },
    }
}

pub fn order(view: &OrderView, dispatch: Option<&Dispatch>) -> checkout::Order {
    let confirmation = view.confirmation.as_ref();
    checkout::Order {
        order_id: view.order_id.to_string(),
        drop_id: view.drop_id.to_string(),
        sku_id: view.sku_id.to_string(),
        status: order_status(view.status) as i32,
        hub_id: view.hub_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        city: view.city.to_string(),
        quantity: view.quantity,
        amount: Some(money(view.amount)),
        expires_at: view
            .expires_at
            .filter(|_| view.status == sku::OrderStatus::Held)
            .map(timestamp),
        waitlist_position: view.waitlist_position.unwrap_or(0),
        fulfilment: confirmation.map_or(checkout::FulfilmentKind::Unspecified, |c| match c.fulfilment {
            sku::Fulfilment::Delivery => checkout::FulfilmentKind::Delivery,
            sku::Fulfilment::Pickup => checkout::FulfilmentKind::Pickup,
            sku::Fulfilment::AtStall => checkout::FulfilmentKind::AtStall,
        }) as i32,
        discreet: confirmation.is_some_and(|c| c.discreet),
        // The hub's code once it has the order: a reissued code replaces the one of the
        // confirmation there.
        pickup_code: match (dispatch, confirmation) {
            (Some(d), Some(_)) => d.order.pickup_code.clone(),
            (None, Some(c)) => c.pickup_code.clone(),
            (_, None) => String::new(),
        },
        updated_at: Some(timestamp(
            view.updated_at.max(dispatch.map_or(view.updated_at, |d| d.updated_at)),
        )),
        tracking: dispatch.map(tracking),
    }
}

/// The buyer's receipt: no PII ever. A discreet receipt names no product: neither in its
/// description nor through the order id (which names the drop and SKU), only the opaque
/// receipt token identifies it.
pub fn receipt(view: &OrderView) -> Option<checkout::Receipt> {
    let c = view.confirmation.as_ref()?;
    Some(checkout::Receipt {
        order_id: if c.discreet {
            String::new()
        } else {
            view.order_id.to_string()
        },
        receipt_token: c.receipt_token.clone(),
        description: if c.discreet {
            "Dropline order".to_string()
        } else {
            view.sku_name.clone()
        },
        quantity: view.quantity,
        amount: Some(money(c.amount)),
        pickup_code: c.pickup_code.clone(),
        confirmed_at: Some(timestamp(c.confirmed_at)),
    })
}

/// The reply to Reserve, with the order's token for the buyer's device.
pub fn reservation(r: &Reservation, order_token: impl FnOnce(&str) -> String) -> checkout::ReserveResponse {
    checkout::ReserveResponse {
        outcome: match r.outcome {
            sku::ReserveOutcome::Held => checkout::ReserveOutcome::Held,
            sku::ReserveOutcome::Partial => checkout::ReserveOutcome::Partial,
            sku::ReserveOutcome::Waitlisted => checkout::ReserveOutcome::Waitlisted,
            sku::ReserveOutcome::SoldOut => checkout::ReserveOutcome::SoldOut,
        } as i32,
        order_id: r.order_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        quantity_held: r.quantity_held,
        quantity_requested: r.quantity_requested,
        hub_id: r.hub_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        expires_at: r.expires_at.map(timestamp),
        waitlist_position: r.waitlist_position.unwrap_or(0),
        order_token: r
            .order_id
            .as_ref()
            .map(|id| order_token(id.as_str()))
            .unwrap_or_default(),
    }
}

pub fn drop_status(s: SaleStatus) -> operator::DropStatus {
    match s {
        SaleStatus::Scheduled => operator::DropStatus::Scheduled,
        SaleStatus::Open => operator::DropStatus::Open,
        SaleStatus::Closed => operator::DropStatus::Closed,
    }
}

pub fn sku_figures(f: &SkuFigures) -> operator::SkuFigures {
    let pools: Vec<operator::PoolFigures> = f
        .pools
        .iter()
        .map(|p| operator::PoolFigures {
            hub_id: p.pool.hub_id.to_string(),
            city: p.pool.city.to_string(),
            allocated: p.pool.allocated,
            available: p.pool.available,
            held: p.pool.held,
            sold: p.pool.sold,
            waitlisted: p.waitlisted,
            // What the pool's live leases hold: the rest of its allocation
            // (available + held + sold + leased = allocated).
            leased: p
                .pool
                .allocated
                .saturating_sub(p.pool.available + p.pool.held + p.pool.sold),
        })
        .collect();
    operator::SkuFigures {
        sku_id: f.sku_id.to_string(),
        name: f.name.clone(),
        price: Some(money(f.price)),
        per_buyer_limit: f.per_buyer_limit,
        allocated: pools.iter().map(|p| p.allocated).sum(),
        available: pools.iter().map(|p| p.available).sum(),
        held: pools.iter().map(|p| p.held).sum(),
        sold: pools.iter().map(|p| p.sold).sum(),
        waitlisted: pools.iter().map(|p| p.waitlisted).sum(),
        leased: pools.iter().map(|p| p.leased).sum(),
        pools,
        sold_out_at: f.sold_out_at.map(timestamp),
        // Presence (last contact, online) is the operator service's to add.
        edges: f
            .leases
            .iter()
            .map(|l| operator::EdgeFigures {
                edge_id: l.edge.to_string(),
                hub_id: l.hub_id.to_string(),
                leased: l.outstanding,
                granted: l.granted,
                sold: l.sold,
                returned: l.returned,
                refunded: l.refunded,
                expires_at: Some(timestamp(l.expires_at)),
                ended: l.ended,
                last_sync: l.last_sync.map(timestamp),
                last_contact: None,
                online: false,
            })
            .collect(),
    }
}

/// A pop-up edge's lease, for the operator and the edge.
pub fn lease(view: &domain::sku::LeaseView) -> operator::Lease {
    use domain::sku::LeaseEnd;
    let lease = &view.lease;
    let (status, ended_at) = match lease.ended {
        None => (operator::LeaseStatus::Live, None),
        Some((LeaseEnd::Closed, at)) => (operator::LeaseStatus::Closed, Some(timestamp(at))),
        Some((LeaseEnd::Lapsed, at)) => (operator::LeaseStatus::Lapsed, Some(timestamp(at))),
    };
    operator::Lease {
        drop_id: view.drop_id.to_string(),
        sku_id: view.sku_id.to_string(),
        edge_id: view.edge.to_string(),
        hub_id: view.hub_id.to_string(),
        city: view.city.to_string(),
        price: Some(money(view.price)),
        status: status as i32,
        outstanding: lease.outstanding,
        granted: lease.granted,
        top_up_max: lease.granted_max,
        sold: lease.sold,
        returned: lease.returned,
        refunded: lease.refunded,
        key_id: lease.key_id.clone(),
        started_at: Some(timestamp(lease.started_at)),
        expires_at: Some(timestamp(lease.expires_at)),
        reconcile_window_seconds: u32::try_from(lease.reconcile_window_ms / 1_000).unwrap_or(u32::MAX),
        ended_at,
        last_sync: lease.last_sync.map(timestamp),
    }
}

pub fn edge_refund_reason(reason: domain::sku::EdgeRefundReason) -> operator::EdgeRefundReason {
    use domain::sku::EdgeRefundReason as R;
    match reason {
        R::SoldOutsideLease => operator::EdgeRefundReason::SoldOutsideLease,
        R::ReconciledTooLate => operator::EdgeRefundReason::ReconciledTooLate,
        R::LeaseEnded => operator::EdgeRefundReason::LeaseEnded,
        R::LeaseExhausted => operator::EdgeRefundReason::LeaseExhausted,
        R::AmountMismatch => operator::EdgeRefundReason::AmountMismatch,
    }
}

/// An edge sale refused (to refund), for the operator.
pub fn edge_refund(sku_id: &domain::SkuId, refund: &domain::sku::EdgeRefund) -> operator::EdgeRefund {
    operator::EdgeRefund {
        edge_id: refund.edge.to_string(),
        sku_id: sku_id.to_string(),
        order_id: refund.sale.order_id.to_string(),
        quantity: refund.sale.quantity,
        amount: Some(money(refund.sale.amount)),
        payment_reference: refund.sale.payment_reference.clone(),
        reason: edge_refund_reason(refund.reason) as i32,
        sold_at: Some(timestamp(refund.sale.sold_at)),
        refused_at: Some(timestamp(refund.at)),
    }
}

/// A drop with exact figures and its hubs' load, for operators.
pub fn drop_with_figures(view: &DropView, skus: &[impl AsRef<SkuFigures>], hubs: &[HubLoad]) -> operator::Drop {
    let spec = &view.spec;
    let currency = spec.skus.first().map(|s| s.price.currency);
    let revenue: i64 = skus
        .iter()
        .map(AsRef::as_ref)
        .filter(|f| Some(f.revenue.currency) == currency)
        .map(|f| f.revenue.minor_units)
        .sum();
    operator::Drop {
        drop_id: spec.drop_id.to_string(),
        creator_id: spec.creator_id.to_string(),
        title: spec.title.clone(),
        status: drop_status(view.status) as i32,
        opens_at: Some(timestamp(spec.opens_at)),
        closes_at: Some(timestamp(spec.closes_at)),
        hold_ttl_seconds: (spec.hold_ttl_ms / 1_000) as u32,
        settlement: Some(operator::SettlementTerms {
            platform_fee_bps: spec.terms.platform_fee_bps,
            delivery_fee_minor_units: spec.terms.delivery_fee_minor_units,
            return_window_seconds: (spec.terms.return_window_ms / 1_000) as u32,
        }),
        skus: skus.iter().map(|f| sku_figures(f.as_ref())).collect(),
        revenue: currency.map(|c| money(Money::new(revenue, c))),
        hubs: hubs
            .iter()
            .map(|h| operator::HubLoad {
                hub_id: h.hub_id.to_string(),
                open_dispatches: h.open,
                waiting_for_partner: h.waiting,
                throttled: h.throttled,
                next_promise_from: Some(timestamp(h.next_promise.0)),
                next_promise_by: Some(timestamp(h.next_promise.1)),
            })
            .collect(),
    }
}
