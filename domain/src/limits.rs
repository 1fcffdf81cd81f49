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
/// Price of one unit: positive and at most a billion minor units (ten million euros, a
/// billion yen, a million Bahraini dinars: prices in circulating ISO 4217 currencies have
/// 0, 2 or 3 decimals).
pub const PRICE_MINOR_UNITS_MAX: i64 = 1_000_000_000;
/// Orders per stock level: a pool with at most this share of its allocation left is LOW.
pub const LOW_STOCK_PERCENT: u32 = 10;

// Limits of the actor shell and the services (the domain only names them).

/// Mailbox of one SKU actor: room for a burst of 4,096 concurrent buyers on one hot SKU;
/// beyond that a buyer is told RESOURCE_EXHAUSTED at once instead of queueing for seconds.
pub const SKU_MAILBOX_CAPACITY: usize = 4_096;
/// Mailbox of one drop actor (operator commands and SKU start-ups).
pub const DROP_MAILBOX_CAPACITY: usize = 1_024;
/// Appends waiting for the journal writer, all actors together.
pub const JOURNAL_QUEUE_MAX: usize = 65_536;
/// Appends written and flushed together: one fsync for up to this many commands.
pub const JOURNAL_BATCH_MAX: usize = 8_192;
/// Snapshot parts (7 KiB each) the embedded journal writes between two batches of appends:
/// a big snapshot is written a slice at a time, so appends never wait for all of it.
pub const SNAPSHOT_SLICE_PARTS: usize = 16;
/// Bytes of snapshots queued for writing at once (a SKU with 100,000 holds: ~36 MB); a
/// further one is dropped, which only lengthens that stream's replay after a restart. One
/// snapshot is always accepted into an empty queue, whatever its size.
pub const SNAPSHOT_QUEUE_BYTES_MAX: usize = 256 * 1024 * 1024;
/// How long a caller waits for an actor's reply (queueing, decision, durable write).
pub const COMMAND_TIMEOUT_MS: u64 = 5_000;
/// How long a caller waits for an actor to start (recover from its journal). An actor
/// stopped while starting (its partition handed to another node) never reports, so the
/// wait must end on its own.
pub const ACTOR_START_TIMEOUT_MS: u64 = 30_000;
/// An actor stops (is passivated) after this long without messages; it is rebuilt from its
/// snapshot and journal on next use, or at its next deadline (see `actors::wakeups`).
pub const ACTOR_IDLE_STOP_MS: u64 = 30_000;
/// Running actors of one kind (SKUs, drops, hubs, creators) a process keeps by default
/// (`dropline serve --live-actors-max`). Starting one more asks the least recently used
/// running ones to passivate early, as idle ones do after `ACTOR_IDLE_STOP_MS`, so a burst
/// over a huge catalog cannot grow memory without end. A running SKU actor with one hold
/// costs about 10 KiB (kameo's task and mailbox about half of it), so 50,000 of them are
/// about 500 MiB: with a 100,000-SKU catalog it fits a 1 GiB container.
pub const LIVE_ACTORS_MAX_DEFAULT: usize = 50_000;
/// Share of the bound asked to passivate at once when it is exceeded (1/64: ~780 actors
/// at the default), so the scan for the least recently used runs once per that many starts.
pub const PASSIVATE_BATCH_DIVISOR: usize = 64;
/// How soon an actor asked to passivate early looks whether it can stop; while it cannot
/// (a journal write in flight, a full journal or wake-up queue) the wait doubles up to
/// `PASSIVATE_RETRY_MAX_MS`.
pub const PASSIVATE_POLL_MS: u64 = 1;
pub const PASSIVATE_RETRY_MAX_MS: u64 = 1_000;
/// Deadline registrations of stopping actors queued for the wake-up scheduler.
pub const WAKEUP_QUEUE_MAX: usize = 65_536;
/// Passivated actors woken for their deadlines at once.
pub const WAKE_CONCURRENCY: usize = 64;
/// A wake that failed (overload) is tried again this much later.
pub const WAKEUP_RETRY_MS: u64 = 1_000;
/// A deadline whose timer command could not run (journal full) is tried again this much later.
pub const TIMER_RETRY_MS: u64 = 100;
/// An actor snapshots after a quiet spell of `SNAPSHOT_QUIET_MS` without messages once this
/// many events accumulated since its last snapshot: between bursts, off the latency path.
pub const SNAPSHOT_IDLE_MIN_EVENTS: u64 = 1_000;
pub const SNAPSHOT_QUIET_MS: u64 = 500;
/// An actor that is never idle snapshots anyway after this many events, and after at least
/// `SNAPSHOT_STATE_FACTOR` times as many events as its state has entries (orders, keys,
/// per-buyer counts, deadlines: what a snapshot writes), so snapshot cost stays
/// O(1) per event however large the state grows and replay after a crash stays bounded.
pub const SNAPSHOT_BUSY_MIN_EVENTS: u64 = 20_000;
pub const SNAPSHOT_STATE_FACTOR: u64 = 4;
/// A state with at least this many entries is encoded for its snapshot off the runtime's
/// worker (`block_in_place`), so the tasks queued on that worker move to another thread.
pub const SNAPSHOT_OFF_WORKER_ENTRIES: u64 = 10_000;
/// Times a command is re-sent to a freshly started actor after it met a stopping one.
pub const ACTOR_RESTART_RETRIES: usize = 3;
/// Live WatchOrder subscriptions per process.
pub const ORDER_WATCHERS_MAX: usize = 100_000;
/// WatchDrop sends at most one update per this interval, coalescing changes in between.
pub const WATCH_DROP_INTERVAL_MS: u64 = 250;
/// Longest a server stream (WatchOrder, WatchDrop) stays open before the client must reconnect.
pub const WATCH_STREAM_MAX_MS: u64 = 3_600_000;
/// Concurrent gRPC streams per connection and concurrent requests per server.
pub const GRPC_CONCURRENT_STREAMS_MAX: u32 = 1_024;
pub const GRPC_REQUESTS_IN_FLIGHT_MAX: usize = 16_384;
/// Largest gRPC message accepted (a CreateDrop of 10,000 SKUs fits).
pub const GRPC_MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Request metadata HTTP/2 accepts (SETTINGS_MAX_HEADER_LIST_SIZE, decoded, each field
/// counted as name + value + 32 bytes). Past it h2 refuses the stream itself with HTTP 431
/// (clients read UNKNOWN) and, past about 1.8 times it, closes the whole connection with
/// GOAWAY, every other call on it included: h2 has no bound that fails only the one call.
/// 1 MiB (Go's `DefaultMaxHeaderBytes`) puts that cliff far above any plausible mistake, so
/// a bloated credential gets a clean status from `GRPC_*_BYTES_MAX` below instead. Memory
/// stays bounded: h2 holds at most one partial header block per connection.
pub const HTTP2_HEADER_LIST_BYTES_MAX: u32 = 1 << 20;
/// Streams of one connection that the server may reset for the client's protocol errors
/// before it closes the connection (h2's own default, the RUSTSEC-2024-0003 guard; tonic
/// turns the guard off unless it is set).
pub const HTTP2_LOCAL_ERROR_RESETS_MAX: usize = 1_024;
/// Longest `authorization` metadata value: a bearer credential is 68 characters, a JWT a
/// few KiB. Longer is refused UNAUTHENTICATED before any credential is hashed.
pub const GRPC_AUTHORIZATION_BYTES_MAX: usize = 8 * 1024;
/// All metadata of one request, counted as HTTP/2 counts it (name + value + 32 per field):
/// a gRPC request needs a few hundred bytes. More is RESOURCE_EXHAUSTED for that call only.
pub const GRPC_METADATA_BYTES_MAX: usize = 16 * 1024;
/// A TLS handshake not finished in this long is dropped, so a client that opens a
/// connection and stays silent does not hold it (and its memory) open.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// TCP keepalive on accepted gRPC connections (beside HTTP/2 pings), so connections of
/// vanished clients behind idle-dropping middleboxes are noticed by the kernel too.
pub const TCP_KEEPALIVE_SECS: u64 = 60;
/// Time given to in-flight calls to finish on shutdown.
pub const SHUTDOWN_DRAIN_MS: u64 = 10_000;
/// sled page cache of the embedded journal.
pub const JOURNAL_CACHE_BYTES: u64 = 64 * 1024 * 1024;

// Compile-time checks between related bounds: our per-call bounds must sit below what HTTP/2
// accepts, or an oversized request would never reach the check that answers it cleanly.
const _: () = assert!(GRPC_AUTHORIZATION_BYTES_MAX < GRPC_METADATA_BYTES_MAX);
const _: () = assert!(GRPC_METADATA_BYTES_MAX < HTTP2_HEADER_LIST_BYTES_MAX as usize);

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
/// Mailbox of one hub actor and of the registry actor.
pub const HUB_MAILBOX_CAPACITY: usize = 8_192;
pub const REGISTRY_MAILBOX_CAPACITY: usize = 1_024;
/// A confirmed order its hub has not acknowledged is sent again this long after (and every
/// this long while it stays unacknowledged): normally the first hand-over, right after the
/// confirm, succeeds and this never fires.
pub const HANDOVER_RETRY_MS: i64 = 30_000;

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
pub const CREATOR_MAILBOX_CAPACITY: usize = 4_096;
pub const CREATORS_MAX: usize = 1_000_000;
/// Storefronts the registry keeps (each one a web/app backend or a pop-up till).
pub const STOREFRONTS_MAX: usize = 100_000;

/// How long a delivery address is kept at most after its order is confirmed: same-day
/// fulfilment, the default 14-day return window and a margin. Delivery brings it forward
/// to the drop's return window after delivery; a cancellation, refund or failure to now.
pub const ADDRESS_RETENTION_MAX_MS: u64 = 30 * 86_400_000;
/// How long after a confirmation a retry of the same Confirm may still store its address
/// (the first store failed): long enough for a client's retries, too short to bring back an
/// address shredded after delivery, a refund or a cancellation.
pub const ADDRESS_STORE_RETRY_MS: u64 = 10 * 60_000;
/// How often a node shreds the addresses that are due, and how many it shreds at most in
/// one pass (the rest wait for the next pass; a pass never holds up anything else).
pub const ADDRESS_SHRED_INTERVAL_MS: u64 = 60_000;
pub const ADDRESS_SHRED_BATCH_MAX: usize = 10_000;
