//! Property tests of a creator's settlement ledger, driven only through `decide` + `apply`:
//! random streams of sale and fulfilment facts (duplicated, reordered, resent, cancelled
//! after confirm), returns, refunds, payouts (with reused idempotency keys), releases at
//! advancing times and restarts. After every step: `check()` is clean, every account's
//! balance equals a simple reference model's to the minor unit, each order is in the state
//! the model says (released only once its return window has passed), and a restart rebuilds
//! the same state. At the end of each case the statement is paged through and its totals are
//! checked against the balances.
//!
//! (Neither serde_json nor postcard is a dev-dependency of `domain`, so restarts are checked
//! by replaying the event log only.)
//!
//! The random streams never combine a failed delivery with a cancellation or refund of the
//! same order; the two example tests at the end pin that case down (a buyer is refunded in
//! full once, whichever fact arrives first).

use domain::drop::SettlementTerms;
use domain::hub::{Fault, Remedy, RemedyKind};
use domain::ledger::*;
use domain::money::allocate;
use domain::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, HashMap};

const START: i64 = 100_000;

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn creator() -> CreatorId {
    CreatorId::parse("c1").unwrap()
}

fn drop_of(i: usize) -> DropId {
    DropId::parse(if i.is_multiple_of(2) { "d1" } else { "d2" }).unwrap()
}

fn order_id(i: usize) -> OrderId {
    OrderId::new(&drop_of(i), &SkuId::parse("s1").unwrap(), i as u64 + 1)
}

fn fault(f: u8) -> Fault {
    match f {
        0 => Fault::Platform,
        n => Fault::Partner(PartnerId::parse(&format!("p{n}")).unwrap()),
    }
}

fn fault_account(f: &Fault) -> Account {
    match f {
        Fault::Partner(_) => Account::PartnerFees,
        Fault::Platform => Account::PlatformFees,
    }
}

/// Decides a command, then applies every event to the state and appends it to the log. A
/// rejection must leave the state exactly as it was.
fn run(
    state: &mut LedgerState,
    log: &mut Vec<LedgerEvent>,
    command: LedgerCommand,
    now: UnixMillis,
) -> Result<LedgerReply, Rejection> {
    let before = state.clone();
    match state.decide(command, now) {
        Ok((events, reply)) => {
            for event in &events {
                state.apply(event);
            }
            log.extend(events);
            Ok(reply)
        }
        Err(rejection) => {
            assert_eq!(&before, state, "a rejected command must change nothing");
            Err(rejection)
        }
    }
}

fn replay(log: &[LedgerEvent]) -> LedgerState {
    let mut state = LedgerState::new(creator());
    for event in log {
        state.apply(event);
    }
    state
}

fn rejection_kind(r: &Rejection) -> &'static str {
    match r {
        Rejection::InvalidArgument(_) => "InvalidArgument",
        Rejection::NotFound { .. } => "NotFound",
        Rejection::FailedPrecondition(_) => "FailedPrecondition",
        Rejection::BuyerLimitReached { .. } => "BuyerLimitReached",
        Rejection::IdempotencyKeyReused { .. } => "IdempotencyKeyReused",
        Rejection::PermissionDenied(_) => "PermissionDenied",
        Rejection::Exhausted(_) => "Exhausted",
        Rejection::AlreadyExists { .. } => "AlreadyExists",
    }
}

// ---------------------------------------------------------------------------------------
// The plan of one case: the orders that exist and what will happen to them at the hub.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Never delivered nor failed (maybe late).
    Open,
    Delivered,
    /// Failed with a `NotDelivered` remedy of the rest of the gross.
    Failed,
}

#[derive(Debug, Clone)]
struct PlanOrder {
    usd: bool,
    gross: i64,
    terms: SettlementTerms,
    /// Late-delivery credits, in percent of the gross, and who is at fault.
    late: Vec<(i64, u8)>,
    fate: Fate,
    final_fault: u8,
    /// How long before it is first reported the delivery or failure happened.
    back: i64,
}

impl PlanOrder {
    fn currency(&self) -> Currency {
        if self.usd {
            usd()
        } else {
            eur()
        }
    }

    /// Stages of the hub's snapshots: each late remedy, then delivery or failure.
    fn stages(&self) -> usize {
        self.late.len() + usize::from(self.fate != Fate::Open)
    }

    fn sale_facts(&self, i: usize, cancelled_at: Option<UnixMillis>) -> SaleFacts {
        SaleFacts {
            order_id: order_id(i),
            drop_id: drop_of(i),
            gross: Money::new(self.gross, self.currency()),
            terms: self.terms,
            confirmed_at: UnixMillis(START - 1_000 + i as i64),
            cancelled_at,
            handed_over_at: None,
        }
    }

