//! A creator's settlement ledger: double-entry bookkeeping in integer minor units, one
//! currency per account, in the manner of TigerBeetle: every movement is a transfer of a
//! positive amount from a debit account to a credit account, so Σdebits = Σcredits holds
//! by construction, and the ledger checks it (and every account's floor) anyway.
//!
//! Accounts (a balance is credits − debits):
//! - `BuyerPayments`: where buyers' money comes from; its balance is minus what they paid.
//! - `CreatorPending`: the creator's earnings inside an order's return window.
//! - `CreatorAvailable`: earnings past the window, ready to be paid out.
//! - `PaidOut`: what has been paid out to the creator.
//! - `PlatformFees`: the platform's share (it also pays remedies the platform is at fault for).
//! - `PartnerFees`: delivery fees owed to fulfilment partners, less remedies charged to them
//!   (it may go below zero: the partners then owe the platform).
//! - `Refunds`: money given back to buyers (returns, cancellations, refunds).
//! - `Remedies`: credits given to buyers for missed delivery promises.
//!
//! The rules:
//! - **Sale** (a confirmed order): the gross is split by the drop's terms into the delivery
//!   fee, then the platform's share and the creator's share by largest remainder, so the
//!   parts add up to the gross exactly: `BuyerPayments → CreatorPending, PlatformFees,
//!   PartnerFees`.
//! - **Delivery** starts the return window; when it has passed the creator's share is
//!   **released**: `CreatorPending → CreatorAvailable`.
//! - **Return** (within the window, of a delivered order) and **refund** (an order cancelled
//!   after confirm, an operator's refund, or an order reconciliation cannot match) reverse
//!   the sale: each share goes back to the buyer, `… → Refunds`.
//! - **Remedy** (a missed delivery window, or a parcel never delivered): the buyer's credit
//!   is charged to the party at fault, the partner that held the dispatch (`PartnerFees →
//!   Remedies`) or the platform when no partner held it (`PlatformFees → Remedies`). The
//!   creator is not at fault for logistics: an order never delivered is refunded to the
//!   buyer in full by its remedies, and the creator's share is released at once (there is
//!   nothing to return). A buyer is refunded in full once: an order already reversed gets
//!   no never-delivered credit, and a failed order is not reversed again when its
//!   cancellation arrives (a late-delivery credit is compensation and is kept).
//! - **Payout**: `CreatorAvailable → PaidOut`, never more than is available, idempotent by
//!   key.
//!
//! Facts reach the ledger at least once (from the SKU and hub actors' outboxes); each input
//! is a snapshot of what is true of an order, and the ledger books only what it has not
//! booked yet, so a repeated or reordered input changes nothing.

use crate::aggregate::Aggregate;
use crate::drop::SettlementTerms;
use crate::facts::{Fault, RemedyKind};
pub use crate::facts::{FulfilmentFacts, SaleFacts};
use crate::ids::{CreatorId, DropId, IdempotencyKey, OrderId};
use crate::limits::{LEDGER_BATCH_MAX, LEDGER_LINES_MAX, PAYOUT_KEYS_MAX, STATEMENT_PAGE_MAX};
use crate::money::{allocate, Currency, Money};
use crate::rejection::Rejection;
use crate::time::UnixMillis;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Account {
    BuyerPayments,
    CreatorPending,
    CreatorAvailable,
    PaidOut,
    PlatformFees,
    PartnerFees,
    Refunds,
    Remedies,
}

/// Which sign an account's balance (credits − debits) must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    NotBelowZero,
    NotAboveZero,
    Any,
}

impl Account {
    pub const ALL: [Account; 8] = [
        Account::BuyerPayments,
        Account::CreatorPending,
        Account::CreatorAvailable,
        Account::PaidOut,
        Account::PlatformFees,
        Account::PartnerFees,
        Account::Refunds,
        Account::Remedies,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Account::BuyerPayments => "buyer_payments",
            Account::CreatorPending => "creator_pending",
            Account::CreatorAvailable => "creator_available",
            Account::PaidOut => "paid_out",
            Account::PlatformFees => "platform_fees",
            Account::PartnerFees => "partner_fees",
            Account::Refunds => "refunds",
            Account::Remedies => "remedies",
        }
    }

    pub fn floor(self) -> Floor {
        match self {
            Account::BuyerPayments => Floor::NotAboveZero,
            Account::PlatformFees | Account::PartnerFees => Floor::Any,
            _ => Floor::NotBelowZero,
        }
    }
}

/// One leg of double entry: `amount` (> 0) moves from `debit` to `credit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub debit: Account,
    pub credit: Account,
    pub amount: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EntryKind {
    Sale,
    Release,
    Return,
    Refund,
    Remedy,
    Payout,
}

impl EntryKind {
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Sale => "sale",
            EntryKind::Release => "release",
            EntryKind::Return => "return",
            EntryKind::Refund => "refund",
            EntryKind::Remedy => "remedy",
            EntryKind::Payout => "payout",
        }
    }
}

