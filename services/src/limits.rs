//! Bounds of the gRPC server and the services on it (HTTP/2 and request metadata, TLS and
//! TCP, shutdown, credentials, checkout call rates, streaming checkout, server streams and
//! pages, address shredding, configuration ranges), each with the reason it exists. What a
//! command may ask for is bounded in `domain::limits`, the actor shell in `actors::limits`.
//!
//! Relations the code relies on between these bounds (and the other crates') are checked at
//! compile time below each group: changing one bound alone cannot break them unnoticed.

use actors::cluster::placement::PARTITIONS_DEFAULT;
use actors::limits::ADDRESS_RETENTION_MAX_MS;
use actors::limits::COMMAND_TIMEOUT_MS;
use actors::limits::LIVE_ACTORS_MAX_DEFAULT;
use domain::limits::{IDEMPOTENCY_KEY_LEN_MAX, ID_LEN_MAX, PER_BUYER_LIMIT_MAX, STATEMENT_PAGE_MAX};

// HTTP/2 and gRPC.

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

// Our per-call bounds sit below what HTTP/2 accepts, or an oversized request would never
// reach the check that answers it cleanly.
const _: () = assert!(GRPC_AUTHORIZATION_BYTES_MAX < GRPC_METADATA_BYTES_MAX);
const _: () = assert!(GRPC_METADATA_BYTES_MAX < HTTP2_HEADER_LIST_BYTES_MAX as usize);

// Connections and shutdown.

/// A TLS handshake not finished in this long is dropped, so a client that opens a
/// connection and stays silent does not hold it (and its memory) open.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// TCP keepalive on accepted gRPC connections (beside HTTP/2 pings), so connections of
/// vanished clients behind idle-dropping middleboxes are noticed by the kernel too.
pub const TCP_KEEPALIVE_SECS: u64 = 60;
/// Time given to in-flight calls to finish on shutdown.
pub const SHUTDOWN_DRAIN_MS: u64 = 10_000;
/// Longest wait between SIGTERM and the drain (`--shutdown-delay-ms`).
pub const SHUTDOWN_DELAY_MS_MAX: u64 = 60_000;
/// How often a cluster node's readiness follows its NATS connection.
pub const NATS_CONNECTION_CHECK_MS: u64 = 1_000;

// The HTTP side (`services::http`: metrics, health, consoles).

/// Request header bytes (the request line and every field) and fields one HTTP request may
/// carry: a browser's request with the console's cookies needs a few KiB and a few dozen
/// fields. Beyond either, hyper answers 431 before any handler runs.
pub const HTTP_HEADER_BYTES_MAX: usize = 16 * 1024;
pub const HTTP_HEADERS_MAX: usize = 64;
/// A connection's read buffer (hyper's `max_buf_size`; hyper refuses less than 8 KiB).
pub const HTTP_READ_BUFFER_BYTES_MAX: usize = 64 * 1024;
/// A request body: the consoles' forms are small; larger is 413.
pub const HTTP_BODY_BYTES_MAX: usize = 64 * 1024;
/// Open HTTP connections; more wait in the listen backlog. Prometheus needs one per
/// scraper, a console one or a few per browser.
pub const HTTP_CONNECTIONS_MAX: usize = 1_024;
/// A request's headers must arrive within this long after the connection is ready for
/// them; this also closes an idle keep-alive connection.
pub const HTTP_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// A handler must start its response within this long (503 beyond). A stream's body (a
/// console's live updates) is not bounded by it.
pub const HTTP_REQUEST_TIMEOUT_MS: u64 = 10_000;

// hyper refuses a read buffer under 8 KiB, and one smaller than the header bound would
// refuse headers before the header bound could.
const _: () = assert!(HTTP_READ_BUFFER_BYTES_MAX >= 8 * 1024 && HTTP_READ_BUFFER_BYTES_MAX >= HTTP_HEADER_BYTES_MAX);
// Draining every connection is a bounded wait for as many permits as connections.
const _: () = assert!(HTTP_CONNECTIONS_MAX <= u32::MAX as usize);

