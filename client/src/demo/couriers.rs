//! The fulfilment half of `dropline demo`: hubs and partners created through the registry
//! API, and simulated couriers that work their dispatches over the real DispatchService.
//! One courier silently stops answering mid-drop; the hub swaps its dispatches to the
//! secondary partner, and the report shows how long after each missed deadline that
//! happened.

use actors::Clock;
use hdrhistogram::Histogram;
use proto::dispatch::v1::dispatch_service_client::DispatchServiceClient;
use proto::dispatch::v1::dispatch_update::Update;
use proto::dispatch::v1::*;
use proto::registry::v1 as registry;
use proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use services::auth::{Authed, Bearer};
use services::convert::{duration, millis};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

/// Counts one more of something in a tally (the demo's buyers and couriers share it).
pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// (hub, city, deliveries per one-minute slot).
pub const HUBS: [(&str, &str, u32); 3] = [
    ("hub-lisbon-1", "Lisbon", 150),
    ("hub-lisbon-2", "Lisbon", 400),
    ("hub-porto-1", "Porto", 400),
];

/// (partner, hub, rank, capabilities, answers this many offers then goes silent).
type PartnerPlan = (
    &'static str,
    &'static str,
    u32,
    &'static [registry::Capability],
    Option<usize>,
);

const ALL: &[registry::Capability] = &[
    registry::Capability::Delivery,
    registry::Capability::PickupPoint,
    registry::Capability::Discreet,
];
const COURIER: &[registry::Capability] = &[registry::Capability::Delivery, registry::Capability::Discreet];
const LOCKER: &[registry::Capability] = &[registry::Capability::PickupPoint, registry::Capability::Discreet];

const PARTNERS: [PartnerPlan; 11] = [
    ("rapido-lx", "hub-lisbon-1", 1, COURIER, Some(15)),
    ("lockers-lx", "hub-lisbon-1", 1, LOCKER, None),
    ("vespa-lx", "hub-lisbon-1", 2, ALL, None),
    ("standby-lx", "hub-lisbon-1", 3, ALL, None),
    ("bikes-lx2", "hub-lisbon-2", 1, COURIER, None),
    ("kiosk-lx2", "hub-lisbon-2", 1, LOCKER, None),
    ("vespa-lx2", "hub-lisbon-2", 2, ALL, None),
    ("standby-lx2", "hub-lisbon-2", 3, ALL, None),
    ("norte-po", "hub-porto-1", 1, ALL, None),
    ("cargo-po", "hub-porto-1", 2, ALL, None),
    ("standby-po", "hub-porto-1", 3, ALL, None),
];

/// Pickup codes as printed on parcel labels at the hub: the courier reads them there.
pub type Labels = Arc<Mutex<HashMap<String, String>>>;

#[derive(Default)]
pub struct CourierTally {
    pub offers: AtomicU64,
    pub accepted: AtomicU64,
    pub declined: AtomicU64,
    pub failures_reported: AtomicU64,
    pub delivered: AtomicU64,
    pub delivered_in_window: AtomicU64,
    pub ignored: AtomicU64,
    /// Swap offers received, by hub, dispatch and missed deadline (ms since the epoch): the
    /// offer's time (server clock) and its arrival at the courier (client clock, same
    /// machine). Only the first offer after a missed deadline is the swap's: a later offer
    /// of the same dispatch (the next partner declined) still names that deadline.
    pub swaps: Mutex<HashMap<(String, String, i64), SwapOffer>>,
}

#[derive(Clone, Copy)]
pub struct SwapOffer {
    pub offered_ms: i64,
    pub received_ms: i64,
}

/// Milliseconds from missed deadlines to the swaps' decisions and to their offers' arrival.
#[derive(Default)]
pub struct SwapDelays {
    pub decided: Vec<i64>,
    pub received: Vec<i64>,
}