    /// The hub's snapshot after `k` stages (`final_at` is used once the last stage is in).
    fn fulfilment_facts(&self, i: usize, k: usize, final_at: UnixMillis) -> FulfilmentFacts {
        let mut remedies: Vec<Remedy> = self.late[..k.min(self.late.len())]
            .iter()
            .map(|&(pct, f)| Remedy {
                kind: RemedyKind::LateDelivery,
                amount: Money::new(self.gross * pct / 100, self.currency()),
                at_fault: fault(f),
                at: UnixMillis(START),
            })
            .collect();
        let done = k == self.stages() && self.fate != Fate::Open;
        if done && self.fate == Fate::Failed {
            let credited: i64 = remedies.iter().map(|r| r.amount.minor_units).sum();
            remedies.push(Remedy {
                kind: RemedyKind::NotDelivered,
                amount: Money::new((self.gross - credited).max(0), self.currency()),
                at_fault: fault(self.final_fault),
                at: final_at,
            });
        }
        FulfilmentFacts {
            order_id: order_id(i),
            delivered_at: (done && self.fate == Fate::Delivered).then_some(final_at),
            failed_at: (done && self.fate == Fate::Failed).then_some(final_at),
            remedies,
        }
    }
}

fn plan_order() -> impl Strategy<Value = PlanOrder> {
    (1i64..=100_000)
        .prop_flat_map(|gross| {
            (
                Just(gross),
                prop::bool::weighted(0.25),
                prop_oneof![1 => Just(0i64), 1 => Just(gross), 3 => 0..=gross],
                prop_oneof![1 => Just(0u32), 1 => Just(10_000u32), 4 => 0u32..=10_000],
                prop_oneof![1 => Just(0u64), 4 => 0u64..=10_000],
                prop::collection::vec((0i64..=50, 0u8..3), 0..=2),
                prop_oneof![1 => Just(Fate::Open), 3 => Just(Fate::Delivered), 2 => Just(Fate::Failed)],
                0u8..3,
                prop_oneof![Just(0i64), 0i64..3_000],
            )
        })
        .prop_map(
            |(gross, usd, delivery_fee, bps, window, late, fate, final_fault, back)| PlanOrder {
                usd,
                gross,
                terms: SettlementTerms {
                    platform_fee_bps: bps,
                    delivery_fee_minor_units: delivery_fee,
                    return_window_ms: window,
                },
                late,
                fate,
                final_fault,
                back,
            },
        )
}

#[derive(Debug, Clone)]
enum Input {
    Sale {
        order: usize,
        cancel: bool,
    },
    /// The hub's snapshot after `stage` stages; None: the latest (delivered or failed, if ever).
    Fulfil {
        order: usize,
        stage: Option<usize>,
    },
}

#[derive(Debug, Clone)]
enum PayoutAmount {
    Units(i64),
    All,
    AllPlusOne,
    Half,
    NonPositive(i64),
}

#[derive(Debug, Clone)]
enum Step {
    Sync(Vec<Input>),
    /// `delivered`: pick among the orders delivered and not reversed, if any.
    Return {
        order: usize,
        delivered: bool,
    },
    /// `released`: pick among the orders released and not reversed, if any.
    Refund {
        order: usize,
        operator: bool,
        released: bool,
    },
    Payout {
        key: u8,
        usd: bool,
        amount: PayoutAmount,
    },
    /// Sends a previous payout again, same key and amount.
    RepeatPayout {
        pick: usize,
    },
    /// Time moves on, then the release timer runs.
    Advance {
        ms: u32,
    },
    /// Time moves to the next release time (or one millisecond before it), then the timer runs.
    ToNextRelease {
        just_before: bool,
    },
    /// Sends an input acked before, alone.
    Resend {
        pick: usize,
    },
    Restart,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        3 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(order, cancel)| Input::Sale { order, cancel }),
        3 => (any::<usize>(), proptest::option::of(0usize..8)).prop_map(|(order, stage)| Input::Fulfil { order, stage }),
    ]
}

fn payout_amount() -> impl Strategy<Value = PayoutAmount> {
    prop_oneof![
        3 => (1i64..20_000).prop_map(PayoutAmount::Units),
        2 => Just(PayoutAmount::All),
        1 => Just(PayoutAmount::AllPlusOne),
        2 => Just(PayoutAmount::Half),
        1 => (-5i64..=0).prop_map(PayoutAmount::NonPositive),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => prop::collection::vec(input(), 1..6).prop_map(Step::Sync),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(order, delivered)| Step::Return { order, delivered }),
        2 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(order, operator, released)| Step::Refund { order, operator, released }),
        3 => (0u8..5, prop::bool::weighted(0.25), payout_amount())
            .prop_map(|(key, usd, amount)| Step::Payout { key, usd, amount }),
        1 => any::<usize>().prop_map(|pick| Step::RepeatPayout { pick }),
        3 => (0u32..=4_000).prop_map(|ms| Step::Advance { ms }),
        3 => any::<bool>().prop_map(|just_before| Step::ToNextRelease { just_before }),
        2 => any::<usize>().prop_map(|pick| Step::Resend { pick }),
        1 => Just(Step::Restart),
    ]
}

// ---------------------------------------------------------------------------------------
// The reference model: per order what has happened, and every account's balance.

#[derive(Debug, Clone, Default)]
struct ModelOrder {
    booked: bool,
    creator: i64,
    platform: i64,
    delivery: i64,
    delivered_at: Option<UnixMillis>,
    failed_at: Option<UnixMillis>,
    release_at: Option<UnixMillis>,
    released: bool,
    /// Some(true): returned, Some(false): refunded.
    reversed: Option<bool>,
    remedies: usize,
}

