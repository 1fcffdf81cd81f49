//! The audit trail operators query per order and per partner: every assignment, swap,
//! delivery, status change and credential use. Entries are written by the hub and registry
//! actors once the batch that caused them is durable (so the trail never shows something
//! that did not happen), and by the services for credential use.

use crate::journal::{AuditWrite, JournalError};
use domain::hub::HubEvent;
use domain::registry::{RegistryEvent, StatusSource};
use domain::{HubId, OrderId, PartnerId, UnixMillis};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: UnixMillis,
    /// What happened: "offered", "accepted", "swapped", "status_changed", "credential_used", ...
    pub action: String,
    pub order_id: Option<String>,
    pub partner_id: Option<String>,
    pub hub_id: Option<String>,
    pub detail: String,
}

impl AuditEntry {
    /// The entry as a journal writes it with the events that cause it.
    pub fn to_write(&self) -> AuditWrite {
        let subjects = [(b'o', &self.order_id), (b'p', &self.partner_id)]
            .into_iter()
            .filter_map(|(kind, id)| Some((kind, id.clone()?)))
            .collect();
        AuditWrite {
            subjects,
            entry: crate::codec::encode(self),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSubject {
    Order(String),
    Partner(String),
}

/// One page of a subject's entries, newest first, and the token of the next page.
#[derive(Debug, Default)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next: Option<u64>,
}

pub trait AuditLog: Send + Sync + 'static {
    /// Appends an entry under its order and its partner (whichever it names). Durable with
    /// the next journal flush.
    fn append(&self, entry: &AuditEntry) -> Result<(), JournalError>;

    /// Appends, logging a failure instead of returning it: the trail must not fail the
    /// action it records.
    fn record(&self, entry: &AuditEntry) {
        if let Err(e) = self.append(entry) {
            tracing::error!(error = %e, action = %entry.action, "audit entry not written");
        }
    }

    /// Entries of a subject, newest first, starting before `before` (a page token).
    fn list(&self, subject: &AuditSubject, before: Option<u64>, limit: usize) -> Result<AuditPage, JournalError>;
}

/// The trail's entry for a registry event, if it has one.
pub(crate) fn registry_entry(event: &RegistryEvent) -> Option<AuditEntry> {
    let entry = |at: UnixMillis, action: &str, partner: &PartnerId, hub: Option<&HubId>, detail: String| AuditEntry {
        at,
        action: action.into(),
        order_id: None,
        partner_id: Some(partner.to_string()),
        hub_id: hub.map(ToString::to_string),
        detail,
    };
    Some(match event {
        RegistryEvent::HubCreated { .. }
        | RegistryEvent::HubUpdated { .. }
        | RegistryEvent::CreatorRegistered { .. }
        | RegistryEvent::CreatorCredentialReset { .. } => return None,
        RegistryEvent::StorefrontRegistered { .. } | RegistryEvent::StorefrontCredentialReset { .. } => return None,
        RegistryEvent::PartnerRegistered { spec, at, .. } => entry(
            *at,
            "registered",
            &spec.partner_id,
            None,
            format!("{:?} with {:?}, on probation", spec.kind, spec.capabilities),
        ),
        RegistryEvent::PartnerUpdated { spec, at } => entry(
            *at,
            "updated",
            &spec.partner_id,
            None,
            format!(
                "capabilities {:?}, at most {} open dispatches",
                spec.capabilities, spec.max_open_dispatches
            ),
        ),
        RegistryEvent::StatusChanged {
            partner_id,
            status,
            reason,
            source,
            at,
        } => {
            let by = match source {
                StatusSource::Registration => "registration".to_string(),
                StatusSource::Operator => "operator".to_string(),
                StatusSource::Hub(h) => format!("hub {h}"),
            };
            let hub = match source {
                StatusSource::Hub(h) => Some(h),
                _ => None,
            };
            entry(
                *at,
                "status_changed",
                partner_id,
                hub,
                format!("{status:?} by {by}: {reason}"),
            )
        }
        RegistryEvent::Assigned {
            partner_id,
            hub_id,
            rank,
            at,
        } => entry(*at, "assigned", partner_id, Some(hub_id), format!("rank {rank}")),
        RegistryEvent::Unassigned { partner_id, hub_id, at } => {
            entry(*at, "unassigned", partner_id, Some(hub_id), String::new())
        }
    })
}

/// The trail's entry for a hub event, if it has one. Pickup codes are never in it.
pub(crate) fn hub_entry(hub_id: &HubId, event: &HubEvent) -> Option<AuditEntry> {
    let entry =
        |at: UnixMillis, action: &str, order: &OrderId, partner: Option<&PartnerId>, detail: String| AuditEntry {
            at,
            action: action.into(),
            order_id: Some(order.to_string()),
            partner_id: partner.map(ToString::to_string),
            hub_id: Some(hub_id.to_string()),
            detail,
        };
    let ms = |t: UnixMillis| t.0;
    Some(match event {
        HubEvent::Configured { .. } | HubEvent::LedgerSynced { .. } | HubEvent::LedgerRetry { .. } => return None,
        HubEvent::StatusRequested {
            partner,
            status,
            reason,
            at,
        } => AuditEntry {
            at: *at,
            action: "status_requested".into(),
            order_id: None,
            partner_id: Some(partner.to_string()),
            hub_id: Some(hub_id.to_string()),
            detail: format!("{status:?}: {reason}"),
        },
        HubEvent::Dispatched {
            order,
            promised_from,
            promised_by,
            throttled,
            at,
            ..
        } => entry(
            *at,
            "dispatched",
            &order.order_id,
            None,
            format!(
                "window {}..{} (unix ms){}",
                ms(*promised_from),
                ms(*promised_by),
                if *throttled { ", throttled to a later slot" } else { "" }
            ),
        ),
        HubEvent::Offered {
            order_id,
            partner,
            deadline,
            at,
            ..
        } => entry(
            *at,
            "offered",
            order_id,
            Some(partner),
            format!("accept by {} (unix ms)", ms(*deadline)),
        ),
        HubEvent::Accepted {
            order_id, partner, at, ..
        } => entry(*at, "accepted", order_id, Some(partner), String::new()),
        // The codes themselves are never written to the trail.
        HubEvent::PickupCodeRefused {
            order_id,
            partner,
            failures,
            at,
        } => entry(
            *at,
            if *failures >= domain::limits::PICKUP_CODE_TRIES_MAX {
                "pickup_locked"
            } else {
                "pickup_code_refused"
            },
            order_id,
            Some(partner),
            format!("wrong pickup code ({failures} in a row)"),
        ),
        HubEvent::PickupCodeReissued { order_id, at, .. } => entry(
            *at,
            "pickup_code_reissued",
            order_id,
            None,
            "a new pickup code was issued to the buyer".into(),
        ),
        HubEvent::PickedUp {
            order_id, partner, at, ..
        } => entry(*at, "picked_up", order_id, Some(partner), String::new()),
        HubEvent::Delivered {
            order_id,
            partner,
            proof,
            on_time,
            at,
        } => entry(
            *at,
            "delivered",
            order_id,
            Some(partner),
            format!("proof {proof}, {}", if *on_time { "on time" } else { "late" }),
        ),
        HubEvent::DeliveryOverdue { order_id, partner, at } => {
            entry(*at, "delivery_overdue", order_id, Some(partner), String::new())
        }
        HubEvent::PartnerSwapped { order_id, swap } => entry(
            swap.at,
            "swapped",
            order_id,
            Some(&swap.from),
            match swap.missed_deadline {
                Some(d) => format!("{} ({} ms after it)", swap.reason.describe(), swap.at.0 - d.0),
                None => swap.reason.describe(),
            },
        ),
        HubEvent::Waiting { order_id, reason, at } => entry(*at, "no_partner", order_id, None, reason.clone()),
        HubEvent::Cancelled { order_id, holder, at } => entry(
            *at,
            "cancelled",
            order_id,
            holder.as_ref(),
            "the order was cancelled or refunded".into(),
        ),
        HubEvent::CancelledBeforeHandOver { order, at } => entry(
            *at,
            "cancelled",
            &order.order_id,
            None,
            "the order was cancelled or refunded before it reached the hub; it will not be dispatched".into(),
        ),
        HubEvent::WindowMissed { order_id, remedy } => entry(
            remedy.at,
            "remedy",
            order_id,
            None,
            format!(
                "{:?}: {} owed to the buyer, charged to {:?}",
                remedy.kind, remedy.amount, remedy.at_fault
            ),
        ),
        HubEvent::Failed {
            order_id,
            holder,
            reason,
            remedy,
            at,
        } => entry(
            *at,
            "failed",
            order_id,
            holder.as_ref(),
            format!("{reason}; {} refunded, charged to {:?}", remedy.amount, remedy.at_fault),
        ),
    })
}
