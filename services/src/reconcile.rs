//! Reconciliation of the creators' ledgers with the SKU journals: every confirmed order in
//! a SKU journal must be booked exactly once in its creator's ledger (and refunded there if
//! it was cancelled), every booked order must be a confirmed order of that creator's drops
//! with the same amount, and every ledger must balance. Differences are listed line by
//! line; an order that is missing from its ledger is booked, and one that cannot be
//! reconciled (unknown, or booked with another amount) is refunded, never silently kept.
//! Every refund booked here withdraws the order's dispatch first, as a cancel does, and is
//! not booked if the parcel has left its hub. An order refunded in its ledger must not reach
//! its buyer either: one its hub delivered (or is delivering) all the same is a difference,
//! and one whose dispatch is still open (a refund booked before refunds withdrew dispatches)
//! is withdrawn.
//!
//! Ledgers are read before the SKU journals: an order reaches a ledger only after its
//! confirmation is durable in its SKU's journal, so every booked order is in the journals
//! read afterwards. An order confirmed meanwhile is either still in its SKU's outbox (in
//! flight, not a difference) or is looked up again in its ledger before it is reported.

use crate::platform::Platform;
use crate::refunds::withdraw_and_refund;
use crate::status::from_command_error;
use actors::codec;
use actors::{CommandError, Journal};
use domain::drop::{DropEvent, DropSpec};
use domain::hub::{DispatchOrder, HubCommand, Stage};
use domain::ledger::{
    LedgerCommand, LedgerInput, LedgerReply, OrderBooking, RefundReason, Reversal, SaleFacts, Synced,
};
use domain::limits::STATEMENT_PAGE_MAX;
use domain::reply::FromReply;
use domain::sku::{SkuEvent, SkuState};
use domain::{Aggregate, CreatorId, HubId, OrderId, Rejection};
use proto::settlement::v1 as pb;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tonic::Status;

/// Streams listed per journal read.
const STREAMS_PAGE: usize = 1_000;

fn storage(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("reading the journal: {e}"))
}