// Telemetry.

/// Longest `x-request-id` taken from a client (a UUID is 36 characters, a W3C trace id 32);
/// a longer or odd one is replaced by a fresh id rather than logged.
pub const REQUEST_ID_LEN_MAX: usize = 128;
/// Spans waiting for the OTLP exporter; beyond, new ones are dropped (a collector that is
/// down must not grow the server's memory).
pub const OTLP_QUEUE_SPANS_MAX: usize = 4_096;
/// One OTLP export call, at most.
pub const OTLP_EXPORT_TIMEOUT_MS: u64 = 5_000;

// A request id fits the metadata bound with room to spare.
const _: () = assert!(REQUEST_ID_LEN_MAX < GRPC_METADATA_BYTES_MAX / 16);

// Credentials.

/// Shortest operator credential accepted.
pub const OPERATOR_TOKEN_LEN_MIN: usize = 16;
/// Longest credential looked at: every credential Dropline issues is 68 characters, and a
/// chosen operator token has no reason to be longer than this. A longer one is refused
/// before it is hashed.
pub const CREDENTIAL_LEN_MAX: usize = 512;

// Some operator token is long enough and short enough.
const _: () = assert!(OPERATOR_TOKEN_LEN_MIN <= CREDENTIAL_LEN_MAX);
// Every credential the authenticator would look at passes the metadata bound first (as
// `Bearer <credential>`), so that bound never refuses a credential the server issued.
const _: () = assert!("Bearer ".len() + CREDENTIAL_LEN_MAX <= GRPC_AUTHORIZATION_BYTES_MAX);

// Checkout call rates (`services::throttle`).

/// Default sustained checkout calls per second for one storefront: well above what one
/// node serves (the hot-SKU benchmark peaks near 60,000/s), so it only stops a runaway.
pub const STOREFRONT_CALLS_PER_SEC_DEFAULT: u32 = 200_000;
/// Default sustained reserves per second for one buyer of one storefront, and the burst a
/// buyer may use at once (a person reserving several SKUs the second a drop opens).
pub const BUYER_RESERVES_PER_SEC_DEFAULT: u32 = 5;
pub const BUYER_RESERVE_BURST_DEFAULT: u32 = 20;
/// Buyers tracked at once per node. When the table is full, buckets that have refilled are
/// dropped (they hold no information); if none has, a new buyer is let through untracked
/// rather than refused: the storefront bound still applies, and an attacker flooding fresh
/// buyer ids must not lock real buyers out.
pub const BUYER_BUCKETS_MAX: usize = 500_000;

// The configuration refuses a rate or burst of 0: the defaults must pass its check.
const _: () = assert!(
    STOREFRONT_CALLS_PER_SEC_DEFAULT >= 1 && BUYER_RESERVES_PER_SEC_DEFAULT >= 1 && BUYER_RESERVE_BURST_DEFAULT >= 1
);

// Streaming checkout (CheckoutService.ReserveStream).

