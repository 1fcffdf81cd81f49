//! Bounds of the actor shell and of the platforms it runs on (mailboxes, the journal and
//! snapshots, command and start timeouts, passivation and wake-ups, outboxes, projections,
//! the address vault, a cluster's routing, storage and leases), each with the reason it
//! exists. What a command may ask for is bounded in `domain::limits`; the gRPC server's
//! bounds are in `services::limits`. Nothing is unbounded: a full queue answers
//! RESOURCE_EXHAUSTED instead of growing or waiting forever.
//!
//! Relations the code relies on between these bounds (and the domain's) are checked at
//! compile time below each group: changing one bound alone cannot break them unnoticed.

use domain::limits::{DEFAULT_RETURN_WINDOW_MS, HANDOVER_RETRY_MS};
use std::time::Duration;

// Mailboxes (kameo's default is 64: each capacity is chosen on purpose).

/// Mailbox of one SKU actor: room for a burst of 4,096 concurrent buyers on one hot SKU;
/// beyond that a buyer is told RESOURCE_EXHAUSTED at once instead of queueing for seconds.
pub const SKU_MAILBOX_CAPACITY: usize = 4_096;
/// Mailbox of one drop actor (operator commands and SKU start-ups).
pub const DROP_MAILBOX_CAPACITY: usize = 1_024;
/// Mailbox of one hub actor and of the registry actor.
pub const HUB_MAILBOX_CAPACITY: usize = 8_192;
pub const REGISTRY_MAILBOX_CAPACITY: usize = 1_024;
/// Mailbox of one creator's ledger actor, which the outboxes of the creator's SKUs and
/// hubs feed.
pub const CREATOR_MAILBOX_CAPACITY: usize = 4_096;
/// Mailbox of one till of a pop-up edge: its tills' reserves and confirms, a few per
/// second per till, and the uploader's reads.
pub const TILL_MAILBOX_CAPACITY: usize = 1_024;

// Commands.

/// How long a caller waits for an actor's reply (queueing, decision, durable write).
pub const COMMAND_TIMEOUT_MS: u64 = 5_000;
/// How long a caller waits for an actor to start (recover from its journal). An actor
/// stopped while starting (its partition handed to another node) never reports, so the
/// wait must end on its own.
pub const ACTOR_START_TIMEOUT_MS: u64 = 30_000;
/// Times a command is re-sent to a freshly started actor after it met a stopping one.
pub const ACTOR_RESTART_RETRIES: usize = 3;

// Recovering a large actor (replaying its journal) may take longer than a command may wait:
// the start outlives the command that caused it and serves the next one, instead of being
// given up before the command's own deadline.
const _: () = assert!(COMMAND_TIMEOUT_MS <= ACTOR_START_TIMEOUT_MS);

// The journal.

/// Appends waiting for the journal writer, all actors together.
pub const JOURNAL_QUEUE_MAX: usize = 65_536;
/// Appends written and flushed together: one fsync for up to this many commands.
pub const JOURNAL_BATCH_MAX: usize = 8_192;
/// Size of a segment of the embedded journal's event log (preallocated): a checkpoint (sled
/// flushed and `fsync`ed, with the point of the log it holds) follows each new segment, so
/// this is also about how much the log replays into sled at most after a crash, and how often
/// the writer pays a checkpoint.
pub const LOG_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// While the journal refuses writes because its disk is full, the writer tries again (the
/// log's write and sync, or reopening sled) after the first interval, doubling up to the
/// longest: writes resume at most that long after space is freed, and a full disk costs a
/// few attempts a second, not a busy loop. Callers are told to retry after the longest.
pub const JOURNAL_RETRY_FIRST_MS: u64 = 100;
pub const JOURNAL_RETRY_MAX_MS: u64 = 2_000;
/// A group commit's write and sync slower than this is logged (a warning per such sync):
/// every reply of the batch waited for it, so an operator sees a slow disk before callers
/// reach their deadlines.
pub const JOURNAL_SLOW_SYNC_MS: u64 = 1_000;
/// sled is reopened after a failed write (its errors are sticky until then) only with at
/// least this much free space in its directory: closing it gives up the reads it still
/// serves from memory, so not while the disk is still full. Room for a few of its 512 KiB
/// segments and the log's records replayed into it.
pub const SLED_REOPEN_FREE_BYTES_MIN: u64 = 8 * 1024 * 1024;
/// Size of a segment of the address vault's log, which holds only the vault's changes
/// (sealed addresses, their salts, shreds) and loses them at every checkpoint.
pub const VAULT_LOG_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// The longest a record waits for a checkpoint once written, however little follows it: so
/// the log replays at most this much after a crash, and a sealed address or a shredded one
/// leaves the vault's log within a minute (beside the vault's own retention bound).
pub const LOG_CHECKPOINT_INTERVAL_MS: u64 = 60_000;
/// sled page cache of the embedded journal (and of a cluster node's local snapshots).
pub const JOURNAL_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Streams with an append in flight at once in the cluster journal; beyond it requests wait
/// in the bounded queue.
pub const JOURNAL_STREAMS_IN_FLIGHT_MAX: usize = 4_096;
/// A message of the cluster journal carries at most this many bytes of events (NATS'
/// default max_payload is 1 MiB); a stream's waiting batches share one while they fit.
pub const JOURNAL_MESSAGE_BYTES_MAX: usize = 512 * 1024;
/// Reading a stream's journal in a cluster (an actor's recovery) gives up after this long.
pub const JOURNAL_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// An append to the cluster journal (and its wake-up write) gives up after this long; the
/// actor then restarts from what is durable.
pub const JOURNAL_APPEND_TIMEOUT: Duration = Duration::from_secs(10);

