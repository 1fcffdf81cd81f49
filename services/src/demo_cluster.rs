//! `dropline demo --cluster N`: a local cluster on loopback, N NATS JetStream servers
//! (`sync_interval: always`, replicas = N) and N `dropline serve --nats` processes (this
//! very binary), for the demo drop to run across; and the node loss in the middle of it:
//! kill -9 of the node owning the hottest SKU, the time until every partition it held has a
//! new owner, and afterwards the check that no acknowledged order was lost.

use actors::cluster::natsd::{self, LocalNats};
use actors::cluster::placement::{self, lease_key, partition_of, PARTITIONS_DEFAULT};
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::{GetOrderRequest, OrderStatus};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Lease timings of the demo's nodes: short, so the takeover shows within the drop.
pub const LEASE_TTL_MS: u64 = 3_000;
pub const LEASE_RENEW_MS: u64 = 500;

struct Node {
    name: String,
    addr: SocketAddr,
    child: Option<Child>,
}

pub struct LocalCluster {
    nats: LocalNats,
    nodes: Vec<Node>,
    leases: async_nats::jetstream::kv::Store,
    js: async_nats::jetstream::Context,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], natsd::unused_loopback_port()?)))
}

impl LocalCluster {
    /// Starts `count` NATS servers and `count` Dropline nodes under `dir`, and waits until
    /// every node answers gRPC and every partition has an owner.
    pub async fn start(count: usize, dir: &Path, operator_token: &str) -> anyhow::Result<LocalCluster> {
        let nats = LocalNats::start(count, &dir.join("nats"))?;
        let exe = std::env::current_exe()?;
        let mut nodes = Vec::new();
        for i in 0..count {
            let name = format!("node-{i}");
            let addr = free_addr()?;
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let child = Command::new(&exe)
                .args(["serve", "--listen", &addr.to_string(), "--data-dir"])
                .arg(dir.join(&name))
                .args(["--nats", &nats.url(), "--node", &name, "--replicas", &count.to_string()])
                .args(["--lease-ttl-ms", &LEASE_TTL_MS.to_string()])
                .args(["--lease-renew-ms", &LEASE_RENEW_MS.to_string()])
                .env("DROPLINE_LOG", "warn")
                .env("DROPLINE_OPERATOR_TOKEN", operator_token)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| anyhow::anyhow!("starting {}: {e}", exe.display()))?;
            nodes.push(Node {
                name,
                addr,
                child: Some(child),
            });
        }
        let urls: Vec<async_nats::ServerAddr> = nats.url().split(',').map(|u| u.parse()).collect::<Result<_, _>>()?;
        let client = async_nats::connect(urls).await?;
        let js = async_nats::jetstream::new(client);
        let until = Instant::now() + Duration::from_secs(90);
        let leases = loop {
            exited(&mut nodes, dir)?;
            if let Ok(leases) = js.get_key_value(placement::LEASES_BUCKET).await {
                break leases;
            }
            if Instant::now() > until {
                anyhow::bail!(
                    "the cluster did not set up its storage in time (logs in {})",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut cluster = LocalCluster {
            nats,
            nodes,
            leases,
            js: js.clone(),
        };
        for i in 0..cluster.nodes.len() {
            // A node still joining has its port bound already, and holds callers in the backlog.
            while !crate::server::is_serving(cluster.nodes[i].addr, Duration::from_secs(2)).await {
                exited(&mut cluster.nodes, dir)?;
                if Instant::now() > until {
                    anyhow::bail!("{} did not answer in time", cluster.nodes[i].name);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Settled: every partition owned, and by every node (fair shares).
        loop {
            let owners = cluster.owners().await;
            let distinct: std::collections::BTreeSet<_> = owners.iter().flatten().collect();
            if owners.iter().all(Option::is_some) && distinct.len() == count {
                break;
            }
            if Instant::now() > until {
                anyhow::bail!("partitions did not settle over the nodes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(cluster)
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.js
    }

    pub fn nats_servers(&self) -> usize {
        self.nats.len()
    }

    /// The owner of every partition (None: being taken over).
    async fn owners(&self) -> Vec<Option<String>> {
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

    /// The node running the actor of `stream`.
    pub async fn owner_of(&self, stream: &str) -> Option<usize> {
        let partition = partition_of(stream, PARTITIONS_DEFAULT);
        let value = self.leases.get(lease_key(partition)).await.ok()??;
        let name = String::from_utf8_lossy(&value);
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Kills node `i` with SIGKILL; returns how long until every partition it held had
    /// a new owner, and how many it held.
    pub async fn kill_and_wait_for_takeover(&mut self, i: usize) -> anyhow::Result<(Duration, usize)> {
        let name = self.nodes[i].name.clone();
        let held = self
            .owners()
            .await
            .iter()
            .filter(|o| o.as_deref() == Some(name.as_str()))
            .count();
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
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

    /// Stops the nodes still running (SIGTERM: they hand their partitions over and drain),
    /// then the NATS servers.
    pub fn stop(mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // std can only SIGKILL; kill(1) sends the SIGTERM a graceful stop needs.
                let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
                let until = Instant::now() + Duration::from_secs(10);
                while Instant::now() < until {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Node {
    /// A node of a cluster that failed to start is not left running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalCluster {
    /// The nodes go before the NATS servers (fields drop in declaration order).
    fn drop(&mut self) {
        self.nodes.clear();
    }
}

/// Fails if a node has exited: it will not come back by waiting.
fn exited(nodes: &mut [Node], dir: &Path) -> anyhow::Result<()> {
    for node in nodes {
        if let Some(child) = node.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "{} exited while starting ({status}); its log: {}",
                    node.name,
                    dir.join(format!("{}.log", node.name)).display()
                );
            }
        }
    }
    Ok(())
}

/// Acknowledged orders whose confirmation cannot be found any more.
/// Read as the operator (who may read every order, without its pickup code).
pub async fn lost_orders(channel: Channel, operator_token: &str, order_ids: &[String]) -> anyhow::Result<Vec<String>> {
    let mut checkout = CheckoutServiceClient::with_interceptor(channel, crate::auth::Bearer::new(operator_token)?);
    let mut lost = Vec::new();
    for order_id in order_ids {
        let kept = match checkout
            .get_order(GetOrderRequest {
                order_id: order_id.clone(),
            })
            .await
        {
            Ok(order) => matches!(
                OrderStatus::try_from(order.into_inner().status),
                Ok(OrderStatus::Confirmed | OrderStatus::Cancelled)
            ),
            Err(status) if status.code() == tonic::Code::NotFound => false,
            Err(status) => return Err(status.into()),
        };
        if !kept {
            lost.push(order_id.clone());
        }
    }
    Ok(lost)
}
