//! Reconciliation of the creators' ledgers with the SKU journals: every confirmed order in
//! a SKU journal must be booked exactly once in its creator's ledger (and refunded there if
//! it was cancelled), every booked order must be a confirmed order of that creator's drops
//! with the same amount, and every ledger must balance. Differences are listed line by
//! line; an order that is missing from its ledger is booked, and one that cannot be
//! reconciled (unknown, or booked with another amount) is refunded, never silently kept.
//!
//! Ledgers are read before the SKU journals: an order reaches a ledger only after its
//! confirmation is durable in its SKU's journal, so every booked order is in the journals
//! read afterwards. An order confirmed meanwhile is either still in its SKU's outbox (in
//! flight, not a difference) or is looked up again in its ledger before it is reported.

use crate::platform::Platform;
use actors::codec;
use actors::Journal;
use domain::drop::{DropEvent, DropSpec};
use domain::ledger::{LedgerCommand, LedgerInput, LedgerReply, OrderBooking, RefundReason, SaleFacts};
use domain::limits::STATEMENT_PAGE_MAX;
use domain::sku::{SkuEvent, SkuState};
use domain::{Aggregate, CreatorId, OrderId};
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

/// Every confirmed order of a drop's SKUs as its journal records it, and whether each is
/// still in its SKU's outbox to the ledger.
async fn sales_of(journal: &dyn Journal, spec: &DropSpec) -> Result<Vec<(SaleFacts, bool)>, Status> {
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
                out.push((facts, state.ledger_outbox.contains_key(id)));
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
    async fn ledger(&self, creator: &CreatorId, command: LedgerCommand) -> Result<LedgerReply, Status> {
        self.platform.ledger(creator, command).await
    }

    async fn booked(&self, creator: &CreatorId) -> Result<BTreeMap<OrderId, OrderBooking>, Status> {
        let mut out = BTreeMap::new();
        let mut after = None;
        loop {
            let reply = self
                .ledger(
                    creator,
                    LedgerCommand::Orders {
                        after: after.clone(),
                        limit: STATEMENT_PAGE_MAX,
                    },
                )
                .await?;
            let LedgerReply::Orders(page) = reply else {
                return Err(Status::internal("unexpected ledger reply"));
            };
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
            Ok(LedgerReply::Order(o)) => Ok(Some(*o)),
            Ok(_) => Err(Status::internal("unexpected ledger reply")),
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

    /// Books the SKU's facts (a missing sale, or a cancellation not refunded).
    async fn book(&mut self, creator: &CreatorId, facts: &SaleFacts, kind: &str, detail: String) -> Result<(), Status> {
        if self.dry_run {
            self.difference(creator, Some(&facts.order_id), kind, detail, "none");
            return Ok(());
        }
        match self
            .ledger(creator, LedgerCommand::Sync(vec![LedgerInput::Sale(facts.clone())]))
            .await?
        {
            LedgerReply::Synced { acked, .. } if acked.contains(&facts.order_id) => {
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

    /// Refunds an order that cannot be reconciled.
    async fn refund(
        &mut self,
        creator: &CreatorId,
        order_id: &OrderId,
        kind: &str,
        detail: String,
    ) -> Result<(), Status> {
        if self.dry_run {
            self.difference(creator, Some(order_id), kind, detail, "none");
            return Ok(());
        }
        let command = LedgerCommand::Refund {
            order_id: order_id.clone(),
            reason: RefundReason::Unreconciled(detail.clone()),
        };
        match self.ledger(creator, command).await {
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
        for (facts, in_outbox) in sales_of(journal, spec).await? {
            run.report.orders += 1;
            seen.insert(facts.order_id.clone());
            let booked = ledgers.get(creator).and_then(|l| l.get(&facts.order_id)).cloned();
            let in_order = |b: &OrderBooking| facts.cancelled_at.is_none() || b.reversed.is_some();
            match booked {
                Some(b) if b.gross != facts.gross => {
                    let detail = format!("booked as {} but the SKU journal says {}", b.gross, facts.gross);
                    if b.reversed.is_none() {
                        run.refund(creator, &facts.order_id, "amount_mismatch", detail).await?;
                    }
                }
                Some(b) if in_order(&b) => {}
                _ if in_outbox => run.report.in_flight += 1,
                _ => {
                    // Booked since the ledger was read?
                    let now = run.booking(creator, &facts.order_id).await?;
                    match now {
                        Some(b) if in_order(&b) => {}
                        Some(_) => {
                            let detail = "cancelled after confirmation, but not refunded".to_string();
                            run.book(creator, &facts, "missing_refund", detail).await?;
                        }
                        None => {
                            let detail = format!("confirmed for {} but not in the ledger", facts.gross);
                            run.book(creator, &facts, "missing_sale", detail).await?;
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
                run.refund(creator, order_id, "unknown_order", detail).await?;
            }
        }
    }
    // Every ledger must balance, after the repairs above.
    let mut sound = true;
    for creator in &creators {
        if let LedgerReply::Problems(problems) = run.ledger(creator, LedgerCommand::Check).await? {
            for p in problems {
                sound = false;
                run.difference(creator, None, "ledger_invariant", p, "none");
            }
        }
    }
    run.report.balanced = sound && run.report.differences.iter().all(|d| d.action != "none");
    Ok(run.report)
}