// The writer takes a batch out of its queue: a batch larger than the queue would never fill.
const _: () = assert!(JOURNAL_BATCH_MAX <= JOURNAL_QUEUE_MAX);
const _: () = assert!(0 < JOURNAL_RETRY_FIRST_MS && JOURNAL_RETRY_FIRST_MS <= JOURNAL_RETRY_MAX_MS);
// A message of several batches stays under NATS' default max_payload (1 MiB), with room
// for the message's own framing.
const _: () = assert!(JOURNAL_MESSAGE_BYTES_MAX < 1024 * 1024);

// Snapshots.

/// Snapshot parts (7 KiB each) the embedded journal writes between two batches of appends:
/// a big snapshot is written a slice at a time, so appends never wait for all of it.
pub const SNAPSHOT_SLICE_PARTS: usize = 16;
/// Bytes of snapshots queued for writing at once (a SKU with 100,000 holds: ~36 MB); a
/// further one is dropped, which only lengthens that stream's replay after a restart. One
/// snapshot is always accepted into an empty queue, whatever its size.
pub const SNAPSHOT_QUEUE_BYTES_MAX: usize = 256 * 1024 * 1024;
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

// Snapshots are taken in quiet spells first: the busy threshold is only the fallback for
// an actor that is never idle (reached first, it would take every snapshot on the hot path).
const _: () = assert!(SNAPSHOT_IDLE_MIN_EVENTS < SNAPSHOT_BUSY_MIN_EVENTS);

// Idle actors, passivation and wake-ups.

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

/// Share of the bound on running actors (`LIVE_ACTORS_MAX_DEFAULT`, `--live-actors-max`)
/// asked to passivate at once when it is exceeded (1/64: ~780 actors at the default), so the
/// scan for the least recently used runs once per that many starts.
pub const PASSIVATE_BATCH_DIVISOR: usize = 64;
/// How soon an actor asked to passivate early looks whether it can stop; while it cannot
/// (a journal write in flight, a full journal or wake-up queue) the wait doubles up to
/// `PASSIVATE_RETRY_MAX_MS`.
pub const PASSIVATE_POLL_MS: u64 = 1;
pub const PASSIVATE_RETRY_MAX_MS: u64 = 1_000;
/// How often stopped actors are forgotten by the registries.
pub const REGISTRY_SWEEP_MS: u64 = 5_000;
/// Deadline registrations of stopping actors queued for the wake-up scheduler.
pub const WAKEUP_QUEUE_MAX: usize = 65_536;
/// Passivated actors woken for their deadlines at once.
pub const WAKE_CONCURRENCY: usize = 64;
/// A wake that failed (overload) is tried again this much later.
pub const WAKEUP_RETRY_MS: u64 = 1_000;
/// A deadline whose timer command could not run (journal full) is tried again this much later.
pub const TIMER_RETRY_MS: u64 = 100;

// The passivation wait doubles from its first value: from zero it would never grow (a busy
// loop), and it starts below its ceiling.
const _: () = assert!(0 < PASSIVATE_POLL_MS && PASSIVATE_POLL_MS <= PASSIVATE_RETRY_MAX_MS);
// A timer command waiting for its retry keeps its actor running: with a retry later than
// the idle stop, the actor would stop and be woken at once for its past deadline instead.
const _: () = assert!(TIMER_RETRY_MS < ACTOR_IDLE_STOP_MS);

