//! Pop-up edges against a real server: the operator leases stock to an edge (a storefront),
//! the edge reads its lease and receipt key and uploads signed sales, each booked once;
//! receipts that do not verify change nothing; another storefront, the anonymous caller and
//! the operator's credential reach no edge's lease; closing returns the rest to the pool.

use actors::secrets::{receipt_mac, ReceiptFields};
use proto::checkout::v1::GetOrderRequest;
use proto::edge::v1::edge_service_client::EdgeServiceClient;
use proto::edge::v1::*;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::{
    CloseLeaseRequest, EdgeRefundReason, GetDropRequest, LeaseStatus, LeaseStockRequest, ListLeasesRequest,
    TopUpLeaseRequest,
};
use services::auth::{Authed, Bearer};
use testkit::*;
use tonic::Code;

const EDGE: &str = "popup-porto";
const KEY_ID: &str = "porto-2026-12";

fn edge_client(server: &TestServer, credential: &str) -> EdgeServiceClient<Authed> {
    EdgeServiceClient::with_interceptor(server.channel.clone(), Bearer::new(credential).unwrap())
}

fn lease_request(drop_id: &str, quantity: u32, top_up_max: u32) -> LeaseStockRequest {
    LeaseStockRequest {
        drop_id: drop_id.into(),
        sku_id: "tee".into(),
        hub_id: "hub-1".into(),
        edge_id: EDGE.into(),
        quantity,
        top_up_max,
        key_id: KEY_ID.into(),
        expires_at: Some(ts(3_000)),
        reconcile_window_seconds: 600,
    }
}

/// Now, to the millisecond (a sale made before its lease started is refunded).
fn now() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: (d.subsec_millis() * 1_000_000) as i32,
    }
}

/// A sale of `quantity` units signed with `key` as the edge would sign it.
fn signed_sale(drop_id: &str, token: u64, quantity: u32, key: &[u8; 32]) -> EdgeSale {
    let mut sale = EdgeSale {
        order_id: format!("{drop_id}.tee.{token:016x}"),
        quantity,
        amount: eur(2_500 * i64::from(quantity)),
        delivery: false,
        payment_reference: format!("card-{token}"),
        pickup_code: format!("{:06}", token % 1_000_000),
        key_id: KEY_ID.into(),
        sold_at: Some(now()),
        receipt_mac: String::new(),
    };
    sale.receipt_mac = mac(drop_id, &sale, key);
    sale
}

fn mac(drop_id: &str, sale: &EdgeSale, key: &[u8; 32]) -> String {
    let amount = sale.amount.as_ref().unwrap();
    receipt_mac(
        key,
        &ReceiptFields {
            drop_id,
            sku_id: "tee",
            order_id: &sale.order_id,
            quantity: sale.quantity,
            amount_minor: amount.minor_units,
            currency: &amount.currency,
            delivery: sale.delivery,
            payment_reference: &sale.payment_reference,
            pickup_code: &sale.pickup_code,
            key_id: &sale.key_id,
            sold_at_ms: {
                let t = sale.sold_at.as_ref().unwrap();
                t.seconds * 1_000 + i64::from(t.nanos) / 1_000_000
            },
        },
    )
}

