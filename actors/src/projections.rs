//! Read-side projections that actors update after every durable batch, so that hot reads
//! (availability, live drop figures, order watches) never queue behind buyers in a SKU's
//! mailbox. Staleness is bounded by one group commit: an actor publishes as soon as the
//! journal has flushed the batch that changed it.

use crate::audit_log::{AuditEntry, AuditLog};
use crate::fulfilment::{CourierUpdate, HubLoad};
use crate::limits::ORDER_WATCHERS_MAX;
use domain::drop::{DropSpec, SaleStatus};
use domain::hub::Dispatch;
use domain::ledger::Entry;
use domain::registry::{CreatorRecord, HubRecord, PartnerRecord, StorefrontRecord};
use domain::sku::{OrderView, SkuFigures, SkuState};
use domain::{CreatorId, DropId, HubId, OrderId, PartnerId, SkuId, StorefrontId, UnixMillis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use tokio::sync::watch;

#[derive(Default)]
pub struct Projections {
    pub availability: AvailabilityCache,
    pub orders: OrderWatchers,
    pub directory: crate::fulfilment::Directory,
    pub couriers: crate::fulfilment::Couriers,
    pub hub_loads: crate::fulfilment::HubLoads,
    pub settlement: crate::settlement_feed::SettlementFeed,
    /// When each pop-up edge last called the platform (on any node).
    pub edge_contacts: EdgeContacts,
    /// In a cluster: where updates go so that every other node's projections follow (the
    /// gRPC call reading them may land on any node). Unset on the embedded platform.
    remote: OnceLock<Arc<dyn RemoteProjections>>,
    /// Where audit entries are written (this process's audit store).
    audit: OnceLock<Arc<dyn AuditLog>>,
    /// Told, on the node of the order's hub, when a delivery's fulfilment ended (delivered:
    /// `true`; failed or withdrawn: `false`): the address vault's retention follows it.
    fulfilment_ended: OnceLock<FulfilmentEndedHook>,
}

/// See [`Projections::set_fulfilment_ended`].
pub type FulfilmentEndedHook = Arc<dyn Fn(&OrderId, bool) + Send + Sync>;

/// One change of a projection, as an actor publishes it after a durable batch. In a
/// cluster it travels to every node, so it is serializable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ProjectionUpdate {
    Drop {
        spec: Arc<DropSpec>,
        status: SaleStatus,
        just_created: bool,
    },
    Sku(SkuFigures),
    Order(OrderView),
    Tracking(Arc<Dispatch>),
    Courier {
        partner: PartnerId,
        update: CourierUpdate,
    },
    HubLoad(HubLoad),
    Settlement {
        creator: CreatorId,
        entries: Vec<Arc<Entry>>,
    },
    Hub(HubRecord),
    Partner(PartnerRecord),
    Creator(CreatorRecord),
    /// An entry of the operators' audit trail: every node keeps the whole trail.
    Audit(AuditEntry),
    Storefront(StorefrontRecord),
    /// A pop-up edge called the platform at `at`.
    EdgeContact {
        edge: StorefrontId,
        at: UnixMillis,
    },
}

/// When each pop-up edge last called the platform: whether it is online, as the operator
/// sees it. At most one entry per storefront (the directory bounds those).
#[derive(Default)]
pub struct EdgeContacts {
    last: RwLock<HashMap<StorefrontId, UnixMillis>>,
}

impl EdgeContacts {
    pub fn get(&self, edge: &StorefrontId) -> Option<UnixMillis> {
        self.last.read().expect("contacts lock").get(edge).copied()
    }

    /// Records a contact (the later one wins); whether it moved the edge's last contact by at
    /// least `share_after_ms`, so worth telling the other nodes.
    pub fn record(&self, edge: &StorefrontId, at: UnixMillis, share_after_ms: i64) -> bool {
        let mut last = self.last.write().expect("contacts lock");
        let entry = last.entry(edge.clone()).or_insert(UnixMillis(i64::MIN));
        if at <= *entry {
            return false;
        }
        let worth = at.0.saturating_sub(entry.0) >= share_after_ms;
        *entry = at;
        worth
    }
}

/// Carries projection updates to the other nodes of a cluster.
pub trait RemoteProjections: Send + Sync + 'static {
    fn publish(&self, updates: &[ProjectionUpdate]);
}

