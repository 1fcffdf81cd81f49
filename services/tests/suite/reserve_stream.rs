//! CheckoutService.ReserveStream over real gRPC, used as a storefront would and attacked:
//! every request gets what Reserve would have answered; idempotency keys, per-buyer limits
//! and call rates hold within a message and across messages; another storefront, a wrong
//! or rotated credential, too many reserves, bytes that do not decode, an oversized
//! message, too many streams and a client that never reads its answers each get a clear
//! status, and change nothing they should not.

use crate::hygiene::RawCodec;
use bytes::Bytes;
use prost::Message;
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use services::auth::Authed;
use services::limits::{
    RESERVE_STREAMS_PER_CONNECTION_MAX, RESERVE_STREAM_REPLY_STALL_MS, RESERVE_STREAM_REQUESTS_MAX,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use testkit::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

const PATH: &str = "/dropline.checkout.v1.CheckoutService/ReserveStream";

/// One open ReserveStream: messages go in through `tx`, answers come from `answers`.
struct Stream {
    tx: mpsc::Sender<ReserveStreamRequest>,
    answers: tonic::Streaming<ReserveStreamResponse>,
}

impl Stream {
    async fn open(checkout: &mut CheckoutServiceClient<Authed>) -> Result<Stream, Status> {
        let (tx, rx) = mpsc::channel(16);
        let answers = checkout.reserve_stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Stream { tx, answers })
    }

    async fn send(&self, reserves: Vec<ReserveRequest>) {
        self.tx.send(ReserveStreamRequest { reserves }).await.unwrap();
    }

    /// The next answer, or the status the stream ended with.
    async fn next(&mut self) -> Result<ReserveStreamResponse, Status> {
        tokio::time::timeout(Duration::from_secs(30), self.answers.message())
            .await
            .expect("an answer within 30 s")?
            .ok_or_else(|| Status::ok("the stream ended"))
    }

    /// Sends one message and returns its results, each as Reserve would have answered.
    async fn reserve(&mut self, reserves: Vec<ReserveRequest>) -> Vec<Result<ReserveResponse, Status>> {
        let count = reserves.len();
        self.send(reserves).await;
        let answer = self.next().await.expect("the message is answered");
        assert_eq!(answer.status, None, "the message is not refused whole");
        assert_eq!(answer.results.len(), count, "one result per reserve");
        answer.results.into_iter().map(outcome).collect()
    }
}

/// A result as Reserve's own: the reservation, or the status with its details.
fn outcome(result: ReserveResult) -> Result<ReserveResponse, Status> {
    match result.result.expect("a result is set") {
        reserve_result::Result::Reservation(reservation) => Ok(reservation),
        reserve_result::Result::Error(error) => Err(status_of(error)),
    }
}

fn status_of(error: RequestStatus) -> Status {
    Status::with_details(Code::from(error.code), error.message, Bytes::from(error.details))
}

fn held(result: &Result<ReserveResponse, Status>) -> &ReserveResponse {
    let reservation = result.as_ref().expect("a reservation");
    assert_eq!(reservation.outcome(), ReserveOutcome::Held, "{reservation:?}");
    reservation
}

fn keyed(drop_id: &str, sku_id: &str, buyer: &str, key: &str) -> ReserveRequest {
    ReserveRequest {
        idempotency_key: key.into(),
        ..reserve(drop_id, sku_id, buyer, 1)
    }
}

/// (available, held, waitlisted) of the drop's SKU `sku_id`.
async fn stock(server: &TestServer, drop_id: &str, sku_id: &str) -> (u32, u32, u32) {
    let figures = server.drop_figures(drop_id).await;
    let sku = figures.skus.iter().find(|s| s.sku_id == sku_id).unwrap();
    (sku.available, sku.held, sku.waitlisted)
}