async fn pool(server: &TestServer, drop_id: &str) -> proto::operator::v1::PoolFigures {
    let drop = server
        .operator()
        .get_drop(GetDropRequest {
            drop_id: drop_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    drop.skus[0].pools[0].clone()
}

fn outcomes(reply: &UploadResponse) -> Vec<i32> {
    reply.results.iter().map(|r| r.outcome).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_sells_its_lease_once_per_sale_and_nothing_beyond_it() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("popup", &[("tee", 100)], 4, 600)).await;
    // Only a registered storefront can be an edge.
    let unknown = server
        .operator()
        .lease_stock(lease_request("popup", 10, 0))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let credential = storefront_credential(std::slice::from_ref(&server.channel), OPERATOR_TOKEN, EDGE)
        .await
        .unwrap();
    let lease = server
        .operator()
        .lease_stock(lease_request("popup", 10, 12))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (lease.outstanding, lease.granted, lease.status),
        (10, 10, LeaseStatus::Live as i32)
    );
    // Asked again, the same lease is answered as it is.
    let again = server
        .operator()
        .lease_stock(lease_request("popup", 10, 12))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, lease);
    let figures = pool(&server, "popup").await;
    assert_eq!((figures.available, figures.leased), (90, 10));

    // Who may read the lease: the edge itself only.
    let mut edge = edge_client(&server, &credential);
    let got = edge
        .get_lease(GetLeaseRequest {
            drop_id: "popup".into(),
            sku_id: "tee".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let key: [u8; 32] = got.receipt_key.clone().try_into().expect("a 32-byte receipt key");
    let get = GetLeaseRequest {
        drop_id: "popup".into(),
        sku_id: "tee".into(),
    };
    let other = edge_client(&server, &server.storefront_credential)
        .get_lease(get.clone())
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound, "another storefront: {other:?}");
    let operator = edge_client(&server, OPERATOR_TOKEN)
        .get_lease(get.clone())
        .await
        .unwrap_err();
    assert_eq!(operator.code(), Code::PermissionDenied, "{operator:?}");
    let anonymous = EdgeServiceClient::new(server.channel.clone())
        .get_lease(get)
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");

    // Three signed sales, one altered after signing, one beyond what the lease holds.
    let mut sales: Vec<EdgeSale> = (1..=3).map(|t| signed_sale("popup", t, 2, &key)).collect();
    let mut altered = signed_sale("popup", 4, 1, &key);
    altered.pickup_code = "000000".into();
    sales.push(altered);
    sales.push(signed_sale("popup", 5, 5, &key));
    let upload = UploadRequest {
        drop_id: "popup".into(),
        sku_id: "tee".into(),
        sales,
    };
    let reply = edge.upload(upload.clone()).await.unwrap().into_inner();
    use SaleOutcome::*;
    assert_eq!(
        outcomes(&reply),
        [Booked, Booked, Booked, ReceiptInvalid, Refunded].map(|o| o as i32)
    );
    assert_eq!(reply.results[4].refund_reason, EdgeRefundReason::LeaseExhausted as i32);
    let lease = reply.lease.clone().unwrap();
    assert_eq!((lease.outstanding, lease.sold, lease.refunded), (4, 6, 5));
    // The same upload again: the same answers, nothing booked twice.
    let replay = edge.upload(upload.clone()).await.unwrap().into_inner();
    assert_eq!(outcomes(&replay), outcomes(&reply));
    assert_eq!(replay.lease.unwrap().sold, 6);
    // The same receipts from another storefront verify under no key of its own.
    let stolen = edge_client(&server, &server.storefront_credential).upload(upload).await;
    match stolen {
        Ok(reply) => assert!(reply
            .into_inner()
            .results
            .iter()
            .all(|r| r.outcome == ReceiptInvalid as i32)),
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
    }
    // A booked sale is an order like any other: confirmed, for pickup, with its receipt.
    let order = server
        .checkout_as(OPERATOR_TOKEN)
        .get_order(GetOrderRequest {
            order_id: reply.results[0].order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.status, proto::checkout::v1::OrderStatus::Confirmed as i32);
    let figures = pool(&server, "popup").await;
    assert_eq!((figures.available, figures.sold, figures.leased), (90, 6, 4));
    assert_eq!(
        figures.allocated,
        figures.available + figures.held + figures.sold + figures.leased
    );

    // The edge tops itself up within its allowance only; the operator may go beyond.
    let top_up = |total| TopUpRequest {
        drop_id: "popup".into(),
        sku_id: "tee".into(),
        granted_total: total,
    };
    let beyond = edge.top_up(top_up(20)).await.unwrap_err();
    assert_eq!(beyond.code(), Code::PermissionDenied, "{beyond:?}");
    let topped = edge.top_up(top_up(12)).await.unwrap().into_inner().lease.unwrap();
    assert_eq!((topped.granted, topped.outstanding), (12, 6));
    let topped = server
        .operator()
        .top_up_lease(TopUpLeaseRequest {
            drop_id: "popup".into(),
            sku_id: "tee".into(),
            edge_id: EDGE.into(),
            granted_total: 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((topped.granted, topped.outstanding), (20, 14));

    // Listed with the refused sale; closed, what it holds goes back to the pool.
    let listed = server
        .operator()
        .list_leases(ListLeasesRequest {
            drop_id: "popup".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.leases.len(), 1);
    assert_eq!(listed.refunds.len(), 1);
    assert_eq!(listed.refunds[0].payment_reference, "card-5");
    let closed = server
        .operator()
        .close_lease(CloseLeaseRequest {
            drop_id: "popup".into(),
            sku_id: "tee".into(),
            edge_id: EDGE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (closed.status, closed.outstanding, closed.returned),
        (LeaseStatus::Closed as i32, 0, 14)
    );
    let figures = pool(&server, "popup").await;
    assert_eq!((figures.available, figures.sold, figures.leased), (94, 6, 0));
    // A sale uploaded after the close is refunded, not booked.
    let late = edge
        .upload(UploadRequest {
            drop_id: "popup".into(),
            sku_id: "tee".into(),
            sales: vec![signed_sale("popup", 6, 1, &key)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&late), [Refunded as i32]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lease_and_upload_requests_change_nothing() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("popup-bad", &[("tee", 10)], 4, 600)).await;
    let credential = storefront_credential(std::slice::from_ref(&server.channel), OPERATOR_TOKEN, EDGE)
        .await
        .unwrap();
    let mut operator = server.operator();
    for (what, request) in [
        ("more than the pool", lease_request("popup-bad", 11, 0)),
        ("zero", lease_request("popup-bad", 0, 0)),
        (
            "expired",
            LeaseStockRequest {
                expires_at: Some(ts(-10)),
                ..lease_request("popup-bad", 1, 0)
            },
        ),
        (
            "no key id",
            LeaseStockRequest {
                key_id: String::new(),
                ..lease_request("popup-bad", 1, 0)
            },
        ),
        (
            "a bad edge id",
            LeaseStockRequest {
                edge_id: "Not An Id".into(),
                ..lease_request("popup-bad", 1, 0)
            },
        ),
    ] {
        let refused = operator.lease_stock(request).await.unwrap_err();
        assert!(
            matches!(refused.code(), Code::InvalidArgument | Code::FailedPrecondition),
            "{what}: {refused:?}"
        );
    }
    // A storefront cannot lease to itself.
    let by_edge = OperatorServiceClient::with_interceptor(server.channel.clone(), Bearer::new(&credential).unwrap())
        .lease_stock(lease_request("popup-bad", 1, 0))
        .await
        .unwrap_err();
    assert_eq!(by_edge.code(), Code::PermissionDenied);
    assert_eq!(pool(&server, "popup-bad").await.available, 10);

    operator.lease_stock(lease_request("popup-bad", 5, 0)).await.unwrap();
    let mut edge = edge_client(&server, &credential);
    // Garbage in an upload: INVALID_ARGUMENT naming the fields; too many sales refused whole.
    let garbage = edge
        .upload(UploadRequest {
            drop_id: "popup-bad".into(),
            sku_id: "tee".into(),
            sales: vec![EdgeSale {
                order_id: "not-an-order".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
    let too_many = edge
        .upload(UploadRequest {
            drop_id: "popup-bad".into(),
            sku_id: "tee".into(),
            sales: vec![EdgeSale::default(); domain::limits::EDGE_SALES_PER_UPLOAD_MAX + 1],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument, "{too_many:?}");
    // A sale of another SKU's order id, even signed: refused, nothing booked.
    let key: [u8; 32] = edge
        .get_lease(GetLeaseRequest {
            drop_id: "popup-bad".into(),
            sku_id: "tee".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt_key
        .try_into()
        .unwrap();
    let mut foreign = signed_sale("popup-bad", 1, 1, &key);
    foreign.order_id = "popup-bad.other.0000000000000001".into();
    foreign.receipt_mac = mac("popup-bad", &foreign, &key);
    let refused = edge
        .upload(UploadRequest {
            drop_id: "popup-bad".into(),
            sku_id: "tee".into(),
            sales: vec![foreign],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let figures = pool(&server, "popup-bad").await;
    assert_eq!((figures.available, figures.sold, figures.leased), (5, 0, 5));
    server.stop().await;
}
