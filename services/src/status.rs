//! The one place where domain rejections and actor delivery errors become gRPC statuses.
//! Field problems carry `BadRequest` details; a reused idempotency key carries an
//! `ErrorInfo` with reason `IDEMPOTENCY_KEY_REUSED`; overload carries `RetryInfo`, and so does
//! a full disk (with `ErrorInfo` reason `STORAGE_FULL`).

use actors::limits::JOURNAL_RETRY_MAX_MS;
use actors::CommandError;
use domain::{FieldViolation, Rejection};
use std::collections::HashMap;
use std::time::Duration;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const ERROR_DOMAIN: &str = "dropline.dev";

/// The retry delay UNAVAILABLE suggests (`RetryInfo`): a takeover or a reloaded actor takes
/// about this long; clients back off further on their own.
pub const UNAVAILABLE_RETRY_MS: u64 = 500;

pub fn invalid_argument(violations: Vec<FieldViolation>) -> Status {
    let message = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let details = ErrorDetails::with_bad_request(
        violations
            .into_iter()
            .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(Code::InvalidArgument, format!("invalid argument: {message}"), details)
}

pub fn from_rejection(rejection: Rejection) -> Status {
    let message = rejection.to_string();
    match rejection {
        Rejection::InvalidArgument(violations) => invalid_argument(violations),
        Rejection::NotFound { id, .. } => {
            // A NOT_FOUND tells the client which id: an empty one means a layer lost it.
            debug_assert!(!id.is_empty(), "NOT_FOUND without its id: {message}");
            Status::not_found(message)
        }
        Rejection::FailedPrecondition(_) => Status::failed_precondition(message),
        Rejection::BuyerLimitReached { limit, .. } => Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_quota_failure_violation("buyer", format!("at most {limit} units of this SKU per buyer")),
        ),
        Rejection::IdempotencyKeyReused { key } => Status::with_error_details(
            Code::AlreadyExists,
            message,
            ErrorDetails::with_error_info(
                "IDEMPOTENCY_KEY_REUSED",
                ERROR_DOMAIN,
                HashMap::from([("key".to_string(), key)]),
            ),
        ),
        Rejection::AlreadyExists { .. } => Status::already_exists(message),
        Rejection::PermissionDenied(_) => Status::permission_denied(message),
        Rejection::Exhausted(_) => Status::resource_exhausted(message),
    }
}

pub fn from_command_error(error: CommandError) -> Status {
    match error {
        CommandError::Rejected(rejection) => from_rejection(rejection),
        CommandError::Overloaded(what) => Status::with_error_details(
            Code::ResourceExhausted,
            format!("overloaded ({what}); nothing was changed, retry shortly"),
            ErrorDetails::with_retry_info(Some(Duration::from_millis(50))),
        ),
        CommandError::Timeout(ms) => {
            Status::deadline_exceeded(format!("no reply within {ms} ms; the command may still take effect"))
        }
        // Both say retry, and when: a partition without an owner is taken over within the
        // lease TTL, a journal that failed a write is reloaded by its next command.
        CommandError::Unavailable(why) => Status::with_error_details(
            Code::Unavailable,
            why,
            ErrorDetails::with_retry_info(Some(Duration::from_millis(UNAVAILABLE_RETRY_MS))),
        ),
        CommandError::Storage(why) => Status::with_error_details(
            Code::Unavailable,
            format!("storage failure, nothing acknowledged was lost; retry: {why}"),
            ErrorDetails::with_retry_info(Some(Duration::from_millis(UNAVAILABLE_RETRY_MS))),
        ),
        CommandError::StorageFull(why) => storage_full(&why),
    }
}

/// The journal's disk is full: RESOURCE_EXHAUSTED (the code gRPC names for "the entire file
/// system is out of space"), `ErrorInfo{reason: STORAGE_FULL}` to tell it from overload, and
/// `RetryInfo` with the journal's longest retry interval: writes resume by themselves within
/// it once space is freed. Reads are still served.
pub fn storage_full(why: &str) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(Duration::from_millis(JOURNAL_RETRY_MAX_MS)));
    details.set_error_info("STORAGE_FULL", ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "the server's disk is full, so this change was not acknowledged; reads still work, \
             retry in {} s with the same request: {why}",
            JOURNAL_RETRY_MAX_MS.div_ceil(1_000)
        ),
        details,
    )
}
