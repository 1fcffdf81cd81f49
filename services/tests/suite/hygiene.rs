//! Transport and request hygiene over real gRPC: bytes that do not decode are
//! INVALID_ARGUMENT on every RPC of every Dropline service; a known credential of the wrong
//! kind is PERMISSION_DENIED, never UNAUTHENTICATED; oversized metadata fails that call
//! alone, with a clear status, while a courier's live stream on the same connection goes
//! on; every NOT_FOUND names its id; a currency outside ISO 4217 is refused.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use proto::dispatch::v1::dispatch_service_client::DispatchServiceClient;
use proto::dispatch::v1::*;
use proto::settlement::v1 as settlement;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use std::time::Duration;
use testkit::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Sends and receives message bodies as they are, so a test can put any bytes in a frame.
#[derive(Clone, Copy, Default)]
pub(crate) struct RawCodec;

pub(crate) struct RawEncoder;
pub(crate) struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Every RPC of every service `dropline serve` serves, as (service,
/// "/package.Service/Method"), read from the descriptor set the server registers for
/// reflection: a new RPC is covered at once.
fn every_rpc() -> Vec<(String, String)> {
    // PopupService is `dropline edge`'s, not the platform's (popup.rs checks it there).
    rpcs_where(|_, service| service != "PopupService")
}

/// The RPCs of the Dropline services for which `keep(package, service)` holds.
pub(crate) fn rpcs_where(keep: impl Fn(&str, &str) -> bool) -> Vec<(String, String)> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut rpcs = Vec::new();
    for file in &set.file {
        let package = file.package();
        // The bench echo service is the load tests' own server, not one Dropline serves.
        if !package.starts_with("dropline.") || package.starts_with("dropline.bench.") {
            continue;
        }
        for service in file.service.iter().filter(|s| keep(package, s.name())) {
            for method in &service.method {
                rpcs.push((
                    service.name().to_string(),
                    format!("/{package}.{}/{}", service.name(), method.name()),
                ));
            }
        }
    }
    rpcs
}

/// Calls `path` with `body` as its message and `authorization` as its credential; Ok when
/// the server answered with a message or opened its stream.
pub(crate) async fn raw_call(
    channel: &Channel,
    path: &str,
    body: Bytes,
    authorization: Option<&str>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(body);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.parse().unwrap());
    }
    let path = PathAndQuery::try_from(path).unwrap();
    // Server streaming works for every RPC: a unary reply is a stream of one message.
    let call = grpc.server_streaming::<Bytes, Bytes, _>(request, path, RawCodec);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(answer) => answer.map(|_| ()),
        Err(_) => Err(Status::deadline_exceeded("no answer within 10 s")),
    }
}

/// The RPCs whose client streams its requests (ReserveStream): the handler runs, and checks
/// the credential, before any message is read.
pub(crate) fn client_streaming_rpcs() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut rpcs = Vec::new();
    for file in set.file.iter().filter(|f| f.package().starts_with("dropline.")) {
        for service in &file.service {
            for method in service.method.iter().filter(|m| m.client_streaming()) {
                rpcs.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
            }
        }
    }
    rpcs
}

/// [`raw_call`] for an RPC whose client streams: `body` is its one message, and the
/// answer is the first error the call or its stream ends with (Ok for a clean end).
async fn raw_stream_call(channel: &Channel, path: &str, body: Bytes, authorization: &str) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(tokio_stream::iter([body]));
    request
        .metadata_mut()
        .insert("authorization", authorization.parse().unwrap());
    let path = PathAndQuery::try_from(path).unwrap();
    let call = async {
        let mut answers = grpc.streaming(request, path, RawCodec).await?.into_inner();
        while answers.message().await?.is_some() {}
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(answer) => answer,
        Err(_) => Err(Status::deadline_exceeded("no answer within 10 s")),
    }
}

/// Message bodies no protobuf message decodes from, whatever its fields.
pub(crate) fn undecodable_bodies() -> Vec<(&'static str, Bytes)> {
    let random = |n: usize| -> Vec<u8> { (0..n).map(|_| rand::random::<u8>()).collect() };
    // Field 1 with wire type 7 (there are six) and field 0 (numbers start at 1), each
    // followed by random bytes that are never read.
    let mut bad_wire_type = vec![0x0f];
    bad_wire_type.extend(random(64));
    let mut field_zero = vec![0x00];
    field_zero.extend(random(64));
    vec![
        ("a field of wire type 7, then random bytes", Bytes::from(bad_wire_type)),
        ("field number 0, then random bytes", Bytes::from(field_zero)),
        // A string of 16 bytes with one byte left, and a varint that never ends.
        ("a length running past the end", Bytes::from_static(&[0x0a, 0x10, 0x41])),
        ("a varint cut short", Bytes::from_static(&[0x08, 0xff])),
    ]
}

