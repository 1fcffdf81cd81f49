//! dropline.settlement.v1.SettlementService: creators' ledgers as creators and operators
//! see them. A creator reads (and pays out) its own ledger only; operators see every ledger
//! and alone register creators, record returns, refund orders and reconcile. A refund stops
//! the order's parcel first (`withdraw_and_refund`), so a buyer never keeps both.

use crate::auth::{
    calling_creator, creator_scope, hash, is_operator, new_creator_credential, refuse, require_operator,
};
use crate::convert::{self, Check};
use crate::limits::{SETTLEMENT_WATCH_BUFFER, STATEMENT_PAGE_DEFAULT, WATCH_STREAM_MAX_MS};
use crate::platform::Platform;
use crate::refunds::withdraw_and_refund;
use crate::status::from_command_error;
use actors::CommandError;
use domain::hub::DispatchOrder;
use domain::ledger::{
    Account, CurrencyBalance, Entry, EntryKind, LedgerCommand, LedgerReply, OrderBooking, Payout, PayoutPage,
    RefundReason, Reversal, Statement, StatementQuery,
};
use domain::limits::STATEMENT_PAGE_MAX;
use domain::registry::{CreatorRecord, RegistryCommand, RegistryState};
use domain::reply::FromReply;
use domain::sku::{OrderView, SkuCommand, SkuState};
use domain::{CreatorId, HubId, IdempotencyKey, OrderId, Rejection, UnixMillis};
use proto::settlement::v1 as pb;
use proto::settlement::v1::settlement_service_server::SettlementService;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct Settlement {
    platform: Platform,
}

impl Settlement {
    pub fn new(platform: Platform) -> Settlement {
        Settlement { platform }
    }

    async fn ledger<T: FromReply<LedgerReply>>(
        &self,
        creator: &CreatorId,
        command: LedgerCommand,
    ) -> Result<T, Status> {
        self.platform.ledger(creator, command).await
    }

    async fn statement(&self, creator: &CreatorId, query: StatementQuery) -> Result<Statement, Status> {
        self.ledger(creator, LedgerCommand::Statement(query)).await
    }

    /// The creator whose ledger books an order (from the order's drop), after checking the
    /// caller may see it: the operator, or that creator.
    async fn order_owner<T>(&self, request: &Request<T>, order_id: &OrderId) -> Result<CreatorId, Status> {
        // The role first: who may not ask learns nothing about the order, not even whether it exists.
        if !is_operator(request) && calling_creator(request).is_none() {
            return Err(refuse(request, "a creator or operator credential"));
        }
        let (drop_id, _) = order_id.owner();
        let view = self.platform.drop_view(drop_id).await?;
        let owner = view.spec.creator_id.clone();
        if !is_operator(request) && calling_creator(request).as_ref() != Some(&owner) {
            return Err(Status::permission_denied("a creator may read only its own orders"));
        }
        Ok(owner)
    }

    /// The order an operator changes the settlement of (a return, a refund) with a reason,
    /// and the creator whose ledger books it.
    async fn operator_order<T>(
        &self,
        request: &Request<T>,
        order_id: &str,
        reason: &str,
    ) -> Result<(OrderId, CreatorId), Status> {
        require_operator(request)?;
        let mut check = Check::default();
        let parsed = check.parse("order_id", order_id, OrderId::parse);
        check.text("reason", reason, false);
        let order_id = check.finish(|| parsed)?;
        let creator = self.order_owner(request, &order_id).await?;
        Ok((order_id, creator))
    }

    /// The order's hub and what the hub needs of it, as its SKU has it (None: no SKU has
    /// the order confirmed).
    async fn order_dispatch(&self, order_id: &OrderId) -> Result<Option<(HubId, DispatchOrder, bool)>, Status> {
        let (drop_id, sku_id) = order_id.owner();
        let command = SkuCommand::GetOrder {
            order_id: order_id.clone(),
        };
        match self
            .platform
            .bus
            .ask_for::<SkuState, OrderView>((drop_id, sku_id), command)
            .await
        {
            Ok(view) => Ok(view.dispatch_order().map(|(hub, order)| (hub, order, view.handed_over))),
            Err(CommandError::Rejected(Rejection::NotFound { .. })) => Ok(None),
            Err(e) => Err(from_command_error(e)),
        }
    }

