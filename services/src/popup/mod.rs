//! `dropline edge`: a pop-up's till server. It sells the stock its upstream platform leased
//! it (`OperatorService.LeaseStock`), online or offline, from a journal of its own, and
//! uploads every sale through a durable outbox.
//!
//! - The tills call it with the platform's CheckoutService (Reserve, Confirm, Cancel,
//!   GetOrder, GetAvailability) and read how it stands with `PopupService.GetStatus`, both
//!   with the edge's storefront credential.
//! - Each leased SKU is a till actor (`domain::till`, hosted as any actor, journaled in the
//!   edge's own sled journal under `--data-dir`): a reserve or confirm is answered once its
//!   event is synced there, never after an upstream round trip.
//! - The uplink (`uplink`) mirrors the leases, uploads the outbox, tops leases up and
//!   fetches the drop's availability levels, and says the edge is offline when the upstream
//!   fails or answers slower than `--offline-after-ms`.
//!
//! Receipt keys (from `EdgeService.GetLease`) are kept in `<data-dir>/receipt-keys/`, one
//! file per lease key id, readable by the owner only: the edge signs receipts with them
//! offline and after a restart. They never enter the journal.

mod keys;
mod till_api;
mod uplink;

use crate::auth::Bearer;
use actors::clock::{Clock, SystemClock};
use actors::embedded::LocalActors;
use actors::journal::Journal;
use actors::projections::Projections;
use actors::sled_journal::SledJournal;
use actors::CommandBus;
use domain::till::TillState;
use domain::{DropId, SkuId};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::Endpoint;
use tracing::info;

pub use keys::ReceiptKeys;
pub use till_api::{PopupStatusService, TillCheckout};
pub use uplink::{LinkState, Uplink};

/// How `dropline edge` runs (the command line's flags, resolved).
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// The platform, as given (`http://…` or `https://…`), for messages.
    pub upstream_url: String,
    /// Its endpoint, with TLS set up for https://.
    pub upstream: Endpoint,
    /// The edge's storefront credential: upstream calls carry it, and tills present it.
    pub token: String,
    pub drop_id: DropId,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub timings: EdgeTimings,
    /// Top a lease up when fewer units than this are free (0: never) ...
    pub top_up_below: u32,
    /// ... by this many units, within the operator's allowance.
    pub top_up_units: u32,
}

/// The edge's bounds in time.
#[derive(Debug, Clone, Copy)]
pub struct EdgeTimings {
    /// An upstream call slower than this, or failing, turns the edge offline.
    pub offline_after: Duration,
    /// Leases are read again this often when online; offline, the upstream is probed every
    /// `probe_every`.
    pub sync_every: Duration,
    pub probe_every: Duration,
    /// The drop's availability levels are fetched this often.
    pub availability_every: Duration,
    /// How long a till's hold waits for its payment.
    pub hold_ttl: Duration,
    /// The outbox is looked at this often (and at once after a sale).
    pub upload_every: Duration,
}

impl Default for EdgeTimings {
    fn default() -> Self {
        EdgeTimings {
            offline_after: Duration::from_millis(1_500),
            sync_every: Duration::from_secs(5),
            probe_every: Duration::from_secs(1),
            availability_every: Duration::from_secs(60),
            hold_ttl: Duration::from_secs(300),
            upload_every: Duration::from_millis(500),
        }
    }
}

/// The tills this edge has (one per leased SKU), kept in `<data-dir>/tills` so that an edge
/// restarted offline still serves them.
pub struct Tills {
    path: PathBuf,
    known: RwLock<BTreeSet<(DropId, SkuId)>>,
}

