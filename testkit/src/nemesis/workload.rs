//! The nemesis's workload: buyers reserving, confirming and cancelling, couriers accepting,
//! picking up and delivering, the operator refunding, a creator taking payouts — every call
//! to a node picked at random, whatever the nemesis is doing to it — and a [`History`] of
//! what each call was answered.
//!
//! An answer is one of three things. Acknowledged: the call took effect and must stay so.
//! Refused with a definite status (FAILED_PRECONDITION, SOLD_OUT as an outcome, …): it did
//! not take effect. Indeterminate (UNAVAILABLE, DEADLINE_EXCEEDED, a broken connection, …):
//! it may or may not have; after the faults [`Workload::resolve`] asks again with the same
//! idempotency key or id until the answer is definite, which proves which.

use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::dispatch::v1::dispatch_service_client::DispatchServiceClient;
use proto::dispatch::v1::dispatch_update::Update;
use proto::dispatch::v1::*;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use proto::settlement::v1::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use services::auth::{Authed, Bearer};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Every call's deadline: a paused or cut-off node must not hold a worker longer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(4);
/// How long [`Workload::resolve`] keeps asking an indeterminate call again.
const RESOLVE_WITHIN: Duration = Duration::from_secs(90);

/// What a call was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Acknowledged,
    /// A definite refusal: nothing was done.
    Refused(Code),
    /// Lost in the fault: it may or may not have taken effect.
    Indeterminate(Code),
}

impl Answer {
    pub fn of(status: &tonic::Status) -> Answer {
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
            | Code::Aborted => Answer::Indeterminate(status.code()),
            code => Answer::Refused(code),
        }
    }

    pub fn acknowledged(&self) -> bool {
        *self == Answer::Acknowledged
    }

    pub fn indeterminate(&self) -> bool {
        matches!(self, Answer::Indeterminate(_))
    }
}

/// A reserve and what became of it.
#[derive(Clone, Debug)]
pub struct ReserveRecord {
    pub request: ReserveRequest,
    pub answer: Answer,
    /// The order (hold) it made, when acknowledged as HELD.
    pub order_id: Option<String>,
    /// It was indeterminate and resolved by asking again.
    pub resolved: bool,
}