/// CheckoutService as a storefront other than `test-web`, registered now, with its credential.
async fn other_storefront(server: &TestServer, storefront_id: &str) -> (String, CheckoutServiceClient<Authed>) {
    let credential = storefront_credential(std::slice::from_ref(&server.channel), OPERATOR_TOKEN, storefront_id)
        .await
        .unwrap();
    let client = server.checkout_as(&credential);
    (credential, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_reserve_of_a_message_is_answered_as_reserve_would_answer_it() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("stream", &[("a", 2), ("b", 5)], 1, 600)).await;
    let mut stream = Stream::open(&mut server.checkout()).await.unwrap();
    let results = stream
        .reserve(vec![
            reserve("stream", "a", "ana", 1),
            reserve("stream", "b", "ana", 1),
            // Field problems, all at once, as Reserve reports them.
            ReserveRequest {
                quantity: 0,
                ..reserve("stream", "no such sku!", "bea", 1)
            },
            reserve("stream", "a", "bea", 1),
            // Over the per-buyer limit of one unit.
            reserve("stream", "a", "ana", 1),
            // The SKU's two units are held: the waitlist, or SOLD_OUT when skipping it.
            reserve("stream", "a", "caio", 1),
            ReserveRequest {
                skip_waitlist: true,
                ..reserve("stream", "a", "dora", 1)
            },
            reserve("nope", "a", "eva", 1),
        ])
        .await;
    for i in [0, 1, 3] {
        let reservation = held(&results[i]);
        assert!(!reservation.order_token.is_empty() && reservation.order_id.starts_with("stream."));
    }
    let invalid = results[2].as_ref().unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    let fields: Vec<_> = invalid
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["sku_id", "quantity"]);
    let limit = results[4].as_ref().unwrap_err();
    assert_eq!(limit.code(), Code::ResourceExhausted, "{limit:?}");
    assert!(limit.get_details_quota_failure().is_some(), "{limit:?}");
    let waitlisted = results[5].as_ref().unwrap();
    assert_eq!(waitlisted.outcome(), ReserveOutcome::Waitlisted);
    assert_eq!(waitlisted.waitlist_position, 1);
    assert_eq!(results[6].as_ref().unwrap().outcome(), ReserveOutcome::SoldOut);
    assert_eq!(results[7].as_ref().unwrap_err().code(), Code::NotFound);
    assert_eq!(stock(&server, "stream", "a").await, (0, 2, 1));
    assert_eq!(stock(&server, "stream", "b").await, (4, 1, 0));

    // A token from the stream is the order's token, as Reserve's is.
    let token = &results[0].as_ref().unwrap().order_token;
    let order = server
        .checkout_as(token)
        .get_order(GetOrderRequest {
            order_id: results[0].as_ref().unwrap().order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.status(), OrderStatus::Held);

    // A buyer hammering within one message meets the per-buyer call rate (a burst of 20)
    // like 30 Reserve calls would: RESOURCE_EXHAUSTED with RetryInfo, nothing done.
    let hammering: Vec<_> = (0..30)
        .map(|i| keyed("stream", "b", "bot", &format!("bot-{i}")))
        .collect();
    let results = stream.reserve(hammering).await;
    held(&results[0]);
    for result in &results[1..20] {
        let status = result.as_ref().unwrap_err();
        assert!(
            status.get_details_quota_failure().is_some(),
            "per-buyer limit: {status:?}"
        );
    }
    for result in &results[20..] {
        let status = result.as_ref().unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.get_details_retry_info().is_some(), "call rate: {status:?}");
    }
    assert_eq!(stock(&server, "stream", "b").await, (3, 2, 0));

    // The client's end of the stream ends it cleanly once everything is answered.
    stream.send(vec![reserve("stream", "b", "fred", 1)]).await;
    drop(stream.tx);
    held(&outcome(
        stream.answers.message().await.unwrap().unwrap().results.remove(0),
    ));
    assert!(stream.answers.message().await.unwrap().is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_twice_in_a_message_or_across_messages_and_calls_has_one_effect() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("keys", &[("sku", 10)], 5, 600)).await;
    let mut stream = Stream::open(&mut server.checkout()).await.unwrap();
    let results = stream
        .reserve(vec![
            keyed("keys", "sku", "ana", "k-1"),
            keyed("keys", "sku", "ana", "k-1"),
            // The same key for another request: refused, nothing done.
            keyed("keys", "sku", "bea", "k-1"),
        ])
        .await;
    let first = held(&results[0]);
    assert_eq!(
        results[1].as_ref().unwrap(),
        first,
        "the same key and request: the first result"
    );
    let reused = results[2].as_ref().unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    assert_eq!(
        reused.get_details_error_info().unwrap().reason,
        "IDEMPOTENCY_KEY_REUSED"
    );
    // In a later message, on another stream, and through Reserve: still the first result.
    let again = stream.reserve(vec![keyed("keys", "sku", "ana", "k-1")]).await;
    assert_eq!(again[0].as_ref().unwrap(), first);
    let mut other = Stream::open(&mut server.checkout()).await.unwrap();
    let again = other.reserve(vec![keyed("keys", "sku", "ana", "k-1")]).await;
    assert_eq!(again[0].as_ref().unwrap(), first);
    let unary = server
        .checkout()
        .reserve(keyed("keys", "sku", "ana", "k-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&unary, first);
    assert_eq!(stock(&server, "keys", "sku").await, (9, 1, 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_storefront_streams_and_another_storefront_reaches_nothing_of_the_first() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("theirs", &[("sku", 10)], 5, 600)).await;
    let mut first = Stream::open(&mut server.checkout()).await.unwrap();
    let mine = first.reserve(vec![keyed("theirs", "sku", "ana", "k-ana")]).await;
    let mine = held(&mine[0]).clone();

    // Another storefront replaying the first one's key and buyer gets neither its order nor
    // its token: the key names another storefront's request.
    let (_, mut other_client) = other_storefront(&server, "other-web").await;
    let mut other = Stream::open(&mut other_client).await.unwrap();
    let replayed = other.reserve(vec![keyed("theirs", "sku", "ana", "k-ana")]).await;
    let refused = replayed[0].as_ref().unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert!(!refused.message().contains(&mine.order_token) && !refused.message().contains(&mine.order_id));
    assert_eq!(stock(&server, "theirs", "sku").await, (9, 1, 0));

    // Credentials that are not a storefront's are refused as the stream opens.
    let partner = courier(&server.channel, "courier-1", "hub-1", 1).await;
    for (who, credential, code) in [
        ("the operator", OPERATOR_TOKEN.to_string(), Code::PermissionDenied),
        ("a partner", partner, Code::PermissionDenied),
        ("an order token", mine.order_token.clone(), Code::PermissionDenied),
        (
            "an unknown credential",
            "dls_not-a-credential".to_string(),
            Code::Unauthenticated,
        ),
    ] {
        let status = Stream::open(&mut server.checkout_as(&credential))
            .await
            .err()
            .unwrap_or_else(|| panic!("{who} opened a stream"));
        assert_eq!(status.code(), code, "{who}: {status:?}");
    }
    let (tx, rx) = mpsc::channel::<ReserveStreamRequest>(1);
    drop(tx);
    let status = server
        .anonymous_checkout()
        .reserve_stream(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A credential replaced while its stream is open ends the stream at the next message,
    // and nothing of that message is done.
    let new_credential = storefront_credential(std::slice::from_ref(&server.channel), OPERATOR_TOKEN, "other-web")
        .await
        .unwrap();
    other.send(vec![reserve("theirs", "sku", "bea", 1)]).await;
    let ended = other.next().await.unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(stock(&server, "theirs", "sku").await, (9, 1, 0));
    let mut renewed = Stream::open(&mut server.checkout_as(&new_credential)).await.unwrap();
    held(&renewed.reserve(vec![reserve("theirs", "sku", "bea", 1)]).await[0]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_too_many_reserves_or_none_is_refused_whole_and_the_stream_goes_on() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("many", &[("sku", 1_000)], 1, 600)).await;
    let mut stream = Stream::open(&mut server.checkout()).await.unwrap();
    let too_many: Vec<_> = (0..=RESERVE_STREAM_REQUESTS_MAX)
        .map(|i| reserve("many", "sku", &format!("buyer-{i}"), 1))
        .collect();
    for reserves in [too_many, Vec::new()] {
        let count = reserves.len();
        stream.send(reserves).await;
        let answer = stream.next().await.unwrap();
        assert!(answer.results.is_empty());
        let refused = status_of(answer.status.expect("refused whole"));
        assert_eq!(refused.code(), Code::InvalidArgument, "{count} reserves: {refused:?}");
        assert_eq!(
            refused.get_details_bad_request().unwrap().field_violations[0].field,
            "reserves"
        );
    }
    assert_eq!(stock(&server, "many", "sku").await, (1_000, 0, 0));
    let most: Vec<_> = (0..RESERVE_STREAM_REQUESTS_MAX)
        .map(|i| reserve("many", "sku", &format!("buyer-{i}"), 1))
        .collect();
    let results = stream.reserve(most).await;
    for result in &results {
        held(result);
    }
    assert_eq!(
        stock(&server, "many", "sku").await.1,
        RESERVE_STREAM_REQUESTS_MAX as u32
    );
    server.stop().await;
}

/// A ReserveStream sending `bodies` as they are, each one message; its answers until the
/// stream ends, and the status it ends with.
async fn raw_stream(
    channel: &Channel,
    credential: &str,
    bodies: Vec<Bytes>,
) -> (Vec<ReserveStreamResponse>, Result<(), Status>) {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(bodies));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {credential}").parse().unwrap());
    let mut answers = grpc
        .streaming(request, PathAndQuery::from_static(PATH), RawCodec)
        .await
        .unwrap()
        .into_inner();
    let mut decoded = Vec::new();
    loop {
        match answers.message().await {
            Ok(Some(bytes)) => decoded.push(ReserveStreamResponse::decode(bytes).unwrap()),
            Ok(None) => return (decoded, Ok(())),
            Err(status) => return (decoded, Err(status)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_an_oversized_message_ends_the_stream_after_answering_what_came_before() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("raw", &[("sku", 100)], 1, 600)).await;
    let valid = |buyer: &str| {
        Bytes::from(
            ReserveStreamRequest {
                reserves: vec![reserve("raw", "sku", buyer, 1)],
            }
            .encode_to_vec(),
        )
    };
    // A varint that never ends, then a valid message that is never read.
    let garbage = Bytes::from_static(&[0x0a, 0x05, 0x0a, 0xff, 0xff]);
    let (answers, end) = raw_stream(
        &server.channel,
        &server.storefront_credential,
        vec![valid("ana"), garbage, valid("bea")],
    )
    .await;
    assert_eq!(answers.len(), 1, "the message before the garbage is answered");
    held(&outcome(answers[0].results[0].clone()));
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("does not decode"), "{status:?}");

    // A message over the byte bound (a buyer id of 300 KiB) is refused before it is read.
    let oversized = Bytes::from(
        ReserveStreamRequest {
            reserves: vec![reserve("raw", "sku", &"x".repeat(300 * 1024), 1)],
        }
        .encode_to_vec(),
    );
    let (answers, end) = raw_stream(
        &server.channel,
        &server.storefront_credential,
        vec![valid("caio"), oversized, valid("dora")],
    )
    .await;
    assert_eq!(answers.len(), 1);
    held(&outcome(answers[0].results[0].clone()));
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(stock(&server, "raw", "sku").await, (98, 2, 0), "ana and caio only");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_bounded_and_a_closed_one_frees_its_place() {
    let server = TestServer::start().await;
    // One connection: the test server's channel.
    let mut checkout = server.checkout();
    let mut open = Vec::new();
    for _ in 0..RESERVE_STREAMS_PER_CONNECTION_MAX {
        open.push(Stream::open(&mut checkout).await.unwrap());
    }
    let refused = Stream::open(&mut checkout).await.err().expect("one stream too many");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Another connection has places of its own.
    let elsewhere = connect(server.addr).await;
    let mut elsewhere = CheckoutServiceClient::with_interceptor(
        elsewhere,
        services::auth::Bearer::new(&server.storefront_credential).unwrap(),
    );
    Stream::open(&mut elsewhere).await.unwrap();
    // A stream the client ended gives its place back.
    let closed = open.pop().unwrap();
    drop(closed.tx);
    let mut answers = closed.answers;
    assert!(answers.message().await.unwrap().is_none());
    let reopened = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match Stream::open(&mut checkout).await {
                Ok(stream) => return stream,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
    .await
    .expect("the place comes back");
    drop(reopened);
    server.stop().await;
}

/// A client that sends and never reads is held back by flow control: the server answers a
/// bounded number of messages, then stops reading, and after the stall bound ends the
/// stream (DEADLINE_EXCEEDED), giving its place back. Driven time: the 30 s pass at once.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_its_answers_is_held_back_then_cut_off() {
    let server = TestServer::start_driven().await;
    open_drop(&server, drop_request("stalled", &[("sku", 100_000)], 1, 3_600)).await;
    // Small HTTP/2 windows on the client's side, so its buffers fill after a few answers.
    let channel = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut checkout = CheckoutServiceClient::with_interceptor(
        channel.clone(),
        services::auth::Bearer::new(&server.storefront_credential).unwrap(),
    );
    let (tx, rx) = mpsc::channel(1);
    let mut answers = checkout
        .reserve_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sent = Arc::new(AtomicUsize::new(0));
    let sending = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for message in 0..1_000 {
                let reserves = (0..64)
                    .map(|i| reserve("stalled", "sku", &format!("b-{message}-{i}"), 1))
                    .collect();
                if tx.send(ReserveStreamRequest { reserves }).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held_then = stock(&server, "stalled", "sku").await.1;
    let sent_then = sent.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        stock(&server, "stalled", "sku").await.1,
        held_then,
        "nothing more is read"
    );
    assert_eq!(sent.load(Ordering::SeqCst), sent_then, "the sender is held back");
    assert!(sent_then < 1_000, "{sent_then} messages went out");
    // What was done is what fits the bounds: messages in flight and queued, and the answers
    // the transport's buffers hold (HTTP/2 windows, hyper's 400 KiB send buffer per stream).
    assert!(held_then > 0 && held_then <= 40 * 64, "{held_then} reserves were done");

    tokio::time::sleep(Duration::from_millis(RESERVE_STREAM_REPLY_STALL_MS)).await;
    let mut answered = 0;
    let ended = loop {
        match answers.message().await {
            Ok(Some(answer)) => answered += answer.results.len(),
            Ok(None) => panic!("the stream should end with a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(
        answered <= held_then as usize,
        "{answered} answers for {held_then} holds"
    );
    sending.abort();
    // Its place is free again: a full set of streams opens on that connection.
    let mut open = Vec::new();
    for _ in 0..RESERVE_STREAMS_PER_CONNECTION_MAX {
        open.push(Stream::open(&mut checkout).await.unwrap());
    }
    server.stop().await;
}