impl SwapDelays {
    pub fn line(&self) -> Option<String> {
        let (d50, d99, dmax) = summary(&self.decided)?;
        let (r50, r99, rmax) = summary(&self.received)?;
        Some(format!(
            "p50 {d50:.0} ms, p99 {d99:.0} ms, max {dmax:.0} ms; \
             new offer at the courier: p50 {r50:.0} ms, p99 {r99:.0} ms, max {rmax:.0} ms"
        ))
    }
}

/// The swaps seen, apart: those whose deadline passed while their hub's node was lost and
/// its partitions not yet taken over (the hub's timer could fire only after the takeover),
/// and the others.
pub struct SwapsSeen {
    pub served: SwapDelays,
    pub in_outage: SwapDelays,
}

pub fn swaps_seen(tally: &CourierTally, outage: Option<&super::Outage>) -> SwapsSeen {
    let mut seen = SwapsSeen {
        served: SwapDelays::default(),
        in_outage: SwapDelays::default(),
    };
    for ((hub_id, _, missed_ms), offer) in lock(&tally.swaps).iter() {
        let delays = match outage {
            Some(o) if (o.from_ms..=o.to_ms).contains(missed_ms) && o.hubs.contains(hub_id) => &mut seen.in_outage,
            _ => &mut seen.served,
        };
        delays.decided.push(offer.offered_ms - missed_ms);
        delays.received.push(offer.received_ms - missed_ms);
    }
    seen
}

fn now_ms() -> i64 {
    actors::SystemClock.now().0
}

fn secs(s: u64) -> Option<prost_types::Duration> {
    Some(duration(s * 1_000))
}

/// Creates the hubs and partners; returns each partner's credential and silence plan.
pub async fn set_up(
    registry: &mut PartnerRegistryServiceClient<Authed>,
) -> anyhow::Result<Vec<(String, String, Option<usize>)>> {
    for (hub_id, city, capacity) in HUBS {
        registry
            .create_hub(registry::CreateHubRequest {
                hub: Some(registry::HubSpec {
                    hub_id: hub_id.into(),
                    name: format!("{city} micro-hub"),
                    city: city.into(),
                    location: Some(registry::Location {
                        latitude: if city == "Porto" { 41.1496 } else { 38.7223 },
                        longitude: if city == "Porto" { -8.6110 } else { -9.1393 },
                    }),
                    slot_minutes: 1,
                    capacity_per_slot: capacity,
                    sla: Some(registry::SlaTargets {
                        accept_within: secs(2),
                        pickup_within: secs(4),
                        deliver_within: secs(6),
                    }),
                    probation_exit_deliveries: 5,
                    ..Default::default()
                }),
            })
            .await?;
    }
    let mut credentials = Vec::new();
    for (partner_id, hub_id, rank, capabilities, silent_after) in PARTNERS {
        let registered = registry
            .register_partner(registry::RegisterPartnerRequest {
                partner_id: partner_id.into(),
                name: partner_id.replace('-', " "),
                kind: if capabilities == LOCKER {
                    registry::PartnerKind::Locker
                } else {
                    registry::PartnerKind::Courier
                } as i32,
                capabilities: capabilities.iter().map(|c| *c as i32).collect(),
                max_open_dispatches: 400,
            })
            .await?
            .into_inner();
        registry
            .assign_partner(registry::AssignPartnerRequest {
                partner_id: partner_id.into(),
                hub_id: hub_id.into(),
                rank,
            })
            .await?;
        // Every partner but one has been vetted; the last stays on probation to show it
        // earning its way out.
        if partner_id != "cargo-po" {
            registry
                .set_partner_status(registry::SetPartnerStatusRequest {
                    partner_id: partner_id.into(),
                    status: registry::PartnerStatus::Active as i32,
                    reason: "vetted before the drop".into(),
                })
                .await?;
        }
        credentials.push((partner_id.to_string(), registered.credential, silent_after));
    }
    Ok(credentials)
}