/// Services whose calls pass the credential interceptor first (all but checkout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_decode_are_invalid_argument_on_every_rpc() {
    let server = TestServer::start().await;
    let rpcs = every_rpc();
    assert!(rpcs.len() >= 40, "every service's RPCs: {rpcs:?}");
    let operator = format!("Bearer {OPERATOR_TOKEN}");
    let storefront = format!("Bearer {}", server.storefront_credential);
    let client_streaming = client_streaming_rpcs();
    assert!(!client_streaming.is_empty(), "ReserveStream streams its requests");
    for (service, path) in &rpcs {
        if client_streaming.contains(path) {
            // The credential is checked as the stream opens; then undecodable bytes end it
            // with INVALID_ARGUMENT.
            for (what, body) in undecodable_bodies() {
                let status = raw_stream_call(&server.channel, path, body, &storefront)
                    .await
                    .expect_err("undecodable bytes are refused");
                assert_eq!(status.code(), Code::InvalidArgument, "{path} with {what}: {status:?}");
                assert!(status.message().contains("does not decode"), "{path}: {status:?}");
            }
            continue;
        }
        for (what, body) in undecodable_bodies() {
            // The message is decoded before any handler runs, so no credential and a valid
            // one get the same answer.
            for credential in [None, Some(operator.as_str())] {
                let status = raw_call(&server.channel, path, body.clone(), credential)
                    .await
                    .expect_err("undecodable bytes are refused");
                assert_eq!(
                    status.code(),
                    Code::InvalidArgument,
                    "{path} with {what} ({}): {status:?}",
                    if credential.is_some() {
                        "operator"
                    } else {
                        "no credential"
                    }
                );
                assert!(status.message().contains("does not decode"), "{path}: {status:?}");
            }
            // An unknown credential: the other services' interceptor runs before the message
            // is decoded, so they say UNAUTHENTICATED first; checkout resolves its caller in
            // the handler (off the interceptor, for its hot path), after decoding.
            let status = raw_call(&server.channel, path, body, Some("Bearer not-a-credential"))
                .await
                .expect_err("refused");
            let expected = if service == "CheckoutService" {
                Code::InvalidArgument
            } else {
                Code::Unauthenticated
            };
            assert_eq!(
                status.code(),
                expected,
                "{path} ({service}) with {what} and an unknown credential"
            );
        }
    }
    println!("{} RPCs refused undecodable bytes with INVALID_ARGUMENT", rpcs.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_credential_of_the_wrong_kind_is_permission_denied_never_unauthenticated() {
    let server = TestServer::start().await;
    let partner = courier(&server.channel, "courier-1", "hub-1", 1).await;
    let creator = creator(&server.channel, "creator-1").await;
    let credentials = [
        ("operator", format!("Bearer {OPERATOR_TOKEN}")),
        ("partner", format!("Bearer {partner}")),
        ("creator", format!("Bearer {creator}")),
        ("storefront", format!("Bearer {}", server.storefront_credential)),
    ];
    let mut checked = 0;
    // Every RPC but the public availability levels needs a credential.
    for (service, path) in every_rpc().iter().filter(|(_, p)| !p.ends_with("/GetAvailability")) {
        // An empty message is a valid one (every field unset).
        for (kind, credential) in &credentials {
            if let Err(status) = raw_call(&server.channel, path, Bytes::new(), Some(credential)).await {
                assert_ne!(
                    status.code(),
                    Code::Unauthenticated,
                    "{service} {path} with a {kind} credential: {status:?}"
                );
            }
            checked += 1;
        }
        // Without a credential every call is refused: for its credential, or first for an
        // empty required field.
        let status = raw_call(&server.channel, path, Bytes::new(), None)
            .await
            .expect_err("anonymous calls are refused");
        assert!(
            matches!(status.code(), Code::Unauthenticated | Code::InvalidArgument),
            "{path} without a credential: {status:?}"
        );
    }
    assert!(checked > 0);

    // The case of the issue: a partner asking for a real order's settlement.
    open_drop(&server, drop_request("roles", &[("sku", 10)], 5, 600)).await;
    let order = buy(&server, "roles", "sku", "ana").await.order.unwrap();
    let mut as_partner = SettlementServiceClient::with_interceptor(
        server.channel.clone(),
        services::auth::Bearer::new(&partner).unwrap(),
    );
    let refused = as_partner
        .get_order_settlement(settlement::GetOrderSettlementRequest {
            order_id: order.order_id,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    server.stop().await;
}

/// A GetDispatch on `channel` carrying `metadata` (name, value) pairs, no other credential.
async fn get_dispatch_with(channel: &Channel, metadata: &[(String, String)]) -> Result<Dispatch, Status> {
    let mut request = tonic::Request::new(GetDispatchRequest {
        dispatch_id: "hub-1/drop-1.sku-1.00000000000000ab".into(),
    });
    for (name, value) in metadata {
        let name = tonic::metadata::MetadataKey::from_bytes(name.as_bytes()).unwrap();
        request.metadata_mut().insert(name, value.parse().unwrap());
    }
    DispatchServiceClient::new(channel.clone())
        .get_dispatch(request)
        .await
        .map(tonic::Response::into_inner)
}

fn bearer_of(bytes: usize) -> Vec<(String, String)> {
    let token: String = (0..bytes - "Bearer ".len())
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    vec![("authorization".into(), format!("Bearer {token}"))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_fails_only_its_call_and_a_courier_stream_on_the_connection_goes_on() {
    let server = TestServer::start().await;
    let credential = courier(&server.channel, "steady", "hub-1", 1).await;
    open_drop(&server, drop_request("hygiene", &[("sku", 10)], 5, 600)).await;
    // One connection (a tonic Channel is one HTTP/2 connection) carries it all.
    let channel = server.channel.clone();
    let mut courier = courier_client(&channel, &credential);
    let mut stream = courier.subscribe(SubscribeRequest {}).await.unwrap().into_inner();

    // A credential over 8 KiB, as far as HTTP/2 lets it reach the server (1 MiB): a clean
    // UNAUTHENTICATED for that call, on an authenticated service and on checkout alike.
    for bytes in [9 * 1024, 16_000, 64_000, 200_000, 1_000_000] {
        let status = get_dispatch_with(&channel, &bearer_of(bytes)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{bytes} bytes: {status:?}");
        assert!(
            status.message().contains("over the 8192-byte bound"),
            "{bytes} bytes: {status:?}"
        );
    }
    let mut checkout = tonic::Request::new(proto::checkout::v1::GetAvailabilityRequest {
        drop_id: "hygiene".into(),
        ..Default::default()
    });
    checkout
        .metadata_mut()
        .insert("authorization", bearer_of(200_000)[0].1.parse().unwrap());
    let status = server
        .anonymous_checkout()
        .get_availability(checkout)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Many headers, each small: RESOURCE_EXHAUSTED for that call.
    for count in [20, 200] {
        let padding: Vec<(String, String)> = (0..count).map(|i| (format!("x-pad-{i}"), "p".repeat(1_000))).collect();
        let status = get_dispatch_with(&channel, &padding).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{count} headers: {status:?}");
        assert!(status.message().contains("request metadata is"), "{status:?}");
    }

    // Past HTTP/2's own bound h2 refuses the stream itself (HTTP 431, read as UNKNOWN):
    // still that call alone.
    let status = get_dispatch_with(&channel, &bearer_of(1_300_000)).await.unwrap_err();
    assert_ne!(status.code(), Code::Ok);

    // The courier's stream lived through all of it: the next order's offer arrives on it,
    // and an ordinary call on the same connection is answered.
    let order = buy(&server, "hygiene", "sku", "ana").await.order.unwrap();
    let offer = next_offer(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(offer.order_id, order.order_id);
    let dispatch = courier
        .get_dispatch(GetDispatchRequest {
            dispatch_id: offer.dispatch_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dispatch.dispatch_id, offer.dispatch_id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_names_the_id_and_an_empty_id_is_required() {
    let server = TestServer::start().await;
    let mut operator = server.operator();
    let missing = operator
        .get_drop(proto::operator::v1::GetDropRequest {
            drop_id: "no-such-drop".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "drop no-such-drop not found");
    let opened = operator
        .open_drop(proto::operator::v1::OpenDropRequest {
            drop_id: "no-such-drop".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(opened.message(), "drop no-such-drop not found");
    let reserved = server
        .checkout()
        .reserve(reserve("no-such-drop", "sku", "ana", 1))
        .await
        .unwrap_err();
    assert_eq!(reserved.code(), Code::NotFound);
    assert!(reserved.message().contains("no-such-drop"), "{reserved:?}");
    let empty = operator
        .get_drop(proto::operator::v1::GetDropRequest { drop_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("drop_id: is required"), "{empty:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_in_a_currency_outside_iso_4217_is_refused() {
    let server = TestServer::start().await;
    let mut zzz = drop_request("zzz", &[("sku", 10)], 5, 600);
    zzz.skus[0].price = Some(proto::common::v1::Money {
        minor_units: 1_000,
        currency: "ZZZ".into(),
    });
    let refused = server.operator().create_drop(zzz).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("ZZZ is not an ISO 4217 currency"),
        "{refused:?}"
    );
    // Yen have no minor unit: ¥1,000 is 1000 minor units, and sells as such.
    let mut yen = drop_request("yen", &[("sku", 10)], 5, 600);
    yen.skus[0].price = Some(proto::common::v1::Money {
        minor_units: 1_000,
        currency: "JPY".into(),
    });
    server.operator().create_drop(yen).await.unwrap();
    server.stop().await;
}