impl Projections {
    /// Writes audit entries to `log` from now on.
    pub fn set_audit(&self, log: Arc<dyn AuditLog>) {
        let _ = self.audit.set(log);
    }

    /// Calls `hook` whenever a hub of this process ends a delivery's fulfilment.
    pub fn set_fulfilment_ended(&self, hook: FulfilmentEndedHook) {
        let _ = self.fulfilment_ended.set(hook);
    }

    /// A hub ended the fulfilment of delivery `order_id` (`delivered` or not).
    pub fn fulfilment_ended(&self, order_id: &OrderId, delivered: bool) {
        if let Some(hook) = self.fulfilment_ended.get() {
            hook(order_id, delivered);
        }
    }

    /// Sends every update to the other nodes from now on (cluster mode).
    pub fn set_remote(&self, remote: Arc<dyn RemoteProjections>) {
        let _ = self.remote.set(remote);
    }

    /// Whether updates leave this process: then watchers anywhere may want any order's or
    /// creator's updates, and actors cannot skip them by looking at local watchers only.
    pub fn is_shared(&self) -> bool {
        self.remote.get().is_some()
    }

    /// Whether some watcher (here, or on another node) may want this order's updates.
    pub fn wants_order(&self, order_id: &OrderId) -> bool {
        self.is_shared() || self.orders.is_watched(order_id)
    }

    /// Whether any order may be watched at all (a cheap test before looking at each).
    pub fn wants_orders(&self) -> bool {
        self.is_shared() || !self.orders.is_empty()
    }

    /// Whether some watcher may want this creator's new statement lines.
    pub fn wants_settlement(&self, creator: &CreatorId) -> bool {
        self.is_shared() || self.settlement.is_watched(creator)
    }

    /// Applies updates here and hands them to the other nodes, if any.
    pub fn emit(&self, updates: Vec<ProjectionUpdate>) {
        if updates.is_empty() {
            return;
        }
        if let Some(remote) = self.remote.get() {
            remote.publish(&updates);
        }
        for update in updates {
            self.apply(update);
        }
    }

    /// Applies one update to this process's projections only (updates from other nodes).
    pub fn apply(&self, update: ProjectionUpdate) {
        match update {
            ProjectionUpdate::Drop {
                spec,
                status,
                just_created,
            } => self.availability.put_drop(spec, status, just_created),
            ProjectionUpdate::Sku(figures) => self.availability.put_sku(figures),
            ProjectionUpdate::Order(view) => self.orders.publish(view),
            ProjectionUpdate::Tracking(dispatch) => self.orders.publish_tracking(dispatch),
            ProjectionUpdate::Courier { partner, update } => self.couriers.send(&partner, update),
            ProjectionUpdate::HubLoad(load) => {
                if self.hub_loads.put(load) {
                    self.availability.touch();
                }
            }
            ProjectionUpdate::Settlement { creator, entries } => self.settlement.publish(&creator, entries),
            ProjectionUpdate::Hub(record) => self.directory.put_hub(record),
            ProjectionUpdate::Partner(record) => self.directory.put_partner(record),
            ProjectionUpdate::Creator(record) => self.directory.put_creator(record),
            ProjectionUpdate::Storefront(record) => self.directory.put_storefront(record),
            ProjectionUpdate::EdgeContact { edge, at } => {
                self.edge_contacts.record(&edge, at, 0);
            }
            ProjectionUpdate::Audit(entry) => match self.audit.get() {
                Some(log) => log.record(&entry),
                None => tracing::warn!(action = %entry.action, "no audit store; entry dropped"),
            },
        }
    }
}

/// What a WatchOrder stream follows: the order (from its SKU) and, once confirmed, its
/// dispatch (from its hub).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    pub order: Option<OrderView>,
    pub tracking: Option<Arc<Dispatch>>,
}

struct DropEntry {
    spec: Arc<DropSpec>,
    status: SaleStatus,
    skus: BTreeMap<SkuId, Arc<SkuFigures>>,
}

/// The drop as the cache knows it: the spec, the recorded status and the figures of every
/// SKU (from its actor, or from the spec if its actor has not run yet).
#[derive(Debug, Clone)]
pub struct CachedDrop {
    pub spec: Arc<DropSpec>,
    pub status: SaleStatus,
    pub skus: Vec<Arc<SkuFigures>>,
    /// SKUs whose actor has not published figures since this process started: their entry
    /// in `skus` is the SKU's initial state, right only if it was never used. Readers that
    /// need exact figures start those actors ([`SkuCommand::GetFigures`]) and read again.
    pub missing: Vec<SkuId>,
}