/// Runs one simulated courier until `stop`: it subscribes, and works each offer (accept,
/// pick up with the label's code, deliver) with human-scale delays, sometimes declining or
/// reporting a failure. With `silent_after`, it answers that many offers and then ignores
/// everything while staying connected.
pub async fn run_courier(
    channel: Channel,
    credential: String,
    silent_after: Option<usize>,
    labels: Labels,
    tally: Arc<CourierTally>,
    seed: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(bearer) = Bearer::new(&credential) else { return };
    let client = DispatchServiceClient::with_interceptor(channel, bearer);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut answered = 0usize;
    while !*stop.borrow() {
        let Ok(response) = client.clone().subscribe(SubscribeRequest {}).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = response.into_inner();
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = stop.changed() => return,
            };
            let Ok(Some(DispatchUpdate {
                update: Some(Update::Offer(offer)),
            })) = message
            else {
                match message {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            };
            bump(&tally.offers);
            if let (Some(missed), Some(offered)) = (&offer.previous_deadline_missed, &offer.offered_at) {
                let seen = SwapOffer {
                    offered_ms: millis(offered),
                    received_ms: now_ms(),
                };
                lock(&tally.swaps)
                    .entry((offer.hub_id.clone(), offer.dispatch_id.clone(), millis(missed)))
                    .and_modify(|first| {
                        if seen.offered_ms < first.offered_ms {
                            *first = seen;
                        }
                    })
                    .or_insert(seen);
            }
            if silent_after.is_some_and(|n| answered >= n) {
                bump(&tally.ignored);
                continue;
            }
            answered += 1;
            let roll: f64 = rng.random();
            let delays = (
                rng.random_range(100..900u64),
                rng.random_range(200..1_500u64),
                rng.random_range(300..2_500u64),
            );
            tokio::spawn(work(client.clone(), offer, roll, delays, labels.clone(), tally.clone()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn work(
    mut client: DispatchServiceClient<Authed>,
    offer: Dispatch,
    roll: f64,
    (accept, pickup, deliver): (u64, u64, u64),
    labels: Labels,
    tally: Arc<CourierTally>,
) {
    let id = offer.dispatch_id.clone();
    tokio::time::sleep(Duration::from_millis(accept)).await;
    if roll < 0.02 {
        if client
            .decline(DeclineRequest {
                dispatch_id: id,
                reason: "out of range".into(),
            })
            .await
            .is_ok()
        {
            bump(&tally.declined);
        }
        return;
    }
    if client
        .accept(AcceptRequest {
            dispatch_id: id.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    bump(&tally.accepted);
    tokio::time::sleep(Duration::from_millis(pickup)).await;
    let code = lock(&labels).get(&offer.order_id).cloned().unwrap_or_default();
    if client
        .mark_picked_up(MarkPickedUpRequest {
            dispatch_id: id.clone(),
            pickup_code: code,
        })
        .await
        .is_err()
    {
        return;
    }
    tokio::time::sleep(Duration::from_millis(deliver)).await;
    if roll > 0.99 {
        if client
            .report_failure(ReportFailureRequest {
                dispatch_id: id,
                reason: "scooter puncture".into(),
            })
            .await
            .is_ok()
        {
            bump(&tally.failures_reported);
        }
        return;
    }
    if let Ok(done) = client
        .mark_delivered(MarkDeliveredRequest {
            dispatch_id: id,
            proof_reference: format!("photo-{}", rand::random::<u32>()),
        })
        .await
    {
        bump(&tally.delivered);
        if done.into_inner().window_by.is_some_and(|by| now_ms() <= millis(&by)) {
            bump(&tally.delivered_in_window);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// p50, p99 and max of a list of milliseconds.
pub fn summary(values: &[i64]) -> Option<(f64, f64, f64)> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).ok()?;
    for v in values {
        h.record((*v).max(1) as u64).ok()?;
    }
    (!values.is_empty()).then(|| {
        (
            h.value_at_quantile(0.5) as f64,
            h.value_at_quantile(0.99) as f64,
            h.max() as f64,
        )
    })
}
