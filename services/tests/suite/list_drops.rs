//! OperatorService/ListDrops: every drop a page at a time, filtered by status, operators only.

use proto::operator::v1::*;
use testkit::fixtures::{drop_request, open_drop, ts};
use testkit::TestServer;
use tonic::Code;

async fn list(server: &TestServer, status: DropStatus, page_size: u32, page_token: &str) -> ListDropsResponse {
    server
        .operator()
        .list_drops(ListDropsRequest {
            status: status as i32,
            page_size,
            page_token: page_token.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Every page, following the tokens.
async fn all(server: &TestServer, status: DropStatus, page_size: u32) -> Vec<DropSummary> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(server, status, page_size, &token).await;
        assert!(page.drops.len() <= page_size as usize);
        out.extend(page.drops);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn drops_are_listed_in_pages_in_id_order_with_their_status_now() {
    let server = TestServer::start().await;
    let mut operator = server.operator();
    for i in 0..5 {
        open_drop(
            &server,
            drop_request(&format!("open-{i}"), &[("tee", 10), ("cap", 5)], 2, 60),
        )
        .await;
    }
    let mut later = drop_request("later", &[("tee", 7)], 2, 60);
    later.opens_at = Some(ts(3_600));
    later.closes_at = Some(ts(7_200));
    operator.create_drop(later).await.unwrap();
    open_drop(&server, drop_request("closed", &[("tee", 3)], 2, 60)).await;
    operator
        .close_drop(CloseDropRequest {
            drop_id: "closed".into(),
        })
        .await
        .unwrap();

    let every = all(&server, DropStatus::Unspecified, 2).await;
    let ids: Vec<&str> = every.iter().map(|d| d.drop_id.as_str()).collect();
    assert_eq!(
        ids,
        ["closed", "later", "open-0", "open-1", "open-2", "open-3", "open-4"]
    );
    let open0 = &every[2];
    assert_eq!((open0.skus, open0.hubs, open0.allocated), (2, 1, 15));
    assert_eq!(open0.creator_id, "creator-1");
    assert_eq!(every[0].status, DropStatus::Closed as i32);
    assert_eq!(every[1].status, DropStatus::Scheduled as i32);

    let open: Vec<String> = all(&server, DropStatus::Open, 2)
        .await
        .into_iter()
        .map(|d| d.drop_id)
        .collect();
    assert_eq!(open, ["open-0", "open-1", "open-2", "open-3", "open-4"]);
    let scheduled = all(&server, DropStatus::Scheduled, 50).await;
    assert_eq!(scheduled.len(), 1);
    assert_eq!(scheduled[0].drop_id, "later");

    // The default page holds them all; a page after the last drop is empty and final.
    let page = list(&server, DropStatus::Unspecified, 0, "").await;
    assert_eq!((page.drops.len(), page.next_page_token.as_str()), (7, ""));
    let page = list(&server, DropStatus::Unspecified, 10, "open-4").await;
    assert!(page.drops.is_empty() && page.next_page_token.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn list_drops_refuses_bad_requests_and_callers_other_than_the_operator() {
    let server = TestServer::start().await;
    let mut operator = server.operator();
    for (request, field) in [
        (
            ListDropsRequest {
                page_size: 501,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListDropsRequest {
                page_token: "Not An Id!".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListDropsRequest {
                status: 99,
                ..Default::default()
            },
            "status",
        ),
    ] {
        let status = operator.list_drops(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
    }
    let creator = testkit::fixtures::creator(&server.channel, "creator-1").await;
    let mut as_creator = proto::operator::v1::operator_service_client::OperatorServiceClient::with_interceptor(
        server.channel.clone(),
        services::auth::Bearer::new(&creator).unwrap(),
    );
    let status = as_creator.list_drops(ListDropsRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut anonymous =
        proto::operator::v1::operator_service_client::OperatorServiceClient::new(server.channel.clone());
    let status = anonymous.list_drops(ListDropsRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    server.stop().await;
}
