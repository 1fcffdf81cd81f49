//! A drop: one creator's time-boxed sale of SKUs with stock allocated per hub. The drop's
//! journal is the authority for its definition and its sale status; each SKU's journal is
//! the authority for its stock.

use crate::aggregate::Aggregate;
use crate::ids::{CityName, CreatorId, DropId, HubId, SkuId};
use crate::limits::*;
use crate::money::Money;
use crate::rejection::{FieldViolation, Rejection};
use crate::time::UnixMillis;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;

/// One hub's ring-fenced share of a SKU's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub hub_id: HubId,
    pub city: CityName,
    pub allocated: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuSpec {
    pub sku_id: SkuId,
    pub name: String,
    pub price: Money,
    pub per_buyer_limit: u32,
    pub pools: Vec<PoolSpec>,
}

/// How a drop's sales are split and settled (see `ledger`). Each order's gross is split
/// into the partner's delivery fee (a fixed amount per order), then the rest between the
/// platform (`platform_fee_bps` of it) and the creator, by largest remainder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementTerms {
    /// The platform's share of each order's gross after the delivery fee, in basis points.
    pub platform_fee_bps: u32,
    /// Paid to the fulfilment partner per order, in minor units of the SKU's currency.
    pub delivery_fee_minor_units: i64,
    /// How long after delivery a buyer may return the goods; the creator's earnings stay
    /// pending until it has passed.
    pub return_window_ms: u64,
}

impl Default for SettlementTerms {
    fn default() -> Self {
        SettlementTerms {
            platform_fee_bps: DEFAULT_PLATFORM_FEE_BPS,
            delivery_fee_minor_units: 0,
            return_window_ms: DEFAULT_RETURN_WINDOW_MS,
        }
    }
}

