//! Memory of a large catalog: how much a Dropline process holds once every SKU of a big
//! catalog is live.
//!
//! The scenario starts its own server so the figure is that process alone, creates the
//! catalog as drops, then reserves one unit of every SKU. The reserve matters: SKU actors
//! start on first use, so without it the figure would leave out the state this measures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures::{StreamExt as _, TryStreamExt as _};
use proto::checkout::v1::{ReserveOutcome, ReserveRequest};
use proto::common::v1::Money;
use proto::operator::v1::{Allocation, CreateDropRequest, SkuSpec};
use testkit::{ServeCommand, ServeProcess};
use tonic::transport::Channel;

use crate::burst::run_burst;
use crate::{net, open_drop, open_window, unix_millis, HOLD_TTL_SECONDS};
use actors::limits::LIVE_ACTORS_MAX_DEFAULT;

/// Cities the hubs are spread over: hub `i` serves `city-{i % CITIES}`.
const CITIES: usize = 5;
/// Units in every pool: plenty for the one reserve each SKU gets.
const UNITS_PER_POOL: u32 = 100;
/// How long the server may take to start answering.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 connections to the server, shared round-robin.
const CONNECTIONS: usize = 4;
/// CreateDrop calls in flight: each carries a whole drop, so a few keep the server busy
/// without queueing megabytes of requests.
const CREATE_CONCURRENCY: usize = 4;
/// The server stops SKU actors idle this long; a slower load may see early actors stopped
/// before memory is read.
const ACTOR_IDLE_STOP: Duration = Duration::from_millis(actors::limits::ACTOR_IDLE_STOP_MS);

/// Arguments of `dropline-load catalog`.
#[derive(Debug, clap::Args)]
pub struct CatalogArgs {
    /// The `dropline` server binary to start and measure.
    #[arg(long)]
    pub dropline_bin: PathBuf,
    /// SKUs in the catalog.
    #[arg(long, default_value_t = 100_000)]
    pub skus: usize,
    /// Hubs each SKU is allocated to (hub-0, hub-1, …).
    #[arg(long, default_value_t = 10)]
    pub hubs: usize,
    /// SKUs per drop; the catalog is split into drops of this size.
    #[arg(long, default_value_t = 1_000)]
    pub skus_per_drop: usize,
    /// The server's data directory [default: a fresh directory under the system temp
    /// directory, removed afterwards].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seconds to wait idle after the load before reading memory again (0: skip); longer
    /// than the server's idle-stop time, so idle SKU actors are passivated.
    #[arg(long, default_value_t = 40)]
    pub settle_secs: u64,
    /// Reserves in flight while every SKU gets its first reserve.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// The server's bound on running actors of each kind (`dropline serve
    /// --live-actors-max`) [default: the server's own, 50000]. At least `--skus` keeps every
    /// SKU actor running until it idles out.
    #[arg(long)]
    pub live_actors_max: Option<usize>,
}

/// Names of a catalog run's drops and SKUs, derived from their index so both the creation
/// and the reserves can compute them without a shared table.
struct Layout {
    run_id: u128,
    skus: usize,
    skus_per_drop: usize,
    hubs: usize,
}

impl Layout {
    fn drops(&self) -> usize {
        self.skus.div_ceil(self.skus_per_drop)
    }

    fn drop_id(&self, drop: usize) -> String {
        format!("catalog-{}-{drop}", self.run_id)
    }

    fn drop_of(&self, sku: usize) -> usize {
        sku / self.skus_per_drop
    }

    fn skus_of(&self, drop: usize) -> std::ops::Range<usize> {
        let start = drop * self.skus_per_drop;
        start..(start + self.skus_per_drop).min(self.skus)
    }

    fn sku_id(sku: usize) -> String {
        format!("sku-{sku}")
    }

    fn city(hub: usize) -> String {
        format!("city-{}", hub % CITIES)
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, PartialEq, Eq)]
struct Memory {
    /// VmRSS: resident now.
    rss_kib: u64,
    /// VmHWM: the most ever resident.
    peak_kib: u64,
}

/// Runs `dropline-load catalog`.
pub async fn run(args: CatalogArgs) -> anyhow::Result<()> {
    ensure!(args.skus > 0, "--skus must be at least 1");
    ensure!(args.hubs > 0, "--hubs must be at least 1");
    ensure!(args.skus_per_drop > 0, "--skus-per-drop must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");

    // Our own temp directory is removed at the end; a directory the user named is kept.
    let (data_dir, temp_dir) = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("dropline-load-catalog-")
                .tempdir()
                .context("cannot create a temporary data directory")?;
            (temp.path().to_owned(), Some(temp))
        }
    };

    let mut child = start_server(&args.dropline_bin, &data_dir, args.live_actors_max)?;
    let target = format!("http://{}", child.addr);
    let result = measure(&args, &mut child, &target).await;
    // Stop the server before removing its directory, so it cannot write into it meanwhile.
    child.kill();
    if let Some(temp_dir) = temp_dir {
        let path = temp_dir.path().to_owned();
        if let Err(error) = temp_dir.close() {
            eprintln!("warning: cannot remove {}: {error}", path.display());
        }
    }
    result
}