#[derive(Debug, Default)]
struct Model {
    orders: Vec<ModelOrder>,
    balances: BTreeMap<(Currency, Account), i64>,
    payouts: HashMap<IdempotencyKey, Payout>,
    payout_count: usize,
    /// The latest time the release timer ran.
    released_up_to: Option<UnixMillis>,
}

impl Model {
    fn balance(&self, currency: Currency, account: Account) -> i64 {
        self.balances.get(&(currency, account)).copied().unwrap_or(0)
    }

    fn transfer(&mut self, currency: Currency, debit: Account, credit: Account, amount: i64) {
        assert!(amount >= 0);
        *self.balances.entry((currency, debit)).or_default() -= amount;
        *self.balances.entry((currency, credit)).or_default() += amount;
    }

    fn book_sale(&mut self, plan: &[PlanOrder], i: usize) {
        if self.orders[i].booked {
            return;
        }
        let p = &plan[i];
        let (creator, platform, delivery) = split(p.gross, &p.terms);
        let o = &mut self.orders[i];
        o.booked = true;
        o.creator = creator;
        o.platform = platform;
        o.delivery = delivery;
        let c = p.currency();
        self.transfer(c, Account::BuyerPayments, Account::CreatorPending, creator);
        self.transfer(c, Account::BuyerPayments, Account::PlatformFees, platform);
        self.transfer(c, Account::BuyerPayments, Account::PartnerFees, delivery);
    }

    /// Every share back to the buyer; false (nothing done) when the released share is gone.
    fn reverse(&mut self, plan: &[PlanOrder], i: usize, returned: bool) -> bool {
        let c = plan[i].currency();
        let o = self.orders[i].clone();
        assert!(o.booked && o.reversed.is_none());
        let from = if o.released {
            if self.balance(c, Account::CreatorAvailable) < o.creator {
                return false;
            }
            Account::CreatorAvailable
        } else {
            Account::CreatorPending
        };
        self.transfer(c, from, Account::Refunds, o.creator);
        self.transfer(c, Account::PlatformFees, Account::Refunds, o.platform);
        self.transfer(c, Account::PartnerFees, Account::Refunds, o.delivery);
        self.orders[i].reversed = Some(returned);
        true
    }

    /// One sync input; true when it should be acked, false when deferred.
    fn sync(&mut self, plan: &[PlanOrder], i: usize, input: &LedgerInput) -> bool {
        match input {
            LedgerInput::Sale(f) => {
                self.book_sale(plan, i);
                if f.cancelled_at.is_some() && self.orders[i].reversed.is_none() {
                    return self.reverse(plan, i, false);
                }
                true
            }
            LedgerInput::Fulfilment(f) => {
                if !self.orders[i].booked {
                    return false;
                }
                for r in f.remedies.iter().skip(self.orders[i].remedies) {
                    self.transfer(
                        r.amount.currency,
                        fault_account(&r.at_fault),
                        Account::Remedies,
                        r.amount.minor_units,
                    );
                    self.orders[i].remedies += 1;
                }
                let o = &mut self.orders[i];
                if o.release_at.is_none() {
                    if let Some(failed) = f.failed_at {
                        o.failed_at = Some(failed);
                        o.delivered_at = f.delivered_at;
                        o.release_at = Some(failed);
                    } else if let Some(delivered) = f.delivered_at {
                        o.delivered_at = Some(delivered);
                        o.release_at = Some(delivered.plus_ms(plan[i].terms.return_window_ms));
                    }
                }
                true
            }
        }
    }

    fn release_due(&mut self, plan: &[PlanOrder], now: UnixMillis) -> usize {
        let mut released = 0;
        for (i, plan_order) in plan.iter().enumerate().take(self.orders.len()) {
            let o = &self.orders[i];
            if o.booked && !o.released && o.reversed.is_none() && o.release_at.is_some_and(|at| at <= now) {
                let amount = o.creator;
                self.orders[i].released = true;
                self.transfer(
                    plan_order.currency(),
                    Account::CreatorPending,
                    Account::CreatorAvailable,
                    amount,
                );
                released += 1;
            }
        }
        self.released_up_to = Some(now);
        released
    }

    /// Expected outcome of a Return: Ok(changed) or the rejection's kind.
    fn return_order(&mut self, plan: &[PlanOrder], i: usize, now: UnixMillis) -> Result<bool, &'static str> {
        let o = self.orders[i].clone();
        if !o.booked {
            return Err("NotFound");
        }
        match o.reversed {
            Some(true) => return Ok(false),
            Some(false) => return Err("FailedPrecondition"),
            None => {}
        }
        if o.failed_at.is_some() {
            return Err("FailedPrecondition");
        }
        let Some(delivered) = o.delivered_at else {
            return Err("FailedPrecondition");
        };
        if o.released || now >= delivered.plus_ms(plan[i].terms.return_window_ms) {
            return Err("FailedPrecondition");
        }
        assert!(self.reverse(plan, i, true), "an unreleased share is always there");
        Ok(true)
    }

    fn refund(&mut self, plan: &[PlanOrder], i: usize) -> Result<bool, &'static str> {
        let o = self.orders[i].clone();
        if !o.booked {
            return Err("NotFound");
        }
        if o.reversed.is_some() {
            return Ok(false);
        }
        if o.failed_at.is_some() {
            return Err("FailedPrecondition");
        }
        if !self.reverse(plan, i, false) {
            return Err("FailedPrecondition");
        }
        Ok(true)
    }

    fn next_release(&self) -> Option<UnixMillis> {
        self.orders
            .iter()
            .filter(|o| o.booked && !o.released && o.reversed.is_none())
            .filter_map(|o| o.release_at)
            .min()
    }
}

