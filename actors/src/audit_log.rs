//! The audit trail operators query per order and per partner: every assignment, swap,
//! delivery, status change and credential use. Entries are written by the hub and registry
//! actors once the batch that caused them is durable (so the trail never shows something
//! that did not happen), and by the services for credential use.

use crate::journal::JournalError;
use domain::UnixMillis;
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
