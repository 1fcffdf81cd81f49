//! The nemesis's checker: after the faults have healed and every indeterminate call has been
//! resolved, it reads the platform back through the public API and compares it with the
//! [`History`]. Each rule broken is a violation, named with the order, SKU or payout.
//!
//! - every acknowledged hold, confirmation and cancellation is what its order shows;
//! - each SKU's figures add up (available + held + sold = allocated, sold ≤ allocated) and
//!   equal the orders' own states, so no reserve took effect twice and none was lost;
//! - every node shows the same figures;
//! - the creator's ledger reconciles with the SKU journals (nothing missing, nothing booked
//!   twice) and balances; its takings equal the drop's revenue less the refunds;
//! - every acknowledged payout is listed exactly once, no key twice, and they add up to
//!   what the balance says was paid out;
//! - no dispatch was delivered twice, no refunded order was delivered, and the hubs' delivery
//!   counters equal the orders delivered.

use super::workload::{Answer, Cast, History, Nodes};
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::GetDropRequest;
use proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient;
use proto::registry::v1::GetHubRequest;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use proto::settlement::v1::*;
use services::auth::Bearer;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What was checked, and what was found wrong.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    /// Acknowledged operations compared with the platform's state.
    pub acknowledged: u64,
    pub reserves: u64,
    pub confirms: u64,
    pub cancels: u64,
    pub refunds: u64,
    pub payouts: u64,
    pub deliveries: u64,
    pub violations: Vec<String>,
}

/// Reads with patience: right after the faults a read may still meet a leader election or a
/// takeover (UNAVAILABLE); a read changes nothing, so it is simply asked again.
async fn read<C: Clone, T, F, Fut>(what: &str, client: &C, mut call: F) -> anyhow::Result<T>
where
    F: FnMut(C) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match call(client.clone()).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) if Answer::of(&status).indeterminate() && tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(status) => anyhow::bail!("{what}: {status}"),
        }
    }
}