/// Everything that must hold after every step.
fn check_against_model(state: &LedgerState, model: &Model, plan: &[PlanOrder]) -> Result<(), TestCaseError> {
    let problems = state.check();
    prop_assert!(problems.is_empty(), "check(): {:?}", problems);
    for currency in [eur(), usd()] {
        for account in Account::ALL {
            prop_assert_eq!(
                state.balance(currency, account),
                model.balance(currency, account),
                "{} {}",
                account.name(),
                currency
            );
        }
        prop_assert!(state.balance(currency, Account::CreatorAvailable) >= 0);
    }
    let booked = model.orders.iter().filter(|o| o.booked).count();
    prop_assert_eq!(state.orders.len(), booked);
    for (i, m) in model.orders.iter().enumerate() {
        let id = order_id(i);
        let Some(o) = state.orders.get(&id) else {
            prop_assert!(!m.booked, "order {} is missing", i);
            continue;
        };
        prop_assert_eq!(o.gross, Money::new(plan[i].gross, plan[i].currency()));
        prop_assert_eq!(
            (o.creator_share, o.platform_fee, o.delivery_fee),
            (m.creator, m.platform, m.delivery)
        );
        prop_assert_eq!(o.delivered_at, m.delivered_at);
        prop_assert_eq!(o.failed_at, m.failed_at);
        prop_assert_eq!(o.release_at, m.release_at);
        prop_assert_eq!(o.released, m.released, "order {} released", i);
        prop_assert_eq!(o.remedies_booked as usize, m.remedies);
        let reversed = o.reversed.as_ref().map(|(r, _)| matches!(r, Reversal::Returned { .. }));
        prop_assert_eq!(reversed, m.reversed);
        // Nothing is available before its release time was reached by the release timer.
        if o.released {
            let at = o.release_at.expect("released orders have a release time");
            prop_assert!(
                model.released_up_to.is_some_and(|t| at <= t),
                "order {} released early",
                i
            );
        }
    }
    Ok(())
}

/// Pages through the statement of [from, to) and checks it against the lines and balances.
fn check_statement(
    state: &LedgerState,
    log: &mut Vec<LedgerEvent>,
    from: UnixMillis,
    to: UnixMillis,
    limit: u32,
) -> Result<(), TestCaseError> {
    let expected: Vec<Entry> = state
        .entries
        .iter()
        .filter(|e| e.at >= from && e.at < to)
        .cloned()
        .collect();
    let mut got: Vec<Entry> = Vec::new();
    let mut after_seq = 0;
    let mut totals: Option<Vec<Totals>> = None;
    let mut shadow = state.clone();
    for _ in 0..=expected.len() + 1 {
        let q = StatementQuery {
            from,
            to,
            after_seq,
            limit,
        };
        let page = state.statement(&q);
        // The command answers the same and books nothing.
        let before = log.len();
        let reply = run(&mut shadow, log, LedgerCommand::Statement(q), UnixMillis(0)).unwrap();
        prop_assert_eq!(log.len(), before);
        prop_assert_eq!(reply, LedgerReply::Statement(page.clone()));
        prop_assert!(page.lines.len() <= limit.clamp(1, 1_000) as usize);
        match &totals {
            Some(t) => prop_assert_eq!(t, &page.totals),
            None => totals = Some(page.totals.clone()),
        }
        got.extend(page.lines);
        match page.next_after_seq {
            Some(next) => {
                prop_assert!(next > after_seq);
                after_seq = next;
            }
            None => break,
        }
    }
    prop_assert_eq!(&got, &expected, "every line of the period exactly once, in order");
    let totals = totals.unwrap();
    // Totals per currency are the sums of the lines' figures.
    let mut sums: BTreeMap<Currency, (u64, u64, Figures)> = BTreeMap::new();
    for e in &expected {
        let s = sums.entry(e.currency).or_default();
        s.0 += 1;
        s.1 += u64::from(e.kind == EntryKind::Sale);
        s.2.add(&e.figures());
    }
    prop_assert_eq!(totals.len(), sums.len());
    for t in &totals {
        let (lines, sales, figures) = sums[&t.currency];
        prop_assert_eq!((t.lines, t.sales, t.figures), (lines, sales, figures));
        let f = t.figures;
        prop_assert_eq!(
            f.gross,
            f.platform_fee + f.partner_fee + f.creator_net + f.remedy + f.paid_out
        );
    }
    Ok(())
}