/// A state of n entries is checked at most once every n / `INVARIANT_CHECK_SHARE` events:
/// a check costs O(n), so this bounds it to O(`INVARIANT_CHECK_SHARE`) per event and keeps
/// debug builds usable with a hot SKU of 100,000 holds, while a small state (every state in
/// the unit and service tests but the largest) is checked after every batch.
pub const INVARIANT_CHECK_SHARE: u64 = 16;

// Outboxes and fan-out.

/// Quick attempts per order of the SKU's hand-over to its hub (a burst can fill a hub's
/// mailbox for a moment), and the first back-off (each next one four times longer); beyond
/// them the durable retry deadline (`HANDOVER_RETRY_MS`) takes over, so tasks never pile up.
pub const HANDOVER_ATTEMPTS: u32 = 3;
pub const HANDOVER_BACKOFF_MS: u64 = 100;
/// SKU actors told about a drop's sale status change at once.
pub const SALE_STATUS_FAN_OUT: usize = 64;

/// How long one order's quick hand-over attempts take at most while its hub runs: each
/// waits up to a command's timeout, with the back-offs between them.
const fn handover_attempts_ms() -> u64 {
    let mut total = HANDOVER_ATTEMPTS as u64 * COMMAND_TIMEOUT_MS;
    let (mut backoff, mut attempt) = (HANDOVER_BACKOFF_MS, 1);
    while attempt < HANDOVER_ATTEMPTS {
        total += backoff;
        backoff *= 4;
        attempt += 1;
    }
    total
}

// One order's quick attempts are over (while its hub runs) before the durable retry
// deadline sends the order again: the retry follows them rather than running beside them.
const _: () = assert!(HANDOVER_ATTEMPTS >= 1 && handover_attempts_ms() < HANDOVER_RETRY_MS as u64);

// Projections.

/// Live WatchOrder subscriptions per process.
pub const ORDER_WATCHERS_MAX: usize = 100_000;
/// Offers and withdrawals queued per courier stream; a courier that falls this far behind
/// is disconnected (it gets its unanswered offers again when it reconnects).
pub const COURIER_STREAM_BUFFER: usize = 1_024;
/// Streams one partner may have open at once (devices of one courier company).
pub const COURIER_STREAMS_PER_PARTNER: usize = 16;
/// Lines buffered per creator for live watchers; a watcher that falls further behind reads
/// the lines it missed from the ledger (nothing is lost, see `WatchSettlement`).
pub const SETTLEMENT_FEED_BUFFER: usize = 1_024;
/// Creators with live watchers at once.
pub const SETTLEMENT_FEEDS_MAX: usize = 100_000;

// Buyers' delivery addresses.

/// How long a delivery address is kept at most after its order is confirmed: same-day
/// fulfilment, the default 14-day return window and a margin. Delivery brings it forward
/// to the drop's return window after delivery; a cancellation, refund or failure to now.
pub const ADDRESS_RETENTION_MAX_MS: u64 = 30 * 86_400_000;
/// Records a shredding pass of a cluster's address bucket looks at, at most, per address it
/// may shred: the bucket has no index by time, so a pass reads records until it has found
/// its limit of due ones or this many times that limit (the bucket's max age bounds what is
/// left over anyway).
pub const ADDRESS_SHRED_SCAN_FACTOR: usize = 64;

// An address is kept through the default return window (a return is collected from it).
const _: () = assert!(DEFAULT_RETURN_WINDOW_MS < ADDRESS_RETENTION_MAX_MS);

// A cluster: routing commands between nodes.

/// Commands from other nodes handled at once; beyond it they get RESOURCE_EXHAUSTED.
pub const REMOTE_COMMANDS_MAX: usize = 8_192;
/// Commands for one partition sent to its owner as one NATS request at most, and such
/// requests in flight per partition at once: under load, commands queued meanwhile go
/// together, as the journal group-commits (one request/reply per batch, not per buyer).
pub const ROUTE_BATCH_MAX: usize = 256;
pub const ROUTE_BATCHES_IN_FLIGHT: usize = 4;
/// Commands waiting for a partition's sender; beyond it RESOURCE_EXHAUSTED.
pub const ROUTE_QUEUE_MAX: usize = 8_192;
/// First and longest wait before asking a partition again while it has no owner.
pub const ROUTE_BACKOFF_MIN: Duration = Duration::from_millis(10);
pub const ROUTE_BACKOFF_MAX: Duration = Duration::from_millis(250);