/// Units of one hub's pools, summed (see [`AvailabilityCache::totals_by_hub`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HubTotals {
    pub allocated: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
    pub waitlisted: u64,
}

/// Exact per-pool figures of every SKU, by drop. Buyers see levels derived from them;
/// operators see them as they are.
pub struct AvailabilityCache {
    drops: RwLock<HashMap<DropId, DropEntry>>,
    /// Bumped on every change, so watchers wake without polling.
    version: watch::Sender<u64>,
}

impl Default for AvailabilityCache {
    fn default() -> Self {
        AvailabilityCache {
            drops: RwLock::new(HashMap::new()),
            version: watch::channel(0).0,
        }
    }
}

impl AvailabilityCache {
    /// Records a drop and its status. `just_created`: the drop was created by this very
    /// publication, so its SKUs cannot have any history yet and their initial figures are
    /// exact (no SKU actor needs starting to know them).
    pub fn put_drop(&self, spec: Arc<DropSpec>, status: SaleStatus, just_created: bool) {
        let mut drops = self.drops.write().expect("cache lock");
        let entry = drops.entry(spec.drop_id.clone()).or_insert_with(|| DropEntry {
            spec: spec.clone(),
            status,
            skus: BTreeMap::new(),
        });
        entry.status = status;
        if just_created {
            for sku in &spec.skus {
                entry.skus.entry(sku.sku_id.clone()).or_insert_with(|| {
                    let mut fresh = SkuState::new(&spec, sku);
                    fresh.sale = status;
                    Arc::new(fresh.figures())
                });
            }
        }
        drop(drops);
        self.version.send_modify(|v| *v += 1);
    }

    pub fn put_sku(&self, figures: SkuFigures) {
        let mut drops = self.drops.write().expect("cache lock");
        // A SKU actor starts only after its drop actor has published the drop.
        if let Some(entry) = drops.get_mut(&figures.drop_id) {
            // Figures older than those held (a former owner's, arriving late) are not taken:
            // a SKU's change times only grow, through takeovers too (replayed events carry
            // them).
            if let Some(held) = entry.skus.get(&figures.sku_id) {
                if held.changed_at > figures.changed_at {
                    tracing::debug!(
                        drop_id = %figures.drop_id,
                        sku_id = %figures.sku_id,
                        held_changed_at = held.changed_at.0,
                        offered_changed_at = figures.changed_at.0,
                        "older SKU figures not taken"
                    );
                    return;
                }
            }
            entry.skus.insert(figures.sku_id.clone(), Arc::new(figures));
        }
        drop(drops);
        self.version.send_modify(|v| *v += 1);
    }