/// The whole history's totals are the balances.
fn check_history_totals(state: &LedgerState, plan: &[PlanOrder]) -> Result<(), TestCaseError> {
    let all = state.statement(&StatementQuery {
        from: UnixMillis(i64::MIN),
        to: UnixMillis(i64::MAX),
        after_seq: 0,
        limit: 1,
    });
    for currency in [eur(), usd()] {
        let b = |a: Account| state.balance(currency, a);
        let t = all.totals.iter().find(|t| t.currency == currency);
        let (f, sales) = t.map_or((Figures::default(), 0), |t| (t.figures, t.sales));
        prop_assert_eq!(f.creator_net, b(Account::CreatorPending) + b(Account::CreatorAvailable));
        prop_assert_eq!(f.available, b(Account::CreatorAvailable));
        prop_assert_eq!(f.paid_out, b(Account::PaidOut));
        prop_assert_eq!(f.gross, -b(Account::BuyerPayments) - b(Account::Refunds));
        prop_assert_eq!(f.platform_fee, b(Account::PlatformFees));
        prop_assert_eq!(f.partner_fee, b(Account::PartnerFees));
        prop_assert_eq!(f.remedy, b(Account::Remedies));
        let orders = state
            .orders
            .keys()
            .filter(|id| {
                plan.iter()
                    .enumerate()
                    .any(|(i, p)| &order_id(i) == *id && p.currency() == currency)
            })
            .count();
        prop_assert_eq!(sales, orders as u64);
    }
    Ok(())
}

