//! The edge's link to its upstream platform: it mirrors the edge's leases into the tills
//! (and keeps their receipt keys), uploads each till's outbox, tops leases up when the
//! stall runs low, fetches the drop's availability levels for the stall's screens, and
//! knows whether the edge is online.
//!
//! Online means the upstream's last answer came within `offline_after`. Offline changes
//! nothing about selling (the tills always sell from their lease, never through the
//! upstream): the outbox waits, the upstream is probed every `probe_every`, and the first
//! answer turns the edge online and uploads what waited.

use super::Edge;
use crate::auth::{Authed, Bearer};
use crate::convert;
use crate::edge::receipt_fields;
use actors::secrets::receipt_mac;
use domain::sku::EdgeRefundReason;
use domain::till::{TillCommand, TillReply, TillState, TillTerms, Upload, TILL_PENDING_MAX};
use domain::{CityName, DropId, HubId, Money, OrderId, SkuId, UnixMillis};
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::{GetAvailabilityRequest, GetAvailabilityResponse};
use proto::edge::v1::edge_service_client::EdgeServiceClient;
use proto::edge::v1::{ListEdgeLeasesRequest, SaleOutcome, TopUpRequest, UploadRequest};
use proto::operator::v1::{EdgeRefundReason as ProtoReason, Lease, LeaseStatus};
use std::future::Future;
use std::sync::RwLock;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

/// How the edge stands with its upstream.
#[derive(Debug, Clone, Default)]
pub struct LinkState {
    pub online: bool,
    /// Why it is offline: the last call's error, or that it was too slow.
    pub reason: Option<String>,
    pub offline_since: Option<UnixMillis>,
    /// The last call the upstream answered.
    pub last_sync: Option<UnixMillis>,
    /// The drop's availability levels, as last fetched, and when.
    pub availability: Option<(GetAvailabilityResponse, UnixMillis)>,
    /// The edge's storefront id, as the upstream names it in its leases.
    pub edge_id: Option<String>,
}

pub struct Uplink {
    channel: Channel,
    bearer: Bearer,
    offline_after: Duration,
    state: RwLock<LinkState>,
    /// A sale was made: upload without waiting for the next tick.
    pub(super) sold: Notify,
}

