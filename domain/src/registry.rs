//! The partner registry: hubs (where orders are fulfilled, with their slot capacity and SLA
//! targets) and partners (couriers, lockers, shops) with their capabilities, status,
//! hashed credential and ranked assignments to hubs. It is the single source of truth for
//! configuration; hub actors own the running part (dispatches, SLA clocks, partner
//! performance) and receive their configuration from here as a versioned [`HubSetup`].

use crate::limits::{CREATORS_MAX, HUBS_MAX, PARTNERS_MAX, PARTNERS_PER_HUB_MAX, STOREFRONTS_MAX, TEXT_LEN_MAX};
use crate::{Aggregate, CityName, CreatorId, FieldViolation, HubId, PartnerId, Rejection, StorefrontId, UnixMillis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PartnerKind {
    Courier,
    Locker,
    Shop,
}

/// What a partner can do; an order needs some of these (see `hub::required_capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Capability {
    /// Takes parcels to a buyer's address.
    Delivery,
    /// Keeps parcels for buyers to collect with their pickup code.
    PickupPoint,
    /// Handles discreet orders (plain packaging, no item names on labels).
    Discreet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PartnerStatus {
    /// New or demoted: receives at most the hub's probation share of dispatches.
    Probation,
    Active,
    /// Receives nothing.
    Suspended,
}

impl PartnerStatus {
    /// Stricter statuses sort higher.
    fn strictness(self) -> u8 {
        match self {
            PartnerStatus::Active => 0,
            PartnerStatus::Probation => 1,
            PartnerStatus::Suspended => 2,
        }
    }
}

/// Who changed a partner's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusSource {
    Registration,
    Operator,
    /// A hub, from the partner's SLA record there.
    Hub(HubId),
}

/// SLA targets of a hub, each measured from the previous step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaTargets {
    /// From the offer to the partner's Accept.
    pub accept_ms: u64,
    /// From Accept to MarkPickedUp.
    pub pickup_ms: u64,
    /// From MarkPickedUp to MarkDelivered.
    pub deliver_ms: u64,
}

