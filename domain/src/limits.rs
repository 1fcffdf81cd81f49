//! Every bound the domain decides with, in one place, with the reason it exists: what a
//! command may ask for (lengths, counts, units, durations, money) and how large an
//! aggregate's state may grow. Nothing is unbounded: a full queue or table answers
//! RESOURCE_EXHAUSTED instead of growing or waiting forever. The bounds of the actor shell
//! (mailboxes, the journal, timeouts) are in `actors::limits`, those of the gRPC server in
//! `services::limits`.
//!
//! Relations the code relies on between these bounds are checked at compile time below
//! each group: changing one bound alone cannot break them unnoticed.

/// Longest id (drop, SKU, hub, creator, buyer): long enough for UUIDs and slugs, short
/// enough that ids never dominate memory or journal size.
pub const ID_LEN_MAX: usize = 64;
/// Longest idempotency key (Stripe allows 255).
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;
/// Longest free text (titles, SKU names, payment references, address lines).
pub const TEXT_LEN_MAX: usize = 200;
/// SKUs in one drop: a drop is one live stream's catalog, and CreateDrop is one message.
pub const SKUS_PER_DROP_MAX: usize = 10_000;
/// Hub pools per SKU.
pub const POOLS_PER_SKU_MAX: usize = 64;
/// Units in one pool, and in one restock.
pub const POOL_UNITS_MAX: u32 = 100_000_000;
/// Units one buyer may reserve of one SKU at most, whatever the drop says.
pub const PER_BUYER_LIMIT_MAX: u32 = 1_000;
/// Shortest and longest reservation window.
pub const HOLD_TTL_MS_MIN: u64 = 1_000;
pub const HOLD_TTL_MS_MAX: u64 = 3_600_000;
/// Longest drop: a week covers every live-stream sale we know of.
pub const DROP_DURATION_MS_MAX: i64 = 7 * 24 * 3_600_000;
/// Buyers waiting per SKU and city: beyond this a buyer is told SOLD_OUT rather than being
/// queued behind more stock than a restock could plausibly bring.
pub const WAITLIST_PER_CITY_MAX: usize = 10_000;
/// Idempotency keys are kept this long (Stripe keeps them 24 hours) ...
pub const IDEMPOTENCY_RETENTION_MS: i64 = 24 * 3_600_000;
/// ... and at most this many per SKU, the oldest forgotten first, so a bot cannot grow a
/// SKU's memory without bound.
pub const IDEMPOTENCY_KEYS_PER_SKU_MAX: usize = 1_000_000;
/// Price of one unit: positive and at most a billion minor units (ten million euros, a
/// billion yen, a million Bahraini dinars: prices in circulating ISO 4217 currencies have
/// 0, 2 or 3 decimals).
pub const PRICE_MINOR_UNITS_MAX: i64 = 1_000_000_000;

// A drop's reservation window is checked to lie between the two: some window does.
const _: () = assert!(HOLD_TTL_MS_MIN < HOLD_TTL_MS_MAX);
// A SKU's revenue (every unit of every pool sold at the highest price) fits in an i64:
// `SkuState` adds confirmed amounts up without overflow checks.
const _: () =
    assert!(PRICE_MINOR_UNITS_MAX as i128 * POOL_UNITS_MAX as i128 * POOLS_PER_SKU_MAX as i128 <= i64::MAX as i128);

// Registry and hubs.

/// Hubs in the registry, partners in the registry, and partners assigned to one hub: the
/// registry is one actor whose state is all of these.
pub const HUBS_MAX: usize = 10_000;
pub const PARTNERS_MAX: usize = 100_000;
pub const PARTNERS_PER_HUB_MAX: usize = 256;
/// Dispatches not yet delivered or failed at one hub; beyond this a confirmed order waits in
/// its SKU's hand-over queue (retried) instead of growing the hub without bound.
pub const HUB_OPEN_DISPATCHES_MAX: usize = 200_000;
/// Finished dispatches a hub keeps for reads (GetOrder, audit); older ones are forgotten by
/// the hub (their history stays in its journal and the audit log).
pub const HUB_FINISHED_DISPATCHES_KEPT: usize = 100_000;
/// Operator alerts a hub keeps (newest first).
pub const HUB_ALERTS_KEPT: usize = 100;
/// Wrong pickup codes a dispatch takes before it is locked for pickup: with six-digit codes
/// a guesser's chance before the lock is 5 in a million, and a courier who mistypes has room.
pub const PICKUP_CODE_TRIES_MAX: u32 = 5;
/// Outcomes a partner's SLA score is computed over (the most recent ones), the fewest
/// outcomes before a score counts, and the score thresholds (basis points of on-time
/// outcomes) below which a partner is put on probation or suspended automatically.
pub const SLA_WINDOW: u32 = 64;
pub const SLA_MIN_SAMPLE: u32 = 10;
pub const SLA_PROBATION_BELOW_BPS: u32 = 8_000;
pub const SLA_SUSPEND_BELOW_BPS: u32 = 5_000;
/// Longest reason text a courier may give for a decline or failure, and proof reference.
pub const COURIER_TEXT_LEN_MAX: usize = 200;
/// Waiting dispatches tried at once after a partner frees up (bounds one decision's work).
pub const PLACE_WAITING_MAX: usize = 1_000;
/// A confirmed order its hub has not acknowledged is sent again this long after (and every
/// this long while it stays unacknowledged): normally the first hand-over, right after the
/// confirm, succeeds and this never fires.
pub const HANDOVER_RETRY_MS: i64 = 30_000;
/// A hub's delivery slot lasts between a minute and a day, and holds at most this many
/// dispatches.
pub const SLOT_MS_MIN: u64 = 60_000;
pub const SLOT_MS_MAX: u64 = 24 * 3_600_000;
pub const SLOT_CAPACITY_MAX: u32 = 1_000_000;
/// Each step of a hub's SLA (accept, pick up, deliver) takes between a second and a day.
pub const SLA_STEP_MS_MIN: u64 = 1_000;
pub const SLA_STEP_MS_MAX: u64 = 24 * 3_600_000;
/// A hub gives up an undelivered dispatch at most a week after its promised window.
pub const GIVE_UP_AFTER_MS_MAX: u64 = 7 * 24 * 3_600_000;
/// On-time deliveries a hub may ask of a partner on probation before it becomes active.
pub const PROBATION_EXIT_DELIVERIES_MAX: u32 = 10_000;
/// Dispatches a partner may hold at once at one hub, at most (its own `max_open_dispatches`
/// is below this).
pub const MAX_OPEN_DISPATCHES_MAX: u32 = 100_000;