impl SettlementTerms {
    /// Problems with the terms, with field paths under `prefix`.
    pub fn violations(&self, prefix: &str) -> Vec<FieldViolation> {
        let mut out = Vec::new();
        if self.platform_fee_bps > 10_000 {
            out.push(FieldViolation::new(
                format!("{prefix}.platform_fee_bps"),
                "must be between 0 and 10000 (100 %)",
            ));
        }
        if !(0..=PRICE_MINOR_UNITS_MAX).contains(&self.delivery_fee_minor_units) {
            out.push(FieldViolation::new(
                format!("{prefix}.delivery_fee_minor_units"),
                format!("must be between 0 and {PRICE_MINOR_UNITS_MAX}"),
            ));
        }
        if self.return_window_ms > RETURN_WINDOW_MS_MAX {
            out.push(FieldViolation::new(
                format!("{prefix}.return_window_seconds"),
                format!("must be at most {} days", RETURN_WINDOW_MS_MAX / 86_400_000),
            ));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropSpec {
    pub drop_id: DropId,
    pub creator_id: CreatorId,
    pub title: String,
    pub opens_at: UnixMillis,
    pub closes_at: UnixMillis,
    pub hold_ttl_ms: u64,
    pub skus: Vec<SkuSpec>,
    pub terms: SettlementTerms,
}

impl DropSpec {
    /// Every problem with the spec, field by field (empty when valid). Field paths follow
    /// the CreateDrop request, e.g. `skus[2].allocations[0].quantity`.
    pub fn violations(&self) -> Vec<FieldViolation> {
        let mut out = Vec::new();
        if self.title.chars().count() > TEXT_LEN_MAX {
            out.push(FieldViolation::new(
                "title",
                format!("must be at most {TEXT_LEN_MAX} characters"),
            ));
        }
        if self.closes_at <= self.opens_at {
            out.push(FieldViolation::new("closes_at", "must be after opens_at"));
        } else if self.closes_at.0 - self.opens_at.0 > DROP_DURATION_MS_MAX {
            out.push(FieldViolation::new("closes_at", "a drop may last at most 7 days"));
        }
        if !(HOLD_TTL_MS_MIN..=HOLD_TTL_MS_MAX).contains(&self.hold_ttl_ms) {
            out.push(FieldViolation::new(
                "hold_ttl_seconds",
                format!(
                    "must be between {} and {} seconds",
                    HOLD_TTL_MS_MIN / 1000,
                    HOLD_TTL_MS_MAX / 1000
                ),
            ));
        }
        out.extend(self.terms.violations("settlement"));
        if self.skus.is_empty() {
            out.push(FieldViolation::new("skus", "a drop needs at least one SKU"));
        }
        if self.skus.len() > SKUS_PER_DROP_MAX {
            out.push(FieldViolation::new(
                "skus",
                format!("at most {SKUS_PER_DROP_MAX} SKUs per drop"),
            ));
        }
        let mut sku_ids = BTreeSet::new();
        for (i, sku) in self.skus.iter().enumerate() {
            let at = |f: &str| format!("skus[{i}].{f}");
            if !sku_ids.insert(&sku.sku_id) {
                out.push(FieldViolation::new(
                    at("sku_id"),
                    format!("duplicate SKU id {}", sku.sku_id),
                ));
            }
            if sku.name.is_empty() || sku.name.chars().count() > TEXT_LEN_MAX {
                out.push(FieldViolation::new(
                    at("name"),
                    format!("must be 1 to {TEXT_LEN_MAX} characters"),
                ));
            }
            if sku.price.minor_units <= 0 || sku.price.minor_units > PRICE_MINOR_UNITS_MAX {
                out.push(FieldViolation::new(
                    at("price.minor_units"),
                    format!("must be between 1 and {PRICE_MINOR_UNITS_MAX}"),
                ));
            } else if sku.price.minor_units < self.terms.delivery_fee_minor_units {
                out.push(FieldViolation::new(
                    at("price.minor_units"),
                    "must cover the delivery fee of the settlement terms",
                ));
            }
            if sku.per_buyer_limit == 0 || sku.per_buyer_limit > PER_BUYER_LIMIT_MAX {
                out.push(FieldViolation::new(
                    at("per_buyer_limit"),
                    format!("must be between 1 and {PER_BUYER_LIMIT_MAX}"),
                ));
            }
            if sku.pools.is_empty() {
                out.push(FieldViolation::new(
                    at("allocations"),
                    "a SKU needs stock in at least one hub",
                ));
            }
            if sku.pools.len() > POOLS_PER_SKU_MAX {
                out.push(FieldViolation::new(
                    at("allocations"),
                    format!("at most {POOLS_PER_SKU_MAX} hubs per SKU"),
                ));
            }
            let mut hubs = BTreeSet::new();
            for (j, pool) in sku.pools.iter().enumerate() {
                if !hubs.insert(&pool.hub_id) {
                    out.push(FieldViolation::new(
                        at(&format!("allocations[{j}].hub_id")),
                        format!("duplicate hub {}", pool.hub_id),
                    ));
                }
                if pool.allocated > POOL_UNITS_MAX {
                    out.push(FieldViolation::new(
                        at(&format!("allocations[{j}].quantity")),
                        format!("must be at most {POOL_UNITS_MAX}"),
                    ));
                }
            }
        }
        out
    }

    pub fn sku(&self, sku_id: &SkuId) -> Option<&SkuSpec> {
        self.skus.iter().find(|s| &s.sku_id == sku_id)
    }
}

/// The sale status an operator sets. The status in force also depends on the clock: a
/// scheduled drop opens by itself at opens_at and every drop closes at closes_at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SaleStatus {
    #[default]
    Scheduled,
    Open,
    Closed,
}

impl SaleStatus {
    /// The status in force at `now` for a drop with this window.
    pub fn effective(self, opens_at: UnixMillis, closes_at: UnixMillis, now: UnixMillis) -> SaleStatus {
        match self {
            SaleStatus::Closed => SaleStatus::Closed,
            _ if now >= closes_at => SaleStatus::Closed,
            SaleStatus::Open => SaleStatus::Open,
            SaleStatus::Scheduled if now >= opens_at => SaleStatus::Open,
            SaleStatus::Scheduled => SaleStatus::Scheduled,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropCommand {
    Create(DropSpec),
    Open,
    Close,
    Get,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropEvent {
    Created { spec: Arc<DropSpec>, at: UnixMillis },
    Opened { at: UnixMillis },
    Closed { at: UnixMillis },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropView {
    /// Shared, not copied: a SKU actor starting in a 10,000-SKU drop reads it in O(1).
    pub spec: Arc<DropSpec>,
    /// The status in force at the time of the reply.
    pub status: SaleStatus,
    /// The status the operator set (the SKUs follow this one).
    pub recorded_status: SaleStatus,
}

/// State of one drop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DropState {
    pub spec: Option<Arc<DropSpec>>,
    pub status: SaleStatus,
}

impl DropState {
    fn view(&self, spec: &Arc<DropSpec>, now: UnixMillis) -> DropView {
        DropView {
            spec: spec.clone(),
            status: self.status.effective(spec.opens_at, spec.closes_at, now),
            recorded_status: self.status,
        }
    }
}

impl Aggregate for DropState {
    type Command = DropCommand;
    type Event = DropEvent;
    type Reply = DropView;

    fn decide(&self, command: DropCommand, now: UnixMillis) -> Result<(Vec<DropEvent>, DropView), Rejection> {
        match (command, &self.spec) {
            (DropCommand::Create(spec), None) => {
                let violations = spec.violations();
                if !violations.is_empty() {
                    return Err(Rejection::InvalidArgument(violations));
                }
                // One copy of the spec, shared by the event, the state and the reply.
                let spec = Arc::new(spec);
                let view = DropView {
                    status: SaleStatus::Scheduled.effective(spec.opens_at, spec.closes_at, now),
                    recorded_status: SaleStatus::Scheduled,
                    spec: spec.clone(),
                };
                Ok((vec![DropEvent::Created { spec, at: now }], view))
            }
            // Creating the same drop again is a safe retry; a different one is a conflict.
            (DropCommand::Create(spec), Some(existing)) if &spec == existing.as_ref() => {
                Ok((vec![], self.view(existing, now)))
            }
            (DropCommand::Create(spec), Some(_)) => Err(Rejection::AlreadyExists {
                what: "drop".into(),
                id: spec.drop_id.to_string(),
            }),
            (_, None) => Err(Rejection::not_found("drop", "")),
            (DropCommand::Get, Some(spec)) => Ok((vec![], self.view(spec, now))),
            (DropCommand::Open, Some(spec)) => match self.status.effective(spec.opens_at, spec.closes_at, now) {
                SaleStatus::Closed => Err(Rejection::FailedPrecondition(format!(
                    "drop {} is closed",
                    spec.drop_id
                ))),
                _ if self.status == SaleStatus::Open => Ok((vec![], self.view(spec, now))),
                _ => {
                    let mut next = self.clone();
                    let events = vec![DropEvent::Opened { at: now }];
                    next.apply(&events[0]);
                    Ok((events, next.view(spec, now)))
                }
            },
            (DropCommand::Close, Some(spec)) => {
                if self.status == SaleStatus::Closed {
                    return Ok((vec![], self.view(spec, now)));
                }
                let mut next = self.clone();
                let events = vec![DropEvent::Closed { at: now }];
                next.apply(&events[0]);
                Ok((events, next.view(spec, now)))
            }
        }
    }

    fn apply(&mut self, event: &DropEvent) {
        match event {
            DropEvent::Created { spec, .. } => {
                self.spec = Some(spec.clone());
                self.status = SaleStatus::Scheduled;
            }
            DropEvent::Opened { .. } => self.status = SaleStatus::Open,
            DropEvent::Closed { .. } => self.status = SaleStatus::Closed,
        }
    }
}
