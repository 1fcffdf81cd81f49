//! The hot-SKU burst: every buyer of a live drop tries to reserve the same SKU at once.
//!
//! This is the worst case for Dropline's design (one actor owns each SKU, so one SKU's
//! reserves are serialised), and the case a live drop actually produces. The burst is then
//! repeated against a bare tonic echo server with messages of the same size, so the report
//! can say how much of the gRPC ceiling Dropline reaches; through ReserveStream, as a
//! storefront forwarding its buyers would send it (many reserves per message); and against
//! Redis with a Lua check-and-decrement and `appendfsync always` (`redis_baseline`), the
//! durable store it is compared with. The SKU's figures are checked after every burst: no
//! load may ever sell more than was allocated.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use prost::Message as _;
use proto::bench::v1::echo_service_client::EchoServiceClient;
use proto::bench::v1::EchoRequest;
use proto::checkout::v1::{ReserveOutcome, ReserveRequest};
use proto::common::v1::Money;
use proto::operator::v1::{Allocation, CreateDropRequest, GetDropRequest, SkuSpec};
use tonic::transport::Channel;

use crate::burst::{run_batches, run_burst, BurstStats};
use crate::cpu::{self, Meter, Pid, Spent};
use crate::redis_baseline::{RedisRound, RedisServer};
use crate::stream::{self, ReserveStreamClient};
use crate::{echo, net, open_drop, open_window, unix_millis, HOLD_TTL_SECONDS};
use actors::runtime::Scheduler;
use proto::checkout::v1::ReserveStreamRequest;

pub(crate) const HOT_SKU: &str = "hot";
const HUB: &str = "hub-1";
const CITY: &str = "Loadville";

/// The shape of a burst, shared by the Dropline run and its echo baseline.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LoadShape {
    /// Calls in flight at once: each worker starts its next call when the last one answers.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Calls to make in total, each by a different buyer.
    #[arg(long, default_value_t = 100_000)]
    pub attempts: usize,
    /// HTTP/2 connections the workers share round-robin.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

impl LoadShape {
    fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.attempts > 0, "--attempts must be at least 1");
        ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        ensure!(self.connections > 0, "--connections must be at least 1");
        Ok(())
    }
}

/// Arguments of `dropline-load hot-sku`.
#[derive(Debug, clap::Args)]
pub struct HotSkuArgs {
    /// The Dropline server to load.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
    #[command(flatten)]
    pub load: LoadShape,
    /// Units of the hot SKU [default: --attempts, so every reserve can be HELD].
    #[arg(long)]
    pub stock: Option<u32>,
    /// Do not run the tonic echo baseline.
    #[arg(long)]
    pub skip_echo: bool,
    /// Rounds, each a burst on a fresh drop followed by its echo baseline; the report gives
    /// every round and the median ratio, so one noisy moment of a shared machine does not
    /// decide the figure. Later rounds also load a server whose journal already holds the
    /// earlier ones.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds to wait for the target to answer, so the test can be started together with
    /// the server.
    #[arg(long, default_value_t = 30)]
    pub wait_secs: u64,
    /// Seconds to wait after each Dropline burst before its echo baseline. After a burst the
    /// server snapshots the hot SKU (0.5 s after the last reserve; ~0.75 s of CPU for 100,000
    /// holds on the benchmark machine): run during the baseline, it would slow the echo and
    /// flatter the ratio.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Process id of the Dropline server, to report its CPU time per reserve [default: the
    /// process listening on the target's port, when the target is on this machine].
    #[arg(long)]
    pub server_pid: Option<i32>,
    #[command(flatten)]
    pub echo: EchoScheduler,
    /// Do not run the ReserveStream burst.
    #[arg(long)]
    pub skip_stream: bool,
    /// Reserves per ReserveStream message (one stream per connection). The messages in
    /// flight are --concurrency / this, so as many buyers wait at once as in the other runs.
    #[arg(long, default_value_t = 32)]
    pub stream_batch: usize,
    /// Do not run the Redis baseline.
    #[arg(long)]
    pub skip_redis: bool,
    /// The redis-server binary of the Redis baseline (scripts/install-redis.sh installs
    /// Debian's); the run starts its own server on a temporary directory and a free port.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
}