    /// Figures of every cached SKU changed at or after `since` for which `keep` holds.
    pub fn changed_since(&self, since: UnixMillis, keep: impl Fn(&DropId, &SkuId) -> bool) -> Vec<Arc<SkuFigures>> {
        let drops = self.drops.read().expect("cache lock");
        drops
            .iter()
            .flat_map(|(drop_id, entry)| {
                entry
                    .skus
                    .iter()
                    .filter(|(sku_id, f)| f.changed_at >= since && keep(drop_id, sku_id))
                    .map(|(_, f)| f.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn spec(&self, drop_id: &DropId) -> Option<Arc<DropSpec>> {
        self.drops
            .read()
            .expect("cache lock")
            .get(drop_id)
            .map(|e| e.spec.clone())
    }

    pub fn get(&self, drop_id: &DropId) -> Option<CachedDrop> {
        let drops = self.drops.read().expect("cache lock");
        let entry = drops.get(drop_id)?;
        let mut missing = Vec::new();
        let skus = entry
            .spec
            .skus
            .iter()
            .map(|sku| match entry.skus.get(&sku.sku_id) {
                Some(figures) => figures.clone(),
                None => {
                    missing.push(sku.sku_id.clone());
                    let mut fresh = SkuState::new(&entry.spec, sku);
                    fresh.sale = entry.status;
                    Arc::new(fresh.figures())
                }
            })
            .collect();
        Some(CachedDrop {
            spec: entry.spec.clone(),
            status: entry.status,
            skus,
            missing,
        })
    }

    /// Units per hub summed over every SKU of every drop the cache knows (SKUs not seen
    /// since this process started count with their initial figures), by hub id: for the
    /// server's metrics. One pass under the read lock.
    pub fn totals_by_hub(&self) -> BTreeMap<HubId, HubTotals> {
        let drops = self.drops.read().expect("cache lock");
        let mut totals: BTreeMap<HubId, HubTotals> = BTreeMap::new();
        for entry in drops.values() {
            for figures in entry.skus.values() {
                for pool in &figures.pools {
                    let hub = totals.entry(pool.pool.hub_id.clone()).or_default();
                    hub.allocated += u64::from(pool.pool.allocated);
                    hub.available += u64::from(pool.pool.available);
                    hub.held += u64::from(pool.pool.held);
                    hub.sold += u64::from(pool.pool.sold);
                    hub.waitlisted += u64::from(pool.waitlisted);
                }
            }
        }
        totals
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Wakes drop watchers for a change outside the cache (a hub's load).
    pub fn touch(&self) {
        self.version.send_modify(|v| *v += 1);
    }
}

/// Live WatchOrder subscriptions, by order id. Bounded by `ORDER_WATCHERS_MAX`.
#[derive(Default)]
pub struct OrderWatchers {
    watched: Mutex<HashMap<OrderId, watch::Sender<Watched>>>,
    /// Number of entries, read without the lock on the hot path.
    count: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
#[error("too many order watches ({0} at most)")]
pub struct TooManyWatchers(pub usize);

impl OrderWatchers {
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Relaxed) == 0
    }

    pub fn is_watched(&self, order_id: &OrderId) -> bool {
        self.watched.lock().expect("watchers lock").contains_key(order_id)
    }

    pub fn subscribe(&self, order_id: &OrderId) -> Result<watch::Receiver<Watched>, TooManyWatchers> {
        let mut watched = self.watched.lock().expect("watchers lock");
        if let Some(sender) = watched.get(order_id) {
            return Ok(sender.subscribe());
        }
        if watched.len() >= ORDER_WATCHERS_MAX {
            watched.retain(|_, sender| sender.receiver_count() > 0);
            if watched.len() >= ORDER_WATCHERS_MAX {
                return Err(TooManyWatchers(ORDER_WATCHERS_MAX));
            }
        }
        let (sender, receiver) = watch::channel(Watched::default());
        watched.insert(order_id.clone(), sender);
        self.count.store(watched.len(), Ordering::Relaxed);
        Ok(receiver)
    }

    /// Forgets the order's entry once its last watcher has gone.
    pub fn release(&self, order_id: &OrderId) {
        let mut watched = self.watched.lock().expect("watchers lock");
        if watched.get(order_id).is_some_and(|s| s.receiver_count() == 0) {
            watched.remove(order_id);
        }
        self.count.store(watched.len(), Ordering::Relaxed);
    }

    pub fn publish(&self, view: OrderView) {
        let watched = self.watched.lock().expect("watchers lock");
        if let Some(sender) = watched.get(&view.order_id) {
            sender.send_modify(|w| w.order = Some(view));
        }
    }

    pub fn publish_tracking(&self, dispatch: Arc<Dispatch>) {
        let watched = self.watched.lock().expect("watchers lock");
        if let Some(sender) = watched.get(&dispatch.order.order_id) {
            sender.send_modify(|w| w.tracking = Some(dispatch));
        }
    }
}

/// The audit trail as a node of a cluster writes it: every entry goes to every node (as a
/// projection update, which also writes it here); reads are served from this node's copy.
pub struct SharedAudit {
    pub projections: Arc<Projections>,
    pub local: Arc<dyn AuditLog>,
}

impl AuditLog for SharedAudit {
    fn append(&self, entry: &AuditEntry) -> Result<(), crate::journal::JournalError> {
        self.projections.emit(vec![ProjectionUpdate::Audit(entry.clone())]);
        Ok(())
    }

    fn list(
        &self,
        subject: &crate::audit_log::AuditSubject,
        before: Option<u64>,
        limit: usize,
    ) -> Result<crate::audit_log::AuditPage, crate::journal::JournalError> {
        self.local.list(subject, before, limit)
    }
}