/// A statement line: the transfers of one booking, all in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// 1, 2, 3… in booking order (`at` never decreases along it).
    pub seq: u64,
    pub at: UnixMillis,
    pub kind: EntryKind,
    pub order_id: Option<OrderId>,
    pub drop_id: Option<DropId>,
    /// The payout id, the refund's reason or the remedy's kind.
    pub reference: String,
    pub currency: Currency,
    pub transfers: Vec<Transfer>,
}

/// A line's effect as a creator reads it. Always `gross = platform_fee + partner_fee +
/// creator_net + remedy + paid_out` (that is the line balancing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Figures {
    /// Paid by buyers (negative: given back).
    pub gross: i64,
    pub platform_fee: i64,
    pub partner_fee: i64,
    /// Change of the creator's earnings (pending + available).
    pub creator_net: i64,
    /// Credits given to buyers.
    pub remedy: i64,
    pub paid_out: i64,
    /// Change of the creator's available balance.
    pub available: i64,
}

impl Figures {
    pub fn add(&mut self, other: &Figures) {
        self.gross += other.gross;
        self.platform_fee += other.platform_fee;
        self.partner_fee += other.partner_fee;
        self.creator_net += other.creator_net;
        self.remedy += other.remedy;
        self.paid_out += other.paid_out;
        self.available += other.available;
    }
}

impl Entry {
    /// Credits − debits of `account` in this entry.
    pub fn delta(&self, account: Account) -> i64 {
        self.transfers
            .iter()
            .map(|t| {
                let mut d = 0;
                if t.credit == account {
                    d += t.amount;
                }
                if t.debit == account {
                    d -= t.amount;
                }
                d
            })
            .sum()
    }

    pub fn figures(&self) -> Figures {
        let available = self.delta(Account::CreatorAvailable);
        Figures {
            gross: -self.delta(Account::BuyerPayments) - self.delta(Account::Refunds),
            platform_fee: self.delta(Account::PlatformFees),
            partner_fee: self.delta(Account::PartnerFees),
            creator_net: self.delta(Account::CreatorPending) + available,
            remedy: self.delta(Account::Remedies),
            paid_out: self.delta(Account::PaidOut),
            available,
        }
    }
}

/// Debits and credits posted to one account in one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Posted {
    pub debits: i64,
    pub credits: i64,
}