/// How the echo baseline's runtime schedules tasks.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct EchoScheduler {
    /// Run the echo server on tokio's default scheduler (`true`: a bare tonic server, what
    /// the target is measured against) or, with `false`, with the LIFO slot off as
    /// `dropline serve` runs: the ceiling tuned the same way.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub echo_lifo_slot: bool,
}

/// Arguments of the hidden `dropline-load echo-only`: the baseline half of `hot-sku` alone,
/// to check the generator and the machine without a Dropline server.
#[derive(Debug, clap::Args)]
pub struct EchoOnlyArgs {
    #[command(flatten)]
    pub load: LoadShape,
    #[command(flatten)]
    pub echo: EchoScheduler,
}

/// The hot SKU's figures after the burst, as the server reports them.
pub(crate) struct StockCheck {
    allocated: u32,
    held: u32,
    sold: u32,
    /// Units held or sold beyond the allocation, summed over pools (or over the SKU, if
    /// that is larger): anything but zero is a correctness bug.
    pub(crate) oversold: u64,
}

/// One round of `hot-sku`: the Dropline burst on its own drop, the stock check, and the
/// echo baseline run right after it.
struct Round {
    dropline: BurstStats<ReserveOutcome>,
    dropline_cpu: Spent,
    /// The server's CPU while it settled after the burst (the hot SKU's snapshot, the
    /// journal's last writes): work the burst caused, counted in its cost.
    aftermath: Option<Duration>,
    check: StockCheck,
    echo: Option<anyhow::Result<(BurstStats<()>, Spent)>>,
    /// The same burst through ReserveStream, on a drop of its own.
    stream: Option<StreamRound>,
    /// The same burst against Redis with `appendfsync always`.
    redis: Option<anyhow::Result<RedisRound>>,
}

/// The ReserveStream burst of a round.
struct StreamRound {
    stats: BurstStats<ReserveOutcome>,
    cpu: Spent,
    /// As [`Round::aftermath`], measured until the Redis baseline starts.
    aftermath: Option<Duration>,
    check: StockCheck,
}

impl StreamRound {
    fn server_cpu(&self) -> Option<Duration> {
        Some(self.cpu.server? + self.aftermath.unwrap_or_default())
    }
}

/// `a` calls/s over `b`'s, when `b` measured any.
fn throughput_ratio<A: Ord, B: Ord>(a: &BurstStats<A>, b: &BurstStats<B>) -> Option<f64> {
    (b.calls_per_second() > 0.0).then(|| a.calls_per_second() / b.calls_per_second())
}

impl Round {
    fn redis(&self) -> Option<&RedisRound> {
        self.redis.as_ref().and_then(|r| r.as_ref().ok())
    }

    fn dropline_over_redis(&self) -> Option<f64> {
        throughput_ratio(&self.dropline, &self.redis()?.stats)
    }

    fn stream_over_redis(&self) -> Option<f64> {
        throughput_ratio(&self.stream.as_ref()?.stats, &self.redis()?.stats)
    }

    fn stream_over_echo(&self) -> Option<f64> {
        match &self.echo {
            Some(Ok((echo, _))) => throughput_ratio(&self.stream.as_ref()?.stats, echo),
            _ => None,
        }
    }

    fn ratio(&self) -> Option<f64> {
        match &self.echo {
            Some(Ok((echo, _))) if echo.calls_per_second() > 0.0 => {
                Some(self.dropline.calls_per_second() / echo.calls_per_second())
            }
            _ => None,
        }
    }

    /// Dropline's server CPU for the burst, the aftermath included when it was measured.
    fn dropline_server_cpu(&self) -> Option<Duration> {
        Some(self.dropline_cpu.server? + self.aftermath.unwrap_or_default())
    }

    /// The echo server's CPU per call over Dropline's (the aftermath included): the
    /// throughput ratio a generator on cores of its own would see, were both servers
    /// CPU-bound on the same cores.
    fn server_cost_ratio(&self) -> Option<f64> {
        let Some(Ok((echo, echo_cpu))) = &self.echo else {
            return None;
        };
        let dropline = cpu::per_call_us(self.dropline_server_cpu(), self.dropline.attempts)?;
        let echo = cpu::per_call_us(echo_cpu.server, echo.attempts)?;
        (dropline > 0.0).then(|| echo / dropline)
    }
}