    /// Registers a creator or replaces its credential: the new credential is shown once.
    async fn issue_credential(
        &self,
        command: impl FnOnce(String) -> RegistryCommand,
    ) -> Result<Response<pb::CreatorCredential>, Status> {
        let credential = new_creator_credential();
        let creator: CreatorRecord = self
            .platform
            .bus
            .ask_for::<RegistryState, _>((), command(hash(&credential)))
            .await
            .map_err(from_command_error)?;
        Ok(Response::new(pb::CreatorCredential {
            creator_id: creator.creator_id.to_string(),
            display_name: creator.display_name,
            credential,
        }))
    }

    fn order_reply(&self, creator: &CreatorId, order_id: &OrderId, booking: OrderBooking) -> pb::OrderSettlement {
        order_settlement(creator, order_id, &booking, self.platform.clock.now())
    }
}

fn parse_order_id(value: &str) -> Result<OrderId, Status> {
    let mut check = Check::default();
    let id = check.parse("order_id", value, OrderId::parse);
    check.finish(|| id)
}

fn optional_time(check: &mut Check, field: &str, value: Option<&prost_types::Timestamp>) -> Option<UnixMillis> {
    value.and_then(|v| check.timestamp(field, Some(v)))
}

fn page_token(check: &mut Check, token: &str) -> u64 {
    if token.is_empty() {
        return 0;
    }
    token.parse().unwrap_or_else(|_| {
        check.fail("page_token", "is not a token this service returned");
        0
    })
}

fn page_size(size: u32) -> u32 {
    match size {
        0 => STATEMENT_PAGE_DEFAULT,
        n => n.min(STATEMENT_PAGE_MAX),
    }
}

pub fn account(a: Account) -> pb::Account {
    match a {
        Account::BuyerPayments => pb::Account::BuyerPayments,
        Account::CreatorPending => pb::Account::CreatorPending,
        Account::CreatorAvailable => pb::Account::CreatorAvailable,
        Account::PaidOut => pb::Account::PaidOut,
        Account::PlatformFees => pb::Account::PlatformFees,
        Account::PartnerFees => pb::Account::PartnerFees,
        Account::Refunds => pb::Account::Refunds,
        Account::Remedies => pb::Account::Remedies,
    }
}

fn line_kind(k: EntryKind) -> pb::LineKind {
    match k {
        EntryKind::Sale => pb::LineKind::Sale,
        EntryKind::Release => pb::LineKind::Release,
        EntryKind::Return => pb::LineKind::Return,
        EntryKind::Refund => pb::LineKind::Refund,
        EntryKind::Remedy => pb::LineKind::Remedy,
        EntryKind::Payout => pb::LineKind::Payout,
    }
}

pub fn line(e: &Entry) -> pb::StatementLine {
    let f = e.figures();
    pb::StatementLine {
        seq: e.seq,
        booked_at: Some(convert::timestamp(e.at)),
        kind: line_kind(e.kind) as i32,
        order_id: e.order_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        drop_id: e.drop_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        reference: e.reference.clone(),
        currency: e.currency.to_string(),
        gross: f.gross,
        platform_fee: f.platform_fee,
        partner_fee: f.partner_fee,
        creator_net: f.creator_net,
        remedy: f.remedy,
        paid_out: f.paid_out,
        available_change: f.available,
        transfers: e
            .transfers
            .iter()
            .map(|t| pb::Transfer {
                debit: account(t.debit) as i32,
                credit: account(t.credit) as i32,
                amount: t.amount,
            })
            .collect(),
    }
}

