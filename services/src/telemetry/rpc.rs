//! The tower layer around every gRPC call ([`RpcLayer`], outermost on the tonic server):
//! gives the call its request id (the client's `x-request-id` when it sends a usable one,
//! else a fresh one; always returned as response metadata), runs the call inside an `rpc`
//! span (target `services::rpc`: method, request id, then status code and latency), and
//! counts it by method and status code with its latency ([`Metrics::rpc_finished`]).
//!
//! The status is read where gRPC puts it: the `grpc-status` response header of a
//! trailers-only answer (tonic's errors), else the trailers at the end of the body. A body
//! dropped before its trailers (the client went away) counts as CANCELLED.

use super::metrics::{Metrics, CODE_CANCELLED, CODE_UNKNOWN, GRPC_CODES};
use crate::limits::REQUEST_ID_LEN_MAX;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;
use tower::{Layer, Service};
use tracing::Span;

/// The metadata key a request id travels in, both ways.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Where gRPC puts a call's status code.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

#[derive(Clone)]
pub struct RpcLayer {
    metrics: Arc<Metrics>,
}

impl RpcLayer {
    pub fn new(metrics: Arc<Metrics>) -> RpcLayer {
        RpcLayer { metrics }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// A usable request id from the client: 1 to `REQUEST_ID_LEN_MAX` characters of letters,
/// digits and `-_.:/+=` (UUIDs, ULIDs, W3C trace ids, base64 all fit); anything else is
/// replaced rather than logged.
fn client_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let value = headers.get(&REQUEST_ID_HEADER)?;
    let ok = (1..=REQUEST_ID_LEN_MAX).contains(&value.len())
        && value
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(b));
    ok.then(|| value.clone())
}

/// A fresh request id: 16 hex digits (64 random bits).
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bits: u64 = rand::random();
    let mut id = [0u8; 16];
    for digit in id.iter_mut().rev() {
        *digit = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// The status code number in a `grpc-status` value.
fn grpc_code(headers: &HeaderMap) -> Option<usize> {
    let value = headers.get(&GRPC_STATUS)?;
    let code: usize = std::str::from_utf8(value.as_bytes()).ok()?.parse().ok()?;
    Some(if code < GRPC_CODES.len() { code } else { CODE_UNKNOWN })
}

/// What ends a call: its count, latency and span fields. Runs once.
struct Finish {
    metrics: Arc<Metrics>,
    method: usize,
    started: Instant,
    span: Span,
}

impl Finish {
    fn finish(self, code: usize) {
        let elapsed = self.started.elapsed();
        self.metrics.rpc_finished(self.method, code, elapsed);
        if self.span.is_disabled() {
            return;
        }
        // As i64: OpenTelemetry's integers (a u64 would be exported as a string).
        let latency_us = i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX);
        if super::logging::exporting() {
            self.span.record("rpc.grpc.status_code", code as i64);
            self.span.record("latency_us", latency_us);
            // Server-side failures, as OpenTelemetry's gRPC conventions count them.
            if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
                self.span.record("otel.status_code", "error");
            }
        }
        tracing::debug!(
            target: "services::rpc",
            parent: &self.span,
            method = self.metrics.method_path(self.method),
            code = GRPC_CODES[code],
            latency_us,
            "rpc finished"
        );
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<RpcBody<ResBody>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> RpcFuture<S::Future> {
        if !self.metrics.enabled() {
            return RpcFuture {
                inner: self.inner.call(request),
                finish: None,
                request_id: None,
            };
        }
        let started = Instant::now();
        let method = self.metrics.method(request.uri().path());
        let request_id = client_request_id(request.headers()).unwrap_or_else(new_request_id);
        // One field at first: the log layer formats every field a span is made with, for the
        // lines logged inside it. Those only a trace shows are recorded only when exporting.
        let span = tracing::info_span!(
            target: "services::rpc",
            "rpc",
            request_id = request_id.to_str().unwrap_or_default(),
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty,
            latency_us = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if super::logging::exporting() && !span.is_disabled() {
            span.record("otel.name", self.metrics.method_path(method));
            span.record("otel.kind", "server");
        }
        let inner = span.in_scope(|| self.inner.call(request));
        RpcFuture {
            inner,
            finish: Some(Finish {
                metrics: self.metrics.clone(),
                method,
                started,
                span,
            }),
            request_id: Some(request_id),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner call inside its span; hands the finishing over to the body unless the
    /// status is in the response's headers already.
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        finish: Option<Finish>,
        request_id: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<RpcBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let polled = match this.finish.as_ref() {
            Some(finish) => {
                let _entered = finish.span.enter();
                this.inner.poll(cx)
            }
            None => this.inner.poll(cx),
        };
        let result = ready!(polled);
        let finish = this.finish.take();
        Poll::Ready(match result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                if let Some(id) = this.request_id.take() {
                    parts.headers.insert(REQUEST_ID_HEADER.clone(), id);
                }
                let finish = match (finish, grpc_code(&parts.headers)) {
                    (Some(finish), Some(code)) => {
                        finish.finish(code);
                        None
                    }
                    (finish, _) => finish,
                };
                Ok(http::Response::from_parts(parts, RpcBody { inner: body, finish }))
            }
            Err(e) => {
                if let Some(finish) = finish {
                    finish.finish(CODE_UNKNOWN);
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// The response body, finishing the call at its trailers (or when dropped unfinished).
    pub struct RpcBody<B> {
        #[pin]
        inner: B,
        finish: Option<Finish>,
    }

    impl<B> PinnedDrop for RpcBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(finish) = this.project().finish.take() {
                finish.finish(CODE_CANCELLED);
            }
        }
    }
}

impl<B: Body> Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(finish) = this.finish.take() {
                        finish.finish(grpc_code(trailers).unwrap_or(CODE_UNKNOWN));
                    }
                }
            }
            // An error or an end without trailers: no status reached the client.
            Some(Err(_)) | None => {
                if let Some(finish) = this.finish.take() {
                    finish.finish(CODE_UNKNOWN);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_request_id_is_kept_only_when_it_is_plain_and_short() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(REQUEST_ID_HEADER.clone(), HeaderValue::from_str(value).unwrap());
            headers
        };
        assert_eq!(
            client_request_id(&headers("4bf92f3577b34da6a3ce929d0e0e4736")).unwrap(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(client_request_id(&headers("a b")).is_none());
        assert!(client_request_id(&headers(&"x".repeat(REQUEST_ID_LEN_MAX + 1))).is_none());
        assert!(client_request_id(&HeaderMap::new()).is_none());
        let made = new_request_id();
        assert_eq!(made.len(), 16);
        assert!(client_request_id(&headers(made.to_str().unwrap())).is_some());
    }

    #[test]
    fn status_codes_come_from_grpc_status() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_code(&headers), None);
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        assert_eq!(grpc_code(&headers), Some(8));
        headers.insert("grpc-status", HeaderValue::from_static("99"));
        assert_eq!(grpc_code(&headers), Some(CODE_UNKNOWN));
    }
}
