//! Test harness: a real server on 127.0.0.1:0 over a temporary data directory, and clients.

#![allow(dead_code)]

use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::common::v1::Money;
use proto::dispatch::v1::dispatch_service_client::DispatchServiceClient;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::*;
use proto::registry::v1 as registry;
use proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use services::auth::{Authed, Bearer};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

/// The operator credential of every test server.
pub const OPERATOR_TOKEN: &str = "test-operator-credential";
/// The storefront every test server registers; `TestServer::checkout` calls as it.
pub const TEST_STOREFRONT: &str = "test-web";

pub fn operator_client(channel: &Channel) -> OperatorServiceClient<Authed> {
    OperatorServiceClient::with_interceptor(channel.clone(), Bearer::new(OPERATOR_TOKEN).unwrap())
}

pub fn registry_client(channel: &Channel) -> PartnerRegistryServiceClient<Authed> {
    PartnerRegistryServiceClient::with_interceptor(channel.clone(), Bearer::new(OPERATOR_TOKEN).unwrap())
}

/// CheckoutService as the storefront `test-web` of the server behind `channel` (registered,
/// or given a new credential when it exists).
pub async fn storefront_client(channel: &Channel) -> CheckoutServiceClient<Authed> {
    let credential =
        services::auth::storefront_credential(std::slice::from_ref(channel), OPERATOR_TOKEN, TEST_STOREFRONT)
            .await
            .unwrap();
    CheckoutServiceClient::with_interceptor(channel.clone(), Bearer::new(&credential).unwrap())
}

pub fn courier_client(channel: &Channel, credential: &str) -> DispatchServiceClient<Authed> {
    DispatchServiceClient::with_interceptor(channel.clone(), Bearer::new(credential).unwrap())
}

pub fn secs(s: u64) -> Option<prost_types::Duration> {
    Some(services::convert::duration(s * 1_000))
}

/// A hub spec with short SLA clocks for tests (accept within `accept_secs`).
pub fn hub_spec(hub_id: &str, city: &str, capacity: u32, accept_secs: u64) -> registry::HubSpec {
    registry::HubSpec {
        hub_id: hub_id.into(),
        name: format!("{city} test hub"),
        city: city.into(),
        location: Some(registry::Location {
            latitude: 38.7,
            longitude: -9.1,
        }),
        slot_minutes: 60,
        capacity_per_slot: capacity,
        sla: Some(registry::SlaTargets {
            accept_within: secs(accept_secs),
            pickup_within: secs(60),
            deliver_within: secs(600),
        }),
        ..Default::default()
    }
}

/// The hubs test drops sell from: hub-1 in Lisbon, hub-2 in Porto.
pub async fn create_test_hubs(channel: &Channel) {
    let mut registry = registry_client(channel);
    for (hub, city) in [("hub-1", "Lisbon"), ("hub-2", "Porto")] {
        registry
            .create_hub(registry::CreateHubRequest {
                hub: Some(hub_spec(hub, city, 1_000, 30)),
            })
            .await
            .unwrap();
    }
}

/// Registers a courier partner, makes it active and assigns it to `hub_id` with `rank`;
/// returns its credential.
pub async fn courier(channel: &Channel, partner_id: &str, hub_id: &str, rank: u32) -> String {
    let mut registry = registry_client(channel);
    let registered = registry
        .register_partner(registry::RegisterPartnerRequest {
            partner_id: partner_id.into(),
            name: format!("courier {partner_id}"),
            kind: registry::PartnerKind::Courier as i32,
            capabilities: vec![
                registry::Capability::Delivery as i32,
                registry::Capability::PickupPoint as i32,
                registry::Capability::Discreet as i32,
            ],
            max_open_dispatches: 100,
        })
        .await
        .unwrap()
        .into_inner();
    registry
        .set_partner_status(registry::SetPartnerStatusRequest {
            partner_id: partner_id.into(),
            status: registry::PartnerStatus::Active as i32,
            reason: "vetted".into(),
        })
        .await
        .unwrap();
    registry
        .assign_partner(registry::AssignPartnerRequest {
            partner_id: partner_id.into(),
            hub_id: hub_id.into(),
            rank,
        })
        .await
        .unwrap();
    registered.credential
}