pub fn currency_balance(b: &CurrencyBalance) -> pb::CurrencyBalance {
    pb::CurrencyBalance {
        currency: b.currency.to_string(),
        pending: b.get(Account::CreatorPending),
        available: b.get(Account::CreatorAvailable),
        paid_out: b.get(Account::PaidOut),
        gross_sales: -b.get(Account::BuyerPayments),
        refunds: b.get(Account::Refunds),
        remedies: b.get(Account::Remedies),
        platform_fees: b.get(Account::PlatformFees),
        partner_fees: b.get(Account::PartnerFees),
        accounts: b
            .accounts
            .iter()
            .map(|(a, balance)| pb::AccountBalance {
                account: account(*a) as i32,
                balance: *balance,
            })
            .collect(),
    }
}

fn payout(creator: &CreatorId, p: &Payout) -> pb::Payout {
    pb::Payout {
        payout_id: p.payout_id.clone(),
        creator_id: creator.to_string(),
        amount: Some(convert::money(p.amount)),
        paid_at: Some(convert::timestamp(p.at)),
        idempotency_key: p.key.as_str().to_string(),
        line_seq: p.seq,
    }
}

pub fn order_settlement(
    creator: &CreatorId,
    order_id: &OrderId,
    o: &OrderBooking,
    now: UnixMillis,
) -> pb::OrderSettlement {
    let state = match (&o.reversed, o.released, o.release_at) {
        (Some((Reversal::Returned { .. }, _)), _, _) => pb::SettlementState::Returned,
        (Some((Reversal::Refunded(_), _)), _, _) => pb::SettlementState::Refunded,
        (None, true, _) => pb::SettlementState::Available,
        // Released by the next timer tick.
        (None, false, Some(at)) if at <= now => pb::SettlementState::Available,
        (None, false, Some(_)) => pb::SettlementState::InReturnWindow,
        (None, false, None) => pb::SettlementState::AwaitingDelivery,
    };
    pb::OrderSettlement {
        order_id: order_id.to_string(),
        creator_id: creator.to_string(),
        drop_id: o.drop_id.to_string(),
        gross: Some(convert::money(o.gross)),
        creator_share: o.creator_share,
        platform_fee: o.platform_fee,
        delivery_fee: o.delivery_fee,
        state: state as i32,
        confirmed_at: Some(convert::timestamp(o.confirmed_at)),
        delivered_at: o.delivered_at.map(convert::timestamp),
        failed_at: o.failed_at.map(convert::timestamp),
        release_at: o.release_at.map(convert::timestamp),
        remedies: o.remedy_total,
        reversal_reason: match &o.reversed {
            Some((Reversal::Returned { reason }, _)) => format!("returned: {reason}"),
            Some((Reversal::Refunded(r), _)) => r.describe(),
            None => String::new(),
        },
    }
}

fn statement_totals(t: &domain::ledger::Totals) -> pb::StatementTotals {
    pb::StatementTotals {
        currency: t.currency.to_string(),
        lines: t.lines,
        sales: t.sales,
        gross: t.figures.gross,
        platform_fee: t.figures.platform_fee,
        partner_fee: t.figures.partner_fee,
        creator_net: t.figures.creator_net,
        remedy: t.figures.remedy,
        paid_out: t.figures.paid_out,
        available_change: t.figures.available,
    }
}

type LineStream = Pin<Box<dyn Stream<Item = Result<pb::StatementLine, Status>> + Send>>;

