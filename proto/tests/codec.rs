//! The codec every Dropline service decodes requests with (`codec::StrictProstCodec`), fed
//! whole gRPC frames through tonic's decoding as a server receives them: arbitrary bytes
//! and mutations of valid messages decode, or are refused with INVALID_ARGUMENT; a frame
//! whose length prefix claims more than the server takes is refused before its bytes are
//! awaited or buffered; nothing panics.
//!
//! `DROPLINE_FUZZ_CASES` runs more cases per property than the CI-sized default.

use bytes::Bytes;
use http_body::{Body, Frame};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use proto::checkout::v1::ReserveRequest;
use proto::codec::StrictProstCodec;
use proto::common::v1::Money;
use proto::operator::v1::{Allocation, CreateDropRequest, SettlementTerms, SkuSpec};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::codec::{Codec, Streaming};
use tonic::Code;

/// The largest message the operator's service takes (services' `GRPC_MESSAGE_BYTES_MAX`).
const MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;

fn cases() -> u32 {
    std::env::var("DROPLINE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000)
}

/// A request body of one chunk.
struct OneChunk(Option<Bytes>);

impl Body for OneChunk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// A gRPC frame: not compressed, the message's length (4 bytes, big-endian), the message.
fn frame(message: &[u8]) -> Vec<u8> {
    [&[0u8][..], &(message.len() as u32).to_be_bytes(), message].concat()
}

/// The first message of `body`, decoded as the servers decode requests.
fn decode<M: Message + Default + Send + 'static>(body: Vec<u8>) -> Result<Option<M>, tonic::Status> {
    let decoder = StrictProstCodec::<M, M>::default().decoder();
    let mut stream = Streaming::new_request(decoder, OneChunk(Some(body.into())), None, Some(MESSAGE_BYTES_MAX));
    futures::executor::block_on(stream.message())
}

fn create_drop() -> CreateDropRequest {
    CreateDropRequest {
        drop_id: "d1".into(),
        creator_id: "c1".into(),
        title: "winter drop".into(),
        opens_at: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        closes_at: None,
        hold_ttl_seconds: 600,
        skus: vec![SkuSpec {
            sku_id: "s1".into(),
            name: "hoodie".into(),
            price: Some(Money {
                minor_units: 2_500,
                currency: "EUR".into(),
            }),
            per_buyer_limit: 2,
            allocations: vec![Allocation::default(); 2],
        }],
        settlement: Some(SettlementTerms {
            platform_fee_bps: 1_000,
            delivery_fee_minor_units: 300,
            return_window_seconds: 86_400,
        }),
    }
}

fn reserve() -> ReserveRequest {
    ReserveRequest {
        drop_id: "d1".into(),
        sku_id: "s1".into(),
        buyer_id: "buyer-1".into(),
        city: "Lisbon".into(),
        quantity: 1,
        idempotency_key: "k1".into(),
        ..Default::default()
    }
}

/// A valid encoding, changed: a byte set, the encoding cut short or grown, or a length
/// (varint) claiming gigabytes written into it.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    prop_oneof![
        (0..len, any::<u8>()).prop_map(|(at, byte)| (at, vec![byte], false)),
        (0..=len).prop_map(|keep| (keep, Vec::new(), true)),
        (0..=len, prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| (at, bytes, false)),
        (0..len).prop_map(|at| (at, vec![0xff, 0xff, 0xff, 0xff, 0x0f], false)),
    ]
    .prop_map(move |(at, bytes, truncate)| {
        let mut out = valid.clone();
        if truncate {
            out.truncate(at);
        } else {
            let end = (at + bytes.len()).min(out.len());
            out.splice(at..end, bytes);
        }
        out
    })
}

/// `M` decodes from every one of `inputs` framed, or is refused with INVALID_ARGUMENT.
fn property<M: Message + Default + Send + 'static>(name: &str, inputs: impl Strategy<Value = Vec<u8>>) {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&inputs, |message| {
        match decode::<M>(frame(&message)) {
            Ok(decoded) => prop_assert!(decoded.is_some()),
            Err(status) => prop_assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message()),
        }
        Ok(())
    }) {
        panic!("{name}: {e}");
    }
}

#[test]
fn operator_requests() {
    let valid = create_drop().encode_to_vec();
    assert_eq!(decode::<CreateDropRequest>(frame(&valid)).unwrap(), Some(create_drop()));
    property::<CreateDropRequest>(
        "CreateDropRequest",
        prop_oneof![prop::collection::vec(any::<u8>(), 0..256), mutated(valid)],
    );
}

#[test]
fn checkout_requests() {
    let valid = reserve().encode_to_vec();
    assert_eq!(decode::<ReserveRequest>(frame(&valid)).unwrap(), Some(reserve()));
    property::<ReserveRequest>(
        "ReserveRequest",
        prop_oneof![prop::collection::vec(any::<u8>(), 0..256), mutated(valid)],
    );
}

/// A frame whose length prefix claims 4 GiB (or just over the limit) is refused from its
/// header, though only a few bytes follow: nothing waits for, or buffers, the rest.
#[test]
fn a_frame_claiming_more_than_the_limit_is_refused_from_its_header() {
    for len in [u32::MAX, MESSAGE_BYTES_MAX as u32 + 1] {
        let body = [&[0u8][..], &len.to_be_bytes(), b"abc"].concat();
        let status = decode::<CreateDropRequest>(body).unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{len}: {status:?}");
    }
    // Groups nested 10,000 deep under an unknown field (15, start group: 0x7b) are refused
    // at prost's recursion limit, not a stack overflow.
    let deep: Vec<u8> = [0x7bu8].repeat(10_000);
    let status = decode::<CreateDropRequest>(frame(&deep)).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}
