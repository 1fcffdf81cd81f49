//! Why a command was refused. Rejections are values: a refused command changes nothing.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One problem with one request field, reported to clients as a gRPC `BadRequest` detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum Rejection {
    /// The request is malformed, whatever the state.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The named thing does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: String, id: String },
    /// The request is well formed but the state does not allow it now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The buyer already has as many units as the drop allows per buyer.
    #[error("per-buyer limit of {limit} reached ({active} already reserved or bought)")]
    BuyerLimitReached { limit: u32, active: u32 },
    /// An idempotency key was reused with different parameters.
    #[error("idempotency key {key:?} was already used with different parameters")]
    IdempotencyKeyReused { key: String },
    /// The caller is known but may not act on this thing (another partner's dispatch).
    #[error("{0}")]
    PermissionDenied(String),
    /// A bounded table or queue is full; retry later.
    #[error("{0}")]
    Exhausted(String),
    /// The thing exists already with different content.
    #[error("{what} {id} already exists with different content")]
    AlreadyExists { what: String, id: String },
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Rejection {
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Rejection {
        Rejection::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    pub fn not_found(what: &str, id: impl Into<String>) -> Rejection {
        Rejection::NotFound {
            what: what.to_string(),
            id: id.into(),
        }
    }
}