impl Posted {
    pub fn balance(&self) -> i64 {
        self.credits - self.debits
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerInput {
    Sale(SaleFacts),
    Fulfilment(FulfilmentFacts),
}

impl LedgerInput {
    pub fn order_id(&self) -> &OrderId {
        match self {
            LedgerInput::Sale(f) => &f.order_id,
            LedgerInput::Fulfilment(f) => &f.order_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefundReason {
    /// Cancelled after confirmation.
    Cancelled,
    /// An operator refunded it.
    Operator(String),
    /// Reconciliation could not match it with the SKU journals.
    Unreconciled(String),
}

impl RefundReason {
    pub fn describe(&self) -> String {
        match self {
            RefundReason::Cancelled => "cancelled after confirmation".into(),
            RefundReason::Operator(r) if r.is_empty() => "refunded by an operator".into(),
            RefundReason::Operator(r) => format!("refunded by an operator: {r}"),
            RefundReason::Unreconciled(r) => format!("unreconciled: {r}"),
        }
    }
}

/// How a sale was reversed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reversal {
    Returned { reason: String },
    Refunded(RefundReason),
}

/// One order in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderBooking {
    pub drop_id: DropId,
    pub gross: Money,
    pub creator_share: i64,
    pub platform_fee: i64,
    pub delivery_fee: i64,
    pub return_window_ms: u64,
    pub confirmed_at: UnixMillis,
    pub delivered_at: Option<UnixMillis>,
    pub failed_at: Option<UnixMillis>,
    /// When the creator's share becomes available (set by delivery or failure).
    pub release_at: Option<UnixMillis>,
    pub released: bool,
    pub reversed: Option<(Reversal, UnixMillis)>,
    /// Hub remedies booked so far (they arrive as a growing list).
    pub remedies_booked: u32,
    pub remedy_total: i64,
    /// The sale's statement line.
    pub sale_seq: u64,
}

impl OrderBooking {
    /// The return window is open: delivered, not failed, not reversed, not released.
    pub fn returnable(&self, now: UnixMillis) -> Result<(), Rejection> {
        if let Some((reversal, _)) = &self.reversed {
            return Err(Rejection::FailedPrecondition(match reversal {
                Reversal::Returned { .. } => "the order was already returned".into(),
                Reversal::Refunded(r) => format!("the order was already refunded ({})", r.describe()),
            }));
        }
        if self.failed_at.is_some() {
            return Err(Rejection::FailedPrecondition(
                "the order was never delivered; its buyer was refunded by its remedy".into(),
            ));
        }
        let Some(delivered_at) = self.delivered_at else {
            return Err(Rejection::FailedPrecondition(
                "the order is not delivered yet; cancel or refund it instead".into(),
            ));
        };
        let closes = delivered_at.plus_ms(self.return_window_ms);
        if self.released || now >= closes {
            return Err(Rejection::FailedPrecondition(format!(
                "the return window closed at {} (unix ms)",
                closes.0
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payout {
    pub payout_id: String,
    pub key: IdempotencyKey,
    pub amount: Money,
    pub at: UnixMillis,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerEvent {
    SaleBooked {
        entry: Entry,
        booking: OrderBooking,
    },
    /// Delivered or failed: the release time is set (no money moves).
    Fulfilled {
        order_id: OrderId,
        delivered_at: Option<UnixMillis>,
        failed_at: Option<UnixMillis>,
        release_at: UnixMillis,
    },
    Released {
        entry: Entry,
    },
    Reversed {
        entry: Entry,
        reversal: Reversal,
    },
    RemedyBooked {
        entry: Entry,
        /// Position in the dispatch's remedy list.
        index: u32,
    },
    PaidOut {
        entry: Entry,
        payout: Payout,
    },
}

impl LedgerEvent {
    pub fn entry(&self) -> Option<&Entry> {
        match self {
            LedgerEvent::SaleBooked { entry, .. }
            | LedgerEvent::Released { entry }
            | LedgerEvent::Reversed { entry, .. }
            | LedgerEvent::RemedyBooked { entry, .. }
            | LedgerEvent::PaidOut { entry, .. } => Some(entry),
            LedgerEvent::Fulfilled { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementQuery {
    pub from: UnixMillis,
    /// Exclusive.
    pub to: UnixMillis,
    /// Lines after this sequence number (paging; 0 for the first page).
    pub after_seq: u64,
    pub limit: u32,
}

/// Totals of one currency over a statement's whole period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub currency: Currency,
    pub lines: u64,
    pub sales: u64,
    pub figures: Figures,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub lines: Vec<Entry>,
    /// The `after_seq` of the next page, if there is one.
    pub next_after_seq: Option<u64>,
    pub totals: Vec<Totals>,
}

/// A creator's balances in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencyBalance {
    pub currency: Currency,
    /// Credits − debits of every account.
    pub accounts: BTreeMap<Account, i64>,
}

impl CurrencyBalance {
    pub fn get(&self, account: Account) -> i64 {
        self.accounts.get(&account).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerCommand {
    /// Order and fulfilment facts, booked idempotently (at most `LEDGER_BATCH_MAX`).
    Sync(Vec<LedgerInput>),
    Return {
        order_id: OrderId,
        reason: String,
    },
    Refund {
        order_id: OrderId,
        reason: RefundReason,
    },
    Payout {
        key: IdempotencyKey,
        amount: Money,
    },
    /// Timer: release the earnings whose return window has passed.
    ReleaseDue,
    GetBalance,
    GetOrder(OrderId),
    Statement(StatementQuery),
    /// Payouts, newest first, before `before` (an index; None: from the newest).
    Payouts {
        before: Option<u64>,
        limit: u32,
    },
    /// Booked orders in id order after `after`.
    Orders {
        after: Option<OrderId>,
        limit: u32,
    },
    /// Every broken invariant (empty when the ledger is sound).
    Check,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerReply {
    Synced {
        /// Inputs fully booked (their senders may forget them).
        acked: Vec<OrderId>,
        /// Inputs that must be sent again later (fulfilment of an order not booked yet).
        deferred: Vec<OrderId>,
    },
    Order(Box<OrderBooking>),
    Payout(Payout),
    Balance(Vec<CurrencyBalance>),
    Statement(Statement),
    Payouts {
        payouts: Vec<Payout>,
        next_before: Option<u64>,
    },
    Orders(Vec<(OrderId, OrderBooking)>),
    Problems(Vec<String>),
    Done,
}

crate::reply_shapes!(LedgerReply {
    Order(box OrderBooking),
    Payout(Payout),
    Balance(Vec<CurrencyBalance>),
    Statement(Statement),
    Orders(Vec<(OrderId, OrderBooking)>),
    Problems(Vec<String>),
    Done,
});

/// What a ledger synced: `LedgerReply::Synced`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub acked: Vec<OrderId>,
    pub deferred: Vec<OrderId>,
}

impl crate::reply::FromReply<LedgerReply> for Synced {
    fn from_reply(reply: LedgerReply) -> Result<Synced, LedgerReply> {
        match reply {
            LedgerReply::Synced { acked, deferred } => Ok(Synced { acked, deferred }),
            other => Err(other),
        }
    }
}

/// A page of payouts: `LedgerReply::Payouts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutPage {
    pub payouts: Vec<Payout>,
    pub next_before: Option<u64>,
}

impl crate::reply::FromReply<LedgerReply> for PayoutPage {
    fn from_reply(reply: LedgerReply) -> Result<PayoutPage, LedgerReply> {
        match reply {
            LedgerReply::Payouts { payouts, next_before } => Ok(PayoutPage { payouts, next_before }),
            other => Err(other),
        }
    }
}

/// State of one creator's ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    pub creator_id: CreatorId,
    pub entries: Vec<Entry>,
    pub posted: BTreeMap<(Currency, Account), Posted>,
    pub orders: BTreeMap<OrderId, OrderBooking>,
    /// Orders whose share is still pending, by release time.
    pub releases: BTreeSet<(UnixMillis, OrderId)>,
    pub payouts: Vec<Payout>,
    payout_keys: HashMap<IdempotencyKey, usize>,
}

impl LedgerState {
    pub fn new(creator_id: CreatorId) -> LedgerState {
        LedgerState {
            creator_id,
            entries: Vec::new(),
            posted: BTreeMap::new(),
            orders: BTreeMap::new(),
            releases: BTreeSet::new(),
            payouts: Vec::new(),
            payout_keys: HashMap::new(),
        }
    }

    pub fn balance(&self, currency: Currency, account: Account) -> i64 {
        self.posted.get(&(currency, account)).map_or(0, Posted::balance)
    }

    pub fn balances(&self) -> Vec<CurrencyBalance> {
        let mut out: Vec<CurrencyBalance> = Vec::new();
        for ((currency, account), posted) in &self.posted {
            if out.last().is_none_or(|b| b.currency != *currency) {
                out.push(CurrencyBalance {
                    currency: *currency,
                    accounts: Account::ALL.iter().map(|a| (*a, 0)).collect(),
                });
            }
            if let Some(last) = out.last_mut() {
                last.accounts.insert(*account, posted.balance());
            }
        }
        out
    }

    pub fn statement(&self, q: &StatementQuery) -> Statement {
        let start = self.entries.partition_point(|e| e.at < q.from);
        let end = self.entries.partition_point(|e| e.at < q.to);
        let period = &self.entries[start..end.max(start)];
        let mut totals: BTreeMap<Currency, Totals> = BTreeMap::new();
        for e in period {
            let t = totals.entry(e.currency).or_insert_with(|| Totals {
                currency: e.currency,
                lines: 0,
                sales: 0,
                figures: Figures::default(),
            });
            t.lines += 1;
            t.sales += u64::from(e.kind == EntryKind::Sale);
            t.figures.add(&e.figures());
        }
        let first = period.partition_point(|e| e.seq <= q.after_seq);
        let limit = q.limit.clamp(1, STATEMENT_PAGE_MAX) as usize;
        let page = &period[first..(first + limit).min(period.len())];
        let next_after_seq = (first + limit < period.len()).then(|| page.last().map_or(q.after_seq, |e| e.seq));
        Statement {
            lines: page.to_vec(),
            next_after_seq,
            totals: totals.into_values().collect(),
        }
    }

    /// Every broken invariant, recomputed from the lines: each transfer positive and
    /// balanced, the posted totals equal to the lines', Σdebits = Σcredits per currency,
    /// every account within its floor, each order's sale booked exactly once with parts
    /// adding up to its gross, and every payout covered by the lines.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut posted: BTreeMap<(Currency, Account), Posted> = BTreeMap::new();
        let mut sales: HashMap<&OrderId, u32> = HashMap::new();
        let mut last_at = UnixMillis(i64::MIN);
        for (i, e) in self.entries.iter().enumerate() {
            if e.seq != i as u64 + 1 {
                problems.push(format!("line {} has sequence number {}", i + 1, e.seq));
            }
            if e.at < last_at {
                problems.push(format!("line {} is dated before the line above it", e.seq));
            }
            last_at = e.at;
            for t in &e.transfers {
                if t.amount <= 0 || t.debit == t.credit {
                    problems.push(format!("line {}: transfer {t:?} is not a positive movement", e.seq));
                }
                posted.entry((e.currency, t.debit)).or_default().debits += t.amount;
                posted.entry((e.currency, t.credit)).or_default().credits += t.amount;
            }
            if e.kind == EntryKind::Sale {
                if let Some(id) = &e.order_id {
                    *sales.entry(id).or_default() += 1;
                }
            }
        }
        let nonzero = |m: &BTreeMap<(Currency, Account), Posted>| -> Vec<((Currency, Account), Posted)> {
            m.iter()
                .filter(|(_, p)| p.debits != 0 || p.credits != 0)
                .map(|(k, p)| (*k, *p))
                .collect()
        };
        if nonzero(&posted) != nonzero(&self.posted) {
            problems.push("the posted totals differ from the sum of the lines".into());
        }
        let mut per_currency: BTreeMap<Currency, (i64, i64)> = BTreeMap::new();
        for ((currency, account), p) in &posted {
            let sums = per_currency.entry(*currency).or_default();
            sums.0 += p.debits;
            sums.1 += p.credits;
            let balance = p.balance();
            let broken = match account.floor() {
                Floor::NotBelowZero => balance < 0,
                Floor::NotAboveZero => balance > 0,
                Floor::Any => false,
            };
            if broken {
                problems.push(format!("{} {} has balance {balance}", account.name(), currency));
            }
        }
        for (currency, (debits, credits)) in per_currency {
            if debits != credits {
                problems.push(format!("{currency}: debits {debits} ≠ credits {credits}"));
            }
        }
        for (id, o) in &self.orders {
            match sales.get(id) {
                Some(1) => {}
                n => problems.push(format!("order {id} has {} sale lines", n.copied().unwrap_or(0))),
            }
            if o.creator_share + o.platform_fee + o.delivery_fee != o.gross.minor_units {
                problems.push(format!("order {id}: its shares do not add up to its gross"));
            }
        }
        if sales.len() != self.orders.len() {
            problems.push("a sale line names an order the ledger does not know".into());
        }
        problems
    }

    fn next_seq(&self) -> u64 {
        self.entries.len() as u64 + 1
    }

    fn last_at(&self) -> UnixMillis {
        self.entries.last().map_or(UnixMillis(i64::MIN), |e| e.at)
    }
}

/// Splits an order's gross: delivery fee first, then platform and creator by largest remainder.
pub fn split(gross: i64, terms: &SettlementTerms) -> (i64, i64, i64) {
    let delivery = terms.delivery_fee_minor_units.clamp(0, gross.max(0));
    let rest = gross.max(0) - delivery;
    let bps = u64::from(terms.platform_fee_bps.min(10_000));
    let parts = allocate(rest, &[10_000 - bps, bps]);
    // The sale's legs move exactly what the buyer paid, no more and no less.
    assert_eq!(parts[0] + parts[1] + delivery, gross.max(0), "split of {gross}");
    (parts[0], parts[1], delivery)
}

/// Decisions in progress: the events so far and their effect on the orders and balances
/// they touched, over the unchanged state.
struct Tx<'a> {
    base: &'a LedgerState,
    now: UnixMillis,
    seq: u64,
    orders: HashMap<OrderId, OrderBooking>,
    posted: HashMap<(Currency, Account), Posted>,
    events: Vec<LedgerEvent>,
}

impl<'a> Tx<'a> {
    fn new(base: &'a LedgerState, now: UnixMillis) -> Tx<'a> {
        Tx {
            base,
            // Lines are dated in booking order, even if the clock steps back.
            now: now.max(base.last_at()),
            seq: base.next_seq(),
            orders: HashMap::new(),
            posted: HashMap::new(),
            events: Vec::new(),
        }
    }

    fn order(&self, id: &OrderId) -> Option<&OrderBooking> {
        self.orders.get(id).or_else(|| self.base.orders.get(id))
    }

    fn balance(&self, currency: Currency, account: Account) -> i64 {
        self.posted
            .get(&(currency, account))
            .map_or_else(|| self.base.balance(currency, account), Posted::balance)
    }

    fn entry(
        &mut self,
        kind: EntryKind,
        order_id: Option<&OrderId>,
        drop_id: Option<&DropId>,
        reference: String,
        currency: Currency,
        legs: &[(Account, Account, i64)],
    ) -> Entry {
        // Legs of nothing are left out; a negative one would be left out too, and the money
        // it stands for with it.
        assert!(
            legs.iter().all(|&(_, _, amount)| amount >= 0),
            "{kind:?} entry with a negative leg: {legs:?}"
        );
        let entry = Entry {
            seq: self.seq,
            at: self.now,
            kind,
            order_id: order_id.cloned(),
            drop_id: drop_id.cloned(),
            reference,
            currency,
            transfers: legs
                .iter()
                .filter(|(_, _, amount)| *amount > 0)
                .map(|&(debit, credit, amount)| Transfer { debit, credit, amount })
                .collect(),
        };
        self.seq += 1;
        entry
    }

    fn emit(&mut self, event: LedgerEvent) {
        if let Some(entry) = event.entry() {
            for t in &entry.transfers {
                for (account, debit) in [(t.debit, true), (t.credit, false)] {
                    let key = (entry.currency, account);
                    let current = self
                        .posted
                        .get(&key)
                        .copied()
                        .unwrap_or_else(|| self.base.posted.get(&key).copied().unwrap_or_default());
                    let mut next = current;
                    if debit {
                        next.debits += t.amount;
                    } else {
                        next.credits += t.amount;
                    }
                    self.posted.insert(key, next);
                }
            }
        }
        if let Some(id) = order_of(&event) {
            let mut booking = match &event {
                LedgerEvent::SaleBooked { booking, .. } => booking.clone(),
                _ => self.order(id).cloned().expect("events change booked orders only"),
            };
            apply_to_order(&mut booking, &event);
            self.orders.insert(id.clone(), booking);
        }
        self.events.push(event);
    }

    fn book_sale(&mut self, f: &SaleFacts) {
        let (creator, platform, delivery) = split(f.gross.minor_units, &f.terms);
        let currency = f.gross.currency;
        let entry = self.entry(
            EntryKind::Sale,
            Some(&f.order_id),
            Some(&f.drop_id),
            String::new(),
            currency,
            &[
                (Account::BuyerPayments, Account::CreatorPending, creator),
                (Account::BuyerPayments, Account::PlatformFees, platform),
                (Account::BuyerPayments, Account::PartnerFees, delivery),
            ],
        );
        let booking = OrderBooking {
            drop_id: f.drop_id.clone(),
            gross: f.gross,
            creator_share: creator,
            platform_fee: platform,
            delivery_fee: delivery,
            return_window_ms: f.terms.return_window_ms,
            confirmed_at: f.confirmed_at,
            delivered_at: None,
            failed_at: None,
            release_at: None,
            released: false,
            reversed: None,
            remedies_booked: 0,
            remedy_total: 0,
            sale_seq: entry.seq,
        };
        self.emit(LedgerEvent::SaleBooked { entry, booking });
    }

    /// Reverses a sale: every share back to the buyer. The creator's share comes from
    /// pending, or from available once released (refused when that is no longer there).
    fn reverse(&mut self, order_id: &OrderId, reversal: Reversal) -> Result<(), Rejection> {
        let o = self
            .order(order_id)
            .cloned()
            .ok_or_else(|| Rejection::not_found("order", order_id.as_str()))?;
        let currency = o.gross.currency;
        let from = if o.released {
            let available = self.balance(currency, Account::CreatorAvailable);
            if available < o.creator_share {
                return Err(Rejection::FailedPrecondition(format!(
                    "the creator's share ({}) was released and only {} is available: it was paid out",
                    Money::new(o.creator_share, currency),
                    Money::new(available, currency)
                )));
            }
            Account::CreatorAvailable
        } else {
            Account::CreatorPending
        };
        let (kind, reference) = match &reversal {
            Reversal::Returned { reason } => (EntryKind::Return, reason.clone()),
            Reversal::Refunded(r) => (EntryKind::Refund, r.describe()),
        };
        let entry = self.entry(
            kind,
            Some(order_id),
            Some(&o.drop_id),
            reference,
            currency,
            &[
                (from, Account::Refunds, o.creator_share),
                (Account::PlatformFees, Account::Refunds, o.platform_fee),
                (Account::PartnerFees, Account::Refunds, o.delivery_fee),
            ],
        );
        self.emit(LedgerEvent::Reversed { entry, reversal });
        Ok(())
    }

    fn book_fulfilment(&mut self, f: &FulfilmentFacts) {
        let Some(o) = self.order(&f.order_id).cloned() else {
            return;
        };
        for (index, remedy) in f.remedies.iter().enumerate().skip(o.remedies_booked as usize) {
            // An order already refunded in full (cancelled, returned, refunded) is not
            // refunded again by the credit for never being delivered.
            if remedy.kind == RemedyKind::NotDelivered && o.reversed.is_some() {
                continue;
            }
            let at_fault = match &remedy.at_fault {
                Fault::Partner(_) => Account::PartnerFees,
                Fault::Platform => Account::PlatformFees,
            };
            let reference = match (&remedy.kind, &remedy.at_fault) {
                (RemedyKind::LateDelivery, Fault::Partner(p)) => format!("late delivery, charged to partner {p}"),
                (RemedyKind::LateDelivery, Fault::Platform) => "late delivery, charged to the platform".into(),
                (RemedyKind::NotDelivered, Fault::Partner(p)) => format!("not delivered, charged to partner {p}"),
                (RemedyKind::NotDelivered, Fault::Platform) => "not delivered, charged to the platform".into(),
            };
            let entry = self.entry(
                EntryKind::Remedy,
                Some(&f.order_id),
                Some(&o.drop_id),
                reference,
                remedy.amount.currency,
                &[(at_fault, Account::Remedies, remedy.amount.minor_units)],
            );
            self.emit(LedgerEvent::RemedyBooked {
                entry,
                index: index as u32,
            });
        }
        let o = self.order(&f.order_id).cloned().expect("booked above");
        if o.release_at.is_none() && (f.delivered_at.is_some() || f.failed_at.is_some()) {
            // A failed order has nothing to return: its share is released at once.
            let release_at = match (f.delivered_at, f.failed_at) {
                (_, Some(failed)) => failed,
                (Some(delivered), None) => delivered.plus_ms(o.return_window_ms),
                (None, None) => unreachable!("checked above"),
            };
            self.emit(LedgerEvent::Fulfilled {
                order_id: f.order_id.clone(),
                delivered_at: f.delivered_at,
                failed_at: f.failed_at,
                release_at,
            });
        }
    }

    fn release_due(&mut self) {
        let due: Vec<OrderId> = self
            .base
            .releases
            .iter()
            .take_while(|(at, _)| *at <= self.now)
            .map(|(_, id)| id.clone())
            .collect();
        for id in due {
            let Some(o) = self.order(&id).cloned() else { continue };
            if o.released || o.reversed.is_some() {
                continue;
            }
            let entry = self.entry(
                EntryKind::Release,
                Some(&id),
                Some(&o.drop_id),
                String::new(),
                o.gross.currency,
                &[(Account::CreatorPending, Account::CreatorAvailable, o.creator_share)],
            );
            self.emit(LedgerEvent::Released { entry });
        }
    }
}

fn order_of(event: &LedgerEvent) -> Option<&OrderId> {
    match event {
        LedgerEvent::Fulfilled { order_id, .. } => Some(order_id),
        LedgerEvent::PaidOut { .. } => None,
        other => other.entry().and_then(|e| e.order_id.as_ref()),
    }
}

fn apply_to_order(o: &mut OrderBooking, event: &LedgerEvent) {
    match event {
        LedgerEvent::SaleBooked { .. } | LedgerEvent::PaidOut { .. } => {}
        LedgerEvent::Fulfilled {
            delivered_at,
            failed_at,
            release_at,
            ..
        } => {
            o.delivered_at = *delivered_at;
            o.failed_at = *failed_at;
            o.release_at = Some(*release_at);
        }
        LedgerEvent::Released { .. } => o.released = true,
        LedgerEvent::Reversed { entry, reversal } => o.reversed = Some((reversal.clone(), entry.at)),
        LedgerEvent::RemedyBooked { entry, index } => {
            o.remedies_booked = index + 1;
            o.remedy_total += entry.delta(Account::Remedies);
        }
    }
}

impl Aggregate for LedgerState {
    type Command = LedgerCommand;
    type Event = LedgerEvent;
    type Reply = LedgerReply;

    fn decide(&self, command: LedgerCommand, now: UnixMillis) -> Result<(Vec<LedgerEvent>, LedgerReply), Rejection> {
        let mut tx = Tx::new(self, now);
        let reply = match command {
            LedgerCommand::Sync(inputs) => {
                if inputs.len() > LEDGER_BATCH_MAX {
                    return Err(Rejection::field(
                        "inputs",
                        format!("at most {LEDGER_BATCH_MAX} per batch"),
                    ));
                }
                // Each input may add a few lines (a sale, a refund, remedies).
                if self.entries.len() + 4 * inputs.len() > LEDGER_LINES_MAX {
                    return Err(Rejection::Exhausted(format!(
                        "creator {} has {} ledger lines, the most one ledger keeps",
                        self.creator_id,
                        self.entries.len()
                    )));
                }
                let mut acked = Vec::with_capacity(inputs.len());
                let mut deferred = Vec::new();
                for input in inputs {
                    match input {
                        LedgerInput::Sale(f) => {
                            if tx.order(&f.order_id).is_none() {
                                tx.book_sale(&f);
                            }
                            // Handed over when sold (at a pop-up's stall): fulfilled then.
                            if let Some(at) = f.handed_over_at {
                                if tx.order(&f.order_id).is_some_and(|o| o.release_at.is_none()) {
                                    tx.book_fulfilment(&FulfilmentFacts {
                                        order_id: f.order_id.clone(),
                                        delivered_at: Some(at),
                                        failed_at: None,
                                        remedies: Vec::new(),
                                    });
                                }
                            }
                            let o = tx.order(&f.order_id).cloned().expect("booked above");
                            // A failed order's buyer was refunded in full by its remedies.
                            if f.cancelled_at.is_some()
                                && o.reversed.is_none()
                                && o.failed_at.is_none()
                                && tx
                                    .reverse(&f.order_id, Reversal::Refunded(RefundReason::Cancelled))
                                    .is_err()
                            {
                                // Paid out already: reconciliation reports it.
                                deferred.push(f.order_id);
                                continue;
                            }
                            acked.push(f.order_id);
                        }
                        LedgerInput::Fulfilment(f) => {
                            if tx.order(&f.order_id).is_none() {
                                deferred.push(f.order_id);
                                continue;
                            }
                            tx.book_fulfilment(&f);
                            acked.push(f.order_id);
                        }
                    }
                }
                LedgerReply::Synced { acked, deferred }
            }
            LedgerCommand::Return { order_id, reason } => {
                let o = self
                    .orders
                    .get(&order_id)
                    .ok_or_else(|| Rejection::not_found("order", order_id.as_str()))?;
                if matches!(o.reversed, Some((Reversal::Returned { .. }, _))) {
                    // A safe retry.
                    return Ok((vec![], LedgerReply::Order(Box::new(o.clone()))));
                }
                o.returnable(tx.now)?;
                tx.reverse(&order_id, Reversal::Returned { reason })?;
                LedgerReply::Order(Box::new(tx.order(&order_id).cloned().expect("booked")))
            }
            LedgerCommand::Refund { order_id, reason } => {
                let o = self
                    .orders
                    .get(&order_id)
                    .ok_or_else(|| Rejection::not_found("order", order_id.as_str()))?;
                if o.reversed.is_none() {
                    if o.failed_at.is_some() {
                        return Err(Rejection::FailedPrecondition(
                            "the order was never delivered; its buyer was refunded in full by its remedies".into(),
                        ));
                    }
                    tx.reverse(&order_id, Reversal::Refunded(reason))?;
                }
                LedgerReply::Order(Box::new(tx.order(&order_id).cloned().expect("booked")))
            }
            LedgerCommand::Payout { key, amount } => {
                if let Some(&i) = self.payout_keys.get(&key) {
                    let p = &self.payouts[i];
                    if p.amount != amount {
                        return Err(Rejection::IdempotencyKeyReused {
                            key: key.as_str().to_string(),
                        });
                    }
                    return Ok((vec![], LedgerReply::Payout(p.clone())));
                }
                if amount.minor_units <= 0 {
                    return Err(Rejection::field("amount.minor_units", "must be positive"));
                }
                let available = self.balance(amount.currency, Account::CreatorAvailable);
                if amount.minor_units > available {
                    return Err(Rejection::FailedPrecondition(format!(
                        "only {} is available to pay out",
                        Money::new(available, amount.currency)
                    )));
                }
                if self.payout_keys.len() >= PAYOUT_KEYS_MAX {
                    return Err(Rejection::Exhausted(format!(
                        "creator {} has {PAYOUT_KEYS_MAX} payouts, the most one ledger keeps",
                        self.creator_id
                    )));
                }
                let payout_id = format!("po-{}", self.payouts.len() + 1);
                let entry = tx.entry(
                    EntryKind::Payout,
                    None,
                    None,
                    payout_id.clone(),
                    amount.currency,
                    &[(Account::CreatorAvailable, Account::PaidOut, amount.minor_units)],
                );
                let payout = Payout {
                    payout_id,
                    key,
                    amount,
                    at: tx.now,
                    seq: entry.seq,
                };
                tx.emit(LedgerEvent::PaidOut {
                    entry,
                    payout: payout.clone(),
                });
                LedgerReply::Payout(payout)
            }
            LedgerCommand::ReleaseDue => {
                tx.release_due();
                LedgerReply::Done
            }
            LedgerCommand::GetBalance => LedgerReply::Balance(self.balances()),
            LedgerCommand::GetOrder(id) => LedgerReply::Order(Box::new(
                self.orders
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Rejection::not_found("order", id.as_str()))?,
            )),
            LedgerCommand::Statement(q) => LedgerReply::Statement(self.statement(&q)),
            LedgerCommand::Payouts { before, limit } => {
                let end = before.map_or(self.payouts.len(), |b| (b as usize).min(self.payouts.len()));
                let limit = limit.clamp(1, STATEMENT_PAGE_MAX) as usize;
                let start = end.saturating_sub(limit);
                LedgerReply::Payouts {
                    payouts: self.payouts[start..end].iter().rev().cloned().collect(),
                    next_before: (start > 0).then_some(start as u64),
                }
            }
            LedgerCommand::Orders { after, limit } => {
                let limit = limit.clamp(1, STATEMENT_PAGE_MAX) as usize;
                let range = match &after {
                    Some(a) => self
                        .orders
                        .range::<OrderId, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
                    None => self.orders.range::<OrderId, _>(..),
                };
                LedgerReply::Orders(range.take(limit).map(|(k, v)| (k.clone(), v.clone())).collect())
            }
            LedgerCommand::Check => LedgerReply::Problems(self.check()),
        };
        Ok((tx.events, reply))
    }

    fn apply(&mut self, event: &LedgerEvent) {
        if let Some(entry) = event.entry() {
            for t in &entry.transfers {
                // Each transfer moves money between two accounts: posted as a debit and a
                // credit of the same amount, it keeps Σdebits = Σcredits.
                assert!(
                    t.amount > 0 && t.debit != t.credit,
                    "entry {}: transfer {t:?} moves nothing",
                    entry.seq
                );
                self.posted.entry((entry.currency, t.debit)).or_default().debits += t.amount;
                self.posted.entry((entry.currency, t.credit)).or_default().credits += t.amount;
            }
            self.entries.push(entry.clone());
        }
        match event {
            LedgerEvent::SaleBooked { entry, booking } => {
                if let Some(id) = &entry.order_id {
                    self.orders.insert(id.clone(), booking.clone());
                }
            }
            LedgerEvent::PaidOut { payout, .. } => {
                self.payout_keys.insert(payout.key.clone(), self.payouts.len());
                self.payouts.push(payout.clone());
            }
            other => {
                let Some(id) = order_of(other) else { return };
                let Some(o) = self.orders.get_mut(id) else { return };
                if let Some(at) = o.release_at {
                    self.releases.remove(&(at, id.clone()));
                }
                apply_to_order(o, other);
                if let (Some(at), false, None) = (o.release_at, o.released, &o.reversed) {
                    self.releases.insert((at, id.clone()));
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<UnixMillis> {
        self.releases.first().map(|(at, _)| *at)
    }
}