/// The server behind `target` when it runs on this machine: `--server-pid`, else the
/// process listening on the target's loopback port.
fn server_process(target: &str, given: Option<i32>) -> Option<Pid> {
    use std::net::ToSocketAddrs as _;
    if let Some(pid) = given {
        return Some(Pid(pid));
    }
    let uri = net::endpoint(target).ok()?.uri().clone();
    // `Uri::host` keeps an IPv6 literal's brackets.
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let addrs = (host, uri.port_u16()?).to_socket_addrs().ok()?;
    addrs.filter(|addr| addr.ip().is_loopback()).find_map(cpu::listening_on)
}

/// Runs `dropline-load hot-sku`.
pub async fn run(args: HotSkuArgs) -> anyhow::Result<()> {
    let load = args.load;
    load.validate()?;
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let stock = match args.stock {
        Some(stock) => stock,
        None => u32::try_from(load.attempts).context("--attempts does not fit a pool's u32 quantity: give --stock")?,
    };

    let wait = Duration::from_secs(args.wait_secs);
    eprintln!("waiting up to {} s for {} to answer", wait.as_secs(), args.target);
    net::wait_until_answering(&args.target, wait).await?;
    let server = server_process(&args.target, args.server_pid);
    match server {
        Some(Pid(pid)) => eprintln!("server process: pid {pid} (its CPU time is read around each burst)"),
        None => eprintln!("server process: not found on this machine; CPU per reserve not reported (see --server-pid)"),
    }
    ensure!(args.stream_batch > 0, "--stream-batch must be at least 1");
    let redis = if args.skip_redis {
        None
    } else {
        match RedisServer::start(&args.redis_server).await {
            Ok(server) => Some(server),
            Err(error) => {
                eprintln!("redis baseline skipped: {error:#}");
                println!("redis baseline skipped: {error:#}");
                None
            }
        }
    };
    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        let channels = net::connect_channels(&args.target, load.connections).await?;
        let drop_id = format!("load-{}", unix_millis());
        eprintln!(
            "round {round}/{}: creating drop {drop_id}: SKU `{HOT_SKU}` with {stock} units",
            args.rounds
        );
        create_hot_drop(channels[0].clone(), &drop_id, stock).await?;
        eprintln!(
            "round {round}: dropline: {} reserves, {} concurrent, {} connections",
            load.attempts, load.concurrency, load.connections
        );
        let meter = Meter::start(server);
        let dropline = reserve_burst(&channels, &drop_id, load).await?;
        let dropline_cpu = meter.stop();
        let settling = Meter::start(server);
        let check = check_stock(channels[0].clone(), &drop_id).await?;
        let (echo, aftermath) = if args.skip_echo {
            (None, None)
        } else {
            eprintln!(
                "round {round}: tonic echo, after {} s for the server to settle: the same burst against a bare echo server",
                args.settle_secs
            );
            tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
            let aftermath = settling.stop().server;
            (Some(echo_burst(&drop_id, load, args.echo).await), aftermath)
        };
        let stream = if args.skip_stream {
            None
        } else {
            let stream_drop = format!("{drop_id}-stream");
            create_hot_drop(channels[0].clone(), &stream_drop, stock).await?;
            eprintln!(
                "round {round}: ReserveStream: {} reserves, {} per message, {} messages in flight over {} streams",
                load.attempts,
                args.stream_batch,
                (load.concurrency / args.stream_batch).max(1),
                load.connections
            );
            let meter = Meter::start(server);
            let stats = stream_burst(&channels, &stream_drop, load, args.stream_batch).await?;
            let cpu = meter.stop();
            let settling = Meter::start(server);
            let check = check_stock(channels[0].clone(), &stream_drop).await?;
            eprintln!("round {round}: {} s for the server to settle", args.settle_secs);
            tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
            Some(StreamRound {
                stats,
                cpu,
                aftermath: settling.stop().server,
                check,
            })
        };
        drop(channels);
        let redis = match &redis {
            None => None,
            Some(redis) => {
                eprintln!("round {round}: redis (appendfsync always, Lua check-and-decrement): the same burst");
                let key = format!("{drop_id}:{HOT_SKU}:stock");
                Some(
                    redis
                        .burst(&key, stock, load.attempts, load.concurrency, load.connections)
                        .await,
                )
            }
        };
        rounds.push(Round {
            dropline,
            dropline_cpu,
            aftermath,
            check,
            echo,
            stream,
            redis,
        });
    }
    drop(redis);

    println!(
        "hot-SKU burst: {} reserves, {} concurrent, {} connections, {} round(s)\n\
         generator scheduler: {}\necho scheduler: {}",
        load.attempts,
        load.concurrency,
        load.connections,
        rounds.len(),
        Scheduler::chosen(crate::GENERATOR_LIFO_SLOT).describe(),
        Scheduler::chosen(args.echo.echo_lifo_slot).describe()
    );
    println!("{}", header());
    for (i, round) in rounds.iter().enumerate() {
        let n = i + 1;
        println!("{}", row(&format!("dropline #{n}"), &round.dropline));
        match &round.echo {
            Some(Ok((echo, _))) => println!("{}", row(&format!("tonic echo #{n}"), echo)),
            Some(Err(error)) => println!("{:<17}failed: {error:#}", format!("tonic echo #{n}")),
            None => {}
        }
        if let Some(ratio) = round.ratio() {
            println!("{:<17}{ratio:>8.2}", format!("ratio #{n}"));
        }
        if let Some(stream) = &round.stream {
            println!("{}", row(&format!("stream #{n}"), &stream.stats));
        }
        match &round.redis {
            Some(Ok(redis)) => println!("{}", row(&format!("redis-always #{n}"), &redis.stats)),
            Some(Err(error)) => println!("{:<17}failed: {error:#}", format!("redis-always #{n}")),
            None => {}
        }
    }
    print_spread("ratio dropline/echo", rounds.iter().filter_map(Round::ratio).collect());
    print_spread(
        "ratio stream/echo",
        rounds.iter().filter_map(Round::stream_over_echo).collect(),
    );
    print_spread(
        "ratio dropline/redis-always",
        rounds.iter().filter_map(Round::dropline_over_redis).collect(),
    );
    print_spread(
        "ratio stream/redis-always",
        rounds.iter().filter_map(Round::stream_over_redis).collect(),
    );
    print_cpu(&rounds);
    for (i, round) in rounds.iter().enumerate() {
        let n = i + 1;
        println!("round {n} outcomes: {}", outcome_summary(&round.dropline));
        round.dropline.error_examples().for_each(|line| println!("{line}"));
        if let Some(Ok((echo, _))) = &round.echo {
            if echo.error_count() > 0 {
                println!("round {n} echo errors: {}", echo.error_summary());
                echo.error_examples().for_each(|line| println!("{line}"));
            }
        }
        let check = &round.check;
        println!(
            "round {n} oversell: {} (allocated {}, held {}, sold {})",
            check.oversold, check.allocated, check.held, check.sold
        );
        if let Some(stream) = &round.stream {
            println!("round {n} stream outcomes: {}", outcome_summary(&stream.stats));
            stream.stats.error_examples().for_each(|line| println!("{line}"));
            let check = &stream.check;
            println!(
                "round {n} stream oversell: {} (allocated {}, held {}, sold {})",
                check.oversold, check.allocated, check.held, check.sold
            );
        }
        if let Some(redis) = round.redis() {
            println!("round {n} redis outcomes: {}", outcome_summary(&redis.stats));
            redis.stats.error_examples().for_each(|line| println!("{line}"));
            println!("round {n} redis units left: {} of {stock}", redis.left);
        }
    }

    for (i, round) in rounds.into_iter().enumerate() {
        let n = i + 1;
        let held_by_clients = round.dropline.outcome(&ReserveOutcome::Held);
        if round.check.oversold > 0 {
            bail!("round {n}: the hot SKU is oversold by {} units", round.check.oversold);
        }
        if u64::from(round.check.held) != held_by_clients {
            bail!(
                "round {n}: the server holds {} units but clients were told HELD {} times",
                round.check.held,
                held_by_clients
            );
        }
        if let Some(stream) = &round.stream {
            let held_by_clients = stream.stats.outcome(&ReserveOutcome::Held);
            if stream.check.oversold > 0 || u64::from(stream.check.held) != held_by_clients {
                bail!(
                    "round {n}: through ReserveStream the server holds {} units (oversold by {}) but clients were told HELD {} times",
                    stream.check.held,
                    stream.check.oversold,
                    held_by_clients
                );
            }
        }
        if let Some(redis) = round.redis() {
            let held_by_clients = redis.stats.outcome(&ReserveOutcome::Held);
            if redis.left < 0 || i64::from(stock) - redis.left != held_by_clients as i64 {
                bail!(
                    "round {n}: redis has {} of {stock} units left but clients were told HELD {held_by_clients} times",
                    redis.left
                );
            }
        }
        if let Some(Err(error)) = round.echo {
            return Err(error.context(format!("round {n}: the echo baseline failed")));
        }
        if let Some(Err(error)) = round.redis {
            return Err(error.context(format!("round {n}: the redis baseline failed")));
        }
    }
    Ok(())
}

