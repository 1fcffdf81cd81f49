//! Read-side projections of the registry and the hubs: the directory of partners,
//! creators and storefronts (credential lookups for every courier, creator and checkout
//! call, without asking the registry actor), the courier channels
//! that carry offers to subscribed partners, and each hub's load for operators.

use domain::hub::Dispatch;
use domain::registry::{CreatorRecord, HubRecord, PartnerRecord, StorefrontRecord};
use domain::{CreatorId, HubId, PartnerId, StorefrontId, UnixMillis};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;

/// Offers and withdrawals queued per courier stream; a courier that falls this far behind
/// is disconnected (it gets its unanswered offers again when it reconnects).
pub const COURIER_STREAM_BUFFER: usize = 1_024;
/// Streams one partner may have open at once (devices of one courier company).
pub const COURIER_STREAMS_PER_PARTNER: usize = 16;

#[derive(Default)]
struct DirectoryInner {
    by_credential: HashMap<String, PartnerId>,
    partners: BTreeMap<PartnerId, Arc<PartnerRecord>>,
    hubs: BTreeMap<HubId, Arc<HubRecord>>,
    creators_by_credential: HashMap<String, CreatorId>,
    creators: HashMap<CreatorId, Arc<CreatorRecord>>,
    storefronts_by_credential: HashMap<String, StorefrontId>,
    storefronts: HashMap<StorefrontId, Arc<StorefrontRecord>>,
}

/// Partners and hubs as the registry last published them.
#[derive(Default)]
pub struct Directory {
    inner: RwLock<DirectoryInner>,
}

impl Directory {
    pub fn put_partner(&self, record: PartnerRecord) {
        let mut inner = self.inner.write().expect("directory lock");
        if let Some(old) = inner.partners.get(&record.spec.partner_id) {
            let old_hash = old.credential_hash.clone();
            inner.by_credential.remove(&old_hash);
        }
        inner
            .by_credential
            .insert(record.credential_hash.clone(), record.spec.partner_id.clone());
        inner.partners.insert(record.spec.partner_id.clone(), Arc::new(record));
    }

    pub fn put_creator(&self, record: CreatorRecord) {
        let mut inner = self.inner.write().expect("directory lock");
        if let Some(old) = inner.creators.get(&record.creator_id) {
            let old_hash = old.credential_hash.clone();
            inner.creators_by_credential.remove(&old_hash);
        }
        inner
            .creators_by_credential
            .insert(record.credential_hash.clone(), record.creator_id.clone());
        inner.creators.insert(record.creator_id.clone(), Arc::new(record));
    }

    /// The creator a credential hash belongs to.
    pub fn creator_by_credential(&self, hash: &str) -> Option<Arc<CreatorRecord>> {
        let inner = self.inner.read().expect("directory lock");
        let id = inner.creators_by_credential.get(hash)?;
        inner.creators.get(id).cloned()
    }

    pub fn put_storefront(&self, record: StorefrontRecord) {
        let mut inner = self.inner.write().expect("directory lock");
        if let Some(old) = inner.storefronts.get(&record.storefront_id) {
            let old_hash = old.credential_hash.clone();
            inner.storefronts_by_credential.remove(&old_hash);
        }
        inner
            .storefronts_by_credential
            .insert(record.credential_hash.clone(), record.storefront_id.clone());
        inner.storefronts.insert(record.storefront_id.clone(), Arc::new(record));
    }

    /// The storefront a credential hash belongs to.
    pub fn storefront_by_credential(&self, hash: &str) -> Option<Arc<StorefrontRecord>> {
        let inner = self.inner.read().expect("directory lock");
        let id = inner.storefronts_by_credential.get(hash)?;
        inner.storefronts.get(id).cloned()
    }

    pub fn creator(&self, id: &CreatorId) -> Option<Arc<CreatorRecord>> {
        self.inner.read().expect("directory lock").creators.get(id).cloned()
    }