/// An order the buyers know of, and every call they made on it.
#[derive(Clone, Debug, Default)]
pub struct OrderRecord {
    pub sku_id: String,
    pub quantity: u32,
    pub amount: i64,
    pub delivery: bool,
    pub confirm: Option<Answer>,
    pub cancel: Option<Answer>,
    pub refund: Option<Answer>,
    /// The code on the parcel's label (from the confirm's reply).
    pub pickup_code: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PayoutRecord {
    pub key: String,
    pub amount: i64,
    pub answer: Answer,
    pub payout_id: Option<String>,
}

/// Everything the workload was answered.
#[derive(Default, Debug)]
pub struct History {
    pub reserves: Vec<ReserveRecord>,
    pub orders: BTreeMap<String, OrderRecord>,
    pub payouts: Vec<PayoutRecord>,
    /// Acknowledged MarkDelivered per order: the distinct dispatches delivered.
    pub deliveries: BTreeMap<String, BTreeSet<String>>,
    /// Courier calls answered (accept, picked up, delivered), acknowledged or not.
    pub courier_acks: u64,
    pub courier_indeterminate: u64,
    /// Indeterminate calls asked again after the faults: (took effect by then, did not).
    pub resolved: (u64, u64),
}

/// Who the workload is, and where it sells.
#[derive(Clone, Debug)]
pub struct Cast {
    pub drop_id: String,
    pub creator_id: String,
    pub creator_credential: String,
    pub storefront: String,
    pub operator: String,
    /// (partner id, hub id, credential).
    pub couriers: Vec<(String, String, String)>,
    /// (sku id, unit price in minor units).
    pub skus: Vec<(String, i64)>,
    /// (city, hub) pairs buyers come from.
    pub cities: Vec<(String, String)>,
}

/// Channels to every node, each call with [`CALL_TIMEOUT`].
#[derive(Clone)]
pub struct Nodes {
    channels: Vec<Channel>,
}

impl Nodes {
    pub fn new(addrs: &[SocketAddr]) -> anyhow::Result<Nodes> {
        let channels = addrs
            .iter()
            .map(|addr| {
                Ok(Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(CALL_TIMEOUT)
                    .connect_lazy())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Nodes { channels })
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    pub fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    pub fn any(&self, rng: &mut StdRng) -> Channel {
        self.channel(rng.random_range(0..self.channels.len()))
    }
}

fn checkout(channel: Channel, credential: &str) -> CheckoutServiceClient<Authed> {
    CheckoutServiceClient::with_interceptor(channel, Bearer::new(credential).unwrap())
}

fn settlement(channel: Channel, credential: &str) -> SettlementServiceClient<Authed> {
    SettlementServiceClient::with_interceptor(channel, Bearer::new(credential).unwrap())
}

fn dispatch(channel: Channel, credential: &str) -> DispatchServiceClient<Authed> {
    DispatchServiceClient::with_interceptor(channel, Bearer::new(credential).unwrap())
}

/// The running workload.
pub struct Workload {
    pub cast: Cast,
    pub nodes: Nodes,
    pub history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    /// Starts `buyers` buyers, the couriers of the cast, a refunding operator and a creator
    /// taking payouts, seeded by `seed`.
    pub fn start(cast: Cast, nodes: Nodes, buyers: usize, seed: u64) -> Workload {
        let history = Arc::new(Mutex::new(History::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for b in 0..buyers {
            let rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000).wrapping_add(b as u64));
            tasks.push(tokio::spawn(buyer(
                cast.clone(),
                nodes.clone(),
                history.clone(),
                stopped.clone(),
                rng,
                b,
            )));
        }
        for (c, courier) in cast.couriers.iter().enumerate() {
            let rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000).wrapping_add(500 + c as u64));
            tasks.push(tokio::spawn(courier_app(
                courier.2.clone(),
                nodes.clone(),
                history.clone(),
                stopped.clone(),
                rng,
            )));
        }
        tasks.push(tokio::spawn(refunder(
            cast.clone(),
            nodes.clone(),
            history.clone(),
            stopped.clone(),
            StdRng::seed_from_u64(seed.wrapping_mul(1_000).wrapping_add(900)),
        )));
        tasks.push(tokio::spawn(payouts(
            cast.clone(),
            nodes.clone(),
            history.clone(),
            stopped.clone(),
            StdRng::seed_from_u64(seed.wrapping_mul(1_000).wrapping_add(901)),
        )));
        Workload {
            cast,
            nodes,
            history,
            stop,
            tasks,
        }
    }