/// CPU per call on each side of every burst, and the servers' cost ratio.
fn print_cpu(rounds: &[Round]) {
    let us = |v: Option<f64>| v.map_or_else(|| format!("{:>10}", "-"), |v| format!("{v:>10.1}"));
    // "settling": the server's CPU after the burst, until the baseline starts.
    println!(
        "{:<17}{:>10}{:>10}{:>10}",
        "CPU µs per call", "server", "settling", "generator"
    );
    for (i, round) in rounds.iter().enumerate() {
        let n = i + 1;
        let calls = round.dropline.attempts;
        println!(
            "{:<17}{}{}{}",
            format!("dropline #{n}"),
            us(cpu::per_call_us(round.dropline_cpu.server, calls)),
            us(cpu::per_call_us(round.aftermath, calls)),
            us(cpu::per_call_us(round.dropline_cpu.generator, calls))
        );
        if let Some(Ok((echo, spent))) = &round.echo {
            println!(
                "{:<17}{}{:>10}{}",
                format!("tonic echo #{n}"),
                us(cpu::per_call_us(spent.server, echo.attempts)),
                "-",
                us(cpu::per_call_us(spent.generator, echo.attempts))
            );
        }
        if let Some(stream) = &round.stream {
            let calls = stream.stats.attempts;
            println!(
                "{:<17}{}{}{}",
                format!("stream #{n}"),
                us(cpu::per_call_us(stream.cpu.server, calls)),
                us(cpu::per_call_us(stream.aftermath, calls)),
                us(cpu::per_call_us(stream.cpu.generator, calls))
            );
        }
        if let Some(redis) = round.redis() {
            let calls = redis.stats.attempts;
            println!(
                "{:<17}{}{:>10}{}",
                format!("redis-always #{n}"),
                us(cpu::per_call_us(redis.spent.server, calls)),
                "-",
                us(cpu::per_call_us(redis.spent.generator, calls))
            );
        }
    }
    print_spread(
        "server CPU per call (settling included), echo/dropline",
        rounds.iter().filter_map(Round::server_cost_ratio).collect(),
    );
    print_spread(
        "server CPU per call (settling included), redis-always/stream",
        rounds
            .iter()
            .filter_map(|round| {
                let stream = round.stream.as_ref()?;
                let redis = round.redis()?;
                let stream_us = cpu::per_call_us(stream.server_cpu(), stream.stats.attempts)?;
                let redis_us = cpu::per_call_us(redis.spent.server, redis.stats.attempts)?;
                (stream_us > 0.0).then(|| redis_us / stream_us)
            })
            .collect(),
    );
}

