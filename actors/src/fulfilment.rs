//! Read-side projections of the registry and the hubs: the directory of partners,
//! creators and storefronts (credential lookups for every courier, creator and checkout
//! call, without asking the registry actor), the courier channels
//! that carry offers to subscribed partners, and each hub's load for operators.

use crate::limits::{COURIER_STREAMS_PER_PARTNER, COURIER_STREAM_BUFFER};
use domain::hub::Dispatch;
use domain::registry::{CreatorRecord, HubRecord, PartnerRecord, StorefrontRecord};
use domain::{CreatorId, HubId, PartnerId, StorefrontId, UnixMillis};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;

/// Whose credential a hash is: the one lookup every authenticated call makes.
#[derive(Clone)]
pub enum Principal {
    Partner(Arc<PartnerRecord>),
    Creator(Arc<CreatorRecord>),
    Storefront(Arc<StorefrontRecord>),
}

/// A credential's blake3 hash, as the registry stores it (64 hex digits), in bytes. A stored
/// hash that is not one (impossible through the registry's commands) matches nothing.
fn hash_bytes(hex: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(hex).ok().map(|h| *h.as_bytes())
}

#[derive(Default)]
struct DirectoryInner {
    /// Credential hash → whose it is; each record's entry is replaced when its credential is.
    by_credential: HashMap<[u8; 32], Principal>,
    partners: BTreeMap<PartnerId, Arc<PartnerRecord>>,
    hubs: BTreeMap<HubId, Arc<HubRecord>>,
    creators: HashMap<CreatorId, Arc<CreatorRecord>>,
    storefronts: HashMap<StorefrontId, Arc<StorefrontRecord>>,
}

impl DirectoryInner {
    /// Indexes `new_hash` for `principal`, dropping the record's previous credential.
    fn index(&mut self, old_hash: Option<&str>, new_hash: &str, principal: Principal) {
        if let Some(old) = old_hash.and_then(hash_bytes) {
            self.by_credential.remove(&old);
        }
        if let Some(new) = hash_bytes(new_hash) {
            self.by_credential.insert(new, principal);
        }
    }
}

/// Partners, hubs, creators and storefronts as the registry last published them.
#[derive(Default)]
pub struct Directory {
    inner: RwLock<DirectoryInner>,
}

impl Directory {
    /// Every record of the registry's `directory` (its `RegistryCommand::Directory` reply):
    /// at a node's start, and again when it may have missed the updates that keep it
    /// current (a credential reset included). Records not in it are kept.
    pub fn load(&self, directory: domain::registry::Directory) {
        let domain::registry::Directory {
            hubs,
            partners,
            creators,
            storefronts,
        } = directory;
        for hub in hubs {
            self.put_hub(hub);
        }
        for partner in partners {
            self.put_partner(partner);
        }
        for creator in creators {
            self.put_creator(creator);
        }
        for storefront in storefronts {
            self.put_storefront(storefront);
        }
    }

    pub fn put_partner(&self, record: PartnerRecord) {
        let mut inner = self.inner.write().expect("directory lock");
        let old = inner
            .partners
            .get(&record.spec.partner_id)
            .map(|o| o.credential_hash.clone());
        let record = Arc::new(record);
        inner.index(
            old.as_deref(),
            &record.credential_hash,
            Principal::Partner(record.clone()),
        );
        inner.partners.insert(record.spec.partner_id.clone(), record);
    }

    pub fn put_creator(&self, record: CreatorRecord) {
        let mut inner = self.inner.write().expect("directory lock");
        let old = inner
            .creators
            .get(&record.creator_id)
            .map(|o| o.credential_hash.clone());
        let record = Arc::new(record);
        inner.index(
            old.as_deref(),
            &record.credential_hash,
            Principal::Creator(record.clone()),
        );
        inner.creators.insert(record.creator_id.clone(), record);
    }

    pub fn put_storefront(&self, record: StorefrontRecord) {
        let mut inner = self.inner.write().expect("directory lock");
        let old = inner
            .storefronts
            .get(&record.storefront_id)
            .map(|o| o.credential_hash.clone());
        let record = Arc::new(record);
        inner.index(
            old.as_deref(),
            &record.credential_hash,
            Principal::Storefront(record.clone()),
        );
        inner.storefronts.insert(record.storefront_id.clone(), record);
    }

    /// Whose credential hashes to `hash`, if anyone's.
    pub fn by_credential(&self, hash: &[u8; 32]) -> Option<Principal> {
        self.inner
            .read()
            .expect("directory lock")
            .by_credential
            .get(hash)
            .cloned()
    }

    pub fn creator(&self, id: &CreatorId) -> Option<Arc<CreatorRecord>> {
        self.inner.read().expect("directory lock").creators.get(id).cloned()
    }

    pub fn put_hub(&self, record: HubRecord) {
        let mut inner = self.inner.write().expect("directory lock");
        inner.hubs.insert(record.spec.hub_id.clone(), Arc::new(record));
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