/// Largest message CheckoutService accepts: every checkout request is small (an address is
/// the largest part of any but a ReserveStream message), so a client cannot make the
/// server buffer and decode 16 MiB (`GRPC_MESSAGE_BYTES_MAX`, for the operator's
/// CreateDrop) per call. Larger: OUT_OF_RANGE.
pub const CHECKOUT_MESSAGE_BYTES_MAX: usize = 256 * 1024;
/// Reserves in one ReserveStream message: a storefront's burst of buyers at once. A message
/// holding more (or none) is refused whole, INVALID_ARGUMENT, so one message's work (its
/// decisions, one journal batch per SKU) and its reply stay small.
pub const RESERVE_STREAM_REQUESTS_MAX: usize = 256;
/// Messages of one ReserveStream decided at once. The server reads no further message
/// until one of them is answered, so a storefront sending faster than Dropline decides is
/// held back by HTTP/2 flow control rather than queued for.
pub const RESERVE_STREAM_MESSAGES_IN_FLIGHT_MAX: usize = 4;
/// Answered messages of one stream waiting for the client to take them. With the client
/// not reading, the answering stops here, then the reading (backpressure), and after
/// `RESERVE_STREAM_REPLY_STALL_MS` the stream ends.
pub const RESERVE_STREAM_REPLIES_QUEUED_MAX: usize = 4;
/// How long an answer may wait for the client to read it before the stream is ended
/// (DEADLINE_EXCEEDED): a client that stopped reading does not keep the stream's slot and
/// buffers for ever. What it reserved stays reserved; its idempotency keys get it back.
pub const RESERVE_STREAM_REPLY_STALL_MS: u64 = 30_000;
/// Open ReserveStreams per client connection (a storefront needs a few; more connections
/// for more) and per server: each holds at most `RESERVE_STREAM_MESSAGES_IN_FLIGHT_MAX` +
/// `RESERVE_STREAM_REPLIES_QUEUED_MAX` messages, so these bound the memory all streams
/// can hold (256 × 8 × 256 KiB = 512 MiB in the worst case of maximal messages).
pub const RESERVE_STREAMS_PER_CONNECTION_MAX: usize = 8;
pub const RESERVE_STREAMS_MAX: usize = 256;

/// The largest ReserveRequest with every field at its longest valid length, encoded, with
/// its framing inside a ReserveStreamRequest: drop, SKU, hub and city ids (tag and
/// one-byte length each), the buyer id (two-byte length), the idempotency key (two-byte
/// length), the quantity (at most 1,000: two bytes), two flags, and the request's own tag
/// and length.
pub const RESERVE_REQUEST_BYTES_MAX: usize =
    4 * (ID_LEN_MAX + 2) + (2 * ID_LEN_MAX + 3) + (IDEMPOTENCY_KEY_LEN_MAX + 3) + 3 + 2 * 2 + 3;

// A message of the most reserves, each as long as a valid one can be, is accepted: only a
// message with invalid or unknown fields can meet the byte bound before the count bound.
const _: () = assert!(RESERVE_STREAM_REQUESTS_MAX * RESERVE_REQUEST_BYTES_MAX <= CHECKOUT_MESSAGE_BYTES_MAX);
const _: () = assert!(CHECKOUT_MESSAGE_BYTES_MAX <= GRPC_MESSAGE_BYTES_MAX);
// The length bytes counted above: an id fits a one-byte varint length, the buyer id and the
// key a two-byte one, the quantity a two-byte varint.
const _: () = assert!(ID_LEN_MAX < 128 && 2 * ID_LEN_MAX < 16_384 && IDEMPOTENCY_KEY_LEN_MAX < 16_384);
const _: () = assert!(PER_BUYER_LIMIT_MAX < 16_384);
// A connection's streams fit the server's, and its messages are answered before the stall bound
// (a message waits at most for its commands' timeout).
const _: () = assert!(RESERVE_STREAMS_PER_CONNECTION_MAX <= RESERVE_STREAMS_MAX);
const _: () = assert!(RESERVE_STREAMS_PER_CONNECTION_MAX <= GRPC_CONCURRENT_STREAMS_MAX as usize);
const _: () = assert!(COMMAND_TIMEOUT_MS < RESERVE_STREAM_REPLY_STALL_MS);

// Server streams and pages.