/// Starts `bin serve` on a free loopback port and `data_dir`, with the server's default
/// bound on running actors unless `live_actors_max` is given.
pub(crate) fn start_server(
    bin: &Path,
    data_dir: &Path,
    live_actors_max: Option<usize>,
) -> anyhow::Result<ServeProcess> {
    let mut command = ServeCommand::new(data_dir)?
        .exe(bin)
        .operator_token(&crate::operator_token())
        // Keep the report readable: the server's info logs would drown it. Warnings and
        // errors still show, and an explicit DROPLINE_LOG (the server's `--log`) wins.
        .log_filter(&std::env::var("DROPLINE_LOG").unwrap_or_else(|_| "warn".into()));
    if let Some(n) = live_actors_max {
        command = command.args(["--live-actors-max".to_string(), n.to_string()]);
    }
    let bound = live_actors_max
        .map(|n| format!(" --live-actors-max {n}"))
        .unwrap_or_default();
    eprintln!(
        "starting {} serve --listen {} --data-dir {}{bound}",
        bin.display(),
        command.listen,
        data_dir.display()
    );
    command.spawn()
}

async fn measure(args: &CatalogArgs, child: &mut ServeProcess, target: &str) -> anyhow::Result<()> {
    let pid = child.id().context("the server exited at once")?;
    // Fails early should the server exit instead.
    child.connect(STARTUP_TIMEOUT).await?;
    let channels = net::connect_channels(target, CONNECTIONS).await?;
    let layout = Arc::new(Layout {
        run_id: unix_millis(),
        skus: args.skus,
        skus_per_drop: args.skus_per_drop,
        hubs: args.hubs,
    });

    let load_started = Instant::now();
    eprintln!(
        "creating {} drops of up to {} SKUs x {} hubs",
        layout.drops(),
        layout.skus_per_drop,
        layout.hubs
    );
    let hubs: Vec<(String, String)> = (0..layout.hubs)
        .map(|h| (format!("hub-{h}"), Layout::city(h)))
        .collect();
    crate::create_hubs(channels[0].clone(), &hubs).await?;
    create_drops(&channels, &layout).await?;
    let created_in = load_started.elapsed();
    let catalog_only = read_memory(pid)?;

    eprintln!("reserving one unit of each of {} SKUs", layout.skus);
    let reserves = first_reserves(&channels, layout.clone(), args.concurrency).await?;
    let loaded_in = load_started.elapsed();

    if let Some(status) = child.try_wait().context("cannot poll the server process")? {
        bail!("the server exited during the load ({status})");
    }
    let memory = read_memory(pid)?;

    println!(
        "catalog: {} SKUs x {} hubs, resident memory {} MiB (peak {} MiB)",
        layout.skus,
        layout.hubs,
        memory.rss_kib.div_ceil(1024),
        memory.peak_kib.div_ceil(1024)
    );
    println!(
        "  of which the catalog alone (drops created and opened, no SKU actor started): {} MiB",
        catalog_only.rss_kib.div_ceil(1024)
    );
    let bound = args.live_actors_max.unwrap_or(LIVE_ACTORS_MAX_DEFAULT);
    if bound < layout.skus {
        println!(
            "  the server runs at most {bound} SKU actors (--live-actors-max): the least recently used \
             stopped early, their holds kept in the journal; --live-actors-max {} keeps all running",
            layout.skus
        );
    } else {
        println!("  every SKU actor running (--live-actors-max {bound})");
    }
    println!(
        "loaded in {:.1} s: {} drops created and opened in {:.1} s, first reserves in {:.1} s ({:.0}/s)",
        loaded_in.as_secs_f64(),
        layout.drops(),
        created_in.as_secs_f64(),
        reserves.elapsed.as_secs_f64(),
        reserves.calls_per_second()
    );
    let held = reserves.outcome(&ReserveOutcome::Held);
    println!(
        "reserves: HELD {held}, other outcomes {}, errors {}",
        reserves.successes() - held,
        reserves.error_summary()
    );
    reserves.error_examples().for_each(|line| println!("{line}"));
    if loaded_in > ACTOR_IDLE_STOP {
        println!(
            "note: the load took over {} s, so the first SKU actors may have stopped idle \
             before memory was read; the peak still counts them",
            ACTOR_IDLE_STOP.as_secs()
        );
    }
    ensure!(
        held == layout.skus as u64,
        "only {held} of {} SKUs hold a reservation: the memory figure leaves out the rest",
        layout.skus
    );
    if args.settle_secs > 0 {
        // A live catalog is mostly idle: idle SKU actors are passivated (their holds' deadlines
        // stay with the wake-up scheduler), so this is the figure a long-running server shows.
        eprintln!(
            "waiting {} s without requests, for idle SKU actors to passivate",
            args.settle_secs
        );
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        if let Some(status) = child.try_wait().context("cannot poll the server process")? {
            bail!("the server exited while settling ({status})");
        }
        let settled = read_memory(pid)?;
        println!(
            "after {} s idle (SKU actors passivated, every hold still pending): resident memory {} MiB",
            args.settle_secs,
            settled.rss_kib.div_ceil(1024)
        );
    }
    Ok(())
}

