//! The partner registry: one actor for every hub's configuration, every partner and their
//! assignments, and the creators' and storefronts' credentials.

use super::{Env, Hosted, Publication};
use crate::audit_log::{self, AuditEntry};
use crate::error::CommandError;
use crate::journal::BoxFuture;
use crate::limits::REGISTRY_MAILBOX_CAPACITY;
use crate::projections::{ProjectionUpdate, Projections};
use domain::hub::{HubCommand, HubState};
use domain::registry::{RegistryEvent, RegistryReply, RegistryState};
use domain::HubId;

impl Hosted for RegistryState {
    const KIND: &'static str = "registry";
    type Key = ();

    fn stream(_: &()) -> String {
        Self::KIND.into()
    }

    fn key_of_stream(stream: &str) -> Option<()> {
        (stream == Self::KIND).then_some(())
    }

    fn mailbox_capacity() -> usize {
        REGISTRY_MAILBOX_CAPACITY
    }

    fn initial<'a>(_: &'a (), _: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async { Ok(RegistryState::default()) })
    }

    fn audit_entries(&self, events: &[RegistryEvent]) -> Vec<AuditEntry> {
        events.iter().filter_map(audit_log::registry_entry).collect()
    }

    fn publication(&self, events: &[RegistryEvent], env: &Env) -> Option<Publication> {
        let storefronts: Vec<_> = if events.is_empty() {
            self.storefronts.values().cloned().collect()
        } else {
            events
                .iter()
                .filter_map(|e| match e {
                    RegistryEvent::StorefrontRegistered { storefront_id, .. }
                    | RegistryEvent::StorefrontCredentialReset { storefront_id, .. } => {
                        self.storefronts.get(storefront_id).cloned()
                    }
                    _ => None,
                })
                .collect()
        };
        let creators: Vec<_> = if events.is_empty() {
            self.creators.values().cloned().collect()
        } else {
            events
                .iter()
                .filter_map(|e| match e {
                    RegistryEvent::CreatorRegistered { creator_id, .. }
                    | RegistryEvent::CreatorCredentialReset { creator_id, .. } => {
                        self.creators.get(creator_id).cloned()
                    }
                    _ => None,
                })
                .collect()
        };
        let (partners, hubs): (Vec<_>, Vec<_>) = if events.is_empty() {
            (
                self.partners.values().cloned().collect(),
                self.hubs.values().cloned().collect(),
            )
        } else {
            let mut partners = std::collections::BTreeSet::new();
            let mut hubs = std::collections::BTreeSet::new();
            for event in events {
                match event {
                    RegistryEvent::HubCreated { spec, .. } | RegistryEvent::HubUpdated { spec, .. } => {
                        hubs.insert(spec.hub_id.clone());
                    }
                    RegistryEvent::PartnerRegistered { spec, .. } | RegistryEvent::PartnerUpdated { spec, .. } => {
                        partners.insert(spec.partner_id.clone());
                    }
                    RegistryEvent::StatusChanged { partner_id, .. }
                    | RegistryEvent::Assigned { partner_id, .. }
                    | RegistryEvent::Unassigned { partner_id, .. } => {
                        partners.insert(partner_id.clone());
                    }
                    RegistryEvent::CreatorRegistered { .. }
                    | RegistryEvent::CreatorCredentialReset { .. }
                    | RegistryEvent::StorefrontRegistered { .. }
                    | RegistryEvent::StorefrontCredentialReset { .. } => {}
                }
            }
            (
                partners.iter().filter_map(|p| self.partners.get(p).cloned()).collect(),
                hubs.iter().filter_map(|h| self.hubs.get(h).cloned()).collect(),
            )
        };
        // Hubs whose setup changed get it now if their actor runs (a version check there
        // keeps an older setup from replacing a newer one).
        let mut touched: Vec<HubId> = events.iter().flat_map(|e| e.hubs_touched(self)).collect();
        touched.sort();
        touched.dedup();
        let setups: Vec<_> = touched.iter().filter_map(|h| self.setup(h)).collect();
        let projections = env.projections.clone();
        let bus = env.bus.clone();
        let runtime = env.runtime.clone();
        Some(Box::new(move || {
            let updates = hubs
                .into_iter()
                .map(ProjectionUpdate::Hub)
                .chain(partners.into_iter().map(ProjectionUpdate::Partner))
                .chain(creators.into_iter().map(ProjectionUpdate::Creator))
                .chain(storefronts.into_iter().map(ProjectionUpdate::Storefront))
                .collect();
            projections.emit(updates);
            if !setups.is_empty() {
                runtime.spawn(async move {
                    let Some(bus) = bus.upgrade() else { return };
                    for setup in setups {
                        let hub_id = setup.spec.hub_id.clone();
                        if let Err(e) = bus.tell::<HubState>(hub_id.clone(), HubCommand::Setup(setup)).await {
                            tracing::warn!(%hub_id, error = %e, "hub did not take its new setup; it reads it at its next start");
                        }
                    }
                });
            }
        }))
    }

    fn snapshot_weight(&self) -> u64 {
        (self.partners.len() + self.hubs.len()) as u64
    }

    /// The registry may run on another node, whose update of the directories arrives here
    /// a moment later; a caller that just created a hub or a partner here must find it here
    /// at once.
    fn replied_elsewhere(reply: &RegistryReply, projections: &Projections) {
        let directory = &projections.directory;
        match reply {
            RegistryReply::Hub(record) => directory.put_hub(record.clone()),
            RegistryReply::Partner(record) => directory.put_partner(record.clone()),
            RegistryReply::Creator(record) => directory.put_creator(record.clone()),
            RegistryReply::Storefront(record) => directory.put_storefront(record.clone()),
            _ => {}
        }
    }
}