impl SlaTargets {
    pub fn total_ms(&self) -> u64 {
        self.accept_ms + self.pickup_ms + self.deliver_ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubSpec {
    pub hub_id: HubId,
    pub name: String,
    pub city: CityName,
    /// Location in micro-degrees (1e-6°), so specs compare exactly.
    pub latitude_e6: i32,
    pub longitude_e6: i32,
    /// Length of a delivery slot and how many dispatches the hub can deliver in one.
    pub slot_ms: u64,
    pub slot_capacity: u32,
    pub sla: SlaTargets,
    /// Share of the hub's assigned dispatches partners on probation may hold at once.
    pub probation_share_percent: u32,
    /// On-time deliveries after which a partner on probation becomes active.
    pub probation_exit_deliveries: u32,
    /// Credit owed to the buyer when a delivery misses its promised window, in percent of
    /// the order amount.
    pub late_credit_percent: u32,
    /// A dispatch still undelivered this long after its promised window ends is failed
    /// (and the buyer refunded in full).
    pub give_up_after_ms: u64,
}

pub const SLOT_MS_MIN: u64 = 60_000;
pub const SLOT_MS_MAX: u64 = 24 * 3_600_000;
pub const SLOT_CAPACITY_MAX: u32 = 1_000_000;
pub const SLA_STEP_MS_MIN: u64 = 1_000;
pub const SLA_STEP_MS_MAX: u64 = 24 * 3_600_000;
pub const GIVE_UP_AFTER_MS_MAX: u64 = 7 * 24 * 3_600_000;
pub const PROBATION_EXIT_DELIVERIES_MAX: u32 = 10_000;

impl HubSpec {
    /// Every problem with the spec, by CreateHub field name.
    pub fn violations(&self) -> Vec<FieldViolation> {
        let mut out = Vec::new();
        if self.name.chars().count() > TEXT_LEN_MAX {
            out.push(FieldViolation::new(
                "name",
                format!("must be at most {TEXT_LEN_MAX} characters"),
            ));
        }
        if !(-90_000_000..=90_000_000).contains(&self.latitude_e6) {
            out.push(FieldViolation::new("location.latitude", "must be between -90 and 90"));
        }
        if !(-180_000_000..=180_000_000).contains(&self.longitude_e6) {
            out.push(FieldViolation::new(
                "location.longitude",
                "must be between -180 and 180",
            ));
        }
        if !(SLOT_MS_MIN..=SLOT_MS_MAX).contains(&self.slot_ms) {
            out.push(FieldViolation::new(
                "slot_minutes",
                "must be between 1 minute and 24 hours",
            ));
        }
        if self.slot_capacity == 0 || self.slot_capacity > SLOT_CAPACITY_MAX {
            out.push(FieldViolation::new(
                "capacity_per_slot",
                format!("must be between 1 and {SLOT_CAPACITY_MAX}"),
            ));
        }
        for (field, ms) in [
            ("sla.accept_within", self.sla.accept_ms),
            ("sla.pickup_within", self.sla.pickup_ms),
            ("sla.deliver_within", self.sla.deliver_ms),
        ] {
            if !(SLA_STEP_MS_MIN..=SLA_STEP_MS_MAX).contains(&ms) {
                out.push(FieldViolation::new(field, "must be between 1 second and 24 hours"));
            }
        }
        if self.probation_share_percent > 100 {
            out.push(FieldViolation::new("probation_share_percent", "must be at most 100"));
        }
        if self.probation_exit_deliveries > PROBATION_EXIT_DELIVERIES_MAX {
            out.push(FieldViolation::new(
                "probation_exit_deliveries",
                format!("must be at most {PROBATION_EXIT_DELIVERIES_MAX}"),
            ));
        }
        if self.late_credit_percent > 100 {
            out.push(FieldViolation::new("late_credit_percent", "must be at most 100"));
        }
        if self.give_up_after_ms == 0 || self.give_up_after_ms > GIVE_UP_AFTER_MS_MAX {
            out.push(FieldViolation::new(
                "give_up_after",
                "must be between 1 second and 7 days",
            ));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerSpec {
    pub partner_id: PartnerId,
    pub name: String,
    pub kind: PartnerKind,
    pub capabilities: BTreeSet<Capability>,
    /// Dispatches the partner may hold at once at one hub (offered or in progress).
    pub max_open_dispatches: u32,
}

pub const MAX_OPEN_DISPATCHES_MAX: u32 = 100_000;

impl PartnerSpec {
    pub fn violations(&self) -> Vec<FieldViolation> {
        let mut out = Vec::new();
        if self.name.chars().count() > TEXT_LEN_MAX {
            out.push(FieldViolation::new(
                "name",
                format!("must be at most {TEXT_LEN_MAX} characters"),
            ));
        }
        if self.capabilities.is_empty() {
            out.push(FieldViolation::new("capabilities", "must name at least one capability"));
        }
        if self.max_open_dispatches == 0 || self.max_open_dispatches > MAX_OPEN_DISPATCHES_MAX {
            out.push(FieldViolation::new(
                "max_open_dispatches",
                format!("must be between 1 and {MAX_OPEN_DISPATCHES_MAX}"),
            ));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerRecord {
    pub spec: PartnerSpec,
    pub status: PartnerStatus,
    pub status_source: StatusSource,
    pub status_reason: String,
    /// blake3 of the credential, hex. The credential itself is shown once and never stored.
    pub credential_hash: String,
    /// Hubs the partner serves, with its rank there (1 = primary, 2 = secondary, ...).
    pub hubs: BTreeMap<HubId, u32>,
    pub registered_at: UnixMillis,
    pub updated_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubRecord {
    pub spec: HubSpec,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// One partner as a hub sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    pub partner_id: PartnerId,
    pub rank: u32,
    pub status: PartnerStatus,
    pub capabilities: BTreeSet<Capability>,
    pub max_open_dispatches: u32,
}

/// Everything a hub actor needs from the registry. `version` is the registry's event count
/// when it was taken: a hub ignores a setup older than the one it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubSetup {
    pub version: u64,
    pub spec: HubSpec,
    pub roster: Vec<RosterEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryCommand {
    CreateHub(HubSpec),
    UpdateHub(HubSpec),
    RegisterPartner {
        spec: PartnerSpec,
        credential_hash: String,
    },
    UpdatePartner(PartnerSpec),
    SetStatus {
        partner_id: PartnerId,
        status: PartnerStatus,
        reason: String,
        source: StatusSource,
    },
    /// Assigns a partner to a hub with a rank, or unassigns it (`rank: None`).
    Assign {
        partner_id: PartnerId,
        hub_id: HubId,
        rank: Option<u32>,
    },
    GetHubSetup(HubId),
    /// Nothing; answers the registry's version (starting the actor fills the directory).
    Load,
    /// Every hub, partner and creator record: a node joining a cluster fills its directory
    /// with them (the registry's own start filled the directories of the nodes up then).
    Directory,
    /// A creator who sells in drops, with the hash of the credential it reads its ledger with.
    RegisterCreator {
        creator_id: CreatorId,
        display_name: String,
        credential_hash: String,
    },
    /// Replaces a creator's credential (a lost or leaked one stops working at once).
    ResetCreatorCredential {
        creator_id: CreatorId,
        credential_hash: String,
    },
    /// A storefront that reserves for the buyers it vouches for, with its credential's hash.
    RegisterStorefront {
        storefront_id: StorefrontId,
        display_name: String,
        credential_hash: String,
    },
    /// Replaces a storefront's credential (a lost or leaked one stops working at once).
    ResetStorefrontCredential {
        storefront_id: StorefrontId,
        credential_hash: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryEvent {
    HubCreated {
        spec: HubSpec,
        at: UnixMillis,
    },
    HubUpdated {
        spec: HubSpec,
        at: UnixMillis,
    },
    PartnerRegistered {
        spec: PartnerSpec,
        credential_hash: String,
        at: UnixMillis,
    },
    PartnerUpdated {
        spec: PartnerSpec,
        at: UnixMillis,
    },
    StatusChanged {
        partner_id: PartnerId,
        status: PartnerStatus,
        reason: String,
        source: StatusSource,
        at: UnixMillis,
    },
    Assigned {
        partner_id: PartnerId,
        hub_id: HubId,
        rank: u32,
        at: UnixMillis,
    },
    Unassigned {
        partner_id: PartnerId,
        hub_id: HubId,
        at: UnixMillis,
    },
    CreatorRegistered {
        creator_id: CreatorId,
        display_name: String,
        credential_hash: String,
        at: UnixMillis,
    },
    CreatorCredentialReset {
        creator_id: CreatorId,
        credential_hash: String,
        at: UnixMillis,
    },
    StorefrontRegistered {
        storefront_id: StorefrontId,
        display_name: String,
        credential_hash: String,
        at: UnixMillis,
    },
    StorefrontCredentialReset {
        storefront_id: StorefrontId,
        credential_hash: String,
        at: UnixMillis,
    },
}

impl RegistryEvent {
    /// Hubs whose setup this event changes, given the state before it.
    pub fn hubs_touched(&self, before: &RegistryState) -> Vec<HubId> {
        let of_partner = |id: &PartnerId| {
            before
                .partners
                .get(id)
                .map(|p| p.hubs.keys().cloned().collect())
                .unwrap_or_default()
        };
        match self {
            RegistryEvent::HubCreated { spec, .. } | RegistryEvent::HubUpdated { spec, .. } => {
                vec![spec.hub_id.clone()]
            }
            RegistryEvent::PartnerRegistered { .. }
            | RegistryEvent::CreatorRegistered { .. }
            | RegistryEvent::CreatorCredentialReset { .. }
            | RegistryEvent::StorefrontRegistered { .. }
            | RegistryEvent::StorefrontCredentialReset { .. } => Vec::new(),
            RegistryEvent::PartnerUpdated { spec, .. } => of_partner(&spec.partner_id),
            RegistryEvent::StatusChanged { partner_id, .. } => of_partner(partner_id),
            RegistryEvent::Assigned { hub_id, .. } | RegistryEvent::Unassigned { hub_id, .. } => vec![hub_id.clone()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryReply {
    Hub(HubRecord),
    Partner(PartnerRecord),
    Setup(HubSetup),
    Version(u64),
    Creator(CreatorRecord),
    Storefront(StorefrontRecord),
    Directory {
        hubs: Vec<HubRecord>,
        partners: Vec<PartnerRecord>,
        creators: Vec<CreatorRecord>,
        storefronts: Vec<StorefrontRecord>,
    },
}

crate::reply_shapes!(RegistryReply {
    Hub(HubRecord),
    Partner(PartnerRecord),
    Setup(HubSetup),
    Version(u64),
    Creator(CreatorRecord),
    Storefront(StorefrontRecord),
});

/// Everything the registry knows: `RegistryReply::Directory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    pub hubs: Vec<HubRecord>,
    pub partners: Vec<PartnerRecord>,
    pub creators: Vec<CreatorRecord>,
    pub storefronts: Vec<StorefrontRecord>,
}

impl crate::reply::FromReply<RegistryReply> for Directory {
    fn from_reply(reply: RegistryReply) -> Result<Directory, RegistryReply> {
        match reply {
            RegistryReply::Directory {
                hubs,
                partners,
                creators,
                storefronts,
            } => Ok(Directory {
                hubs,
                partners,
                creators,
                storefronts,
            }),
            other => Err(other),
        }
    }
}

/// A creator known to the platform. Its ledger lives in its own actor; the registry keeps
/// only who it is and its credential's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatorRecord {
    pub creator_id: CreatorId,
    pub display_name: String,
    pub credential_hash: String,
    pub registered_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// A storefront known to the platform: who it is and its credential's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorefrontRecord {
    pub storefront_id: StorefrontId,
    pub display_name: String,
    pub credential_hash: String,
    pub registered_at: UnixMillis,
    pub updated_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RegistryState {
    pub hubs: BTreeMap<HubId, HubRecord>,
    pub partners: BTreeMap<PartnerId, PartnerRecord>,
    pub creators: BTreeMap<CreatorId, CreatorRecord>,
    pub storefronts: BTreeMap<StorefrontId, StorefrontRecord>,
    /// Events applied so far (the version of hub setups).
    pub version: u64,
}

impl RegistryState {
    pub fn setup(&self, hub_id: &HubId) -> Option<HubSetup> {
        let hub = self.hubs.get(hub_id)?;
        let roster = self
            .partners
            .values()
            .filter_map(|p| {
                p.hubs.get(hub_id).map(|rank| RosterEntry {
                    partner_id: p.spec.partner_id.clone(),
                    rank: *rank,
                    status: p.status,
                    capabilities: p.spec.capabilities.clone(),
                    max_open_dispatches: p.spec.max_open_dispatches,
                })
            })
            .collect();
        Some(HubSetup {
            version: self.version,
            spec: hub.spec.clone(),
            roster,
        })
    }

    fn partner(&self, id: &PartnerId) -> Result<&PartnerRecord, Rejection> {
        self.partners
            .get(id)
            .ok_or_else(|| Rejection::not_found("partner", id.as_str()))
    }

    fn hub(&self, id: &HubId) -> Result<&HubRecord, Rejection> {
        self.hubs
            .get(id)
            .ok_or_else(|| Rejection::not_found("hub", id.as_str()))
    }

    /// The target's record after `events` (which are all about it): applied to a copy of
    /// that one record, not of the whole registry.
    fn creator_after(&self, creator_id: &CreatorId, event: &RegistryEvent) -> RegistryReply {
        let mut skeleton = RegistryState::default();
        skeleton.creators.extend(
            self.creators
                .get_key_value(creator_id)
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        skeleton.apply(event);
        RegistryReply::Creator(skeleton.creators[creator_id].clone())
    }

    fn storefront_after(&self, storefront_id: &StorefrontId, event: &RegistryEvent) -> RegistryReply {
        let mut skeleton = RegistryState::default();
        skeleton.storefronts.extend(
            self.storefronts
                .get_key_value(storefront_id)
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        skeleton.apply(event);
        RegistryReply::Storefront(skeleton.storefronts[storefront_id].clone())
    }

    fn reply_after(&self, target: Target, events: &[RegistryEvent]) -> RegistryReply {
        let mut skeleton = RegistryState::default();
        match &target {
            Target::Hub(id) => skeleton
                .hubs
                .extend(self.hubs.get_key_value(id).map(|(k, v)| (k.clone(), v.clone()))),
            Target::Partner(id) => skeleton
                .partners
                .extend(self.partners.get_key_value(id).map(|(k, v)| (k.clone(), v.clone()))),
        }
        for event in events {
            skeleton.apply(event);
        }
        match target {
            Target::Hub(id) => RegistryReply::Hub(skeleton.hubs[&id].clone()),
            Target::Partner(id) => RegistryReply::Partner(skeleton.partners[&id].clone()),
        }
    }
}

enum Target {
    Hub(HubId),
    Partner(PartnerId),
}

fn check_display_name(display_name: &str) -> Result<(), Rejection> {
    if display_name.chars().count() > TEXT_LEN_MAX || display_name.chars().any(char::is_control) {
        return Err(Rejection::field(
            "display_name",
            format!("must be at most {TEXT_LEN_MAX} printable characters"),
        ));
    }
    Ok(())
}

fn invalid(violations: Vec<FieldViolation>) -> Result<(), Rejection> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Rejection::InvalidArgument(violations))
    }
}

impl Aggregate for RegistryState {
    type Command = RegistryCommand;
    type Event = RegistryEvent;
    type Reply = RegistryReply;

    fn decide(
        &self,
        command: RegistryCommand,
        now: UnixMillis,
    ) -> Result<(Vec<RegistryEvent>, RegistryReply), Rejection> {
        let (events, target) = match command {
            RegistryCommand::Load => return Ok((vec![], RegistryReply::Version(self.version))),
            RegistryCommand::Directory => {
                return Ok((
                    vec![],
                    RegistryReply::Directory {
                        hubs: self.hubs.values().cloned().collect(),
                        partners: self.partners.values().cloned().collect(),
                        creators: self.creators.values().cloned().collect(),
                        storefronts: self.storefronts.values().cloned().collect(),
                    },
                ))
            }
            RegistryCommand::RegisterCreator {
                creator_id,
                display_name,
                credential_hash,
            } => {
                check_display_name(&display_name)?;
                if self.creators.contains_key(&creator_id) {
                    // The credential is shown once: a second registration cannot return it.
                    return Err(Rejection::AlreadyExists {
                        what: "creator".into(),
                        id: creator_id.to_string(),
                    });
                }
                if self.creators.len() >= CREATORS_MAX {
                    return Err(Rejection::Exhausted(format!("at most {CREATORS_MAX} creators")));
                }
                let event = RegistryEvent::CreatorRegistered {
                    creator_id: creator_id.clone(),
                    display_name,
                    credential_hash,
                    at: now,
                };
                return Ok((vec![event.clone()], self.creator_after(&creator_id, &event)));
            }
            RegistryCommand::ResetCreatorCredential {
                creator_id,
                credential_hash,
            } => {
                if !self.creators.contains_key(&creator_id) {
                    return Err(Rejection::not_found("creator", creator_id.as_str()));
                }
                let event = RegistryEvent::CreatorCredentialReset {
                    creator_id: creator_id.clone(),
                    credential_hash,
                    at: now,
                };
                return Ok((vec![event.clone()], self.creator_after(&creator_id, &event)));
            }
            RegistryCommand::RegisterStorefront {
                storefront_id,
                display_name,
                credential_hash,
            } => {
                check_display_name(&display_name)?;
                if self.storefronts.contains_key(&storefront_id) {
                    // The credential is shown once: a second registration cannot return it.
                    return Err(Rejection::AlreadyExists {
                        what: "storefront".into(),
                        id: storefront_id.to_string(),
                    });
                }
                if self.storefronts.len() >= STOREFRONTS_MAX {
                    return Err(Rejection::Exhausted(format!("at most {STOREFRONTS_MAX} storefronts")));
                }
                let event = RegistryEvent::StorefrontRegistered {
                    storefront_id: storefront_id.clone(),
                    display_name,
                    credential_hash,
                    at: now,
                };
                return Ok((vec![event.clone()], self.storefront_after(&storefront_id, &event)));
            }
            RegistryCommand::ResetStorefrontCredential {
                storefront_id,
                credential_hash,
            } => {
                if !self.storefronts.contains_key(&storefront_id) {
                    return Err(Rejection::not_found("storefront", storefront_id.as_str()));
                }
                let event = RegistryEvent::StorefrontCredentialReset {
                    storefront_id: storefront_id.clone(),
                    credential_hash,
                    at: now,
                };
                return Ok((vec![event.clone()], self.storefront_after(&storefront_id, &event)));
            }
            RegistryCommand::GetHubSetup(hub_id) => {
                self.hub(&hub_id)?;
                return Ok((vec![], RegistryReply::Setup(self.setup(&hub_id).expect("hub exists"))));
            }
            RegistryCommand::CreateHub(spec) => {
                invalid(spec.violations())?;
                match self.hubs.get(&spec.hub_id) {
                    // A retry of the same creation is answered with the hub as it is.
                    Some(existing) if existing.spec == spec => {
                        return Ok((vec![], RegistryReply::Hub(existing.clone())))
                    }
                    Some(_) => {
                        return Err(Rejection::AlreadyExists {
                            what: "hub".into(),
                            id: spec.hub_id.to_string(),
                        })
                    }
                    None if self.hubs.len() >= HUBS_MAX => {
                        return Err(Rejection::FailedPrecondition(format!("at most {HUBS_MAX} hubs")))
                    }
                    None => (
                        vec![RegistryEvent::HubCreated {
                            spec: spec.clone(),
                            at: now,
                        }],
                        Target::Hub(spec.hub_id),
                    ),
                }
            }
            RegistryCommand::UpdateHub(spec) => {
                invalid(spec.violations())?;
                let existing = self.hub(&spec.hub_id)?;
                if existing.spec.city != spec.city {
                    return Err(Rejection::field(
                        "city",
                        "a hub's city cannot change (drops ring-fence stock to it); create another hub",
                    ));
                }
                let target = Target::Hub(spec.hub_id.clone());
                if existing.spec == spec {
                    (vec![], target)
                } else {
                    (vec![RegistryEvent::HubUpdated { spec, at: now }], target)
                }
            }
            RegistryCommand::RegisterPartner { spec, credential_hash } => {
                invalid(spec.violations())?;
                if self.partners.contains_key(&spec.partner_id) {
                    // The credential is shown once: a second registration cannot return it.
                    return Err(Rejection::AlreadyExists {
                        what: "partner".into(),
                        id: spec.partner_id.to_string(),
                    });
                }
                if self.partners.len() >= PARTNERS_MAX {
                    return Err(Rejection::FailedPrecondition(format!(
                        "at most {PARTNERS_MAX} partners"
                    )));
                }
                let target = Target::Partner(spec.partner_id.clone());
                (
                    vec![RegistryEvent::PartnerRegistered {
                        spec,
                        credential_hash,
                        at: now,
                    }],
                    target,
                )
            }
            RegistryCommand::UpdatePartner(spec) => {
                invalid(spec.violations())?;
                let existing = self.partner(&spec.partner_id)?;
                let target = Target::Partner(spec.partner_id.clone());
                if existing.spec == spec {
                    (vec![], target)
                } else {
                    (vec![RegistryEvent::PartnerUpdated { spec, at: now }], target)
                }
            }
            RegistryCommand::SetStatus {
                partner_id,
                status,
                reason,
                source,
            } => {
                let existing = self.partner(&partner_id)?;
                if reason.chars().count() > TEXT_LEN_MAX {
                    return Err(Rejection::field(
                        "reason",
                        format!("must be at most {TEXT_LEN_MAX} characters"),
                    ));
                }
                let change = match &source {
                    StatusSource::Operator | StatusSource::Registration => existing.status != status,
                    // A hub only demotes, or lifts its own or the registration's probation;
                    // it never lifts a suspension, and never overrides an operator's
                    // probation (the operator decides when that ends).
                    StatusSource::Hub(_) => {
                        if status.strictness() > existing.status.strictness() {
                            true
                        } else {
                            existing.status == PartnerStatus::Probation
                                && status == PartnerStatus::Active
                                && existing.status_source != StatusSource::Operator
                        }
                    }
                };
                let target = Target::Partner(partner_id.clone());
                if change {
                    let event = RegistryEvent::StatusChanged {
                        partner_id,
                        status,
                        reason,
                        source,
                        at: now,
                    };
                    (vec![event], target)
                } else {
                    (vec![], target)
                }
            }
            RegistryCommand::Assign {
                partner_id,
                hub_id,
                rank,
            } => {
                let partner = self.partner(&partner_id)?;
                self.hub(&hub_id)?;
                let target = Target::Partner(partner_id.clone());
                let events = match rank {
                    Some(0) => return Err(Rejection::field("rank", "must be 1 (primary) or more")),
                    Some(rank) if rank > PARTNERS_PER_HUB_MAX as u32 => {
                        return Err(Rejection::field(
                            "rank",
                            format!("must be at most {PARTNERS_PER_HUB_MAX}"),
                        ))
                    }
                    Some(rank) if partner.hubs.get(&hub_id) == Some(&rank) => vec![],
                    Some(rank) => {
                        let assigned = self.partners.values().filter(|p| p.hubs.contains_key(&hub_id)).count();
                        if !partner.hubs.contains_key(&hub_id) && assigned >= PARTNERS_PER_HUB_MAX {
                            return Err(Rejection::FailedPrecondition(format!(
                                "hub {hub_id} already has {PARTNERS_PER_HUB_MAX} partners"
                            )));
                        }
                        vec![RegistryEvent::Assigned {
                            partner_id,
                            hub_id,
                            rank,
                            at: now,
                        }]
                    }
                    None if partner.hubs.contains_key(&hub_id) => vec![RegistryEvent::Unassigned {
                        partner_id,
                        hub_id,
                        at: now,
                    }],
                    None => vec![],
                };
                (events, target)
            }
        };
        let reply = self.reply_after(target, &events);
        Ok((events, reply))
    }

    fn apply(&mut self, event: &RegistryEvent) {
        self.version += 1;
        match event {
            RegistryEvent::HubCreated { spec, at } => {
                self.hubs.insert(
                    spec.hub_id.clone(),
                    HubRecord {
                        spec: spec.clone(),
                        created_at: *at,
                        updated_at: *at,
                    },
                );
            }
            RegistryEvent::HubUpdated { spec, at } => {
                if let Some(hub) = self.hubs.get_mut(&spec.hub_id) {
                    hub.spec = spec.clone();
                    hub.updated_at = *at;
                }
            }
            RegistryEvent::PartnerRegistered {
                spec,
                credential_hash,
                at,
            } => {
                self.partners.insert(
                    spec.partner_id.clone(),
                    PartnerRecord {
                        spec: spec.clone(),
                        status: PartnerStatus::Probation,
                        status_source: StatusSource::Registration,
                        status_reason: "new partner".into(),
                        credential_hash: credential_hash.clone(),
                        hubs: BTreeMap::new(),
                        registered_at: *at,
                        updated_at: *at,
                    },
                );
            }
            RegistryEvent::PartnerUpdated { spec, at } => {
                if let Some(p) = self.partners.get_mut(&spec.partner_id) {
                    p.spec = spec.clone();
                    p.updated_at = *at;
                }
            }
            RegistryEvent::StatusChanged {
                partner_id,
                status,
                reason,
                source,
                at,
            } => {
                if let Some(p) = self.partners.get_mut(partner_id) {
                    p.status = *status;
                    p.status_reason = reason.clone();
                    p.status_source = source.clone();
                    p.updated_at = *at;
                }
            }
            RegistryEvent::Assigned {
                partner_id,
                hub_id,
                rank,
                at,
            } => {
                if let Some(p) = self.partners.get_mut(partner_id) {
                    p.hubs.insert(hub_id.clone(), *rank);
                    p.updated_at = *at;
                }
            }
            RegistryEvent::Unassigned { partner_id, hub_id, at } => {
                if let Some(p) = self.partners.get_mut(partner_id) {
                    p.hubs.remove(hub_id);
                    p.updated_at = *at;
                }
            }
            RegistryEvent::CreatorRegistered {
                creator_id,
                display_name,
                credential_hash,
                at,
            } => {
                self.creators.insert(
                    creator_id.clone(),
                    CreatorRecord {
                        creator_id: creator_id.clone(),
                        display_name: display_name.clone(),
                        credential_hash: credential_hash.clone(),
                        registered_at: *at,
                        updated_at: *at,
                    },
                );
            }
            RegistryEvent::CreatorCredentialReset {
                creator_id,
                credential_hash,
                at,
            } => {
                if let Some(c) = self.creators.get_mut(creator_id) {
                    c.credential_hash = credential_hash.clone();
                    c.updated_at = *at;
                }
            }
            RegistryEvent::StorefrontRegistered {
                storefront_id,
                display_name,
                credential_hash,
                at,
            } => {
                self.storefronts.insert(
                    storefront_id.clone(),
                    StorefrontRecord {
                        storefront_id: storefront_id.clone(),
                        display_name: display_name.clone(),
                        credential_hash: credential_hash.clone(),
                        registered_at: *at,
                        updated_at: *at,
                    },
                );
            }
            RegistryEvent::StorefrontCredentialReset {
                storefront_id,
                credential_hash,
                at,
            } => {
                if let Some(s) = self.storefronts.get_mut(storefront_id) {
                    s.credential_hash = credential_hash.clone();
                    s.updated_at = *at;
                }
            }
        }
    }
}