    /// Stops every task and waits for them (each call has its deadline).
    pub async fn stop(&mut self) {
        self.stop.send_replace(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }

    /// Asks every indeterminate call again with the same key or id until it is answered
    /// definitely. Fails when one stays indeterminate for [`RESOLVE_WITHIN`].
    pub async fn resolve(&self) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(7);
        let (mut took, mut not) = (0u64, 0u64);
        let reserves: Vec<usize> = {
            let h = self.history.lock().unwrap();
            (0..h.reserves.len())
                .filter(|i| h.reserves[*i].answer.indeterminate())
                .collect()
        };
        for i in reserves {
            let request = self.history.lock().unwrap().reserves[i].request.clone();
            let reply = retry(&self.nodes, &mut rng, |channel| {
                let request = request.clone();
                let credential = self.cast.storefront.clone();
                async move { checkout(channel, &credential).reserve(request).await }
            })
            .await?;
            let mut h = self.history.lock().unwrap();
            let record = &mut h.reserves[i];
            record.resolved = true;
            match reply {
                Ok(reply) => {
                    record.answer = Answer::Acknowledged;
                    let reply = reply.into_inner();
                    if reply.outcome == ReserveOutcome::Held as i32 {
                        record.order_id = Some(reply.order_id.clone());
                        let price = self.price(&request.sku_id);
                        h.orders.entry(reply.order_id).or_insert(OrderRecord {
                            sku_id: request.sku_id.clone(),
                            quantity: reply.quantity_held,
                            amount: price * i64::from(reply.quantity_held),
                            ..Default::default()
                        });
                        took += 1;
                    } else {
                        not += 1;
                    }
                }
                Err(code) => {
                    record.answer = Answer::Refused(code);
                    not += 1;
                }
            }
        }
        let orders: Vec<(String, OrderRecord)> = self
            .history
            .lock()
            .unwrap()
            .orders
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (order_id, order) in orders {
            if order.confirm.as_ref().is_some_and(Answer::indeterminate) {
                let request = confirm_request(&order_id, order.amount, order.delivery);
                let reply = retry(&self.nodes, &mut rng, |channel| {
                    let request = request.clone();
                    let credential = self.cast.storefront.clone();
                    async move { checkout(channel, &credential).confirm(request).await }
                })
                .await?;
                let mut h = self.history.lock().unwrap();
                let record = h.orders.get_mut(&order_id).unwrap();
                match reply {
                    Ok(reply) => {
                        record.confirm = Some(Answer::Acknowledged);
                        record.pickup_code = reply.into_inner().order.map(|o| o.pickup_code);
                        took += 1;
                    }
                    Err(code) => {
                        record.confirm = Some(Answer::Refused(code));
                        not += 1;
                    }
                }
            }
            if order.cancel.as_ref().is_some_and(Answer::indeterminate) {
                let reply = retry(&self.nodes, &mut rng, |channel| {
                    let order_id = order_id.clone();
                    let credential = self.cast.storefront.clone();
                    async move { checkout(channel, &credential).cancel(CancelRequest { order_id }).await }
                })
                .await?;
                let answer = definite(reply, &mut took, &mut not);
                self.history.lock().unwrap().orders.get_mut(&order_id).unwrap().cancel = Some(answer);
            }
            if order.refund.as_ref().is_some_and(Answer::indeterminate) {
                let reply = retry(&self.nodes, &mut rng, |channel| {
                    let order_id = order_id.clone();
                    let credential = self.cast.operator.clone();
                    async move {
                        settlement(channel, &credential)
                            .refund_order(RefundOrderRequest {
                                order_id,
                                reason: "nemesis".into(),
                            })
                            .await
                    }
                })
                .await?;
                let answer = definite(reply, &mut took, &mut not);
                self.history.lock().unwrap().orders.get_mut(&order_id).unwrap().refund = Some(answer);
            }
        }
        let payouts: Vec<usize> = {
            let h = self.history.lock().unwrap();
            (0..h.payouts.len())
                .filter(|i| h.payouts[*i].answer.indeterminate())
                .collect()
        };
        for i in payouts {
            let (key, amount) = {
                let h = self.history.lock().unwrap();
                (h.payouts[i].key.clone(), h.payouts[i].amount)
            };
            let reply = retry(&self.nodes, &mut rng, |channel| {
                let request = RequestPayoutRequest {
                    creator_id: self.cast.creator_id.clone(),
                    amount: crate::fixtures::eur(amount),
                    idempotency_key: key.clone(),
                };
                let credential = self.cast.creator_credential.clone();
                async move { settlement(channel, &credential).request_payout(request).await }
            })
            .await?;
            let mut h = self.history.lock().unwrap();
            let record = &mut h.payouts[i];
            match reply {
                Ok(payout) => {
                    record.answer = Answer::Acknowledged;
                    record.payout_id = Some(payout.into_inner().payout_id);
                }
                // Not enough available by now: the first attempt took nothing either.
                Err(code) => record.answer = Answer::Refused(code),
            }
        }
        let mut h = self.history.lock().unwrap();
        h.resolved = (took, not);
        Ok(())
    }

