//! `dropline demo --cluster N`: the demo drop runs across a local cluster on loopback
//! (`testkit::LocalCluster`: N NATS JetStream servers, replicas = N, and N `dropline serve
//! --nats` processes of this very binary), and loses a node in the middle of it: kill -9 of
//! the node owning the hottest SKU, the time until every partition it held has a new owner,
//! and afterwards the check that no acknowledged order was lost.

use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::{GetOrderRequest, OrderStatus};
use tonic::transport::Channel;

/// Lease timings of the demo's nodes: short, so the takeover shows within the drop.
pub const LEASE_TTL_MS: u64 = 3_000;
pub const LEASE_RENEW_MS: u64 = 500;

/// Acknowledged orders whose confirmation cannot be found any more.
/// Read as the operator (who may read every order, without its pickup code).
pub async fn lost_orders(channel: Channel, operator_token: &str, order_ids: &[String]) -> anyhow::Result<Vec<String>> {
    let mut checkout = CheckoutServiceClient::with_interceptor(channel, services::auth::Bearer::new(operator_token)?);
    let mut lost = Vec::new();
    for order_id in order_ids {
        let kept = match checkout
            .get_order(GetOrderRequest {
                order_id: order_id.clone(),
            })
            .await
        {
            Ok(order) => matches!(
                OrderStatus::try_from(order.into_inner().status),
                Ok(OrderStatus::Confirmed | OrderStatus::Cancelled)
            ),
            Err(status) if status.code() == tonic::Code::NotFound => false,
            Err(status) => return Err(status.into()),
        };
        if !kept {
            lost.push(order_id.clone());
        }
    }
    Ok(lost)
}