/// Longest a server stream (WatchOrder, WatchDrop, WatchSettlement, a courier's dispatch
/// stream) stays open before the client must reconnect.
pub const WATCH_STREAM_MAX_MS: u64 = 3_600_000;
/// WatchDrop sends at most one update per this interval, coalescing changes in between.
pub const WATCH_DROP_INTERVAL_MS: u64 = 250;
/// A pop-up edge is online, as the operator sees it, while its last call is at most this old
/// (an edge calls every `--sync-secs`, 5 s by default, and every second while it probes).
pub const EDGE_ONLINE_WITHIN_MS: i64 = 15_000;
/// WatchDrop looks again this often while a drop has edges: they go offline by falling silent.
pub const EDGE_PRESENCE_CHECK_MS: u64 = 2_000;
/// A node tells the others of an edge's contact at most this often.
pub const EDGE_CONTACT_SHARE_MS: i64 = 2_000;
/// Lines queued for one WatchSettlement client before the stream waits for it.
pub const SETTLEMENT_WATCH_BUFFER: usize = 256;
/// Statement lines per page when the client names no page size.
pub const STATEMENT_PAGE_DEFAULT: u32 = 100;
/// Page sizes of the registry's list calls.
pub const REGISTRY_PAGE_SIZE_DEFAULT: usize = 100;
pub const REGISTRY_PAGE_SIZE_MAX: usize = 1_000;
/// ListDrops: drops per page when the caller names no page size, and at most.
pub const LIST_DROPS_PAGE_DEFAULT: u32 = 50;
pub const LIST_DROPS_PAGE_MAX: u32 = 500;
/// ListDrops with a status filter reads at most this many drops per call (each may start
/// its drop actor), so a filter that matches nothing cannot make one call read them all:
/// the reply then says where to go on.
pub const LIST_DROPS_SCAN_MAX: usize = 2_000;
/// The web consoles (`console`). Sessions open at once, in all and per credential: a holder
/// of one credential signing in again and again replaces its own oldest session rather
/// than filling the store.
pub const SESSIONS_MAX: usize = 10_000;
pub const SESSIONS_PER_PRINCIPAL_MAX: usize = 32;
/// A console session ends after 30 minutes without a request, and 8 hours after sign-in
/// in any case (a working day; a stolen cookie is not good for longer).
pub const SESSION_IDLE_MS: u64 = 30 * 60 * 1_000;
pub const SESSION_LIFETIME_MS: u64 = 8 * 3_600 * 1_000;
/// Sign-in attempts per second and burst per peer address, and for all peers together,
/// and the peers remembered (past it, peers whose bucket has refilled are forgotten).
pub const SIGN_IN_PER_SEC: u32 = 1;
pub const SIGN_IN_BURST: u32 = 10;
pub const SIGN_IN_GLOBAL_PER_SEC: u32 = 20;
pub const SIGN_IN_GLOBAL_BURST: u32 = 100;
pub const SIGN_IN_PEERS_MAX: usize = 4_096;
/// One-time sign-in links kept at once, and how long one is good for.
pub const ONE_TIME_LINKS_MAX: usize = 64;
pub const ONE_TIME_LINK_TTL_MS: u64 = 10 * 60 * 1_000;
/// A console request's body: forms are a few fields; anything larger is refused (413).
pub const CONSOLE_BODY_BYTES_MAX: usize = 16 * 1_024;
/// Live streams (server-sent events) open at once across the consoles; past it, 503.
pub const CONSOLE_STREAMS_MAX: usize = 256;
/// Events queued for one live stream before it waits for its reader.
pub const CONSOLE_STREAM_BUFFER: usize = 16;
/// How often a live stream checks that its session is still valid.
pub const CONSOLE_STREAM_CHECK_MS: u64 = 15_000;
/// Rows per console page (statements, partners, drops, audit entries).
pub const CONSOLE_PAGE_SIZE: u32 = 50;
/// Statement lines read at most to list a period's returns and refunds.
pub const CONSOLE_RETURNS_SCAN_MAX: usize = 20_000;
/// The live board's reserve rate: units taken over this window, per second.
pub const RESERVE_RATE_WINDOW_MS: u64 = 10_000;
/// Streams listed per journal read while reconciling.
pub const RECONCILE_STREAMS_PAGE: usize = 1_000;