    fn price(&self, sku_id: &str) -> i64 {
        self.cast
            .skus
            .iter()
            .find(|(s, _)| s == sku_id)
            .map(|(_, p)| *p)
            .unwrap_or(0)
    }
}

/// The answer a resolved call got, counted as having taken effect or not.
fn definite<T>(reply: Result<T, Code>, took: &mut u64, not: &mut u64) -> Answer {
    match reply {
        Ok(_) => {
            *took += 1;
            Answer::Acknowledged
        }
        Err(code) => {
            *not += 1;
            Answer::Refused(code)
        }
    }
}

/// Calls `call` on random nodes until it is answered definitely: Ok(reply) or Err(code) of
/// a definite refusal. Fails after [`RESOLVE_WITHIN`] of indeterminate answers.
async fn retry<T, F, Fut>(nodes: &Nodes, rng: &mut StdRng, mut call: F) -> anyhow::Result<Result<T, Code>>
where
    F: FnMut(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let until = tokio::time::Instant::now() + RESOLVE_WITHIN;
    loop {
        match call(nodes.any(rng)).await {
            Ok(reply) => return Ok(Ok(reply)),
            Err(status) => match Answer::of(&status) {
                Answer::Refused(code) => return Ok(Err(code)),
                _ if tokio::time::Instant::now() > until => {
                    anyhow::bail!("still indeterminate after {RESOLVE_WITHIN:?}: {status}")
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            },
        }
    }
}

fn confirm_request(order_id: &str, amount: i64, delivery: bool) -> ConfirmRequest {
    let fulfilment = if delivery {
        confirm_request::Fulfilment::Delivery(Delivery {
            address: Some(Address {
                recipient_name: "Nemesis Buyer".into(),
                line1: "1 Rua Augusta".into(),
                line2: String::new(),
                postal_code: "1100-048".into(),
                city: "Lisbon".into(),
                country: "PT".into(),
                phone: String::new(),
            }),
        })
    } else {
        confirm_request::Fulfilment::Pickup(Pickup {})
    };
    ConfirmRequest {
        order_id: order_id.into(),
        payment_reference: format!("pay-{order_id}"),
        amount: crate::fixtures::eur(amount),
        fulfilment: Some(fulfilment),
        discreet: false,
    }
}

async fn buyer(
    cast: Cast,
    nodes: Nodes,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
    mut rng: StdRng,
    index: usize,
) {
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let (sku_id, price) = cast.skus[rng.random_range(0..cast.skus.len())].clone();
        let (city, _) = cast.cities[rng.random_range(0..cast.cities.len())].clone();
        let buyer_id = format!("buyer-{index}-{n}");
        let request = ReserveRequest {
            drop_id: cast.drop_id.clone(),
            sku_id: sku_id.clone(),
            buyer_id: buyer_id.clone(),
            city,
            quantity: 1,
            skip_waitlist: true,
            idempotency_key: format!("reserve-{buyer_id}"),
            ..Default::default()
        };
        let reply = checkout(nodes.any(&mut rng), &cast.storefront)
            .reserve(request.clone())
            .await;
        let order_id = match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                let held = reply.outcome == ReserveOutcome::Held as i32;
                {
                    let mut h = history.lock().unwrap();
                    h.reserves.push(ReserveRecord {
                        request,
                        answer: Answer::Acknowledged,
                        order_id: held.then(|| reply.order_id.clone()),
                        resolved: false,
                    });
                    if held {
                        h.orders.insert(
                            reply.order_id.clone(),
                            OrderRecord {
                                sku_id,
                                quantity: reply.quantity_held,
                                amount: price * i64::from(reply.quantity_held),
                                ..Default::default()
                            },
                        );
                    }
                }
                if !held {
                    // Sold out: slow down rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                reply.order_id
            }
            Err(status) => {
                history.lock().unwrap().reserves.push(ReserveRecord {
                    request,
                    answer: Answer::of(&status),
                    order_id: None,
                    resolved: false,
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Then: confirm (for delivery or pickup), cancel, or leave the hold as it is.
        let roll = rng.random_range(0..100);
        if roll < 65 {
            let delivery = rng.random_bool(0.6);
            let amount = price;
            history.lock().unwrap().orders.get_mut(&order_id).unwrap().delivery = delivery;
            let reply = checkout(nodes.any(&mut rng), &cast.storefront)
                .confirm(confirm_request(&order_id, amount, delivery))
                .await;
            let confirmed = {
                let mut h = history.lock().unwrap();
                let record = h.orders.get_mut(&order_id).unwrap();
                match reply {
                    Ok(reply) => {
                        record.confirm = Some(Answer::Acknowledged);
                        record.pickup_code = reply.into_inner().order.map(|o| o.pickup_code);
                    }
                    Err(status) => record.confirm = Some(Answer::of(&status)),
                }
                record.confirm == Some(Answer::Acknowledged)
            };
            // Some confirmed orders are cancelled again before they leave the hub.
            if confirmed && rng.random_range(0..100) < 10 {
                cancel(&cast, &nodes, &history, &mut rng, &order_id).await;
            }
        } else if roll < 85 {
            cancel(&cast, &nodes, &history, &mut rng, &order_id).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..30))).await;
    }
}

async fn cancel(cast: &Cast, nodes: &Nodes, history: &Mutex<History>, rng: &mut StdRng, order_id: &str) {
    let reply = checkout(nodes.any(rng), &cast.storefront)
        .cancel(CancelRequest {
            order_id: order_id.into(),
        })
        .await;
    let answer = match reply {
        Ok(_) => Answer::Acknowledged,
        Err(status) => Answer::of(&status),
    };
    history.lock().unwrap().orders.get_mut(order_id).unwrap().cancel = Some(answer);
}

/// A courier app: subscribes on a random node, takes every offer, picks the parcel up with
/// the code on its label and delivers it; subscribes again (on another node, perhaps) when
/// its stream ends or stays quiet.
async fn courier_app(
    credential: String,
    nodes: Nodes,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
    mut rng: StdRng,
) {
    let mut finished = BTreeSet::new();
    while !*stop.borrow() {
        // The subscription has no deadline of its own (it is a long stream).
        let channel = nodes.any(&mut rng);
        let mut client = dispatch(channel.clone(), &credential);
        let stream = match tokio::time::timeout(CALL_TIMEOUT, client.subscribe(SubscribeRequest {})).await {
            Ok(Ok(stream)) => stream.into_inner(),
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut stream = stream;
        loop {
            if *stop.borrow() {
                return;
            }
            let message = match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Ok(Some(message))) => message,
                _ => break,
            };
            let Some(Update::Offer(offer)) = message.update else {
                continue;
            };
            if finished.contains(&offer.dispatch_id) {
                continue;
            }
            let code = history
                .lock()
                .unwrap()
                .orders
                .get(&offer.order_id)
                .and_then(|o| o.pickup_code.clone());
            let Some(code) = code else {
                // The offer overtook the confirm's reply (or the confirm is indeterminate):
                // it comes again on the next subscription.
                continue;
            };
            if work(&mut client, &offer, &code, &history, &stop).await {
                finished.insert(offer.dispatch_id.clone());
            }
        }
    }
}

/// Takes a dispatch from where it is to delivered; true once it is delivered (by us).
async fn work(
    client: &mut DispatchServiceClient<Authed>,
    offer: &Dispatch,
    code: &str,
    history: &Mutex<History>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> bool {
    let id = offer.dispatch_id.clone();
    for _ in 0..50 {
        if *stop.borrow() {
            return false;
        }
        let stage = match client
            .get_dispatch(GetDispatchRequest {
                dispatch_id: id.clone(),
            })
            .await
        {
            Ok(d) => DispatchStage::try_from(d.into_inner().stage).unwrap_or(DispatchStage::Unspecified),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (step, delivering) = match stage {
            DispatchStage::Offered => (
                client
                    .accept(AcceptRequest {
                        dispatch_id: id.clone(),
                    })
                    .await
                    .map(|_| ()),
                false,
            ),
            DispatchStage::Accepted => (
                client
                    .mark_picked_up(MarkPickedUpRequest {
                        dispatch_id: id.clone(),
                        pickup_code: code.into(),
                    })
                    .await
                    .map(|_| ()),
                false,
            ),
            DispatchStage::PickedUp => (
                client
                    .mark_delivered(MarkDeliveredRequest {
                        dispatch_id: id.clone(),
                        proof_reference: "photo".into(),
                    })
                    .await
                    .map(|_| ()),
                true,
            ),
            DispatchStage::Delivered => return true,
            // Withdrawn, swapped to someone else, failed: not ours to work.
            _ => return false,
        };
        let failed = {
            let mut h = history.lock().unwrap();
            match step {
                Ok(()) => {
                    h.courier_acks += 1;
                    if delivering {
                        h.deliveries
                            .entry(offer.order_id.clone())
                            .or_default()
                            .insert(id.clone());
                        return true;
                    }
                    false
                }
                Err(status) => {
                    if Answer::of(&status).indeterminate() {
                        h.courier_indeterminate += 1;
                    }
                    true
                }
            }
        };
        if failed {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    false
}

/// The operator refunds a confirmed order now and then (refused once its parcel is picked up).
async fn refunder(
    cast: Cast,
    nodes: Nodes,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
    mut rng: StdRng,
) {
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..900))).await;
        let candidate = {
            let h = history.lock().unwrap();
            let confirmed: Vec<&String> = h
                .orders
                .iter()
                .filter(|(_, o)| o.confirm == Some(Answer::Acknowledged) && o.cancel.is_none() && o.refund.is_none())
                .map(|(id, _)| id)
                .collect();
            (!confirmed.is_empty()).then(|| confirmed[rng.random_range(0..confirmed.len())].clone())
        };
        let Some(order_id) = candidate else { continue };
        let reply = settlement(nodes.any(&mut rng), &cast.operator)
            .refund_order(RefundOrderRequest {
                order_id: order_id.clone(),
                reason: "nemesis".into(),
            })
            .await;
        let answer = match reply {
            Ok(_) => Answer::Acknowledged,
            Err(status) => Answer::of(&status),
        };
        history.lock().unwrap().orders.get_mut(&order_id).unwrap().refund = Some(answer);
    }
}

/// The creator takes half of what is available now and then, each request with a new key.
async fn payouts(
    cast: Cast,
    nodes: Nodes,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
    mut rng: StdRng,
) {
    let mut n = 0;
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1_500))).await;
        let Ok(balance) = settlement(nodes.any(&mut rng), &cast.creator_credential)
            .get_balance(GetBalanceRequest {
                creator_id: cast.creator_id.clone(),
            })
            .await
        else {
            continue;
        };
        let available = balance
            .into_inner()
            .currencies
            .iter()
            .find(|c| c.currency == "EUR")
            .map_or(0, |c| c.available);
        if available < 2 {
            continue;
        }
        n += 1;
        let key = format!("payout-{n}");
        let amount = available / 2;
        let reply = settlement(nodes.any(&mut rng), &cast.creator_credential)
            .request_payout(RequestPayoutRequest {
                creator_id: cast.creator_id.clone(),
                amount: crate::fixtures::eur(amount),
                idempotency_key: key.clone(),
            })
            .await;
        let (answer, payout_id) = match reply {
            Ok(payout) => (Answer::Acknowledged, Some(payout.into_inner().payout_id)),
            Err(status) => (Answer::of(&status), None),
        };
        history.lock().unwrap().payouts.push(PayoutRecord {
            key,
            amount,
            answer,
            payout_id,
        });
    }
}