/// `name: median m (min a, max b, n rounds)`, nothing when no round has the figure.
fn print_spread(name: &str, mut ratios: Vec<f64>) {
    ratios.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (ratios.first(), ratios.last()) {
        println!(
            "{name}: median {:.2} (min {min:.2}, max {max:.2}, {} rounds)",
            median(&ratios),
            ratios.len()
        );
    }
}

/// The median of sorted, non-empty `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// Runs the hidden `dropline-load echo-only`.
pub async fn run_echo_only(args: EchoOnlyArgs) -> anyhow::Result<()> {
    let load = args.load;
    load.validate()?;
    let (echo, _) = echo_burst(&format!("load-{}", unix_millis()), load, args.echo).await?;
    println!(
        "echo burst: {} calls, {} concurrent, {} connections",
        load.attempts, load.concurrency, load.connections
    );
    println!("{}", header());
    println!("{}", row("tonic echo", &echo));
    println!("errors: {}", echo.error_summary());
    echo.error_examples().for_each(|line| println!("{line}"));
    ensure!(echo.error_count() == 0, "{} echo calls failed", echo.error_count());
    Ok(())
}

/// Creates and opens a drop with the one hot SKU, all its stock in one pool.
pub(crate) async fn create_hot_drop(channel: Channel, drop_id: &str, stock: u32) -> anyhow::Result<()> {
    crate::create_hubs(channel.clone(), &[(HUB.to_owned(), CITY.to_owned())]).await?;
    let mut operator = crate::operator(channel);
    let (opens_at, closes_at) = open_window();
    let request = CreateDropRequest {
        drop_id: drop_id.to_owned(),
        creator_id: "load-creator".to_owned(),
        title: "Hot-SKU load test".to_owned(),
        opens_at: Some(opens_at),
        closes_at: Some(closes_at),
        hold_ttl_seconds: HOLD_TTL_SECONDS,
        skus: vec![SkuSpec {
            sku_id: HOT_SKU.to_owned(),
            name: "Hot item".to_owned(),
            price: Some(Money {
                minor_units: 2_500,
                currency: "EUR".to_owned(),
            }),
            per_buyer_limit: 1,
            allocations: vec![Allocation {
                hub_id: HUB.to_owned(),
                city: CITY.to_owned(),
                quantity: stock,
            }],
        }],
        settlement: None,
    };
    operator
        .create_drop(request)
        .await
        .with_context(|| format!("CreateDrop {drop_id} failed"))?;
    open_drop(&mut operator, drop_id).await
}

