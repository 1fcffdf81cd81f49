//! The demo's settlement act, through the SettlementService: the operator records a few
//! returns within their window, the return windows pass and earnings become available,
//! each creator (with its own credential) pays out what is available and reads its
//! statement, one creator is refused the other's ledger, and the operator reconciles the
//! ledgers with the SKU journals.

use proto::settlement::v1 as pb;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use services::auth::Bearer;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The demo drops' return window (short, so the demo sees earnings released).
pub const RETURN_WINDOW_SECONDS: u32 = 8;
/// Returns recorded per creator.
const RETURNS_PER_CREATOR: usize = 2;

/// An amount in major units of `currency` (the demo sells in EUR, but a ledger prints what
/// it holds): `3.50`, `1000` for JPY.
fn amount(minor_units: i64, currency: &str) -> String {
    domain::money::format_minor_units(minor_units, domain::money::exponent_of(currency))
}

/// Runs the act and prints its report; false if reconciliation found differences.
pub async fn report(
    channel: &Channel,
    operator: &Bearer,
    creators: &[(String, String)],
    drops: &[&String],
    order_ids: Vec<String>,
) -> anyhow::Result<bool> {
    let mut ops = SettlementServiceClient::with_interceptor(channel.clone(), operator.clone());
    let started = Instant::now();

    // Returns: a few recently delivered orders per creator, inside their window.
    let mut returned = Vec::new();
    for (i, (creator_id, _)) in creators.iter().enumerate() {
        let Some(drop_id) = drops.get(i) else { continue };
        let prefix = format!("{drop_id}.");
        let mut n = 0;
        for order_id in order_ids.iter().filter(|id| id.starts_with(&prefix)) {
            if n == RETURNS_PER_CREATOR {
                break;
            }
            let Ok(o) = ops
                .get_order_settlement(pb::GetOrderSettlementRequest {
                    order_id: order_id.clone(),
                })
                .await
            else {
                continue;
            };
            if o.get_ref().state != pb::SettlementState::InReturnWindow as i32 {
                continue;
            }
            if ops
                .record_return(pb::RecordReturnRequest {
                    order_id: order_id.clone(),
                    reason: "demo: the buyer sent it back".into(),
                })
                .await
                .is_ok()
            {
                n += 1;
                returned.push((creator_id.clone(), order_id.clone()));
            }
        }
    }

    // The return windows pass; earnings become available. Orders still undelivered stay
    // pending, so wait for the window, not for pending to reach zero.
    tokio::time::sleep(Duration::from_millis(u64::from(RETURN_WINDOW_SECONDS) * 1_000 + 500)).await;

    println!();
    println!(
        "settlement ({}% platform fee, {} EUR delivery fee, {} s return window; {} returns recorded):",
        12,
        amount(350, "EUR"),
        RETURN_WINDOW_SECONDS,
        returned.len()
    );
    for (creator_id, credential) in creators {
        let mut mine = SettlementServiceClient::with_interceptor(channel.clone(), Bearer::new(credential)?);
        let balance = mine.get_balance(pb::GetBalanceRequest::default()).await?.into_inner();
        // Each creator pays out everything available, once (the key makes a retry safe).
        let mut payout = None;
        for b in &balance.currencies {
            if b.available > 0 {
                let p = mine
                    .request_payout(pb::RequestPayoutRequest {
                        creator_id: String::new(),
                        amount: Some(proto::common::v1::Money {
                            minor_units: b.available,
                            currency: b.currency.clone(),
                        }),
                        idempotency_key: format!("demo-payout-{creator_id}"),
                    })
                    .await?
                    .into_inner();
                payout = Some(p);
            }
        }
        let mut statement = pb::Statement::default();
        let mut lines = 0usize;
        let mut page_token = String::new();
        loop {
            let page = mine
                .get_statement(pb::GetStatementRequest {
                    page_size: 1_000,
                    page_token: page_token.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            lines += page.lines.len();
            page_token = page.next_page_token.clone();
            statement.totals = page.totals;
            if page_token.is_empty() {
                break;
            }
        }
        let balance = mine.get_balance(pb::GetBalanceRequest::default()).await?.into_inner();
        for t in &statement.totals {
            let b = balance
                .currencies
                .iter()
                .find(|b| b.currency == t.currency)
                .cloned()
                .unwrap_or_default();
            let earnings = b.pending + b.available + b.paid_out;
            let eur = |minor_units| amount(minor_units, &t.currency);
            // Double entry, read from the balances and from the lines.
            let balances_hold = b.gross_sales - b.refunds == b.platform_fees + b.partner_fees + b.remedies + earnings;
            let lines_hold = t.gross == t.platform_fee + t.partner_fee + t.creator_net + t.remedy + t.paid_out;
            println!(
                "  {creator_id}: {} sales in {lines} lines; gross {} {cur}, refunds and returns {}, platform fees {}, \
                 delivery fees {}, remedies to buyers {} (charged to partners or the platform); earnings {}",
                t.sales,
                eur(b.gross_sales),
                eur(b.refunds),
                eur(b.platform_fees),
                eur(b.partner_fees),
                eur(b.remedies),
                eur(earnings),
                cur = t.currency,
            );
            println!(
                "    pending {}, available {}, paid out {}{}; gross − refunds = fees + remedies + earnings: {}",
                eur(b.pending),
                eur(b.available),
                eur(b.paid_out),
                payout.as_ref().map_or(String::new(), |p| format!(" ({})", p.payout_id)),
                if balances_hold && lines_hold { "holds" } else { "BROKEN" }
            );
        }
    }
    // A creator sees only its own ledger.
    if let [(first, _), (_, other_credential), ..] = creators {
        let mut other = SettlementServiceClient::with_interceptor(channel.clone(), Bearer::new(other_credential)?);
        let refused = other
            .get_statement(pb::GetStatementRequest {
                creator_id: first.clone(),
                ..Default::default()
            })
            .await
            .err()
            .map_or("ALLOWED (wrong!)".to_string(), |s| format!("{:?}", s.code()));
        println!("  another creator asking for {first}'s statement: {refused}");
    }

    let report = ops
        .reconcile(pb::ReconcileRequest { dry_run: false })
        .await?
        .into_inner();
    println!(
        "reconciliation: {} confirmed orders in {} SKU journals of {} drops against {} ledgers: {} differences, \
         {} in flight, {} booked, {} refunded; ledgers balance (Σdebits = Σcredits): {} ({:.1} s)",
        report.orders,
        report.skus,
        report.drops,
        report.ledgers,
        report.differences.len(),
        report.in_flight,
        report.booked,
        report.refunded,
        if report.balanced { "yes" } else { "NO" },
        started.elapsed().as_secs_f64()
    );
    for d in report.differences.iter().take(10) {
        println!(
            "  {} {} {}: {} ({})",
            d.creator_id, d.order_id, d.kind, d.detail, d.action
        );
    }
    Ok(report.balanced && report.differences.is_empty())
}
