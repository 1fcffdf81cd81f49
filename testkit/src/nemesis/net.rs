//! The links of a local cluster the nemesis can cut: every Dropline node to every NATS
//! server, and every NATS server's routes to the others, each through its own
//! [`LinkProxy`].

use super::proxy::{LinkMode, LinkProxy};
use crate::nats::{unused_loopback_port, RoutePlan};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// One end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peer {
    Node(usize),
    Nats(usize),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Node(i) => write!(f, "node-{i}"),
            Peer::Nats(i) => write!(f, "nats-{i}"),
        }
    }
}

/// The proxies of a cluster: `(from, to)` carries the connections `from` opens to `to`.
pub struct Network {
    links: BTreeMap<(Peer, Peer), LinkProxy>,
    plan: RoutePlan,
    nodes: usize,
}

impl Network {
    /// Proxies for `nodes` Dropline nodes and `servers` NATS servers (ports picked now, the
    /// servers not started yet: see [`Network::plan`]).
    pub async fn start(nodes: usize, servers: usize) -> anyhow::Result<Network> {
        let mut plan = RoutePlan::direct(servers)?;
        plan.advertise_nowhere = Some(unused_loopback_port()?);
        let mut links = BTreeMap::new();
        for i in 0..servers {
            for j in 0..servers {
                if i != j {
                    let proxy = LinkProxy::start(unused_loopback_port()?, loopback(plan.route[j])).await?;
                    plan.dial[i][j] = proxy.addr().port();
                    links.insert((Peer::Nats(i), Peer::Nats(j)), proxy);
                }
            }
        }
        for node in 0..nodes {
            for j in 0..servers {
                let proxy = LinkProxy::start(unused_loopback_port()?, loopback(plan.client[j])).await?;
                links.insert((Peer::Node(node), Peer::Nats(j)), proxy);
            }
        }
        Ok(Network { links, plan, nodes })
    }

    /// The ports the NATS servers must listen on and dial.
    pub fn plan(&self) -> &RoutePlan {
        &self.plan
    }

    /// The NATS URLs node `node` is given: its own proxy to each server.
    pub fn node_url(&self, node: usize) -> String {
        self.links
            .iter()
            .filter(|((from, _), _)| *from == Peer::Node(node))
            .map(|(_, proxy)| format!("nats://{}", proxy.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    pub fn servers(&self) -> usize {
        self.plan.client.len()
    }

    /// Sets both directions between `a` and `b`.
    pub fn set(&self, a: Peer, b: Peer, mode: LinkMode) {
        for key in [(a, b), (b, a)] {
            if let Some(proxy) = self.links.get(&key) {
                proxy.set(mode);
            }
        }
    }

    /// Sets every link of `peer`.
    pub fn set_all(&self, peer: Peer, mode: LinkMode) {
        for ((from, to), proxy) in &self.links {
            if *from == peer || *to == peer {
                proxy.set(mode);
            }
        }
    }

    /// Every link up.
    pub fn heal(&self) {
        for proxy in self.links.values() {
            proxy.set(LinkMode::Up);
        }
    }

    /// The links not up now, as `a->b mode`.
    pub fn faults(&self) -> Vec<String> {
        self.links
            .iter()
            .filter(|(_, p)| p.mode() != LinkMode::Up)
            .map(|((a, b), p)| format!("{a}->{b} {:?}", p.mode()))
            .collect()
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