async fn streams(journal: &dyn Journal, prefix: &str) -> Result<Vec<String>, Status> {
    let mut out: Vec<String> = Vec::new();
    loop {
        let page = journal
            .streams(prefix, out.last().map(String::as_str), STREAMS_PAGE)
            .await
            .map_err(storage)?;
        let done = page.len() < STREAMS_PAGE;
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

async fn drop_spec(journal: &dyn Journal, stream: &str) -> Result<Option<Arc<DropSpec>>, Status> {
    let events = journal.load_all(stream).await.map_err(storage)?;
    for (_, bytes) in events {
        if let DropEvent::Created { spec, .. } = codec::decode::<DropEvent>(&bytes).map_err(storage)? {
            return Ok(Some(spec));
        }
    }
    Ok(None)
}

/// A confirmed order as its SKU's journal records it.
struct Sale {
    facts: SaleFacts,
    /// Still in its SKU's outbox to the ledger.
    to_ledger: bool,
    /// Its hub and what the hub needs of it (to withdraw its dispatch).
    dispatch: Option<(HubId, DispatchOrder)>,
    /// Still in its SKU's outbox to its hub (not handed over yet, or a withdrawal the hub
    /// has not acknowledged).
    to_hub: bool,
}

/// Every confirmed order of a drop's SKUs as its journal records it.
async fn sales_of(journal: &dyn Journal, spec: &DropSpec) -> Result<Vec<Sale>, Status> {
    let mut out = Vec::new();
    for sku in &spec.skus {
        let stream = format!("sku/{}/{}", spec.drop_id, sku.sku_id);
        // The SKU's own state machine folds its journal, so the facts are exactly what its
        // actor would send.
        let mut state = SkuState::new(spec, sku);
        for (_, bytes) in journal.load_all(&stream).await.map_err(storage)? {
            state.apply(&codec::decode::<SkuEvent>(&bytes).map_err(storage)?);
        }
        let mut ids: Vec<&OrderId> = state
            .orders
            .iter()
            .filter(|(_, o)| o.confirmation.is_some())
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        for id in ids {
            if let Some(facts) = state.sale_facts(id) {
                out.push(Sale {
                    facts,
                    to_ledger: state.ledger_outbox.contains_key(id),
                    dispatch: state.dispatch_order(id),
                    to_hub: state.handover.contains(id),
                });
            }
        }
    }
    Ok(out)
}

struct Run<'a> {
    platform: &'a Platform,
    dry_run: bool,
    report: pb::ReconcileReport,
}

impl Run<'_> {
    async fn ledger<T: FromReply<LedgerReply>>(
        &self,
        creator: &CreatorId,
        command: LedgerCommand,
    ) -> Result<T, Status> {
        self.platform.ledger(creator, command).await
    }

    async fn booked(&self, creator: &CreatorId) -> Result<BTreeMap<OrderId, OrderBooking>, Status> {
        let mut out = BTreeMap::new();
        let mut after = None;
        loop {
            let page: Vec<(OrderId, OrderBooking)> = self
                .ledger(
                    creator,
                    LedgerCommand::Orders {
                        after: after.clone(),
                        limit: STATEMENT_PAGE_MAX,
                    },
                )
                .await?;
            let done = page.len() < STATEMENT_PAGE_MAX as usize;
            after = page.last().map(|(id, _)| id.clone());
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    async fn booking(&self, creator: &CreatorId, order_id: &OrderId) -> Result<Option<OrderBooking>, Status> {
        match self.ledger(creator, LedgerCommand::GetOrder(order_id.clone())).await {
            Ok(booking) => Ok(Some(booking)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    fn difference(
        &mut self,
        creator: &CreatorId,
        order_id: Option<&OrderId>,
        kind: &str,
        detail: String,
        action: &str,
    ) {
        self.report.differences.push(pb::Difference {
            creator_id: creator.to_string(),
            order_id: order_id.map(ToString::to_string).unwrap_or_default(),
            kind: kind.into(),
            detail,
            action: action.into(),
        });
    }

    /// Withdraws an order's dispatch before a refund is booked; `Ok(Err(why))` when its hub
    /// refuses (the parcel has left it).
    async fn withdraw(&self, sale: &Sale) -> Result<Result<(), String>, Status> {
        let Some((hub_id, order)) = &sale.dispatch else {
            return Ok(Ok(()));
        };
        let command = HubCommand::Cancel {
            order: order.clone(),
            handed_over: !sale.to_hub,
        };
        match self.platform.hub_dispatch(hub_id.clone(), command).await {
            Ok(_) => Ok(Ok(())),
            Err(CommandError::Rejected(Rejection::FailedPrecondition(why))) => Ok(Err(why)),
            Err(e) => Err(from_command_error(e)),
        }
    }

    /// Books the SKU's facts (a missing sale, or a cancellation not refunded: its dispatch is
    /// withdrawn first).
    async fn book(&mut self, creator: &CreatorId, sale: &Sale, kind: &str, detail: String) -> Result<(), Status> {
        let facts = &sale.facts;
        if self.dry_run {
            self.difference(creator, Some(&facts.order_id), kind, detail, "none");
            return Ok(());
        }
        if facts.cancelled_at.is_some() {
            if let Err(why) = self.withdraw(sale).await? {
                let detail = format!("{detail}; the refund was not booked: {why}");
                self.difference(creator, Some(&facts.order_id), "refund_blocked", detail, "none");
                return Ok(());
            }
        }
        let synced: Synced = self
            .ledger(creator, LedgerCommand::Sync(vec![LedgerInput::Sale(facts.clone())]))
            .await?;
        match synced {
            Synced { acked, .. } if acked.contains(&facts.order_id) => {
                self.report.booked += 1;
                self.difference(creator, Some(&facts.order_id), kind, detail, "booked");
            }
            _ => self.difference(
                creator,
                Some(&facts.order_id),
                "refund_blocked",
                format!("{detail}; the refund could not be booked: the creator's share was paid out"),
                "none",
            ),
        }
        Ok(())
    }

    /// Refunds an order that cannot be reconciled, once its hub (if a SKU confirmed it)
    /// has withdrawn its dispatch.
    async fn refund(
        &mut self,
        creator: &CreatorId,
        order_id: &OrderId,
        dispatch: Option<(HubId, DispatchOrder, bool)>,
        kind: &str,
        detail: String,
    ) -> Result<(), Status> {
        if self.dry_run {
            self.difference(creator, Some(order_id), kind, detail, "none");
            return Ok(());
        }
        let reason = RefundReason::Unreconciled(detail.clone());
        match withdraw_and_refund(self.platform, creator, order_id, reason, dispatch).await {
            Ok(_) => {
                self.report.refunded += 1;
                self.difference(creator, Some(order_id), kind, detail, "refunded");
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => self.difference(
                creator,
                Some(order_id),
                "refund_blocked",
                format!("{detail}; {}", s.message()),
                "none",
            ),
            Err(s) => return Err(s),
        }
        Ok(())
    }

    /// An order refunded in its ledger must not reach its buyer: one its hub delivered or
    /// handed to a courier all the same is a difference for an operator, and a dispatch still
    /// open (or an order still on its way to its hub) is withdrawn.
    async fn check_refunded(&mut self, creator: &CreatorId, sale: &Sale, booking: &OrderBooking) -> Result<(), Status> {
        let Some((Reversal::Refunded(reason), _)) = &booking.reversed else {
            return Ok(());
        };
        let Some((hub_id, _)) = &sale.dispatch else {
            return Ok(());
        };
        let order_id = &sale.facts.order_id;
        let command = HubCommand::GetDispatch(order_id.clone());
        let stage = match self.platform.hub_dispatch(hub_id.clone(), command).await {
            Ok(d) => Some(d.stage),
            Err(CommandError::Rejected(Rejection::NotFound { .. })) => None,
            Err(e) => return Err(from_command_error(e)),
        };
        let refunded = reason.describe();
        let order = Some(order_id);
        match (stage, booking.delivered_at) {
            (Some(Stage::Delivered { at, .. }), _) | (None, Some(at)) => {
                let detail = format!("{refunded}, but hub {hub_id} delivered it at {} (unix ms)", at.0);
                self.difference(creator, order, "refunded_but_delivered", detail, "none");
            }
            (Some(Stage::PickedUp { .. }), _) => {
                let detail = format!("{refunded}, but a courier picked it up at hub {hub_id}");
                self.difference(creator, order, "refunded_but_picked_up", detail, "none");
            }
            (Some(Stage::Cancelled { .. } | Stage::Failed { .. }), _) => {}
            // The hub acknowledged it and has since forgotten it (finished long ago).
            (None, None) if !sale.to_hub => {}
            // Still open at its hub, or on its way there.
            _ => {
                let detail = format!("{refunded}, but its dispatch at hub {hub_id} was not withdrawn");
                if self.dry_run {
                    self.difference(creator, order, "refunded_not_withdrawn", detail, "none");
                } else {
                    match self.withdraw(sale).await? {
                        Ok(()) => self.difference(creator, order, "refunded_not_withdrawn", detail, "withdrawn"),
                        Err(why) => {
                            let detail = format!("{refunded}, but {why}");
                            self.difference(creator, order, "refunded_but_picked_up", detail, "none");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

pub async fn run(platform: &Platform, dry_run: bool) -> Result<pb::ReconcileReport, Status> {
    let journal: &dyn Journal = platform.journal.as_ref();
    let mut run = Run {
        platform,
        dry_run,
        report: pb::ReconcileReport::default(),
    };
    // Which ledgers: every creator with a ledger or a drop.
    let mut specs = Vec::new();
    for stream in streams(journal, "drop/").await? {
        if let Some(spec) = drop_spec(journal, &stream).await? {
            specs.push(spec);
        }
    }
    let mut creators: BTreeSet<CreatorId> = specs.iter().map(|s| s.creator_id.clone()).collect();
    for stream in streams(journal, "creator/").await? {
        if let Some(id) = stream.strip_prefix("creator/").and_then(|id| CreatorId::parse(id).ok()) {
            creators.insert(id);
        }
    }
    // Ledgers first (see the module comment), then the journals.
    let mut ledgers: BTreeMap<CreatorId, BTreeMap<OrderId, OrderBooking>> = BTreeMap::new();
    for creator in &creators {
        ledgers.insert(creator.clone(), run.booked(creator).await?);
    }
    run.report.ledgers = creators.len() as u64;
    run.report.drops = specs.len() as u64;
    let mut seen: BTreeSet<OrderId> = BTreeSet::new();
    for spec in &specs {
        run.report.skus += spec.skus.len() as u64;
        let creator = &spec.creator_id;
        for sale in sales_of(journal, spec).await? {
            let facts = &sale.facts;
            run.report.orders += 1;
            seen.insert(facts.order_id.clone());
            let booked = ledgers.get(creator).and_then(|l| l.get(&facts.order_id)).cloned();
            let in_order = |b: &OrderBooking| facts.cancelled_at.is_none() || b.reversed.is_some();
            match booked {
                Some(b) if b.gross != facts.gross => {
                    let detail = format!("booked as {} but the SKU journal says {}", b.gross, facts.gross);
                    if b.reversed.is_none() {
                        let dispatch = sale.dispatch.clone().map(|(hub, order)| (hub, order, !sale.to_hub));
                        run.refund(creator, &facts.order_id, dispatch, "amount_mismatch", detail)
                            .await?;
                    } else {
                        run.check_refunded(creator, &sale, &b).await?;
                    }
                }
                Some(b) if in_order(&b) => run.check_refunded(creator, &sale, &b).await?,
                _ if sale.to_ledger => run.report.in_flight += 1,
                _ => {
                    // Booked since the ledger was read?
                    let now = run.booking(creator, &facts.order_id).await?;
                    match now {
                        Some(b) if in_order(&b) => {}
                        Some(_) => {
                            let detail = "cancelled after confirmation, but not refunded".to_string();
                            run.book(creator, &sale, "missing_refund", detail).await?;
                        }
                        None => {
                            let detail = format!("confirmed for {} but not in the ledger", facts.gross);
                            run.book(creator, &sale, "missing_sale", detail).await?;
                        }
                    }
                }
            }
        }
    }
    // Booked orders no SKU journal confirms (for this creator).
    let owner: BTreeMap<&domain::DropId, &CreatorId> = specs.iter().map(|s| (&s.drop_id, &s.creator_id)).collect();
    for (creator, booked) in &ledgers {
        for (order_id, b) in booked {
            let (drop_id, _) = order_id.owner();
            let known = seen.contains(order_id) && owner.get(&drop_id) == Some(&creator);
            if !known && b.reversed.is_none() {
                let detail = format!("booked for {} but no SKU journal confirms it for this creator", b.gross);
                run.refund(creator, order_id, None, "unknown_order", detail).await?;
            }
        }
    }
    // Every ledger must balance, after the repairs above.
    let mut sound = true;
    for creator in &creators {
        let problems: Vec<String> = run.ledger(creator, LedgerCommand::Check).await?;
        for p in problems {
            sound = false;
            run.difference(creator, None, "ledger_invariant", p, "none");
        }
    }
    run.report.balanced = sound && run.report.differences.iter().all(|d| d.action != "none");
    Ok(run.report)
}