impl Tills {
    fn load(path: PathBuf) -> anyhow::Result<Tills> {
        let mut known = BTreeSet::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let (drop_id, sku_id) = line
                        .split_once('/')
                        .ok_or_else(|| anyhow::anyhow!("{}: bad line {line:?}", path.display()))?;
                    known.insert((
                        DropId::parse(drop_id).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                        SkuId::parse(sku_id).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        }
        Ok(Tills {
            path,
            known: RwLock::new(known),
        })
    }

    pub fn all(&self) -> Vec<(DropId, SkuId)> {
        self.known.read().expect("tills lock").iter().cloned().collect()
    }

    pub fn contains(&self, drop_id: &DropId, sku_id: &SkuId) -> bool {
        self.known
            .read()
            .expect("tills lock")
            .contains(&(drop_id.clone(), sku_id.clone()))
    }

    /// Adds a till, written durably (temporary file, fsync, rename, fsync of the directory)
    /// before it is used.
    fn add(&self, drop_id: &DropId, sku_id: &SkuId) -> anyhow::Result<()> {
        let mut known = self.known.write().expect("tills lock");
        if !known.insert((drop_id.clone(), sku_id.clone())) {
            return Ok(());
        }
        let text: String = known.iter().map(|(d, s)| format!("{d}/{s}\n")).collect();
        keys::write_durably(&self.path, text.as_bytes())
    }
}

/// Everything the edge's services share.
#[derive(Clone)]
pub struct Edge {
    pub config: Arc<EdgeConfig>,
    pub bus: Arc<dyn CommandBus>,
    pub journal: Arc<dyn Journal>,
    pub clock: Arc<dyn Clock>,
    pub tills: Arc<Tills>,
    pub keys: Arc<ReceiptKeys>,
    pub uplink: Arc<Uplink>,
}

impl Edge {
    /// Opens the edge's data directory (journal, receipt keys, tills) and its uplink; no
    /// upstream call is made yet.
    pub fn open(config: EdgeConfig, clock: Arc<dyn Clock>) -> anyhow::Result<Edge> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", config.data_dir.display()))?;
        let store = SledJournal::open(&config.data_dir.join("journal"))
            .map_err(|e| anyhow::anyhow!("opening the journal in {}: {e}", config.data_dir.display()))?;
        let journal: Arc<dyn Journal> = store.clone();
        let actors = LocalActors::new(
            journal.clone(),
            clock.clone(),
            Arc::new(Projections::default()),
            store,
            crate::limits::EDGE_LIVE_TILLS_MAX,
        )?;
        actors.host::<TillState>();
        let keys = Arc::new(ReceiptKeys::open(config.data_dir.join("receipt-keys"))?);
        let tills = Arc::new(Tills::load(config.data_dir.join("tills"))?);
        let bearer = Bearer::new(&config.token)?;
        let uplink = Arc::new(Uplink::new(&config, bearer)?);
        Ok(Edge {
            config: Arc::new(config),
            bus: actors as Arc<dyn CommandBus>,
            journal,
            clock,
            tills,
            keys,
            uplink,
        })
    }

    /// Closes the journal: queued appends answered, the log checkpointed (on a blocking
    /// thread: it waits for the journal's writer).
    pub async fn close(&self) {
        let journal = self.journal.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || journal.close()).await {
            tracing::warn!(error = %e, "the journal did not close cleanly");
        }
    }
}

/// Runs `dropline edge` until SIGTERM or Ctrl-C.
pub async fn run(config: EdgeConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", config.listen))?;
    let edge = Edge::open(config, Arc::new(SystemClock))?;
    let stop = serve(edge.clone(), listener, crate::server::shutdown_signal()).await;
    edge.close().await;
    stop
}

/// Serves the tills on `listener` and runs the uplink until `shutdown` resolves.
pub async fn serve(
    edge: Edge,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let uplink = tokio::spawn(uplink::run(edge.clone(), stop_rx));
    let local = listener.local_addr()?;
    info!(
        addr = %local,
        upstream = %edge.config.upstream_url,
        drop_id = %edge.config.drop_id,
        tills = edge.tills.all().len(),
        "pop-up edge listening on {local}"
    );
    let served = till_api::serve(edge.clone(), listener, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = uplink.await;
    served
}
