//! The nemesis: faults on purpose against a real cluster, and a check of what survived.
//!
//! [`run`] starts 3 `dropline serve --nats` nodes on 3 JetStream servers (R3), every
//! connection between them through a proxy ([`Network`]), runs the [`workload`] (buyers,
//! couriers, the operator, a creator; every answer recorded) and, meanwhile, a schedule of
//! faults drawn from a seed:
//!
//! - a node cut off from every NATS server while it still answers gRPC;
//! - a NATS server cut off from the other servers (its clients still connected to it), or
//!   one route between two servers cut;
//! - a node's NATS links slowed down;
//! - SIGSTOP of a node for longer than the lease TTL (it must be fenced when it wakes up
//!   believing it still owns its partitions), or of a NATS server;
//! - kill -9 of one or two nodes, of a NATS server, or of a node and a server at once, and
//!   their restart.
//!
//! Then it heals everything, times how long until every node serves writes again, asks every
//! indeterminate call again (same key, same id) until its answer is definite, and runs the
//! [`checker`]. Schedules are one fault at a time, within what R3 tolerates: at most one
//! NATS server down or cut off, at most two of three nodes.

pub mod checker;
pub mod net;
pub mod proxy;
pub mod workload;

pub use net::{Network, Peer};
pub use proxy::{LinkMode, LinkProxy};

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::fixtures::*;
use proto::checkout::v1::{CancelRequest, ReserveOutcome, ReserveRequest};
use proto::operator::v1::{Allocation, CreateDropRequest, OpenDropRequest, SettlementTerms, SkuSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use workload::{Answer, Cast, Nodes, OrderRecord, ReserveRecord, Workload};

/// A fault the nemesis injects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The node loses every NATS server; it still answers gRPC.
    IsolateNode(usize),
    /// The NATS server loses the other servers; its clients stay connected to it.
    IsolateNats(usize),
    /// The route between two NATS servers.
    CutRoute(usize, usize),
    /// Every byte between the node and NATS held this long.
    SlowNode(usize, Duration),
    /// SIGSTOP, then SIGCONT.
    PauseNode(usize),
    PauseNats(usize),
    /// kill -9, then a restart on the same data.
    KillNodes(Vec<usize>),
    KillNats(usize),
    /// A node and a NATS server at once.
    KillNodeAndNats(usize, usize),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::IsolateNode(n) => write!(f, "node-{n} cut off from NATS"),
            Fault::IsolateNats(i) => write!(f, "nats-{i} cut off from its peers"),
            Fault::CutRoute(i, j) => write!(f, "route nats-{i}/nats-{j} cut"),
            Fault::SlowNode(n, d) => write!(f, "node-{n}'s NATS links +{} ms", d.as_millis()),
            Fault::PauseNode(n) => write!(f, "SIGSTOP node-{n}"),
            Fault::PauseNats(i) => write!(f, "SIGSTOP nats-{i}"),
            Fault::KillNodes(nodes) => {
                let names: Vec<String> = nodes.iter().map(|n| format!("node-{n}")).collect();
                write!(f, "kill -9 {}", names.join("+"))
            }
            Fault::KillNats(i) => write!(f, "kill -9 nats-{i}"),
            Fault::KillNodeAndNats(n, i) => write!(f, "kill -9 node-{n}+nats-{i}"),
        }
    }
}

/// One step of a schedule: the fault, how long it lasts, then a quiet time.
#[derive(Clone, Debug)]
pub struct Step {
    pub fault: Fault,
    pub hold: Duration,
    pub rest: Duration,
}

/// `steps` faults drawn from `seed` for `nodes` nodes on `servers` NATS servers; node pauses
/// last longer than `lease_ttl`.
pub fn schedule(seed: u64, steps: usize, nodes: usize, servers: usize, lease_ttl: Duration) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ms = |rng: &mut StdRng, low: u64, high: u64| Duration::from_millis(rng.random_range(low..=high));
    (0..steps)
        .map(|_| {
            let node = rng.random_range(0..nodes);
            let server = rng.random_range(0..servers);
            let (fault, hold) = match rng.random_range(0..9) {
                0 => (Fault::IsolateNode(node), ms(&mut rng, 1_000, 6_000)),
                1 if servers > 1 => (Fault::IsolateNats(server), ms(&mut rng, 1_000, 6_000)),
                2 if servers > 1 => {
                    let other = (server + rng.random_range(1..servers)) % servers;
                    (Fault::CutRoute(server, other), ms(&mut rng, 1_000, 6_000))
                }
                3 => (Fault::SlowNode(node, ms(&mut rng, 50, 500)), ms(&mut rng, 1_000, 4_000)),
                4 => {
                    let beyond = ms(&mut rng, 500, 3_000);
                    (Fault::PauseNode(node), lease_ttl + beyond)
                }
                5 => (Fault::PauseNats(server), ms(&mut rng, 1_000, 5_000)),
                6 => {
                    let mut victims = vec![node];
                    if nodes > 2 && rng.random_bool(0.4) {
                        victims.push((node + rng.random_range(1..nodes)) % nodes);
                    }
                    (Fault::KillNodes(victims), ms(&mut rng, 500, 4_000))
                }
                7 => (Fault::KillNats(server), ms(&mut rng, 500, 4_000)),
                _ => (Fault::KillNodeAndNats(node, server), ms(&mut rng, 500, 4_000)),
            };
            Step {
                fault,
                hold,
                rest: ms(&mut rng, 1_000, 2_500),
            }
        })
        .collect()
}

