//! [`LocalCluster`]: a Dropline cluster on loopback. NATS JetStream servers
//! (`sync_interval: always`, the journal and buckets replicated on all of them) and
//! `dropline serve --nats` processes, the partition leases they hold (read from the lease
//! bucket), and what tests and the demo do to them: kill -9 a node and time the takeover,
//! restart it, restart a NATS server.

use crate::nats::LocalNats;
use crate::process::{ServeCommand, ServeProcess};
use actors::cluster::placement::{lease_key, partition_of, LEASES_BUCKET, PARTITIONS_DEFAULT};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How long starting a cluster may take: a new 3-server JetStream cluster elects its
/// leaders first, which takes several seconds on a loaded machine.
const START_WITHIN: Duration = Duration::from_secs(90);
/// How long the partitions may take to settle over the nodes.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);

/// What [`LocalCluster::start`] starts.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Dropline nodes.
    pub nodes: usize,
    /// NATS servers (a NATS cluster when more than one); every stream and bucket has this
    /// many replicas.
    pub nats_servers: usize,
    pub lease_ttl_ms: u64,
    pub lease_renew_ms: u64,
    pub operator_token: String,
    /// The `dropline` binary the nodes run [default: [`crate::dropline_exe`]].
    pub exe: Option<PathBuf>,
    /// The nodes' `DROPLINE_LOG`.
    pub log_filter: String,
    /// Each node's log in `<dir>/<node>.log` instead of this process's standard error.
    pub logs_in_files: bool,
    /// Every node-to-server connection and every route between NATS servers through a
    /// proxy the nemesis can cut or slow ([`LocalCluster::network`]).
    pub partitionable: bool,
}

impl ClusterOptions {
    /// `nodes` nodes on as many NATS servers, with short leases (a takeover shows within a
    /// few seconds) and the test operator credential.
    pub fn new(nodes: usize) -> ClusterOptions {
        ClusterOptions {
            nodes,
            nats_servers: nodes,
            lease_ttl_ms: 3_000,
            lease_renew_ms: 500,
            operator_token: crate::fixtures::OPERATOR_TOKEN.into(),
            exe: None,
            log_filter: "warn".into(),
            logs_in_files: false,
            partitionable: false,
        }
    }
}

struct Node {
    name: String,
    command: ServeCommand,
    process: Option<ServeProcess>,
    channel: Channel,
}

pub struct LocalCluster {
    // Fields drop in declaration order: the nodes go before the NATS servers.
    nodes: Vec<Node>,
    nats: LocalNats,
    network: Option<crate::nemesis::Network>,
    js: async_nats::jetstream::Context,
    leases: async_nats::jetstream::kv::Store,
    options: ClusterOptions,
    dir: PathBuf,
}

impl LocalCluster {
    /// Starts the NATS servers and the nodes under `dir`, and waits until every node serves
    /// and the partitions have settled over them ([`LocalCluster::settled`]).
    pub async fn start(options: ClusterOptions, dir: &Path) -> anyhow::Result<LocalCluster> {
        let network = match options.partitionable {
            true => Some(crate::nemesis::Network::start(options.nodes, options.nats_servers).await?),
            false => None,
        };
        let nats = match &network {
            Some(network) => LocalNats::start_planned(network.plan(), &dir.join("nats"))?,
            None => LocalNats::start(options.nats_servers, &dir.join("nats"))?,
        };
        let mut commands = Vec::new();
        let mut processes = Vec::new();
        for i in 0..options.nodes {
            let name = format!("node-{i}");
            let url = match &network {
                Some(network) => network.node_url(i),
                None => nats.url(),
            };
            let mut command = ServeCommand::new(dir.join(&name))?
                .operator_token(&options.operator_token)
                .log_filter(&options.log_filter)
                .args(["--nats", &url, "--node", &name])
                .args(["--replicas", &options.nats_servers.to_string()])
                .args(["--lease-ttl-ms", &options.lease_ttl_ms.to_string()])
                .args(["--lease-renew-ms", &options.lease_renew_ms.to_string()]);
            if let Some(exe) = &options.exe {
                command = command.exe(exe);
            }
            if options.logs_in_files {
                command = command.log_to(dir.join(format!("{name}.log")));
            }
            processes.push(command.spawn()?);
            commands.push((name, command));
        }
        let urls: Vec<async_nats::ServerAddr> = nats.url().split(',').map(str::parse).collect::<Result<_, _>>()?;
        let js = async_nats::jetstream::new(async_nats::connect(urls).await?);
        let mut nodes = Vec::new();
        for ((name, command), mut process) in commands.into_iter().zip(processes) {
            let started = Instant::now();
            let channel = process
                .connect(START_WITHIN)
                .await
                .map_err(|e| anyhow::anyhow!("{name}: {e}{}", log_hint(&options, dir, &name)))?;
            tracing::info!(node = %name, after_ms = started.elapsed().as_millis() as u64, "node serving");
            nodes.push(Node {
                name,
                command,
                process: Some(process),
                channel,
            });
        }
        // Every node has set up the storage by the time it serves.
        let leases = js.get_key_value(LEASES_BUCKET).await?;
        let cluster = LocalCluster {
            nodes,
            nats,
            network,
            js,
            leases,
            options,
            dir: dir.to_path_buf(),
        };
        cluster.settled().await?;
        Ok(cluster)
    }