/// Creates and opens every drop of the catalog, a few at a time, stopping at the first
/// failure (a catalog with a missing drop would measure the wrong thing).
async fn create_drops(channels: &[Channel], layout: &Layout) -> anyhow::Result<()> {
    futures::stream::iter(0..layout.drops())
        .map(Ok)
        .try_for_each_concurrent(CREATE_CONCURRENCY, |drop| {
            let channel = channels[drop % channels.len()].clone();
            async move {
                let mut operator = crate::operator(channel);
                let drop_id = layout.drop_id(drop);
                operator
                    .create_drop(create_drop_request(layout, drop))
                    .await
                    .with_context(|| format!("CreateDrop {drop_id} failed"))?;
                open_drop(&mut operator, &drop_id).await
            }
        })
        .await
}

fn create_drop_request(layout: &Layout, drop: usize) -> CreateDropRequest {
    let (opens_at, closes_at) = open_window();
    let allocations: Vec<Allocation> = (0..layout.hubs)
        .map(|hub| Allocation {
            hub_id: format!("hub-{hub}"),
            city: Layout::city(hub),
            quantity: UNITS_PER_POOL,
        })
        .collect();
    CreateDropRequest {
        drop_id: layout.drop_id(drop),
        creator_id: "load-creator".to_owned(),
        title: format!("Catalog load test, part {drop}"),
        opens_at: Some(opens_at),
        closes_at: Some(closes_at),
        hold_ttl_seconds: HOLD_TTL_SECONDS,
        skus: layout
            .skus_of(drop)
            .map(|sku| SkuSpec {
                sku_id: Layout::sku_id(sku),
                name: format!("Catalog item {sku}"),
                price: Some(Money {
                    minor_units: 2_500,
                    currency: "EUR".to_owned(),
                }),
                per_buyer_limit: 1,
                allocations: allocations.clone(),
            })
            .collect(),
        settlement: None,
    }
}

/// One reserve per SKU, in the city of hub 0, each by its own buyer.
async fn first_reserves(
    channels: &[Channel],
    layout: Arc<Layout>,
    concurrency: usize,
) -> anyhow::Result<crate::burst::BurstStats<ReserveOutcome>> {
    let clients = crate::storefront_clients(channels).await?;
    let city = Layout::city(0);
    run_burst(layout.skus, concurrency, move |sku| {
        let mut client = clients[sku % clients.len()].clone();
        let request = ReserveRequest {
            drop_id: layout.drop_id(layout.drop_of(sku)),
            sku_id: Layout::sku_id(sku),
            buyer_id: format!("catalog-buyer-{sku}"),
            city: city.clone(),
            hub_id: String::new(),
            quantity: 1,
            allow_partial: false,
            skip_waitlist: true,
            idempotency_key: format!("c-{sku}"),
        };
        async move {
            let response = client.reserve(request).await?.into_inner();
            Ok(response.outcome())
        }
    })
    .await
}

fn read_memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path} (Linux only)"))?;
    parse_memory(&status).with_context(|| format!("no VmRSS/VmHWM in {path}: has the server exited?"))
}

/// Reads VmRSS and VmHWM (in kB, which the kernel means as KiB) from a `/proc/*/status`.
fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?.trim();
            value.strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some(Memory {
        rss_kib: field("VmRSS")?,
        peak_kib: field("VmHWM")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let status = "Name:\tdropline\nVmPeak:\t  900000 kB\nVmHWM:\t  716800 kB\nVmRSS:\t  626688 kB\n";
        assert_eq!(
            parse_memory(status),
            Some(Memory {
                rss_kib: 626_688,
                peak_kib: 716_800
            })
        );
        assert_eq!(parse_memory("Name:\tzombie\nState:\tZ (zombie)\n"), None);
    }

    #[test]
    fn layout_splits_the_catalog_into_drops() {
        let layout = Layout {
            run_id: 7,
            skus: 2_500,
            skus_per_drop: 1_000,
            hubs: 10,
        };
        assert_eq!(layout.drops(), 3);
        assert_eq!(layout.skus_of(2), 2_000..2_500);
        assert_eq!(layout.drop_of(1_999), 1);
        assert_eq!(layout.drop_id(1), "catalog-7-1");
        assert_eq!(Layout::city(7), "city-2");
    }
}