/// How [`run`] runs a schedule.
#[derive(Clone, Debug)]
pub struct NemesisOptions {
    pub seed: u64,
    /// Faults in the schedule.
    pub steps: usize,
    /// Concurrent buyers.
    pub buyers: usize,
    /// The `dropline` binary [default: [`crate::dropline_exe`]].
    pub exe: Option<PathBuf>,
    /// The nodes' `DROPLINE_LOG`.
    pub log_filter: String,
}

impl NemesisOptions {
    pub fn new(seed: u64) -> NemesisOptions {
        NemesisOptions {
            seed,
            steps: 4,
            buyers: 6,
            exe: None,
            // `DROPLINE_LOG=warn,actors::projections=debug` to see more of the nodes.
            log_filter: std::env::var("DROPLINE_LOG").unwrap_or_else(|_| "warn".into()),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub schedule: Vec<String>,
    pub verdict: checker::Verdict,
    /// Calls answered indeterminately during the faults (all resolved afterwards).
    pub indeterminate: u64,
    /// Of those, how many had taken effect (or did on the retry) and how many not.
    pub resolved: (u64, u64),
    /// Refused with a definite status during the faults (UNAVAILABLE is indeterminate).
    pub refused: u64,
    /// From the last heal until every node served a write on every SKU.
    pub recovered_after: Duration,
    pub elapsed: Duration,
}

impl Report {
    /// One line: seed, faults, what was checked, violations.
    pub fn line(&self) -> String {
        let v = &self.verdict;
        format!(
            "nemesis seed {}: [{}]; {} acknowledged operations checked (reserves {}, confirms {}, cancels {}, \
             refunds {}, payouts {}, deliveries {}), {} indeterminate resolved ({} had taken effect), \
             served again {:.1} s after the last heal, {:.0} s in all; violations: {}",
            self.seed,
            self.schedule.join("; "),
            v.acknowledged,
            v.reserves,
            v.confirms,
            v.cancels,
            v.refunds,
            v.payouts,
            v.deliveries,
            self.indeterminate,
            self.resolved.0,
            self.recovered_after.as_secs_f64(),
            self.elapsed.as_secs_f64(),
            v.violations.len()
        )
    }
}

/// Runs one schedule on a fresh cluster under `dir`.
pub async fn run(options: &NemesisOptions, dir: &Path) -> anyhow::Result<Report> {
    let started = Instant::now();
    let cluster_options = ClusterOptions {
        exe: options.exe.clone(),
        log_filter: options.log_filter.clone(),
        logs_in_files: true,
        partitionable: true,
        ..ClusterOptions::new(3)
    };
    let lease_ttl = Duration::from_millis(cluster_options.lease_ttl_ms);
    let mut cluster = LocalCluster::start(cluster_options, dir).await?;
    let cast = set_up(&cluster, options.seed).await?;
    let nodes = Nodes::new(&cluster.addrs())?;
    let steps = schedule(
        options.seed,
        options.steps,
        cluster.len(),
        cluster.nats_servers(),
        lease_ttl,
    );
    let mut workload = Workload::start(cast.clone(), nodes.clone(), options.buyers, options.seed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut applied = Vec::new();
    let outcome = async {
        for step in &steps {
            tracing::info!(fault = %step.fault, hold_ms = step.hold.as_millis() as u64, "nemesis");
            inject(&mut cluster, &step.fault)?;
            applied.push(format!("{} {:.1} s", step.fault, step.hold.as_secs_f64()));
            tokio::time::sleep(step.hold).await;
            heal(&mut cluster, &step.fault).await?;
            tokio::time::sleep(step.rest).await;
        }
        anyhow::Ok(())
    }
    .await;
    // Whatever happened, nothing stays cut or stopped.
    heal_everything(&mut cluster).await?;
    outcome?;
    let healed = Instant::now();
    served_everywhere(&cast, &nodes, &workload).await?;
    let recovered_after = healed.elapsed();
    workload.stop().await;
    let (indeterminate, refused) = {
        let h = workload.history.lock().unwrap();
        let mut indeterminate = h.courier_indeterminate;
        let mut refused = 0;
        let answers = h
            .reserves
            .iter()
            .map(|r| &r.answer)
            .chain(
                h.orders
                    .values()
                    .flat_map(|o| [&o.confirm, &o.cancel, &o.refund].into_iter().flatten()),
            )
            .chain(h.payouts.iter().map(|p| &p.answer));
        for answer in answers {
            match answer {
                Answer::Indeterminate(_) => indeterminate += 1,
                Answer::Refused(_) => refused += 1,
                Answer::Acknowledged => {}
            }
        }
        (indeterminate, refused)
    };
    workload.resolve().await?;
    let history = std::mem::take(&mut *workload.history.lock().unwrap());
    let verdict = checker::check(&cast, &nodes, &history).await?;
    cluster.stop();
    Ok(Report {
        seed: options.seed,
        schedule: applied,
        verdict,
        indeterminate,
        resolved: history.resolved,
        refused,
        recovered_after,
        elapsed: started.elapsed(),
    })
}

/// The drop, hubs, couriers and creator of a run.
async fn set_up(cluster: &LocalCluster, seed: u64) -> anyhow::Result<Cast> {
    let channels = cluster.channels();
    let channel = &channels[0];
    let storefront = storefront_credential(&channels, OPERATOR_TOKEN, TEST_STOREFRONT).await?;
    create_test_hubs(channel).await;
    let couriers = vec![
        ("courier-1", "hub-1", 1),
        ("courier-2", "hub-1", 2),
        ("courier-3", "hub-2", 1),
    ];
    let mut cast_couriers = Vec::new();
    for (partner, hub, rank) in couriers {
        let credential = courier(channel, partner, hub, rank).await;
        cast_couriers.push((partner.to_string(), hub.to_string(), credential));
    }
    let creator_id = "creator-1".to_string();
    let creator_credential = creator(channel, &creator_id).await;
    let drop_id = format!("nemesis-{seed}");
    let skus = [("hot", 40, 20), ("cool", 300, 150)];
    let mut operator = operator_client(channel);
    operator
        .create_drop(CreateDropRequest {
            drop_id: drop_id.clone(),
            creator_id: creator_id.clone(),
            title: "nemesis drop".into(),
            opens_at: Some(ts(-1)),
            closes_at: Some(ts(3_600)),
            hold_ttl_seconds: 600,
            skus: skus
                .iter()
                .map(|(sku, lisbon, porto)| SkuSpec {
                    sku_id: (*sku).into(),
                    name: format!("item {sku}"),
                    price: eur(2_500),
                    per_buyer_limit: 1,
                    allocations: vec![
                        Allocation {
                            hub_id: "hub-1".into(),
                            city: "Lisbon".into(),
                            quantity: *lisbon,
                        },
                        Allocation {
                            hub_id: "hub-2".into(),
                            city: "Porto".into(),
                            quantity: *porto,
                        },
                    ],
                })
                .collect(),
            settlement: Some(SettlementTerms {
                platform_fee_bps: 1_000,
                delivery_fee_minor_units: 300,
                // Delivered orders' earnings become available for payouts within the run.
                return_window_seconds: 1,
            }),
        })
        .await?;
    operator
        .open_drop(OpenDropRequest {
            drop_id: drop_id.clone(),
        })
        .await?;
    Ok(Cast {
        drop_id,
        creator_id,
        creator_credential,
        storefront,
        operator: OPERATOR_TOKEN.into(),
        couriers: cast_couriers,
        skus: skus.iter().map(|(sku, _, _)| ((*sku).to_string(), 2_500)).collect(),
        cities: vec![("Lisbon".into(), "hub-1".into()), ("Porto".into(), "hub-2".into())],
    })
}

fn inject(cluster: &mut LocalCluster, fault: &Fault) -> anyhow::Result<()> {
    let network = cluster.network().expect("a partitionable cluster");
    match fault {
        Fault::IsolateNode(n) => network.set_all(Peer::Node(*n), LinkMode::Cut),
        Fault::IsolateNats(i) => {
            for j in 0..network.servers() {
                network.set(Peer::Nats(*i), Peer::Nats(j), LinkMode::Cut);
            }
        }
        Fault::CutRoute(i, j) => network.set(Peer::Nats(*i), Peer::Nats(*j), LinkMode::Cut),
        Fault::SlowNode(n, delay) => network.set_all(Peer::Node(*n), LinkMode::Delayed(*delay)),
        Fault::PauseNode(n) => cluster.pause(*n, true)?,
        Fault::PauseNats(i) => cluster.nats().pause(*i, true)?,
        Fault::KillNodes(nodes) => {
            for n in nodes {
                cluster.kill(*n);
            }
        }
        Fault::KillNats(i) => cluster.nats().kill(*i),
        Fault::KillNodeAndNats(n, i) => {
            cluster.kill(*n);
            cluster.nats().kill(*i);
        }
    }
    Ok(())
}

async fn heal(cluster: &mut LocalCluster, fault: &Fault) -> anyhow::Result<()> {
    match fault {
        Fault::IsolateNode(_) | Fault::IsolateNats(_) | Fault::CutRoute(..) | Fault::SlowNode(..) => {
            cluster.network().expect("a partitionable cluster").heal()
        }
        Fault::PauseNode(n) => cluster.pause(*n, false)?,
        Fault::PauseNats(i) => cluster.nats().pause(*i, false)?,
        Fault::KillNodes(nodes) => {
            for n in nodes {
                cluster.restart(*n).await?;
            }
        }
        Fault::KillNats(i) => cluster.nats().restart(*i)?,
        Fault::KillNodeAndNats(n, i) => {
            cluster.nats().restart(*i)?;
            cluster.restart(*n).await?;
        }
    }
    Ok(())
}

/// Every link up, every process continued, every one killed started again.
async fn heal_everything(cluster: &mut LocalCluster) -> anyhow::Result<()> {
    if let Some(network) = cluster.network() {
        network.heal();
    }
    for i in 0..cluster.nats_servers() {
        if cluster.nats().is_running(i) {
            let _ = cluster.nats().pause(i, false);
        } else {
            cluster.nats().restart(i)?;
        }
    }
    for n in 0..cluster.len() {
        if cluster.is_running(n) {
            let _ = cluster.pause(n, false);
        } else {
            cluster.restart(n).await?;
        }
    }
    Ok(())
}

/// Waits until every node takes a write on every SKU: a hold through that node, cancelled
/// again (both recorded in the history, which the checker then checks too).
async fn served_everywhere(cast: &Cast, nodes: &Nodes, workload: &Workload) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(120);
    for node in 0..nodes.len() {
        for (sku_id, price) in &cast.skus {
            let mut checkout = proto::checkout::v1::checkout_service_client::CheckoutServiceClient::with_interceptor(
                nodes.channel(node),
                services::auth::Bearer::new(&cast.storefront)?,
            );
            let buyer_id = format!("probe-{node}-{sku_id}");
            let request = ReserveRequest {
                drop_id: cast.drop_id.clone(),
                sku_id: sku_id.clone(),
                buyer_id: buyer_id.clone(),
                city: "Lisbon".into(),
                quantity: 1,
                skip_waitlist: true,
                idempotency_key: format!("reserve-{buyer_id}"),
                ..Default::default()
            };
            let reply = loop {
                match checkout.reserve(request.clone()).await {
                    Ok(reply) => break reply.into_inner(),
                    Err(status) if Instant::now() < until => {
                        tracing::debug!(node, %status, "not served yet");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(status) => {
                        anyhow::bail!("node-{node} serves no write on {sku_id} 120 s after the heal: {status}")
                    }
                }
            };
            let held = reply.outcome == ReserveOutcome::Held as i32;
            {
                let mut history = workload.history.lock().unwrap();
                history.reserves.push(ReserveRecord {
                    request,
                    answer: Answer::Acknowledged,
                    order_id: held.then(|| reply.order_id.clone()),
                    resolved: false,
                });
                if held {
                    history.orders.insert(
                        reply.order_id.clone(),
                        OrderRecord {
                            sku_id: sku_id.clone(),
                            quantity: reply.quantity_held,
                            amount: price * i64::from(reply.quantity_held),
                            // Cancelled below; resolved like any other call if that is
                            // indeterminate.
                            cancel: Some(Answer::Indeterminate(tonic::Code::Unavailable)),
                            ..Default::default()
                        },
                    );
                }
            }
            if !held {
                continue; // sold out: the write was served all the same
            }
            if checkout
                .cancel(CancelRequest {
                    order_id: reply.order_id.clone(),
                })
                .await
                .is_ok()
            {
                workload
                    .history
                    .lock()
                    .unwrap()
                    .orders
                    .get_mut(&reply.order_id)
                    .unwrap()
                    .cancel = Some(Answer::Acknowledged);
            }
        }
    }
    Ok(())
}