    /// Every node's gRPC address.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.command.listen).collect()
    }

    /// A channel to every node (a killed node's fails its calls).
    pub fn channels(&self) -> Vec<Channel> {
        self.nodes.iter().map(|n| n.channel.clone()).collect()
    }

    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.js
    }

    /// The NATS servers (to kill or restart one).
    pub fn nats(&mut self) -> &mut LocalNats {
        &mut self.nats
    }

    pub fn nats_servers(&self) -> usize {
        self.nats.len()
    }

    /// The proxies between nodes and NATS servers, when started `partitionable`.
    pub fn network(&self) -> Option<&crate::nemesis::Network> {
        self.network.as_ref()
    }

    /// Whether node `node` runs (it may be paused).
    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].process.is_some()
    }

    /// SIGSTOP (`stop: true`) or SIGCONT to node `node`.
    pub fn pause(&self, node: usize, stop: bool) -> anyhow::Result<()> {
        match &self.nodes[node].process {
            Some(process) => process.pause(stop),
            None => anyhow::bail!("{} is not running", self.nodes[node].name),
        }
    }

    /// The owner of every partition by name (None: free, being taken over).
    pub async fn owners(&self) -> Vec<Option<String>> {
        let mut owners = Vec::new();
        for partition in 0..PARTITIONS_DEFAULT {
            let owner = match self.leases.get(lease_key(partition)).await {
                Ok(Some(value)) => Some(String::from_utf8_lossy(&value).into_owned()),
                _ => None,
            };
            owners.push(owner);
        }
        owners
    }

    /// The node holding the lease of the partition of `stream` (an actor key such as
    /// `sku/<drop>/<sku>` or `hub/<hub>`), if one holds it now.
    pub async fn owner_of(&self, stream: &str) -> Option<usize> {
        let partition = partition_of(stream, PARTITIONS_DEFAULT);
        let value = self.leases.get(lease_key(partition)).await.ok()??;
        let name = String::from_utf8_lossy(&value);
        self.nodes.iter().position(|n| n.name == name)
    }

    /// [`LocalCluster::owner_of`], waiting up to `within` for the partition to have one.
    pub async fn wait_for_owner_of(&self, stream: &str, within: Duration) -> anyhow::Result<usize> {
        let until = Instant::now() + within;
        loop {
            if let Some(owner) = self.owner_of(stream).await {
                return Ok(owner);
            }
            if Instant::now() > until {
                anyhow::bail!("the partition of {stream} has no owner");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every partition has an owner and the running nodes hold fair shares,
    /// the same over two reads a renewal round apart: a node that answers first takes every
    /// partition and hands the surplus over in the next rounds, stopping the actors it had
    /// started.
    pub async fn settled(&self) -> anyhow::Result<()> {
        let running: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.process.is_some())
            .map(|n| n.name.as_str())
            .collect();
        let fair = PARTITIONS_DEFAULT.div_ceil(running.len().max(1) as u32) as usize;
        let until = Instant::now() + SETTLE_WITHIN;
        let mut last = Vec::new();
        loop {
            let owners = self.owners().await;
            let mut shares = std::collections::BTreeMap::new();
            for owner in owners.iter().flatten() {
                *shares.entry(owner.clone()).or_insert(0usize) += 1;
            }
            let fair_now = owners.iter().all(Option::is_some)
                && running.iter().all(|n| shares.contains_key(*n))
                && shares.len() == running.len()
                && shares.values().all(|n| *n <= fair);
            if fair_now && owners == last {
                return Ok(());
            }
            if Instant::now() > until {
                anyhow::bail!("the partitions did not settle over the nodes: {shares:?}");
            }
            last = owners;
            tokio::time::sleep(Duration::from_millis(2 * self.options.lease_renew_ms)).await;
        }
    }

    /// Kills node `node` with SIGKILL and waits for it to exit.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut process) = self.nodes[node].process.take() {
            process.kill();
        }
    }

    /// Kills node `node` with SIGKILL; returns how long until every partition it held had a
    /// new owner, and how many it held.
    pub async fn kill_and_wait_for_takeover(&mut self, node: usize) -> anyhow::Result<(Duration, usize)> {
        let name = self.nodes[node].name.clone();
        let held = self
            .owners()
            .await
            .iter()
            .filter(|o| o.as_deref() == Some(name.as_str()))
            .count();
        self.kill(node);
        let killed = Instant::now();
        loop {
            let owners = self.owners().await;
            if owners.iter().all(|o| o.as_ref().is_some_and(|o| *o != name)) {
                return Ok((killed.elapsed(), held));
            }
            if killed.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("the partitions of {name} were not taken over within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts node `node` again, on its address and data directory, and waits until it
    /// serves (the partitions rebalance afterwards: see [`LocalCluster::settled`]).
    pub async fn restart(&mut self, node: usize) -> anyhow::Result<Channel> {
        self.kill(node);
        let hint = log_hint(&self.options, &self.dir, &self.nodes[node].name);
        let node = &mut self.nodes[node];
        let mut process = node.command.spawn()?;
        let channel = process
            .connect(START_WITHIN)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}{hint}", node.name))?;
        node.process = Some(process);
        node.channel = channel.clone();
        Ok(channel)
    }

    /// Stops the nodes still running (SIGTERM: they hand their partitions over and drain),
    /// then the NATS servers.
    pub fn stop(mut self) {
        for node in &mut self.nodes {
            if let Some(process) = node.process.as_mut() {
                process.terminate(Duration::from_secs(10));
            }
        }
    }
}

fn log_hint(options: &ClusterOptions, dir: &Path, name: &str) -> String {
    if options.logs_in_files {
        format!(" (its log: {})", dir.join(format!("{name}.log")).display())
    } else {
        String::new()
    }
}