// A watched drop gets more than one update before its stream must be opened again.
const _: () = assert!(WATCH_DROP_INTERVAL_MS < WATCH_STREAM_MAX_MS);
// A default page is a page the domain serves whole.
const _: () = assert!(STATEMENT_PAGE_DEFAULT <= STATEMENT_PAGE_MAX);
const _: () = assert!(REGISTRY_PAGE_SIZE_DEFAULT <= REGISTRY_PAGE_SIZE_MAX);
// Reconciliation reads pages until one comes back short: an empty page size never would.
const _: () = assert!(RECONCILE_STREAMS_PAGE > 0);
// A live stream outlives no session, and a session is idle-bounded by its lifetime.
const _: () = assert!(SESSION_IDLE_MS < SESSION_LIFETIME_MS);
const _: () = assert!(CONSOLE_STREAM_CHECK_MS < SESSION_IDLE_MS);
const _: () = assert!(SESSIONS_PER_PRINCIPAL_MAX < SESSIONS_MAX);
const _: () = assert!(CONSOLE_PAGE_SIZE <= STATEMENT_PAGE_MAX);
// A full page is always within one call's scan.
const _: () = assert!(LIST_DROPS_PAGE_DEFAULT <= LIST_DROPS_PAGE_MAX);
const _: () = assert!(LIST_DROPS_PAGE_MAX as usize <= LIST_DROPS_SCAN_MAX);

// The platform.

/// How long a joining node waits for the registry's partition to be served.
pub const DIRECTORY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// SKU actors started at once to fill a drop's figures into the cache.
pub const FIGURES_LOAD_FAN_OUT: usize = 64;
/// Most partitions a cluster may have (each is a lease and a command subscription).
pub const PARTITIONS_MAX: u32 = 1_024;
/// The largest `live_actors_max` accepted (flag, environment or file).
pub const LIVE_ACTORS_MAX_UPPER: u64 = 100_000_000;
/// `--journal-segment-bytes` bounds: a segment holds at least a few large records (a
/// record is a group commit, up to `actors::limits::JOURNAL_BATCH_MAX` appends), and is
/// preallocated whole, so not more than a disk can spare at once.
pub const JOURNAL_SEGMENT_BYTES_MIN: u64 = 64 * 1024;
pub const JOURNAL_SEGMENT_BYTES_MAX: u64 = 1024 * 1024 * 1024;

// The defaults pass the configuration's own range checks.
const _: () = assert!(1 <= PARTITIONS_DEFAULT && PARTITIONS_DEFAULT <= PARTITIONS_MAX);
const _: () = assert!(1 <= LIVE_ACTORS_MAX_DEFAULT && LIVE_ACTORS_MAX_DEFAULT as u64 <= LIVE_ACTORS_MAX_UPPER);
const _: () = assert!(
    JOURNAL_SEGMENT_BYTES_MIN <= actors::limits::LOG_SEGMENT_BYTES
        && actors::limits::LOG_SEGMENT_BYTES <= JOURNAL_SEGMENT_BYTES_MAX
);

// Buyers' delivery addresses (the vault's retention bound is `actors::limits`).

/// How long after a confirmation a retry of the same Confirm may still store its address
/// (the first store failed): long enough for a client's retries, too short to bring back an
/// address shredded after delivery, a refund or a cancellation.
pub const ADDRESS_STORE_RETRY_MS: u64 = 10 * 60_000;
/// How often a node shreds the addresses that are due, and how many it shreds at most in
/// one pass (the rest wait for the next pass; a pass never holds up anything else).
pub const ADDRESS_SHRED_INTERVAL_MS: u64 = 60_000;
pub const ADDRESS_SHRED_BATCH_MAX: usize = 10_000;

// A due address waits at most one pass, a small part of the retention bound (and a zero
// period would make the shredder's interval panic).
const _: () = assert!(0 < ADDRESS_SHRED_INTERVAL_MS && ADDRESS_SHRED_INTERVAL_MS < ADDRESS_RETENTION_MAX_MS);
// A pass shreds something, or addresses would outlive the bound in the embedded vault.
const _: () = assert!(ADDRESS_SHRED_BATCH_MAX > 0);

// What buyers see.

/// Orders per stock level: a pool with at most this share of its allocation left is LOW.
pub const LOW_STOCK_PERCENT: u32 = 10;

// A pool with all of its allocation left is IN_STOCK, not LOW.
const _: () = assert!(LOW_STOCK_PERCENT < 100);

/// Till actors a pop-up edge keeps running (one per leased SKU; a stall leases a few).
pub const EDGE_LIVE_TILLS_MAX: usize = 1_024;
