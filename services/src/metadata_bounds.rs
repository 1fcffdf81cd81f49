//! The server-wide bound on request metadata. HTTP/2 accepts up to
//! `HTTP2_HEADER_LIST_BYTES_MAX` (see `crate::limits`); this layer answers anything above
//! our own, much smaller bounds with a status for that call alone, before any service,
//! interceptor or credential hash runs: checkout, health and reflection included, which the
//! `Authenticator` does not cover.

use crate::limits::{GRPC_AUTHORIZATION_BYTES_MAX, GRPC_METADATA_BYTES_MAX};
use tonic::service::InterceptorLayer;
use tonic::{Request, Status};

/// HTTP/2's accounting of one header field (RFC 7541 §4.1), as h2 counts the list.
const FIELD_OVERHEAD_BYTES: usize = 32;

/// The layer to put on the whole server (`Server::builder().layer(..)`).
pub fn layer() -> InterceptorLayer<Check> {
    InterceptorLayer::new(check as Check)
}

/// The interceptor function's type.
pub type Check = fn(Request<()>) -> Result<Request<()>, Status>;

/// UNAUTHENTICATED for an `authorization` value longer than any credential, then
/// RESOURCE_EXHAUSTED for metadata larger than a request needs.
pub fn check(request: Request<()>) -> Result<Request<()>, Status> {
    let headers: &tonic::codegen::http::HeaderMap = request.metadata().as_ref();
    if let Some(value) = headers.get(tonic::codegen::http::header::AUTHORIZATION) {
        if value.len() > GRPC_AUTHORIZATION_BYTES_MAX {
            return Err(Status::unauthenticated(format!(
                "authorization metadata is {} bytes, over the {GRPC_AUTHORIZATION_BYTES_MAX}-byte bound: \
                 send `Bearer <credential>`",
                value.len()
            )));
        }
    }
    let total: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD_OVERHEAD_BYTES)
        .sum();
    if total > GRPC_METADATA_BYTES_MAX {
        return Err(Status::resource_exhausted(format!(
            "request metadata is {total} bytes, over the {GRPC_METADATA_BYTES_MAX}-byte bound"
        )));
    }
    Ok(request)
}