/// Reserve number `index` of the burst: its own buyer and idempotency key, one unit, and no
/// waitlist, so a reserve either holds a unit or is told SOLD_OUT at once.
fn reserve_request(drop_id: &str, index: usize) -> ReserveRequest {
    ReserveRequest {
        drop_id: drop_id.to_owned(),
        sku_id: HOT_SKU.to_owned(),
        buyer_id: format!("buyer-{index}"),
        city: CITY.to_owned(),
        hub_id: String::new(),
        quantity: 1,
        allow_partial: false,
        skip_waitlist: true,
        idempotency_key: format!("k-{index}"),
    }
}

/// The Dropline burst: `attempts` reserves of the hot SKU.
pub(crate) async fn reserve_burst(
    channels: &[Channel],
    drop_id: &str,
    load: LoadShape,
) -> anyhow::Result<BurstStats<ReserveOutcome>> {
    let clients = crate::storefront_clients(channels).await?;
    let drop_id: Arc<str> = drop_id.into();
    run_burst(load.attempts, load.concurrency, move |index| {
        let mut client = clients[index % clients.len()].clone();
        let request = reserve_request(&drop_id, index);
        async move {
            let response = client.reserve(request).await?.into_inner();
            Ok(response.outcome())
        }
    })
    .await
}

/// The ReserveStream burst: `attempts` reserves of the hot SKU, the same requests as
/// [`reserve_burst`]'s, `batch` to a message, one stream per channel, `load.concurrency /
/// batch` messages in flight across them.
pub(crate) async fn stream_burst(
    channels: &[Channel],
    drop_id: &str,
    load: LoadShape,
    batch: usize,
) -> anyhow::Result<BurstStats<ReserveOutcome>> {
    let clients = crate::storefront_clients(channels).await?;
    let mut streams = Vec::with_capacity(clients.len());
    for client in clients.iter() {
        streams.push(ReserveStreamClient::open(client.clone()).await?);
    }
    let streams: Arc<[ReserveStreamClient]> = streams.into();
    let drop_id: Arc<str> = drop_id.into();
    let in_flight = (load.concurrency / batch).max(1);
    run_batches(load.attempts, batch, in_flight, move |range| {
        let stream = streams[(range.start / batch) % streams.len()].clone();
        let count = range.len();
        let reserves = range.map(|index| reserve_request(&drop_id, index)).collect();
        async move {
            let answer = stream.call(ReserveStreamRequest { reserves }).await?;
            Ok(stream::outcomes(answer, count))
        }
    })
    .await
}

/// The baseline burst: the same calls against a fresh echo server process, each carrying an
/// encoded reserve request of the same shape, so request sizes match the Dropline run.
async fn echo_burst(
    drop_id: &str,
    load: LoadShape,
    scheduler: EchoScheduler,
) -> anyhow::Result<(BurstStats<()>, Spent)> {
    let (mut child, addr) = echo::spawn_child(scheduler.echo_lifo_slot).await?;
    let pid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid);
    let result = async {
        let channels = net::connect_channels(&format!("http://{addr}"), load.connections).await?;
        let clients: Arc<[EchoServiceClient<Channel>]> = channels.into_iter().map(EchoServiceClient::new).collect();
        let drop_id: Arc<str> = drop_id.into();
        let meter = Meter::start(pid);
        let stats = run_burst(load.attempts, load.concurrency, move |index| {
            let mut client = clients[index % clients.len()].clone();
            let payload = reserve_request(&drop_id, index).encode_to_vec();
            async move {
                client.echo(EchoRequest { payload }).await?;
                Ok(())
            }
        })
        .await?;
        Ok((stats, meter.stop()))
    }
    .await;
    net::stop(&mut child).await;
    result
}

