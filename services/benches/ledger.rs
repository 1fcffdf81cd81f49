//! `cargo bench -p services --bench ledger`: the settlement targets.
//! - Booking: sales booked by ONE creator actor on the embedded platform (durable: each
//!   batch is group-committed to sled before its reply), sent as outboxes send them, in
//!   batches, with a few senders at once. Reported as statement lines (entries) per second
//!   and as transfers (double-entry legs) per second, next to the pure domain's rate.
//! - Statement: GetStatement through gRPC over a ledger of at least 100,000 lines (totals
//!   over the whole period, one page of lines), latency percentiles.
//!
//! Environment: LEDGER_BENCH_SALES (default 120000), LEDGER_BENCH_BATCH (default 500).

use domain::ledger::{LedgerCommand, LedgerInput, LedgerState, SaleFacts, Synced};
use domain::{Aggregate, CreatorId, Currency, DropId, Money, OrderId, UnixMillis};
use hdrhistogram::Histogram;
use proto::settlement::v1 as pb;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use services::auth::Bearer;
use std::sync::Arc;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const OPERATOR_TOKEN: &str = "ledger-bench-operator-token";
const SENDERS: usize = 4;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn sale(i: usize) -> LedgerInput {
    LedgerInput::Sale(SaleFacts {
        order_id: OrderId::parse(&format!("bench.sku.{i:016x}")).expect("order id"),
        drop_id: DropId::parse("bench").expect("drop id"),
        gross: Money::new(1_000 + (i % 9_000) as i64, Currency::parse("EUR").expect("EUR")),
        terms: domain::drop::SettlementTerms {
            platform_fee_bps: 1_200,
            delivery_fee_minor_units: 350,
            return_window_ms: 14 * 86_400_000,
        },
        confirmed_at: UnixMillis(1),
        cancelled_at: None,
        handed_over_at: None,
    })
}

fn main() -> anyhow::Result<()> {
    let sales = env("LEDGER_BENCH_SALES", 120_000);
    let batch = env("LEDGER_BENCH_BATCH", 500).clamp(1, domain::limits::LEDGER_BATCH_MAX);
    let inputs: Vec<LedgerInput> = (0..sales).map(sale).collect();

    // The pure domain, for reference: decide + apply, no journal.
    let creator = CreatorId::parse("bench-creator")?;
    let mut state = LedgerState::new(creator.clone());
    let started = Instant::now();
    for chunk in inputs.chunks(batch) {
        let (events, _) = state
            .decide(LedgerCommand::Sync(chunk.to_vec()), UnixMillis(2))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for e in &events {
            state.apply(e);
        }
    }
    let domain_rate = sales as f64 / started.elapsed().as_secs_f64();
    assert!(state.check().is_empty());
    drop(state);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let dir = tempfile::tempdir()?;
        let platform = services::platform::Platform::open_embedded(
            dir.path(),
            Some(OPERATOR_TOKEN),
            actors::limits::LIVE_ACTORS_MAX_DEFAULT,
        )
        .await?;
        // Booking through the actor, durable.
        let inputs = Arc::new(inputs);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for sender in 0..SENDERS {
            let (bus, inputs, creator) = (platform.bus.clone(), inputs.clone(), creator.clone());
            tasks.push(tokio::spawn(async move {
                let chunks: Vec<_> = inputs.chunks(batch).skip(sender).step_by(SENDERS).collect();
                for chunk in chunks {
                    match bus
                        .ask_for::<LedgerState, Synced>(creator.clone(), LedgerCommand::Sync(chunk.to_vec()))
                        .await
                    {
                        Ok(Synced { acked, .. }) if acked.len() == chunk.len() => {}
                        other => anyhow::bail!("booking failed: {other:?}"),
                    }
                }
                Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let problems: Vec<String> = platform
            .bus
            .ask_for::<LedgerState, _>(creator.clone(), LedgerCommand::Check)
            .await?;
        anyhow::ensure!(problems.is_empty(), "ledger broken: {problems:?}");
        // Each sale is one statement line of three transfers (creator, platform, partner).
        println!(
            "booking: {sales} sales in batches of {batch} from {SENDERS} senders: {:.0} lines/s ({:.0} transfers/s) \
             durable through one creator actor; pure domain {:.0} lines/s",
            sales as f64 / elapsed,
            3.0 * sales as f64 / elapsed,
            domain_rate
        );

        // GetStatement over the whole ledger, through gRPC.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(services::server::serve(platform.clone(), listener, async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = SettlementServiceClient::with_interceptor(channel, Bearer::new(OPERATOR_TOKEN)?);
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut lines = 0;
        for round in 0..60 {
            let started = Instant::now();
            let statement = client
                .get_statement(pb::GetStatementRequest {
                    creator_id: creator.to_string(),
                    page_size: 100,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if round >= 10 {
                latency.record(started.elapsed().as_micros().max(1) as u64)?;
            }
            lines = statement.totals.first().map_or(0, |t| t.lines);
        }
        println!(
            "GetStatement over {lines} lines (totals of the whole period + a page of 100 lines): \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} calls",
            latency.value_at_quantile(0.5) as f64 / 1e3,
            latency.value_at_quantile(0.99) as f64 / 1e3,
            latency.max() as f64 / 1e3,
            latency.len()
        );
        let _ = stop.send(());
        server.await??;
        Ok(())
    })
}