/// Checks `history` against the platform as `nodes` show it; `probes` are orders made after
/// the faults to refresh the figures (held, then cancelled).
pub async fn check(cast: &Cast, nodes: &Nodes, history: &History) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict::default();
    let channel = nodes.channel(0);
    let bearer = |token: &str| Bearer::new(token).unwrap();
    let checkout = CheckoutServiceClient::with_interceptor(channel.clone(), bearer(&cast.operator));
    let settlement = SettlementServiceClient::with_interceptor(channel.clone(), bearer(&cast.operator));

    // Reserves: each acknowledged HELD names an order the buyers know.
    for record in &history.reserves {
        if let (Answer::Acknowledged, Some(order_id)) = (&record.answer, &record.order_id) {
            verdict.reserves += 1;
            if !history.orders.contains_key(order_id) {
                verdict.violations.push(format!("reserve {order_id}: held but unknown"));
            }
        }
    }
    // Keys: a key answered twice with two different orders would be a reserve applied twice.
    let mut by_key: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for record in &history.reserves {
        if let Some(order_id) = &record.order_id {
            by_key
                .entry(record.request.idempotency_key.as_str())
                .or_default()
                .insert(order_id.as_str());
        }
    }
    for (key, orders) in &by_key {
        if orders.len() > 1 {
            verdict
                .violations
                .push(format!("idempotency key {key} made {orders:?}"));
        }
    }

    // Orders.
    let mut states: BTreeMap<String, Order> = BTreeMap::new();
    for (order_id, record) in &history.orders {
        let order = read(&format!("GetOrder {order_id}"), &checkout, |mut c| async move {
            c.get_order(GetOrderRequest {
                order_id: order_id.clone(),
            })
            .await
        })
        .await?;
        let status = OrderStatus::try_from(order.status).unwrap_or(OrderStatus::Unspecified);
        let cancelled = record.cancel.as_ref().is_some_and(Answer::acknowledged);
        let confirmed = record.confirm.as_ref().is_some_and(Answer::acknowledged);
        let expected = if cancelled {
            verdict.cancels += 1;
            if confirmed {
                verdict.confirms += 1;
            }
            Some(OrderStatus::Cancelled)
        } else if confirmed {
            verdict.confirms += 1;
            Some(OrderStatus::Confirmed)
        } else if record.confirm.is_none() && record.cancel.is_none() {
            Some(OrderStatus::Held)
        } else {
            // A refused confirm or cancel: the hold stays, or expired meanwhile.
            None
        };
        match expected {
            Some(expected) if status != expected => verdict
                .violations
                .push(format!("order {order_id}: {status:?}, acknowledged as {expected:?}")),
            None if !matches!(status, OrderStatus::Held | OrderStatus::Expired) => verdict.violations.push(format!(
                "order {order_id}: {status:?} after a refused confirm or cancel"
            )),
            _ => {}
        }
        states.insert(order_id.clone(), order);
    }

    // SKU figures equal the orders' states, on every node.
    let mut revenue = None;
    for node in 0..nodes.len() {
        let operator = OperatorServiceClient::with_interceptor(nodes.channel(node), bearer(&cast.operator));
        // Figures reach other nodes asynchronously: wait for them to agree.
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let drop = read("GetDrop", &operator, |mut c| async move {
                c.get_drop(GetDropRequest {
                    drop_id: cast.drop_id.clone(),
                })
                .await
            })
            .await?;
            let mut wrong = Vec::new();
            for sku in &drop.skus {
                let held: u32 = states
                    .values()
                    .filter(|o| o.sku_id == sku.sku_id && o.status == OrderStatus::Held as i32)
                    .map(|o| o.quantity)
                    .sum();
                let sold: u32 = states
                    .values()
                    .filter(|o| o.sku_id == sku.sku_id && o.status == OrderStatus::Confirmed as i32)
                    .map(|o| o.quantity)
                    .sum();
                if sku.sold > sku.allocated {
                    wrong.push(format!("{}: oversold, {} of {}", sku.sku_id, sku.sold, sku.allocated));
                }
                if sku.available + sku.held + sku.sold != sku.allocated {
                    wrong.push(format!(
                        "{}: available {} + held {} + sold {} != allocated {}",
                        sku.sku_id, sku.available, sku.held, sku.sold, sku.allocated
                    ));
                }
                if sku.held != held || sku.sold != sold {
                    wrong.push(format!(
                        "{} on node-{node}: held {} sold {}, the orders say held {held} sold {sold}",
                        sku.sku_id, sku.held, sku.sold
                    ));
                }
            }
            if wrong.is_empty() {
                revenue = drop.revenue.map(|m| m.minor_units);
                break;
            }
            if tokio::time::Instant::now() > until {
                verdict.violations.extend(wrong);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // Ledger: reconciled with the journals, balanced, and its takings equal the revenue. The
    // ledger books what the SKUs decided through retried hand-overs: wait for it to catch up.
    let refunded: Vec<&String> = history
        .orders
        .iter()
        .filter(|(_, o)| o.refund.as_ref().is_some_and(Answer::acknowledged))
        .map(|(id, _)| id)
        .collect();
    verdict.refunds = refunded.len() as u64;
    // Refunds of orders still confirmed at their SKU (a cancelled one left the revenue too).
    let refunded_amount: i64 = refunded
        .iter()
        .filter(|id| {
            states
                .get(**id)
                .is_some_and(|o| o.status == OrderStatus::Confirmed as i32)
        })
        .map(|id| history.orders[*id].amount)
        .sum();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let eur = loop {
        let report = read("Reconcile", &settlement, |mut c| async move {
            c.reconcile(ReconcileRequest { dry_run: true }).await
        })
        .await?;
        let balance = read("GetBalance", &settlement, |mut c| async move {
            c.get_balance(GetBalanceRequest {
                creator_id: cast.creator_id.clone(),
            })
            .await
        })
        .await?;
        let eur = balance
            .currencies
            .iter()
            .find(|c| c.currency == "EUR")
            .cloned()
            .unwrap_or_default();
        let mut wrong: Vec<String> = report
            .differences
            .iter()
            .filter(|d| d.creator_id == cast.creator_id)
            .map(|d| format!("reconciliation: {} {} ({})", d.order_id, d.kind, d.detail))
            .collect();
        if !report.balanced {
            wrong.push("the ledgers do not balance".into());
        }
        if let Some(revenue) = revenue {
            if eur.gross_sales - eur.refunds != revenue - refunded_amount {
                wrong.push(format!(
                    "ledger: gross {} - refunds {} != revenue {revenue} - operator refunds {refunded_amount}",
                    eur.gross_sales, eur.refunds
                ));
            }
        }
        if wrong.is_empty() {
            break eur;
        }
        if tokio::time::Instant::now() > until {
            verdict.violations.extend(wrong);
            break eur;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for order_id in &refunded {
        let settled = read("GetOrderSettlement", &settlement, |mut c| async move {
            c.get_order_settlement(GetOrderSettlementRequest {
                order_id: (*order_id).clone(),
            })
            .await
        })
        .await?;
        if settled.state != SettlementState::Refunded as i32 {
            verdict.violations.push(format!(
                "refund of {order_id} acknowledged; its settlement is {:?}",
                SettlementState::try_from(settled.state)
            ));
        }
    }

    // Payouts: each acknowledged one listed once, no key twice, the sum is what was paid out.
    let mut listed = Vec::new();
    let mut page_token = String::new();
    let creator = SettlementServiceClient::with_interceptor(channel.clone(), bearer(&cast.creator_credential));
    loop {
        let token = &page_token;
        let page = read("ListPayouts", &creator, |mut c| async move {
            c.list_payouts(ListPayoutsRequest {
                creator_id: cast.creator_id.clone(),
                page_size: 100,
                page_token: token.clone(),
            })
            .await
        })
        .await?;
        listed.extend(page.payouts);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut keys = BTreeMap::new();
    for payout in &listed {
        *keys.entry(payout.idempotency_key.clone()).or_insert(0) += 1;
    }
    for (key, n) in &keys {
        if *n > 1 {
            verdict.violations.push(format!("payout key {key} paid {n} times"));
        }
    }
    for record in &history.payouts {
        if record.answer.acknowledged() {
            verdict.payouts += 1;
            let found = listed
                .iter()
                .filter(|p| Some(&p.payout_id) == record.payout_id.as_ref())
                .count();
            if found != 1 {
                verdict.violations.push(format!(
                    "payout {} ({:?}) listed {found} times",
                    record.key, record.payout_id
                ));
            }
        }
    }
    let paid: i64 = listed
        .iter()
        .filter_map(|p| p.amount.as_ref())
        .map(|m| m.minor_units)
        .sum();
    if paid != eur.paid_out {
        verdict.violations.push(format!(
            "payouts add up to {paid}, the balance says {} paid out",
            eur.paid_out
        ));
    }

    // Deliveries.
    let mut delivered_orders = 0u64;
    for (order_id, dispatches) in &history.deliveries {
        verdict.deliveries += 1;
        if dispatches.len() > 1 {
            verdict.violations.push(format!(
                "order {order_id} delivered {} times: {dispatches:?}",
                dispatches.len()
            ));
        }
    }
    for (order_id, order) in &states {
        let stage = order
            .tracking
            .as_ref()
            .map(|t| TrackingStage::try_from(t.stage).unwrap_or(TrackingStage::Unspecified));
        if stage == Some(TrackingStage::Delivered) {
            delivered_orders += 1;
            if refunded.contains(&order_id) {
                verdict
                    .violations
                    .push(format!("order {order_id} refunded and delivered"));
            }
            if order.status != OrderStatus::Confirmed as i32 {
                verdict.violations.push(format!(
                    "order {order_id} delivered while {:?}",
                    OrderStatus::try_from(order.status)
                ));
            }
        }
        if history.deliveries.contains_key(order_id) && stage != Some(TrackingStage::Delivered) {
            verdict.violations.push(format!(
                "order {order_id}: delivery acknowledged, tracking says {stage:?}"
            ));
        }
    }
    let registry = PartnerRegistryServiceClient::with_interceptor(channel.clone(), bearer(&cast.operator));
    let hubs: BTreeSet<&String> = cast.cities.iter().map(|(_, hub)| hub).collect();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut counted = 0u64;
        for hub_id in &hubs {
            let hub = read("GetHub", &registry, |mut c| async move {
                c.get_hub(GetHubRequest {
                    hub_id: (*hub_id).clone(),
                })
                .await
            })
            .await?;
            counted += hub.delivered;
        }
        if counted == delivered_orders {
            break;
        }
        if tokio::time::Instant::now() > until {
            verdict.violations.push(format!(
                "the hubs count {counted} deliveries, the orders show {delivered_orders}"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    verdict.acknowledged = verdict.reserves
        + verdict.confirms
        + verdict.cancels
        + verdict.refunds
        + verdict.payouts
        + verdict.deliveries
        + history.courier_acks;
    Ok(verdict)
}