// A batch is taken out of the partition's queue: a larger batch would never fill.
const _: () = assert!(ROUTE_BATCH_MAX <= ROUTE_QUEUE_MAX);
// The back-off doubles from its first value: from zero it would never grow (a busy loop).
const _: () =
    assert!(0 < ROUTE_BACKOFF_MIN.as_millis() && ROUTE_BACKOFF_MIN.as_millis() <= ROUTE_BACKOFF_MAX.as_millis());

// A cluster: projection updates between nodes.

/// Projection messages queued for publishing; beyond it updates are dropped (the caches
/// they feed are refreshed by the next change, and readers can ask the actor).
pub const PROJECTION_QUEUE_MAX: usize = 16_384;
/// Publications of projection updates sent as one NATS message at most.
pub const PROJECTION_BATCH_MAX: usize = 1_024;
/// How long the first queued projection update waits for others to share its message: the
/// staleness it adds to other nodes' caches.
pub const PROJECTION_LINGER: Duration = Duration::from_millis(10);
/// Projection messages whose storage acknowledgement is awaited at once.
pub const PROJECTION_ACKS_PENDING: usize = 64;
/// How long a node waits before sending again the projection updates the events stream did
/// not store (a leader election takes about this long).
pub const PROJECTION_RETRY: Duration = Duration::from_millis(500);
/// How often a node publishes again the figures of the SKUs it owns that changed within
/// `PROJECTION_RESYNC_WINDOW`, so that a node that missed updates catches up.
pub const PROJECTION_RESYNC: Duration = Duration::from_secs(5);
pub const PROJECTION_RESYNC_WINDOW: Duration = Duration::from_secs(600);
/// Projection updates stay this long in the events stream, within this many bytes.
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(3_600);
pub const EVENTS_MAX_BYTES: i64 = 256 << 20;
/// Pull requests of a node's projection consumer last this long, with heartbeats this often.
pub const EVENTS_PULL_EXPIRES: Duration = Duration::from_secs(2);
pub const EVENTS_PULL_HEARTBEAT: Duration = Duration::from_millis(500);
/// How often a node checks that the events stream has not gone back behind its consumer
/// (see `cluster::node::watch_events_consumer`).
pub const EVENTS_CONSUMER_CHECK: Duration = Duration::from_secs(3);
/// After following the events stream again, how long a node waits for its new consumer
/// before it reads the registry's directory again, and how long it keeps asking.
pub const EVENTS_REFOLLOW_WAIT: Duration = Duration::from_secs(10);
pub const DIRECTORY_RELOAD_WAIT: Duration = Duration::from_secs(30);
/// Updates delivered to a node and not yet acknowledged, at most.
pub const EVENTS_ACK_PENDING_MAX: i64 = 10_000;

// A batch is taken out of the publishing queue: a larger batch would never fill.
const _: () = assert!(PROJECTION_BATCH_MAX <= PROJECTION_QUEUE_MAX);
// JetStream refuses a pull request whose idle heartbeat is over half its expiry.
const _: () = assert!(2 * EVENTS_PULL_HEARTBEAT.as_millis() <= EVENTS_PULL_EXPIRES.as_millis());

// A cluster: storage and leases.

/// How long a starting node waits for JetStream (a new JetStream cluster elects leaders).
pub const STORAGE_WAIT: Duration = Duration::from_secs(60);
/// Default lease timings (`--lease-ttl-ms`, `--lease-renew-ms`): a partition's lease lapses
/// this long after its owner's last renewal, which happens this often. Takeover after a node
/// dies takes about the sum.
pub const LEASE_TTL_MS_DEFAULT: u64 = 5_000;
pub const LEASE_RENEW_MS_DEFAULT: u64 = 1_000;
/// A lease's TTL spans at least this many renewals, so one late or lost renewal does not
/// lose the partition.
pub const LEASE_TTL_RENEWALS_MIN: u32 = 3;
/// A node gives up a lease it could not renew at least this long (or one renewal interval,
/// if longer) before the bucket lets another node take it: its own fencing.
pub const LEASE_FENCE_MARGIN_MS_MIN: u64 = 500;

// The default timings pass `LeaseTimings::validate`, or a node started without flags
// would refuse to join.
const _: () = assert!(LEASE_TTL_MS_DEFAULT >= LEASE_TTL_RENEWALS_MIN as u64 * LEASE_RENEW_MS_DEFAULT);
// With the default timings a node fences itself some time after its last renewal, not at
// once (`LeaseTimings::self_fence_after`).
const _: () =
    assert!(LEASE_TTL_MS_DEFAULT > LEASE_RENEW_MS_DEFAULT && LEASE_TTL_MS_DEFAULT > LEASE_FENCE_MARGIN_MS_MIN);
