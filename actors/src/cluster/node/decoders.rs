//! What a node decodes from NATS and its buckets never panics, overflows its stack or
//! hangs: commands from other nodes (`Request`), their answers (`Result<Response, _>`),
//! projection updates (`ProjectionBatch`, applied as the node applies them) and address
//! vault records. Arbitrary bytes and mutations of valid messages (see `crate::fuzz`).

use super::*;
use crate::fuzz;
use domain::drop::{DropSpec, PoolSpec, SaleStatus, SkuSpec};
use domain::registry::{CreatorRecord, StorefrontRecord};
use domain::{CityName, CreatorId, Currency, DropId, HubId, Money, Rejection, SkuId, StorefrontId};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn command(stream: &str, tell: bool) -> Request {
    Request::Command {
        kind: "sku".into(),
        stream: stream.into(),
        command: vec![3, 1, 4, 1, 5],
        tell,
    }
}

fn requests() -> Vec<Vec<u8>> {
    [
        command("sku/d/s", false),
        Request::Wake("hub/h".into()),
        Request::Batch(vec![
            command("sku/d/s", true),
            Request::Wake("sku/d/t".into()),
            command("sku/d/u", false),
        ]),
    ]
    .iter()
    .map(|r| postcard::to_stdvec(r).unwrap())
    .collect()
}

fn responses() -> Vec<Vec<u8>> {
    let results: Vec<Result<Response, CommandError>> = vec![
        Ok(Response::Reply(vec![9, 9, 9])),
        Ok(Response::NotOwner),
        Err(CommandError::Overloaded("busy".into())),
        Ok(Response::Batch(vec![
            Ok(Response::Reply(vec![1])),
            Err(CommandError::Rejected(Rejection::FailedPrecondition("closed".into()))),
            Ok(Response::NotOwner),
            Err(CommandError::Timeout(5_000)),
        ])),
    ];
    results.iter().map(|r| postcard::to_stdvec(r).unwrap()).collect()
}

fn projection_batches() -> Vec<Vec<u8>> {
    let spec = DropSpec {
        drop_id: DropId::parse("d1").unwrap(),
        creator_id: CreatorId::parse("c1").unwrap(),
        title: "drop".into(),
        opens_at: UnixMillis(1_000),
        closes_at: UnixMillis(2_000),
        hold_ttl_ms: 60_000,
        terms: Default::default(),
        skus: vec![SkuSpec {
            sku_id: SkuId::parse("s1").unwrap(),
            name: "hoodie".into(),
            price: Money::new(2_500, Currency::parse("EUR").unwrap()),
            per_buyer_limit: 2,
            pools: vec![PoolSpec {
                hub_id: HubId::parse("h1").unwrap(),
                city: CityName::parse("Lisbon").unwrap(),
                allocated: 5,
            }],
        }],
    };
    let updates = vec![
        ProjectionUpdate::Drop {
            spec: Arc::new(spec),
            status: SaleStatus::Open,
            just_created: true,
        },
        ProjectionUpdate::Creator(CreatorRecord {
            creator_id: CreatorId::parse("c1").unwrap(),
            display_name: "Ana".into(),
            credential_hash: "ab".repeat(32),
            registered_at: UnixMillis(1),
            updated_at: UnixMillis(2),
        }),
        ProjectionUpdate::Storefront(StorefrontRecord {
            storefront_id: StorefrontId::parse("web").unwrap(),
            display_name: "Web".into(),
            credential_hash: "cd".repeat(32),
            registered_at: UnixMillis(1),
            updated_at: UnixMillis(2),
        }),
        ProjectionUpdate::Audit(crate::audit_log::AuditEntry {
            at: UnixMillis(5),
            action: "offered".into(),
            order_id: Some("d1.s1.0000000000000001".into()),
            partner_id: Some("p1".into()),
            hub_id: None,
            detail: String::new(),
        }),
    ];
    vec![
        postcard::to_stdvec(&ProjectionBatch {
            origin: "node-a".into(),
            updates: updates.clone(),
        })
        .unwrap(),
        postcard::to_stdvec(&ProjectionBatch {
            origin: "node-b".into(),
            updates: updates[1..].to_vec(),
        })
        .unwrap(),
    ]
}

