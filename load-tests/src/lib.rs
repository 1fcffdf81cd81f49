//! Load tests for Dropline, behind the `dropline-load` binary.
//!
//! [`burst`] is the one load generator every measurement goes through, so a Dropline run and
//! its bare-tonic baseline are measured by the same code. [`hot_sku`] and [`catalog`] are the
//! scenarios, [`echo`] is the baseline server, [`redis_baseline`] the durable-store one,
//! [`stream`] a ReserveStream client, and [`net`] holds the connection and child process
//! plumbing they share.

pub mod burst;
pub mod catalog;
pub mod cluster;
pub mod cpu;
pub mod echo;
pub mod edge;
pub mod hot_sku;
pub mod nemesis;
pub mod net;
pub mod redis_baseline;
pub mod stream;
pub mod swaps;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::{DropStatus, GetDropRequest, OpenDropRequest};
use proto::registry::v1 as registry;
use proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The operator credential the load tests present: `DROPLINE_OPERATOR_TOKEN`, which must be
/// the one the server was started with (the scenarios that start their own server pass it).
pub fn operator_token() -> String {
    std::env::var("DROPLINE_OPERATOR_TOKEN").unwrap_or_else(|_| "load-test-operator-token".into())
}

/// Adds `authorization: Bearer <token>` to every call (the operator's or a courier's).
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Bearer {
        Bearer(
            format!("Bearer {token}")
                .parse()
                .expect("credentials are printable ASCII"),
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Operator = OperatorServiceClient<InterceptedService<Channel, Bearer>>;
pub type Checkout = CheckoutServiceClient<InterceptedService<Channel, Bearer>>;

/// The storefront the load tests reserve as.
pub const STOREFRONT: &str = "load-tests";

/// CheckoutService through `channel` as the storefront whose credential is `credential`.
pub fn checkout(channel: Channel, credential: &str) -> Checkout {
    CheckoutServiceClient::with_interceptor(channel, Bearer::new(credential))
        .max_decoding_message_size(net::MAX_DECODING_BYTES)
}

/// One checkout client per channel, all as the load tests' storefront.
pub async fn storefront_clients(channels: &[Channel]) -> anyhow::Result<std::sync::Arc<[Checkout]>> {
    let credential = storefront(channels).await?;
    Ok(channels.iter().cloned().map(|c| checkout(c, &credential)).collect())
}

/// Registers the load tests' storefront (or gives it a new credential when it exists) and
/// waits until every channel's server accepts the credential.
pub async fn storefront(channels: &[Channel]) -> anyhow::Result<String> {
    testkit::storefront_credential(channels, &operator_token(), STOREFRONT).await
}

pub fn operator_auth() -> Bearer {
    Bearer::new(&operator_token())
}

/// An operator client with the operator credential.
pub fn operator(channel: Channel) -> Operator {
    OperatorServiceClient::with_interceptor(channel, operator_auth()).max_decoding_message_size(net::MAX_DECODING_BYTES)
}

/// A hub with room for any load (one slot per hour, a million deliveries in it) and the
/// given accept deadline.
pub fn hub_spec(hub_id: &str, city: &str, accept_secs: i64) -> registry::HubSpec {
    let secs = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    registry::HubSpec {
        hub_id: hub_id.to_owned(),
        name: format!("load hub {hub_id}"),
        city: city.to_owned(),
        location: Some(registry::Location::default()),
        slot_minutes: 60,
        capacity_per_slot: 1_000_000,
        sla: Some(registry::SlaTargets {
            accept_within: secs(accept_secs),
            pickup_within: secs(600),
            deliver_within: secs(3_600),
        }),
        ..Default::default()
    }
}

/// Creates the hubs drops will sell from (a retry of the same creation is accepted).
pub async fn create_hubs(channel: Channel, hubs: &[(String, String)]) -> anyhow::Result<()> {
    let mut client = PartnerRegistryServiceClient::with_interceptor(channel, operator_auth());
    for (hub_id, city) in hubs {
        client
            .create_hub(registry::CreateHubRequest {
                hub: Some(hub_spec(hub_id, city, 60)),
            })
            .await
            .with_context(|| format!("CreateHub {hub_id} failed"))?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, used to give each run fresh drop ids so runs against
/// a long-lived server never collide with an earlier drop.
pub fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis()
}

/// The load generator's runtime keeps tokio's LIFO slot (`true`) or turns it off like
/// `dropline serve` (`false`): it is the same client on both sides of every comparison, and
/// with the slot off it leaves more of the shared cores to the server it loads
/// (actors/src/runtime.rs).
pub const GENERATOR_LIFO_SLOT: bool = false;

/// Hold window given to every load-test drop: the longest the server allows, so no hold
/// expires (and returns stock) while a test is still counting.
pub const HOLD_TTL_SECONDS: u32 = 3_600;

/// `(opens_at, closes_at)` of a load-test drop: opened a second ago, so it is on sale at
/// once, and closing in an hour, so it cannot close under a long run.
pub fn open_window() -> (prost_types::Timestamp, prost_types::Timestamp) {
    let now = SystemTime::now();
    let opens_at = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
    let closes_at = now + Duration::from_secs(3_600);
    (opens_at.into(), closes_at.into())
}

/// Opens a drop, accepting one that is already open: its `opens_at` lies in the past, so
/// the server may have opened it by itself and refuse OpenDrop as redundant.
pub async fn open_drop(operator: &mut Operator, drop_id: &str) -> anyhow::Result<()> {
    let Err(refused) = operator
        .open_drop(OpenDropRequest {
            drop_id: drop_id.to_owned(),
        })
        .await
    else {
        return Ok(());
    };
    let drop = operator
        .get_drop(GetDropRequest {
            drop_id: drop_id.to_owned(),
        })
        .await
        .with_context(|| format!("GetDrop {drop_id} failed after OpenDrop was refused"))?
        .into_inner();
    if drop.status() == DropStatus::Open {
        return Ok(());
    }
    Err(anyhow::Error::new(refused).context(format!("OpenDrop {drop_id} failed")))
}