/// Registers a creator; returns its credential.
pub async fn creator(channel: &Channel, creator_id: &str) -> String {
    SettlementServiceClient::with_interceptor(channel.clone(), Bearer::new(OPERATOR_TOKEN).unwrap())
        .register_creator(proto::settlement::v1::RegisterCreatorRequest {
            creator_id: creator_id.into(),
            display_name: format!("creator {creator_id}"),
        })
        .await
        .unwrap()
        .into_inner()
        .credential
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub platform: services::platform::Platform,
    pub channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub dir: tempfile::TempDir,
    /// The credential of the storefront `test-web`, which the checkout client calls as.
    pub storefront_credential: String,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with_live_actors_max(domain::limits::LIVE_ACTORS_MAX_DEFAULT).await
    }

    /// A server keeping at most `live_actors_max` actors of each kind running.
    pub async fn start_with_live_actors_max(live_actors_max: usize) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let platform = services::platform::Platform::open_embedded(dir.path(), Some(OPERATOR_TOKEN), live_actors_max)
            .await
            .unwrap();
        TestServer::serve(platform, dir).await
    }

    /// A server on an in-memory journal whose clock follows tokio's time from the wall-clock
    /// time now (`actors::TokioClock`): in a `#[tokio::test(start_paused = true)]`, hold
    /// expiries, SLA deadlines and swaps come at their exact times without real waiting.
    /// (Not sled: its writer is a thread whose flushes tokio cannot see, so paused time
    /// would jump ahead while one is under way.)
    pub async fn start_driven() -> TestServer {
        TestServer::start_driven_with_live_actors_max(domain::limits::LIVE_ACTORS_MAX_DEFAULT).await
    }

    /// [`TestServer::start_driven`], keeping at most `live_actors_max` actors of each kind
    /// running.
    pub async fn start_driven_with_live_actors_max(live_actors_max: usize) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let clock = std::sync::Arc::new(actors::TokioClock::from_system());
        let journal = actors::memory_journal::MemoryJournal::new(clock.clone());
        let storage = services::platform::EmbeddedStorage::all_in(journal);
        let platform = services::platform::Platform::open_embedded_on(
            dir.path(),
            Some(OPERATOR_TOKEN),
            live_actors_max,
            storage,
            clock,
        )
        .await
        .unwrap();
        TestServer::serve(platform, dir).await
    }

    async fn serve(platform: services::platform::Platform, dir: tempfile::TempDir) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(services::server::serve(platform.clone(), listener, async {
            let _ = stopped.await;
        }));
        let channel = connect(addr).await;
        create_test_hubs(&channel).await;
        let storefront_credential =
            services::auth::storefront_credential(std::slice::from_ref(&channel), OPERATOR_TOKEN, TEST_STOREFRONT)
                .await
                .unwrap();
        TestServer {
            addr,
            platform,
            channel,
            stop: Some(stop),
            task: Some(task),
            dir,
            storefront_credential,
        }
    }

    /// CheckoutService as the storefront `test-web`.
    pub fn checkout(&self) -> CheckoutServiceClient<Authed> {
        CheckoutServiceClient::with_interceptor(self.channel.clone(), Bearer::new(&self.storefront_credential).unwrap())
    }

    /// CheckoutService with another credential (an order token, another storefront's).
    pub fn checkout_as(&self, credential: &str) -> CheckoutServiceClient<Authed> {
        CheckoutServiceClient::with_interceptor(self.channel.clone(), Bearer::new(credential).unwrap())
    }

    /// CheckoutService with no credential at all.
    pub fn anonymous_checkout(&self) -> CheckoutServiceClient<Channel> {
        CheckoutServiceClient::new(self.channel.clone())
    }

    pub fn operator(&self) -> OperatorServiceClient<Authed> {
        operator_client(&self.channel)
    }

    pub fn registry(&self) -> PartnerRegistryServiceClient<Authed> {
        registry_client(&self.channel)
    }

    /// The operator's view of a drop (GetDrop), which must exist.
    pub async fn drop_figures(&self, drop_id: &str) -> Drop {
        self.operator()
            .get_drop(GetDropRequest {
                drop_id: drop_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A loopback port free right now, for a server process about to start (see
/// `unused_loopback_port` for why not port 0).
pub fn free_port() -> u16 {
    actors::cluster::natsd::unused_loopback_port().unwrap()
}

/// Whether the server at `addr` reports SERVING within 2 s. Its port is bound before the
/// platform opens (callers wait in the backlog), so a TCP connect alone says nothing.
pub async fn serving(addr: SocketAddr) -> bool {
    services::server::is_serving(addr, Duration::from_secs(2)).await
}

/// A channel (no deadline on its calls) to the server at `addr`, once it serves.
pub async fn connect(addr: SocketAddr) -> Channel {
    connect_to(addr, None, Duration::from_secs(60)).await
}

/// As [`connect`], to a server process this test started, waiting up to `within`: fails
/// at once, with its exit status, should the process exit instead of serving.
pub async fn connect_process(port: u16, child: &mut std::process::Child, within: Duration) -> Channel {
    connect_to(SocketAddr::from(([127, 0, 0, 1], port)), Some(child), within).await
}

async fn connect_to(addr: SocketAddr, mut child: Option<&mut std::process::Child>, within: Duration) -> Channel {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if let Some(status) = child.as_deref_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("the server at {addr} exited before serving ({status}); its log is above");
        }
        if serving(addr).await {
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
            {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {addr} never answered");
}

/// The next update on a courier's stream that `pick` takes (others are skipped), waiting at
/// most `within` for it.
pub async fn next_update<T>(
    stream: &mut tonic::Streaming<proto::dispatch::v1::DispatchUpdate>,
    within: Duration,
    pick: impl Fn(proto::dispatch::v1::dispatch_update::Update) -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let message = tokio::time::timeout(left, stream.message())
            .await
            .expect("the update in time")
            .unwrap()
            .expect("stream open");
        if let Some(update) = message.update.and_then(&pick) {
            return update;
        }
    }
}

/// The next offer on a courier's stream.
pub async fn next_offer(
    stream: &mut tonic::Streaming<proto::dispatch::v1::DispatchUpdate>,
    within: Duration,
) -> proto::dispatch::v1::Dispatch {
    use proto::dispatch::v1::dispatch_update::Update;
    next_update(stream, within, |u| match u {
        Update::Offer(d) => Some(d),
        Update::Withdrawn(_) => None,
    })
    .await
}

/// The next withdrawal on a courier's stream.
pub async fn next_withdrawal(
    stream: &mut tonic::Streaming<proto::dispatch::v1::DispatchUpdate>,
    within: Duration,
) -> proto::dispatch::v1::Withdrawal {
    use proto::dispatch::v1::dispatch_update::Update;
    next_update(stream, within, |u| match u {
        Update::Withdrawn(w) => Some(w),
        Update::Offer(_) => None,
    })
    .await
}

/// The courier accepts the dispatch and picks its parcel up.
pub async fn pick_up(courier: &mut DispatchServiceClient<Authed>, dispatch_id: &str, pickup_code: &str) {
    courier
        .accept(proto::dispatch::v1::AcceptRequest {
            dispatch_id: dispatch_id.into(),
        })
        .await
        .unwrap();
    courier
        .mark_picked_up(proto::dispatch::v1::MarkPickedUpRequest {
            dispatch_id: dispatch_id.into(),
            pickup_code: pickup_code.into(),
        })
        .await
        .unwrap();
}

pub fn ts(offset_secs: i64) -> prost_types::Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    prost_types::Timestamp {
        seconds: now + offset_secs,
        nanos: 0,
    }
}

pub fn eur(minor_units: i64) -> Option<Money> {
    Some(Money {
        minor_units,
        currency: "EUR".into(),
    })
}

/// A drop with one SKU per (sku_id, stock) in one hub of "Lisbon", open now.
pub fn drop_request(
    drop_id: &str,
    skus: &[(&str, u32)],
    per_buyer_limit: u32,
    hold_ttl_seconds: u32,
) -> CreateDropRequest {
    CreateDropRequest {
        drop_id: drop_id.into(),
        creator_id: "creator-1".into(),
        title: "test drop".into(),
        opens_at: Some(ts(-1)),
        closes_at: Some(ts(3_600)),
        hold_ttl_seconds,
        skus: skus
            .iter()
            .map(|(sku_id, stock)| SkuSpec {
                sku_id: (*sku_id).into(),
                name: format!("item {sku_id}"),
                price: eur(2_500),
                per_buyer_limit,
                allocations: vec![Allocation {
                    hub_id: "hub-1".into(),
                    city: "Lisbon".into(),
                    quantity: *stock,
                }],
            })
            .collect(),
        settlement: None,
    }
}

pub async fn open_drop(server: &TestServer, request: CreateDropRequest) {
    let mut operator = server.operator();
    let drop_id = request.drop_id.clone();
    operator.create_drop(request).await.unwrap();
    operator.open_drop(OpenDropRequest { drop_id }).await.unwrap();
}

pub fn reserve(drop_id: &str, sku_id: &str, buyer: &str, quantity: u32) -> ReserveRequest {
    ReserveRequest {
        drop_id: drop_id.into(),
        sku_id: sku_id.into(),
        buyer_id: buyer.into(),
        city: "Lisbon".into(),
        quantity,
        ..Default::default()
    }
}

pub fn pickup(order_id: &str, amount: i64) -> ConfirmRequest {
    ConfirmRequest {
        order_id: order_id.into(),
        payment_reference: format!("pay-{order_id}"),
        amount: eur(amount),
        fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
        discreet: false,
    }
}

/// Reserves one unit for `buyer` and confirms it for pickup; returns the Confirm response.
pub async fn buy(
    server: &TestServer,
    drop_id: &str,
    sku_id: &str,
    buyer: &str,
) -> proto::checkout::v1::ConfirmResponse {
    let mut checkout = server.checkout();
    let held = checkout
        .reserve(reserve(drop_id, sku_id, buyer, 1))
        .await
        .unwrap()
        .into_inner();
    checkout
        .confirm(pickup(&held.order_id, 2_500))
        .await
        .unwrap()
        .into_inner()
}