/// The `pick`th order among those `wanted` says, else among the booked ones (one time in
/// four among all, to ask for unknown ones too).
fn pick_order(model: &Model, pick: usize, n: usize, wanted: impl Fn(&ModelOrder) -> bool) -> usize {
    let mut candidates: Vec<usize> = (0..n).filter(|&i| wanted(&model.orders[i])).collect();
    if candidates.is_empty() && !pick.is_multiple_of(4) {
        candidates = (0..n).filter(|&i| model.orders[i].booked).collect();
    }
    if candidates.is_empty() {
        pick % n
    } else {
        candidates[pick / 4 % candidates.len()]
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ledger_matches_the_reference_model(
        plan in prop::collection::vec(plan_order(), 1..7),
        steps in prop::collection::vec(step(), 1..100),
        pages in prop::collection::vec((0i64..40_000, 0i64..40_000, 0u32..6), 3),
    ) {
        let n = plan.len();
        let mut state = LedgerState::new(creator());
        let mut log: Vec<LedgerEvent> = Vec::new();
        let mut model = Model { orders: vec![ModelOrder::default(); n], ..Model::default() };
        let mut now = UnixMillis(START);
        // When each order was cancelled, delivered or failed (fixed once first reported).
        let mut cancelled_at: Vec<Option<UnixMillis>> = vec![None; n];
        let mut final_at: Vec<Option<UnixMillis>> = vec![None; n];
        let mut acked_inputs: Vec<LedgerInput> = Vec::new();
        let mut payouts_made: Vec<Payout> = Vec::new();

        for step in steps {
            match step {
                Step::Sync(inputs) => {
                    let mut batch = Vec::new();
                    for input in inputs {
                        match input {
                            Input::Sale { order, cancel } => {
                                let i = order % n;
                                // A failed order is never cancelled here (see the tests below).
                                let cancel = cancel && plan[i].fate != Fate::Failed;
                                if cancel && cancelled_at[i].is_none() {
                                    cancelled_at[i] = Some(now);
                                }
                                // Once cancelled the facts say so, but an older copy may still arrive.
                                let at = if cancel { cancelled_at[i] } else { None };
                                batch.push((i, LedgerInput::Sale(plan[i].sale_facts(i, at))));
                            }
                            Input::Fulfil { order, stage } => {
                                let i = order % n;
                                let k = stage.map_or(plan[i].stages(), |s| s % (plan[i].stages() + 1));
                                if k == plan[i].stages() && plan[i].fate != Fate::Open && final_at[i].is_none() {
                                    final_at[i] = Some(UnixMillis(now.0 - plan[i].back));
                                }
                                let at = final_at[i].unwrap_or(now);
                                batch.push((i, LedgerInput::Fulfilment(plan[i].fulfilment_facts(i, k, at))));
                            }
                        }
                    }
                    let mut acked = Vec::new();
                    let mut deferred = Vec::new();
                    for (i, input) in &batch {
                        if model.sync(&plan, *i, input) {
                            acked.push(order_id(*i));
                            acked_inputs.push(input.clone());
                        } else {
                            deferred.push(order_id(*i));
                        }
                    }
                    let command = LedgerCommand::Sync(batch.into_iter().map(|(_, input)| input).collect());
                    let reply = run(&mut state, &mut log, command, now);
                    prop_assert_eq!(reply, Ok(LedgerReply::Synced { acked, deferred }));
                }
                Step::Resend { pick } if !acked_inputs.is_empty() => {
                    let input = acked_inputs[pick % acked_inputs.len()].clone();
                    let i = (0..n).find(|&i| &order_id(i) == input.order_id()).unwrap();
                    prop_assert!(model.sync(&plan, i, &input));
                    let before = log.len();
                    let reply = run(&mut state, &mut log, LedgerCommand::Sync(vec![input]), now);
                    prop_assert_eq!(log.len(), before, "an input acked before books nothing");
                    prop_assert_eq!(reply, Ok(LedgerReply::Synced { acked: vec![order_id(i)], deferred: vec![] }));
                }
                Step::Resend { .. } => {}
                Step::Return { order, delivered } => {
                    let i = pick_order(&model, order, n, |o| delivered && o.delivered_at.is_some() && o.reversed.is_none());
                    let expected = model.return_order(&plan, i, now);
                    let before = log.len();
                    let reply = run(&mut state, &mut log, LedgerCommand::Return { order_id: order_id(i), reason: "too small".into() }, now);
                    match (expected, reply) {
                        (Ok(changed), Ok(LedgerReply::Order(o))) => {
                            prop_assert_eq!(log.len() - before, usize::from(changed));
                            prop_assert!(matches!(o.reversed, Some((Reversal::Returned { .. }, _))), "returned");
                        }
                        (Err(kind), Err(r)) => prop_assert_eq!(kind, rejection_kind(&r), "{}", r),
                        (e, r) => prop_assert!(false, "return of {}: expected {:?}, got {:?}", i, e, r),
                    }
                }
                Step::Refund { order, operator, released } => {
                    let i = pick_order(&model, order, n, |o| released && o.released && o.reversed.is_none());
                    let o = &model.orders[i];
                    if plan[i].fate == Fate::Failed && o.booked && o.failed_at.is_none() && o.reversed.is_none() {
                        // Refunding an order that fails later: see the tests below.
                        continue;
                    }
                    let reason = if operator { RefundReason::Operator("goodwill".into()) } else { RefundReason::Unreconciled("no match".into()) };
                    let expected = model.refund(&plan, i);
                    let before = log.len();
                    let reply = run(&mut state, &mut log, LedgerCommand::Refund { order_id: order_id(i), reason }, now);
                    match (expected, reply) {
                        (Ok(changed), Ok(LedgerReply::Order(o))) => {
                            prop_assert_eq!(log.len() - before, usize::from(changed));
                            prop_assert!(o.reversed.is_some());
                        }
                        (Err(kind), Err(r)) => prop_assert_eq!(kind, rejection_kind(&r), "{}", r),
                        (e, r) => prop_assert!(false, "refund of {}: expected {:?}, got {:?}", i, e, r),
                    }
                }
                Step::Payout { key, usd: in_usd, amount } => {
                    let currency = if in_usd { usd() } else { eur() };
                    let available = model.balance(currency, Account::CreatorAvailable);
                    let units = match amount {
                        PayoutAmount::Units(u) => u,
                        PayoutAmount::All => available,
                        PayoutAmount::AllPlusOne => available + 1,
                        PayoutAmount::Half => available / 2,
                        PayoutAmount::NonPositive(u) => u,
                    };
                    let key = IdempotencyKey::parse(&format!("payout-{key}")).unwrap();
                    let amount = Money::new(units, currency);
                    let before = log.len();
                    let reply = run(&mut state, &mut log, LedgerCommand::Payout { key: key.clone(), amount }, now);
                    if let Some(previous) = model.payouts.get(&key) {
                        if previous.amount == amount {
                            prop_assert_eq!(reply, Ok(LedgerReply::Payout(previous.clone())));
                            prop_assert_eq!(log.len(), before);
                        } else {
                            prop_assert!(matches!(reply, Err(Rejection::IdempotencyKeyReused { .. })), "{:?}", reply);
                        }
                    } else if units <= 0 {
                        prop_assert!(matches!(reply, Err(Rejection::InvalidArgument(_))), "{:?}", reply);
                    } else if units > available {
                        prop_assert!(matches!(reply, Err(Rejection::FailedPrecondition(_))), "{:?}", reply);
                    } else {
                        model.payout_count += 1;
                        let payout = Payout {
                            payout_id: format!("po-{}", model.payout_count),
                            key: key.clone(),
                            amount,
                            at: now,
                            seq: state.entries.len() as u64,
                        };
                        prop_assert_eq!(reply, Ok(LedgerReply::Payout(payout.clone())));
                        prop_assert_eq!(log.len() - before, 1);
                        model.transfer(currency, Account::CreatorAvailable, Account::PaidOut, units);
                        model.payouts.insert(key, payout.clone());
                        payouts_made.push(payout);
                    }
                }
                Step::RepeatPayout { pick } if !payouts_made.is_empty() => {
                    let p = payouts_made[pick % payouts_made.len()].clone();
                    let before = log.len();
                    let reply = run(&mut state, &mut log, LedgerCommand::Payout { key: p.key.clone(), amount: p.amount }, now);
                    prop_assert_eq!(reply, Ok(LedgerReply::Payout(p)));
                    prop_assert_eq!(log.len(), before);
                }
                Step::RepeatPayout { .. } => {}
                Step::Advance { .. } | Step::ToNextRelease { .. } => {
                    now = match step {
                        Step::Advance { ms } => now.plus_ms(u64::from(ms)),
                        Step::ToNextRelease { just_before } => match model.next_release() {
                            Some(at) => now.max(UnixMillis(at.0 - i64::from(just_before))),
                            None => now,
                        },
                        _ => unreachable!(),
                    };
                    let released = model.release_due(&plan, now);
                    let before = log.len();
                    let reply = run(&mut state, &mut log, LedgerCommand::ReleaseDue, now);
                    prop_assert_eq!(reply, Ok(LedgerReply::Done));
                    prop_assert_eq!(log.len() - before, released);
                    prop_assert!(log[before..].iter().all(|e| matches!(e, LedgerEvent::Released { .. })), "releases only");
                    // Nothing due is left.
                    prop_assert!(state.next_deadline().is_none_or(|t| t > now));
                    prop_assert_eq!(state.next_deadline(), model.next_release());
                }
                Step::Restart => {
                    let rebuilt = replay(&log);
                    prop_assert_eq!(&rebuilt, &state, "replaying the log rebuilds the state");
                    state = rebuilt;
                }
            }
            check_against_model(&state, &model, &plan)?;
        }

        // Restart at the end too, then read statements.
        let rebuilt = replay(&log);
        prop_assert_eq!(&rebuilt, &state);
        check_history_totals(&state, &plan)?;
        check_statement(&state, &mut log, UnixMillis(i64::MIN), UnixMillis(i64::MAX), pages[0].2)?;
        for &(a, b, limit) in &pages {
            let from = UnixMillis(START + a.min(b));
            let to = UnixMillis(START + a.max(b));
            check_statement(&state, &mut log, from, to, limit)?;
            // An empty or inverted period has no lines.
            let inverted = state.statement(&StatementQuery { from: to, to: from, after_seq: 0, limit });
            if to > from {
                prop_assert!(inverted.lines.is_empty() && inverted.totals.is_empty() && inverted.next_after_seq.is_none());
            }
        }
    }

    #[test]
    fn split_parts_add_up_and_are_within_a_unit_of_their_share(
        gross in 0i64..=1_000_000_000,
        bps in 0u32..=10_000,
        fee in prop_oneof![Just(0i64), 0i64..=2_000, 0i64..=1_000_000_000],
    ) {
        let terms = SettlementTerms { platform_fee_bps: bps, delivery_fee_minor_units: fee, return_window_ms: 0 };
        let (creator, platform, delivery) = split(gross, &terms);
        prop_assert_eq!(creator + platform + delivery, gross);
        prop_assert_eq!(delivery, fee.min(gross));
        prop_assert!(creator >= 0 && platform >= 0);
        let rest = i128::from(gross - delivery);
        // |platform - rest × bps / 10000| < 1, and the same for the creator.
        prop_assert!((i128::from(platform) * 10_000 - rest * i128::from(bps)).abs() < 10_000);
        prop_assert!((i128::from(creator) * 10_000 - rest * i128::from(10_000 - bps)).abs() < 10_000);
    }

    #[test]
    fn allocate_parts_add_up_and_are_within_a_unit_of_their_share(
        total in prop_oneof![0i64..=1_000, 0i64..=1_000_000_000_000],
        weights in prop::collection::vec(prop_oneof![Just(0u64), 0u64..=10, 0u64..=u64::from(u32::MAX)], 1..8),
    ) {
        prop_assume!(weights.iter().any(|w| *w > 0));
        let parts = allocate(total, &weights);
        prop_assert_eq!(parts.len(), weights.len());
        prop_assert_eq!(parts.iter().sum::<i64>(), total);
        let sum: i128 = weights.iter().map(|w| i128::from(*w)).sum();
        for (part, w) in parts.iter().zip(&weights) {
            // |part - total × w / sum| < 1
            prop_assert!((i128::from(*part) * sum - i128::from(total) * i128::from(*w)).abs() < sum, "{} of {:?}", part, weights);
            if *w == 0 {
                prop_assert_eq!(*part, 0);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Examples.

fn sale(i: usize, gross: i64, cancelled_at: Option<i64>) -> LedgerInput {
    LedgerInput::Sale(SaleFacts {
        order_id: order_id(i),
        drop_id: drop_of(i),
        gross: Money::new(gross, eur()),
        terms: SettlementTerms {
            platform_fee_bps: 1_000,
            delivery_fee_minor_units: 500,
            return_window_ms: 1_000,
        },
        confirmed_at: UnixMillis(1_000),
        cancelled_at: cancelled_at.map(UnixMillis),
        handed_over_at: None,
    })
}

fn failed(i: usize, gross: i64, at: i64) -> LedgerInput {
    LedgerInput::Fulfilment(FulfilmentFacts {
        order_id: order_id(i),
        delivered_at: None,
        failed_at: Some(UnixMillis(at)),
        remedies: vec![Remedy {
            kind: RemedyKind::NotDelivered,
            amount: Money::new(gross, eur()),
            at_fault: fault(1),
            at: UnixMillis(at),
        }],
    })
}

/// What the buyer got back of an order: refunds and credits.
fn given_back(state: &LedgerState) -> i64 {
    state.balance(eur(), Account::Refunds) + state.balance(eur(), Account::Remedies)
}

#[test]
fn sale_delivery_release_and_payout() {
    let mut state = LedgerState::new(creator());
    let mut log = Vec::new();
    let delivered = LedgerInput::Fulfilment(FulfilmentFacts {
        order_id: order_id(0),
        delivered_at: Some(UnixMillis(2_000)),
        failed_at: None,
        remedies: vec![],
    });
    // Reordered: the delivery first is deferred, then booked after the sale.
    let reply = run(
        &mut state,
        &mut log,
        LedgerCommand::Sync(vec![delivered.clone(), sale(0, 10_000, None), delivered]),
        UnixMillis(2_000),
    );
    assert_eq!(
        reply,
        Ok(LedgerReply::Synced {
            acked: vec![order_id(0), order_id(0)],
            deferred: vec![order_id(0)]
        })
    );
    // 10_000 − 500 delivery = 9_500: 950 platform, 8_550 creator.
    assert_eq!(state.balance(eur(), Account::CreatorPending), 8_550);
    assert_eq!(state.balance(eur(), Account::PlatformFees), 950);
    assert_eq!(state.balance(eur(), Account::PartnerFees), 500);
    assert_eq!(state.next_deadline(), Some(UnixMillis(3_000)));
    run(&mut state, &mut log, LedgerCommand::ReleaseDue, UnixMillis(2_999)).unwrap();
    assert_eq!(state.balance(eur(), Account::CreatorAvailable), 0);
    let key = IdempotencyKey::parse("k1").unwrap();
    let too_much = LedgerCommand::Payout {
        key: key.clone(),
        amount: Money::new(1, eur()),
    };
    assert!(matches!(
        run(&mut state, &mut log, too_much, UnixMillis(2_999)),
        Err(Rejection::FailedPrecondition(_))
    ));
    run(&mut state, &mut log, LedgerCommand::ReleaseDue, UnixMillis(3_000)).unwrap();
    assert_eq!(state.balance(eur(), Account::CreatorAvailable), 8_550);
    let payout = LedgerCommand::Payout {
        key: key.clone(),
        amount: Money::new(8_000, eur()),
    };
    let first = run(&mut state, &mut log, payout.clone(), UnixMillis(3_100)).unwrap();
    assert_eq!(run(&mut state, &mut log, payout, UnixMillis(3_200)).unwrap(), first);
    let other = LedgerCommand::Payout {
        key,
        amount: Money::new(100, eur()),
    };
    assert!(matches!(
        run(&mut state, &mut log, other, UnixMillis(3_300)),
        Err(Rejection::IdempotencyKeyReused { .. })
    ));
    // The share was paid out: a late refund is refused, a late cancellation deferred.
    let refund = LedgerCommand::Refund {
        order_id: order_id(0),
        reason: RefundReason::Operator(String::new()),
    };
    assert!(matches!(
        run(&mut state, &mut log, refund, UnixMillis(3_400)),
        Err(Rejection::FailedPrecondition(_))
    ));
    let reply = run(
        &mut state,
        &mut log,
        LedgerCommand::Sync(vec![sale(0, 10_000, Some(3_400))]),
        UnixMillis(3_400),
    );
    assert_eq!(
        reply,
        Ok(LedgerReply::Synced {
            acked: vec![],
            deferred: vec![order_id(0)]
        })
    );
    assert_eq!(state.balance(eur(), Account::PaidOut), 8_000);
    assert_eq!(state.balance(eur(), Account::CreatorAvailable), 550);
    assert!(state.check().is_empty());
    assert_eq!(replay(&log), state);
}

/// The buyer of an order that was never delivered is refunded in full by its remedies (the
/// Refund command refuses such an order for that reason); a cancellation reaching the
/// ledger afterwards (the SKU's cancel raced the parcel leaving the hub) must not refund
/// the buyer a second time.
#[test]
fn a_cancellation_after_a_failed_delivery_does_not_refund_the_buyer_twice() {
    let mut state = LedgerState::new(creator());
    let mut log = Vec::new();
    run(
        &mut state,
        &mut log,
        LedgerCommand::Sync(vec![sale(0, 10_000, None)]),
        UnixMillis(1_000),
    )
    .unwrap();
    run(
        &mut state,
        &mut log,
        LedgerCommand::Sync(vec![failed(0, 10_000, 2_000)]),
        UnixMillis(2_000),
    )
    .unwrap();
    assert_eq!(given_back(&state), 10_000);
    let refund = LedgerCommand::Refund {
        order_id: order_id(0),
        reason: RefundReason::Operator(String::new()),
    };
    assert!(matches!(
        run(&mut state, &mut log, refund, UnixMillis(2_500)),
        Err(Rejection::FailedPrecondition(_))
    ));
    run(
        &mut state,
        &mut log,
        LedgerCommand::Sync(vec![sale(0, 10_000, Some(3_000))]),
        UnixMillis(3_000),
    )
    .unwrap();
    assert!(state.check().is_empty());
    assert_eq!(
        given_back(&state),
        10_000,
        "the buyer paid 10_000 and got back {}",
        given_back(&state)
    );
}

/// The same race the other way round: refunded by the cancellation first, the order's
/// `NotDelivered` remedy must not credit the buyer again.
#[test]
fn a_failed_delivery_after_a_cancellation_does_not_credit_the_buyer_twice() {
    let mut state = LedgerState::new(creator());
    let mut log = Vec::new();
    run(
        &mut state,
        &mut log,
        LedgerCommand::Sync(vec![sale(0, 10_000, None)]),
        UnixMillis(1_000),
    )
    .unwrap();
    run(
        &mut state,
        &mut log,
        LedgerCommand::Sync(vec![sale(0, 10_000, Some(1_500))]),
        UnixMillis(1_500),
    )
    .unwrap();
    assert_eq!(given_back(&state), 10_000);
    run(
        &mut state,
        &mut log,
        LedgerCommand::Sync(vec![failed(0, 10_000, 2_000)]),
        UnixMillis(2_000),
    )
    .unwrap();
    assert!(state.check().is_empty());
    assert_eq!(
        given_back(&state),
        10_000,
        "the buyer paid 10_000 and got back {}",
        given_back(&state)
    );
}