// A partner's recent outcomes are kept as the bits of one u64 (`PartnerStats::recent`), and
// a score needs no more outcomes than that window holds.
const _: () = assert!(SLA_MIN_SAMPLE <= SLA_WINDOW && SLA_WINDOW <= u64::BITS);
// A falling score puts a partner on probation before it suspends it.
const _: () = assert!(SLA_SUSPEND_BELOW_BPS < SLA_PROBATION_BELOW_BPS && SLA_PROBATION_BELOW_BPS <= 10_000);
// A hub's slot and SLA steps are checked to lie in these ranges: some value does.
const _: () = assert!(SLOT_MS_MIN < SLOT_MS_MAX && SLA_STEP_MS_MIN < SLA_STEP_MS_MAX);

// Settlement.
/// The platform's share when a drop names none: 10 %.
pub const DEFAULT_PLATFORM_FEE_BPS: u32 = 1_000;
/// The return window when a drop names none: 14 days (the EU's right of withdrawal).
pub const DEFAULT_RETURN_WINDOW_MS: u64 = 14 * 86_400_000;
pub const RETURN_WINDOW_MS_MAX: u64 = 90 * 86_400_000;
/// Inputs (order and fulfilment facts) per ledger command, and lines per statement page.
pub const LEDGER_BATCH_MAX: usize = 4_096;
pub const STATEMENT_PAGE_MAX: u32 = 1_000;
/// Payout idempotency keys kept per creator.
pub const PAYOUT_KEYS_MAX: usize = 100_000;
/// Lines a creator's ledger may hold in memory before booking is refused (RESOURCE_EXHAUSTED).
pub const LEDGER_LINES_MAX: usize = 10_000_000;
pub const CREATORS_MAX: usize = 1_000_000;
/// Storefronts the registry keeps (each one a web/app backend or a pop-up till).
pub const STOREFRONTS_MAX: usize = 100_000;

// A drop without terms of its own gets terms a drop could name.
const _: () = assert!(DEFAULT_RETURN_WINDOW_MS <= RETURN_WINDOW_MS_MAX && DEFAULT_PLATFORM_FEE_BPS <= 10_000);

// Pop-up edges (leases of stock).
/// Edges holding a lease of one SKU at once: one per pop-up, and a SKU's pools are already
/// bounded by `POOLS_PER_SKU_MAX`; the lease table is copied into every order reply.
pub const LEASES_PER_SKU_MAX: usize = 64;
/// Longest lease: a week, like the longest drop.
pub const LEASE_DURATION_MS_MAX: i64 = DROP_DURATION_MS_MAX;
/// The reconciliation window (how long after a sale its upload is still booked): at least a
/// minute, at most a day (Square's offline payments must upload within 24 hours), one hour
/// when the operator names none.
pub const RECONCILE_WINDOW_MS_MIN: u64 = 60_000;
pub const RECONCILE_WINDOW_MS_MAX: u64 = 24 * 3_600_000;
pub const RECONCILE_WINDOW_MS_DEFAULT: u64 = 3_600_000;
/// Sales in one upload command: one journal batch, a few hundred kilobytes at most.
pub const EDGE_SALES_PER_UPLOAD_MAX: usize = 1_000;
/// Refused (refunded) edge sales a SKU remembers, so their uploads replay the same answer:
/// beyond this, uploads with more unbookable sales are refused (RESOURCE_EXHAUSTED).
pub const EDGE_REFUNDS_PER_SKU_MAX: usize = 10_000;
/// Longest HMAC key id of a lease (printable ASCII).
pub const LEASE_KEY_ID_LEN_MAX: usize = 64;

const _: () = assert!(RECONCILE_WINDOW_MS_MIN <= RECONCILE_WINDOW_MS_DEFAULT);
const _: () = assert!(RECONCILE_WINDOW_MS_DEFAULT <= RECONCILE_WINDOW_MS_MAX);
const _: () = assert!(LEASES_PER_SKU_MAX <= POOLS_PER_SKU_MAX * 64);