/// `decode` on every valid encoding succeeds, and on arbitrary or mutated bytes returns,
/// within the time guard, whatever it returns (an error or a value) without panicking.
fn property<T: Send + 'static>(name: &str, valid: Vec<Vec<u8>>, decode: fn(&[u8]) -> Result<T, String>) {
    for bytes in &valid {
        assert!(decode(bytes).is_ok(), "{name}: a valid message does not decode");
    }
    let mut runner = TestRunner::new(fuzz::config());
    if let Err(e) = runner.run(&fuzz::corrupt(valid), |bytes| {
        fuzz::within_time(move || drop(decode(&bytes)));
        Ok(())
    }) {
        panic!("{name}: {e}");
    }
}

#[test]
fn commands_from_other_nodes() {
    // Batches decode into what was sent, byte for byte.
    for bytes in requests() {
        let request: Request = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(postcard::to_stdvec(&request).unwrap(), bytes);
    }
    property("requests", requests(), |bytes| {
        postcard::from_bytes::<Request>(bytes).map_err(|e| e.to_string())
    });
}

#[test]
fn answers_from_other_nodes() {
    for bytes in responses() {
        let response: Result<Response, CommandError> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(postcard::to_stdvec(&response).unwrap(), bytes);
    }
    property("responses", responses(), |bytes| {
        postcard::from_bytes::<Result<Response, CommandError>>(bytes).map_err(|e| e.to_string())
    });
}

#[test]
fn projection_updates_from_other_nodes_decode_and_apply() {
    property("projection batches", projection_batches(), |bytes| {
        let batch = postcard::from_bytes::<ProjectionBatch>(bytes).map_err(|e| e.to_string())?;
        // As the node does with them (`share_projections`).
        let projections = Projections::default();
        for update in batch.updates {
            projections.apply(update);
        }
        Ok(())
    });
}

/// Regression: `Request::Batch` holds requests and `Response::Batch` results, so postcard
/// decoded a batch in a batch in a batch… by recursion, as deep as the message said: a
/// message of 200 KB (a node's command subject takes up to 1 MiB) overflowed the stack of
/// the task decoding it, which aborts the whole process. A batch holds commands and wakes
/// only, and answers to them: anything nested deeper is refused at its second level.
#[test]
fn nested_batches_are_refused_not_a_stack_overflow() {
    const DEPTH: usize = 100_000;
    // Variant 2 (`Batch`) of one element, DEPTH times, then a wake.
    let mut request = [2u8, 1].repeat(DEPTH);
    request.extend_from_slice(&[1, 1, b's']);
    let decoded = fuzz::within_time(move || postcard::from_bytes::<Request>(&request).map(drop));
    assert!(decoded.is_err());
    // `Ok` (0), then variant 2 (`Batch`) of one element, DEPTH times, then `Ok(NotOwner)`.
    let mut response = [0u8, 2, 1].repeat(DEPTH);
    response.extend_from_slice(&[0, 1]);
    let decoded =
        fuzz::within_time(move || postcard::from_bytes::<Result<Response, CommandError>>(&response).map(drop));
    assert!(decoded.is_err());
    // One level is what batches are.
    let batch = postcard::to_stdvec(&Request::Batch(vec![Request::Wake("s".into())])).unwrap();
    assert!(matches!(postcard::from_bytes::<Request>(&batch), Ok(Request::Batch(b)) if b.len() == 1));
}

#[test]
fn vault_records() {
    let sealed = SealedAddress {
        salt: [7; 32],
        ciphertext: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    };
    let valid = vault_record(&sealed, UnixMillis(1_234)).to_vec();
    assert_eq!(parse_vault_record("o1", &valid).unwrap(), (sealed, UnixMillis(1_234)));
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(&fuzz::corrupt(vec![valid]), |bytes| {
            match parse_vault_record("o1", &bytes) {
                Ok((sealed, at)) => prop_assert_eq!(&vault_record(&sealed, at)[..], &bytes[..]),
                Err(_) => prop_assert!(bytes.len() < 40),
            }
            Ok(())
        })
        .unwrap();
}