#[tonic::async_trait]
impl SettlementService for Settlement {
    async fn register_creator(
        &self,
        request: Request<pb::RegisterCreatorRequest>,
    ) -> Result<Response<pb::CreatorCredential>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let creator_id = check.parse("creator_id", &r.creator_id, CreatorId::parse);
        check.text("display_name", &r.display_name, true);
        let creator_id = check.finish(|| creator_id)?;
        self.issue_credential(|credential_hash| RegistryCommand::RegisterCreator {
            creator_id,
            display_name: r.display_name,
            credential_hash,
        })
        .await
    }

    async fn reset_creator_credential(
        &self,
        request: Request<pb::ResetCreatorCredentialRequest>,
    ) -> Result<Response<pb::CreatorCredential>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let creator_id = check.parse("creator_id", &r.creator_id, CreatorId::parse);
        let creator_id = check.finish(|| creator_id)?;
        self.issue_credential(|credential_hash| RegistryCommand::ResetCreatorCredential {
            creator_id,
            credential_hash,
        })
        .await
    }

    async fn get_balance(&self, request: Request<pb::GetBalanceRequest>) -> Result<Response<pb::Balance>, Status> {
        let creator = creator_scope(&request, &request.get_ref().creator_id)?;
        let balances: Vec<CurrencyBalance> = self.ledger(&creator, LedgerCommand::GetBalance).await?;
        Ok(Response::new(pb::Balance {
            creator_id: creator.to_string(),
            currencies: balances.iter().map(currency_balance).collect(),
        }))
    }

    async fn get_statement(
        &self,
        request: Request<pb::GetStatementRequest>,
    ) -> Result<Response<pb::Statement>, Status> {
        let creator = creator_scope(&request, &request.get_ref().creator_id)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let from = optional_time(&mut check, "from", r.from.as_ref());
        let to = optional_time(&mut check, "to", r.to.as_ref());
        if let (Some(from), Some(to)) = (from, to) {
            if to < from {
                check.fail("to", "must not be before from");
            }
        }
        let after_seq = page_token(&mut check, &r.page_token);
        check.finish(|| Some(()))?;
        let query = StatementQuery {
            from: from.unwrap_or(UnixMillis(i64::MIN)),
            to: to.unwrap_or(UnixMillis(i64::MAX)),
            after_seq,
            limit: page_size(r.page_size),
        };
        let s = self.statement(&creator, query).await?;
        Ok(Response::new(pb::Statement {
            creator_id: creator.to_string(),
            from: r.from,
            to: r.to,
            lines: s.lines.iter().map(line).collect(),
            totals: s.totals.iter().map(statement_totals).collect(),
            next_page_token: s.next_after_seq.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    type WatchSettlementStream = LineStream;

    async fn watch_settlement(
        &self,
        request: Request<pb::WatchSettlementRequest>,
    ) -> Result<Response<LineStream>, Status> {
        let creator = creator_scope(&request, &request.get_ref().creator_id)?;
        let mut after = request.get_ref().after_seq;
        // Subscribe before reading the backlog, so no line falls between the two.
        let mut live = self
            .platform
            .projections
            .settlement
            .subscribe(&creator)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(SETTLEMENT_WATCH_BUFFER);
        let this = Settlement {
            platform: self.platform.clone(),
        };
        let mut shutdown = self.platform.shutdown.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(Duration::from_millis(WATCH_STREAM_MAX_MS));
            tokio::pin!(deadline);
            // The backlog (and, after falling behind the live feed, what was missed) comes
            // from the ledger itself, page by page.
            let mut catch_up = true;
            loop {
                if catch_up {
                    loop {
                        let query = StatementQuery {
                            from: UnixMillis(i64::MIN),
                            to: UnixMillis(i64::MAX),
                            after_seq: after,
                            limit: STATEMENT_PAGE_MAX,
                        };
                        let page = match this.statement(&creator, query).await {
                            Ok(page) => page,
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        };
                        for e in &page.lines {
                            if tx.send(Ok(line(e))).await.is_err() {
                                return;
                            }
                            after = e.seq;
                        }
                        if page.next_after_seq.is_none() {
                            break;
                        }
                    }
                    catch_up = false;
                }
                tokio::select! {
                    next = live.recv() => match next {
                        Ok(entry) if entry.seq <= after => {}
                        Ok(entry) if entry.seq == after + 1 => {
                            if tx.send(Ok(line(&entry))).await.is_err() {
                                return;
                            }
                            after = entry.seq;
                        }
                        // A gap (the feed dropped lines for a slow reader): read them.
                        Ok(_) | Err(RecvError::Lagged(_)) => catch_up = true,
                        Err(RecvError::Closed) => return,
                    },
                    _ = &mut deadline => return,
                    _ = shutdown.changed() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as LineStream))
    }

    async fn list_payouts(
        &self,
        request: Request<pb::ListPayoutsRequest>,
    ) -> Result<Response<pb::ListPayoutsResponse>, Status> {
        let creator = creator_scope(&request, &request.get_ref().creator_id)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let before = page_token(&mut check, &r.page_token);
        check.finish(|| Some(()))?;
        let command = LedgerCommand::Payouts {
            before: (!r.page_token.is_empty()).then_some(before),
            limit: page_size(r.page_size),
        };
        let PayoutPage { payouts, next_before } = self.ledger(&creator, command).await?;
        Ok(Response::new(pb::ListPayoutsResponse {
            payouts: payouts.iter().map(|p| payout(&creator, p)).collect(),
            next_page_token: next_before.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn request_payout(&self, request: Request<pb::RequestPayoutRequest>) -> Result<Response<pb::Payout>, Status> {
        let creator = creator_scope(&request, &request.get_ref().creator_id)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let amount = check.money("amount", r.amount.as_ref());
        let key = check.parse("idempotency_key", &r.idempotency_key, IdempotencyKey::parse);
        let (amount, key) = check.finish(|| Some((amount?, key?)))?;
        let p: Payout = self.ledger(&creator, LedgerCommand::Payout { key, amount }).await?;
        tracing::info!(%creator, payout = %p.payout_id, amount = %p.amount, "payout");
        Ok(Response::new(payout(&creator, &p)))
    }

    async fn get_order_settlement(
        &self,
        request: Request<pb::GetOrderSettlementRequest>,
    ) -> Result<Response<pb::OrderSettlement>, Status> {
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        let creator = self.order_owner(&request, &order_id).await?;
        let booking = self.ledger(&creator, LedgerCommand::GetOrder(order_id.clone())).await?;
        Ok(Response::new(self.order_reply(&creator, &order_id, booking)))
    }

    async fn record_return(
        &self,
        request: Request<pb::RecordReturnRequest>,
    ) -> Result<Response<pb::OrderSettlement>, Status> {
        let r = request.get_ref();
        let (order_id, creator) = self.operator_order(&request, &r.order_id, &r.reason).await?;
        let command = LedgerCommand::Return {
            order_id: order_id.clone(),
            reason: r.reason.clone(),
        };
        let booking = self.ledger(&creator, command).await?;
        Ok(Response::new(self.order_reply(&creator, &order_id, booking)))
    }

    async fn refund_order(
        &self,
        request: Request<pb::RefundOrderRequest>,
    ) -> Result<Response<pb::OrderSettlement>, Status> {
        let r = request.get_ref();
        let (order_id, creator) = self.operator_order(&request, &r.order_id, &r.reason).await?;
        let dispatch = self.order_dispatch(&order_id).await?;
        let reason = RefundReason::Operator(r.reason.clone());
        let booking = withdraw_and_refund(&self.platform, &creator, &order_id, reason, dispatch).await?;
        Ok(Response::new(self.order_reply(&creator, &order_id, booking)))
    }

    async fn reconcile(&self, request: Request<pb::ReconcileRequest>) -> Result<Response<pb::ReconcileReport>, Status> {
        require_operator(&request)?;
        let dry_run = request.into_inner().dry_run;
        let report = crate::reconcile::run(&self.platform, dry_run).await?;
        tracing::info!(
            orders = report.orders,
            differences = report.differences.len(),
            booked = report.booked,
            refunded = report.refunded,
            balanced = report.balanced,
            "reconciliation"
        );
        Ok(Response::new(report))
    }
}

/// The columns of a statement as CSV (amounts in minor units), as the console's download and
/// `dropline settlement statement --csv` write it.
pub const STATEMENT_CSV_HEADER: [&str; 15] = [
    "creator_id",
    "seq",
    "booked_at",
    "kind",
    "order_id",
    "drop_id",
    "currency",
    "gross_minor",
    "platform_fee_minor",
    "partner_fee_minor",
    "creator_net_minor",
    "remedy_minor",
    "paid_out_minor",
    "available_change_minor",
    "reference",
];