impl Uplink {
    pub(super) fn new(config: &super::EdgeConfig, bearer: Bearer) -> anyhow::Result<Uplink> {
        let channel = config
            .upstream
            .clone()
            .connect_timeout(config.timings.offline_after)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Uplink {
            channel,
            bearer,
            offline_after: config.timings.offline_after,
            // Offline until the upstream first answers.
            state: RwLock::new(LinkState {
                reason: Some("the upstream has not answered yet".into()),
                ..LinkState::default()
            }),
            sold: Notify::new(),
        })
    }

    pub fn state(&self) -> LinkState {
        self.state.read().expect("link lock").clone()
    }

    pub fn is_online(&self) -> bool {
        self.state.read().expect("link lock").online
    }

    fn edge(&self) -> EdgeServiceClient<Authed> {
        EdgeServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    fn checkout(&self) -> CheckoutServiceClient<Authed> {
        CheckoutServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    fn went_online(&self, now: UnixMillis) {
        let mut state = self.state.write().expect("link lock");
        if !state.online {
            info!("the upstream answers: online");
        }
        state.online = true;
        state.reason = None;
        state.offline_since = None;
        state.last_sync = Some(now);
    }

    fn went_offline(&self, now: UnixMillis, reason: String) {
        let mut state = self.state.write().expect("link lock");
        if state.online {
            warn!(%reason, "the upstream is out of reach: offline, the tills go on selling their leases");
            state.offline_since = Some(now);
        } else if state.offline_since.is_none() {
            state.offline_since = Some(now);
        }
        state.online = false;
        state.reason = Some(reason);
    }

    /// Runs one upstream call within `limit`: an answer (even a refusal) within the offline
    /// threshold means online; no answer, a transport failure, or an answer later than the
    /// threshold means offline.
    async fn call<T>(
        &self,
        now: impl Fn() -> UnixMillis,
        what: &str,
        limit: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let answer = tokio::time::timeout(limit, call).await;
        let took = started.elapsed();
        match answer {
            Err(_) => {
                let reason = format!("{what}: no answer within {} ms", limit.as_millis());
                self.went_offline(now(), reason.clone());
                Err(Status::unavailable(reason))
            }
            Ok(Err(status)) if unreachable(&status) => {
                self.went_offline(now(), format!("{what}: {}", status.message()));
                Err(status)
            }
            Ok(answer) => {
                if took > self.offline_after {
                    self.went_offline(
                        now(),
                        format!(
                            "{what}: answered in {} ms, over the {} ms threshold",
                            took.as_millis(),
                            self.offline_after.as_millis()
                        ),
                    );
                } else {
                    self.went_online(now());
                }
                answer.map(tonic::Response::into_inner)
            }
        }
    }
}

/// A status that says the upstream was not reached (or could not serve), as opposed to an
/// answer about the request.
fn unreachable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

/// The lease as a till mirrors it, from the upstream's message.
pub(super) fn terms_of(lease: &Lease) -> Result<(DropId, SkuId, TillTerms), String> {
    let bad = |what: &str, e: &dyn std::fmt::Display| format!("the upstream's lease has a bad {what}: {e}");
    let drop_id = DropId::parse(&lease.drop_id).map_err(|e| bad("drop_id", &e))?;
    let sku_id = SkuId::parse(&lease.sku_id).map_err(|e| bad("sku_id", &e))?;
    let price = lease.price.as_ref().ok_or_else(|| bad("price", &"missing"))?;
    let currency = domain::Currency::parse(&price.currency).map_err(|e| bad("currency", &e))?;
    let at = |t: &Option<prost_types::Timestamp>| t.as_ref().map_or(UnixMillis(0), |t| UnixMillis(convert::millis(t)));
    Ok((
        drop_id,
        sku_id,
        TillTerms {
            key_id: lease.key_id.clone(),
            hub_id: HubId::parse(&lease.hub_id).map_err(|e| bad("hub_id", &e))?,
            city: CityName::parse(&lease.city).map_err(|e| bad("city", &e))?,
            price: Money::new(price.minor_units, currency),
            granted: lease.granted,
            granted_max: lease.top_up_max,
            returned: lease.returned,
            booked: lease.sold,
            started_at: at(&lease.started_at),
            expires_at: at(&lease.expires_at),
            reconcile_window_ms: u64::from(lease.reconcile_window_seconds) * 1_000,
            ended: lease.status != LeaseStatus::Live as i32,
        },
    ))
}

fn upload_of(outcome: i32, reason: i32) -> Upload {
    match SaleOutcome::try_from(outcome) {
        Ok(SaleOutcome::Booked) => Upload::Booked,
        Ok(SaleOutcome::Conflict) => Upload::Conflict,
        Ok(SaleOutcome::ReceiptInvalid) => Upload::ReceiptInvalid,
        Ok(SaleOutcome::Refunded) => Upload::Refunded(match ProtoReason::try_from(reason) {
            Ok(ProtoReason::SoldOutsideLease) => EdgeRefundReason::SoldOutsideLease,
            Ok(ProtoReason::ReconciledTooLate) => EdgeRefundReason::ReconciledTooLate,
            Ok(ProtoReason::LeaseEnded) => EdgeRefundReason::LeaseEnded,
            Ok(ProtoReason::AmountMismatch) => EdgeRefundReason::AmountMismatch,
            _ => EdgeRefundReason::LeaseExhausted,
        }),
        // An answer this edge does not know: the sale stays in the outbox.
        _ => Upload::Pending,
    }
}

/// The uplink's loop, until `stop`.
pub(super) async fn run(edge: Edge, mut stop: watch::Receiver<bool>) {
    let timings = edge.config.timings;
    let mut next_sync = Instant::now();
    let mut next_availability = Instant::now();
    loop {
        if Instant::now() >= next_sync {
            sync_leases(&edge).await;
            next_sync = Instant::now()
                + if edge.uplink.is_online() {
                    timings.sync_every
                } else {
                    timings.probe_every
                };
        }
        if edge.uplink.is_online() {
            upload_all(&edge).await;
        }
        if edge.uplink.is_online() && Instant::now() >= next_availability {
            refresh_availability(&edge).await;
            next_availability = Instant::now() + timings.availability_every;
        }
        let wait = timings
            .upload_every
            .min(next_sync.saturating_duration_since(Instant::now()));
        tokio::select! {
            _ = stop.changed() => return,
            _ = edge.uplink.sold.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn now_of(edge: &Edge) -> impl Fn() -> UnixMillis + '_ {
    move || edge.clock.now()
}

/// Reads the edge's leases of the drop, keeps their keys and mirrors them into the tills;
/// tops up the ones running low.
async fn sync_leases(edge: &Edge) {
    let uplink = &edge.uplink;
    let request = ListEdgeLeasesRequest {
        drop_id: edge.config.drop_id.to_string(),
    };
    let mut client = uplink.edge();
    let leases = match uplink
        .call(
            now_of(edge),
            "ListLeases",
            uplink.offline_after,
            client.list_leases(request),
        )
        .await
    {
        Ok(reply) => reply.leases,
        Err(status) => {
            debug!(error = %status.message(), "leases not read");
            return;
        }
    };
    for edge_lease in leases {
        let Some(lease) = edge_lease.lease.as_ref() else {
            continue;
        };
        if let Err(e) = mirror(edge, lease, &edge_lease.receipt_key).await {
            warn!(error = %e, sku_id = %lease.sku_id, "lease not mirrored");
            continue;
        }
        if let Err(e) = top_up_if_low(edge, lease).await {
            debug!(error = %e, sku_id = %lease.sku_id, "lease not topped up");
        }
    }
}

/// Keeps the lease's key (durably, before any receipt is signed with it), records the
/// till and hands it the lease.
async fn mirror(edge: &Edge, lease: &Lease, receipt_key: &[u8]) -> anyhow::Result<(DropId, SkuId, TillTerms)> {
    let (drop_id, sku_id, terms) = terms_of(lease).map_err(anyhow::Error::msg)?;
    if !receipt_key.is_empty() {
        let key: [u8; 32] = receipt_key
            .try_into()
            .map_err(|_| anyhow::anyhow!("the upstream's receipt key is not 32 bytes"))?;
        edge.keys.put(&terms.key_id, key)?;
    }
    edge.tills.add(&drop_id, &sku_id)?;
    {
        let mut state = edge.uplink.state.write().expect("link lock");
        if state.edge_id.is_none() {
            state.edge_id = Some(lease.edge_id.clone());
        }
    }
    edge.bus
        .ask::<TillState>((drop_id.clone(), sku_id.clone()), TillCommand::Mirror(terms.clone()))
        .await?;
    Ok((drop_id, sku_id, terms))
}

async fn top_up_if_low(edge: &Edge, lease: &Lease) -> anyhow::Result<()> {
    let config = &edge.config;
    if config.top_up_below == 0 || lease.status != LeaseStatus::Live as i32 || lease.granted >= lease.top_up_max {
        return Ok(());
    }
    let (drop_id, sku_id, terms) = terms_of(lease).map_err(anyhow::Error::msg)?;
    if edge.clock.now() >= terms.expires_at {
        return Ok(());
    }
    let TillReply::Stock(stock) = edge
        .bus
        .ask::<TillState>((drop_id.clone(), sku_id.clone()), TillCommand::Stock)
        .await?
    else {
        return Ok(());
    };
    if stock.free >= config.top_up_below {
        return Ok(());
    }
    let granted_total = lease.top_up_max.min(lease.granted.saturating_add(config.top_up_units));
    let uplink = &edge.uplink;
    let mut client = uplink.edge();
    let request = TopUpRequest {
        drop_id: drop_id.to_string(),
        sku_id: sku_id.to_string(),
        granted_total,
    };
    let topped = uplink
        .call(now_of(edge), "TopUp", uplink.offline_after, client.top_up(request))
        .await?;
    if let Some(lease) = topped.lease.as_ref() {
        mirror(edge, lease, &topped.receipt_key).await?;
        info!(%drop_id, %sku_id, granted = lease.granted, "lease topped up");
    }
    Ok(())
}

/// Uploads every till's outbox, a full upload at a time, until it is empty or the upstream
/// stops answering.
async fn upload_all(edge: &Edge) {
    for (drop_id, sku_id) in edge.tills.all() {
        loop {
            match upload_once(edge, &drop_id, &sku_id).await {
                // A full upload, all of it answered: there may be more.
                Ok((sent, settled)) if sent == TILL_PENDING_MAX && settled == sent => continue,
                Ok(_) => break,
                Err(e) => {
                    debug!(error = %e, %drop_id, %sku_id, "upload not done");
                    return;
                }
            }
        }
    }
}

/// Uploads the till's oldest pending sales (at most a full upload) and settles them with
/// the upstream's answers; returns how many were sent and how many got an answer (one this
/// edge does not know leaves its sale pending: the next round sends it again, not at once).
async fn upload_once(edge: &Edge, drop_id: &DropId, sku_id: &SkuId) -> anyhow::Result<(usize, usize)> {
    let key = (drop_id.clone(), sku_id.clone());
    let TillReply::Pending(pending) = edge
        .bus
        .ask::<TillState>(key.clone(), TillCommand::Pending { max: TILL_PENDING_MAX })
        .await?
    else {
        return Ok((0, 0));
    };
    if pending.is_empty() {
        return Ok((0, 0));
    }
    let mut sales = Vec::with_capacity(pending.len());
    for (order_id, sale) in &pending {
        let Some(receipt_key) = edge.keys.get(&sale.key_id) else {
            // Never: a key is kept before its lease is mirrored, and sales need the lease.
            anyhow::bail!("no receipt key for lease key id {:?}", sale.key_id);
        };
        let domain_sale = TillState::edge_sale(order_id, sale);
        let mac = receipt_mac(&receipt_key, &receipt_fields(drop_id, sku_id, &domain_sale));
        sales.push(proto::edge::v1::EdgeSale {
            order_id: order_id.to_string(),
            quantity: sale.quantity,
            amount: Some(convert::money(sale.amount)),
            delivery: false,
            payment_reference: sale.payment_reference.clone(),
            pickup_code: sale.pickup_code.clone(),
            key_id: sale.key_id.clone(),
            sold_at: Some(convert::timestamp(sale.sold_at)),
            receipt_mac: mac,
        });
    }
    let sent = sales.len();
    let uplink = &edge.uplink;
    let mut client = uplink.edge();
    let request = UploadRequest {
        drop_id: drop_id.to_string(),
        sku_id: sku_id.to_string(),
        sales,
    };
    // An upload books up to a thousand sales: give it longer than a probe, but an answer
    // later than the threshold still says the link is slow.
    let limit = (uplink.offline_after * 4).max(Duration::from_secs(5));
    let reply = uplink
        .call(now_of(edge), "Upload", limit, client.upload(request))
        .await?;
    let results: Vec<(OrderId, Upload)> = reply
        .results
        .iter()
        .filter_map(|r| Some((OrderId::parse(&r.order_id).ok()?, upload_of(r.outcome, r.refund_reason))))
        .collect();
    let terms = match reply.lease.as_ref().map(terms_of) {
        Some(Ok((d, s, terms))) if d == *drop_id && s == *sku_id => Some(terms),
        _ => None,
    };
    let booked = results.iter().filter(|(_, u)| *u == Upload::Booked).count();
    let refunded = results.iter().filter(|(_, u)| u.is_refund()).count();
    let answered = results.iter().filter(|(_, u)| *u != Upload::Pending).count();
    edge.bus
        .ask::<TillState>(key, TillCommand::Settle { results, terms })
        .await?;
    info!(%drop_id, %sku_id, sent, booked, refunded, "sales uploaded");
    Ok((sent, answered))
}

async fn refresh_availability(edge: &Edge) {
    let uplink = &edge.uplink;
    let mut client = uplink.checkout();
    let request = GetAvailabilityRequest {
        drop_id: edge.config.drop_id.to_string(),
        city: String::new(),
    };
    if let Ok(reply) = uplink
        .call(
            now_of(edge),
            "GetAvailability",
            uplink.offline_after,
            client.get_availability(request),
        )
        .await
    {
        let now = edge.clock.now();
        uplink.state.write().expect("link lock").availability = Some((reply, now));
    }
}