    pub fn put_hub(&self, record: HubRecord) {
        let mut inner = self.inner.write().expect("directory lock");
        inner.hubs.insert(record.spec.hub_id.clone(), Arc::new(record));
    }

    /// The partner a credential hash belongs to.
    pub fn partner_by_credential(&self, hash: &str) -> Option<Arc<PartnerRecord>> {
        let inner = self.inner.read().expect("directory lock");
        let id = inner.by_credential.get(hash)?;
        inner.partners.get(id).cloned()
    }

    pub fn partner(&self, id: &PartnerId) -> Option<Arc<PartnerRecord>> {
        self.inner.read().expect("directory lock").partners.get(id).cloned()
    }

    pub fn hub(&self, id: &HubId) -> Option<Arc<HubRecord>> {
        self.inner.read().expect("directory lock").hubs.get(id).cloned()
    }

    /// Partners in id order after `after`, matching `filter`, at most `limit`.
    pub fn partners(
        &self,
        after: Option<&PartnerId>,
        limit: usize,
        filter: impl Fn(&PartnerRecord) -> bool,
    ) -> Vec<Arc<PartnerRecord>> {
        let inner = self.inner.read().expect("directory lock");
        let range = match after {
            Some(after) => inner
                .partners
                .range::<PartnerId, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => inner.partners.range::<PartnerId, _>(..),
        };
        range
            .map(|(_, p)| p)
            .filter(|p| filter(p))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn hubs(&self) -> Vec<Arc<HubRecord>> {
        self.inner
            .read()
            .expect("directory lock")
            .hubs
            .values()
            .cloned()
            .collect()
    }
}

/// What a subscribed courier receives.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum CourierUpdate {
    Offer {
        hub_id: HubId,
        dispatch: Arc<Dispatch>,
    },
    Withdrawn {
        hub_id: HubId,
        order_id: domain::OrderId,
        reason: String,
    },
}

/// Open courier streams, by partner.
#[derive(Default)]
pub struct Couriers {
    streams: Mutex<HashMap<PartnerId, Vec<mpsc::Sender<CourierUpdate>>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("partner already has {COURIER_STREAMS_PER_PARTNER} dispatch streams open")]
pub struct TooManyStreams;

impl Couriers {
    pub fn subscribe(&self, partner: &PartnerId) -> Result<mpsc::Receiver<CourierUpdate>, TooManyStreams> {
        let mut streams = self.streams.lock().expect("couriers lock");
        let open = streams.entry(partner.clone()).or_default();
        open.retain(|tx| !tx.is_closed());
        if open.len() >= COURIER_STREAMS_PER_PARTNER {
            return Err(TooManyStreams);
        }
        let (tx, rx) = mpsc::channel(COURIER_STREAM_BUFFER);
        open.push(tx);
        Ok(rx)
    }

    /// Sends to every open stream of the partner; a stream that is full is closed.
    pub fn send(&self, partner: &PartnerId, update: CourierUpdate) {
        let mut streams = self.streams.lock().expect("couriers lock");
        if let Some(open) = streams.get_mut(partner) {
            open.retain(|tx| tx.try_send(update.clone()).is_ok());
            if open.is_empty() {
                streams.remove(partner);
            }
        }
    }
}

/// A hub's load as operators see it in WatchDrop.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HubLoad {
    pub hub_id: HubId,
    pub open: u32,
    pub waiting: u32,
    pub throttled: bool,
    pub next_promise: (UnixMillis, UnixMillis),
}

#[derive(Default)]
pub struct HubLoads {
    loads: RwLock<HashMap<HubId, HubLoad>>,
}

impl HubLoads {
    /// Returns whether anything changed.
    pub fn put(&self, load: HubLoad) -> bool {
        let mut loads = self.loads.write().expect("hub loads lock");
        if loads.get(&load.hub_id) == Some(&load) {
            return false;
        }
        loads.insert(load.hub_id.clone(), load);
        true
    }

    pub fn get(&self, hub_id: &HubId) -> Option<HubLoad> {
        self.loads.read().expect("hub loads lock").get(hub_id).cloned()
    }
}