/// Reads the hot SKU's figures and computes how far, if at all, it is oversold.
pub(crate) async fn check_stock(channel: Channel, drop_id: &str) -> anyhow::Result<StockCheck> {
    let mut operator = crate::operator(channel);
    let drop = operator
        .get_drop(GetDropRequest {
            drop_id: drop_id.to_owned(),
        })
        .await
        .with_context(|| format!("GetDrop {drop_id} failed"))?
        .into_inner();
    let sku = drop
        .skus
        .iter()
        .find(|sku| sku.sku_id == HOT_SKU)
        .with_context(|| format!("GetDrop {drop_id} does not list SKU `{HOT_SKU}`"))?;
    let excess =
        |allocated: u32, held: u32, sold: u32| (u64::from(held) + u64::from(sold)).saturating_sub(u64::from(allocated));
    // Per pool as well as per SKU: a pool oversold while another undersold would cancel out
    // in the SKU's totals, yet still sells stock a hub does not have.
    let pools_excess: u64 = sku
        .pools
        .iter()
        .map(|pool| excess(pool.allocated, pool.held, pool.sold))
        .sum();
    Ok(StockCheck {
        allocated: sku.allocated,
        held: sku.held,
        sold: sku.sold,
        oversold: pools_excess.max(excess(sku.allocated, sku.held, sku.sold)),
    })
}

pub(crate) fn header() -> String {
    format!(
        "{:<17}{:>8}{:>10}{:>9}{:>10}",
        "", "calls/s", "p50 ms", "p99 ms", "p999 ms"
    )
}

pub(crate) fn row<O: Ord>(name: &str, stats: &BurstStats<O>) -> String {
    format!(
        "{name:<17}{:>8.0}{:>10.1}{:>9.1}{:>10.1}",
        stats.calls_per_second(),
        stats.latency_ms(0.5),
        stats.latency_ms(0.99),
        stats.latency_ms(0.999),
    )
}

/// `HELD 99000, SOLD_OUT 1000, errors 0`: HELD and SOLD_OUT always, the outcomes a
/// one-unit, no-waitlist reserve should never produce only when they occurred.
fn outcome_summary(stats: &BurstStats<ReserveOutcome>) -> String {
    let mut parts = Vec::new();
    for outcome in [
        ReserveOutcome::Held,
        ReserveOutcome::Partial,
        ReserveOutcome::Waitlisted,
        ReserveOutcome::SoldOut,
        ReserveOutcome::Unspecified,
    ] {
        let count = stats.outcome(&outcome);
        let always = matches!(outcome, ReserveOutcome::Held | ReserveOutcome::SoldOut);
        if always || count > 0 {
            let name = outcome.as_str_name();
            let name = name.strip_prefix("RESERVE_OUTCOME_").unwrap_or(name);
            parts.push(format!("{name} {count}"));
        }
    }
    let errors = stats.error_count();
    if errors == 0 {
        parts.push("errors 0".to_owned());
    } else {
        parts.push(format!("errors {errors} ({})", stats.error_summary()));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::{median, server_process};
    use crate::cpu::Pid;

    #[test]
    fn the_server_process_is_the_one_given_or_the_local_listener() {
        assert_eq!(server_process("http://10.1.2.3:50051", Some(42)), Some(Pid(42)));
        assert_eq!(server_process("http://10.1.2.3:50051", None), None);
        assert_eq!(server_process("not a url", None), None);
        #[cfg(target_os = "linux")]
        {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            for target in [format!("http://127.0.0.1:{port}"), format!("http://localhost:{port}/")] {
                assert_eq!(server_process(&target, None), Some(Pid::myself()), "{target}");
            }
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[0.5]), 0.5);
        assert_eq!(median(&[0.4, 0.6, 0.9]), 0.6);
        assert_eq!(median(&[0.25, 0.5, 1.0, 2.0]), 0.75);
    }
}
