//! Every bound in Dropline, in one place, with the reason it exists. Nothing is unbounded:
//! a full queue or table answers RESOURCE_EXHAUSTED instead of growing or waiting forever.

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
/// Price of one unit: positive and below ten million major units of any currency.
pub const PRICE_MINOR_UNITS_MAX: i64 = 1_000_000_000;
/// Orders per stock level: a pool with at most this share of its allocation left is LOW.
pub const LOW_STOCK_PERCENT: u32 = 10;
