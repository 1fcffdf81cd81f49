//! Local NATS servers for tests, `dropline demo --cluster` and the load tests: one JetStream server, or a
//! cluster of them, on free loopback ports with their own store directories, configured as
//! Dropline needs (`sync_interval: always`: fsync before every acknowledgement), stopped
//! when dropped.
//!
//! The server binary is the pinned NATS 2.15.1 that `scripts/install-nats.sh` puts in
//! `.tools/nats/bin` (Debian's 2.9 cannot serve async-nats 0.51's key-value API), or the
//! one named by `DROPLINE_NATS_SERVER`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The NATS server binary to run.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("DROPLINE_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let mut candidates = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/nats/bin/nats-server")];
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/dropline or target/<profile>/deps/<test> → <workspace>/.tools
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join(".tools/nats/bin/nats-server"));
        }
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "no NATS server found: run scripts/install-nats.sh (pinned nats-server 2.15.1 into .tools/) \
             or set DROPLINE_NATS_SERVER"
        )
    })
}

/// A loopback port for a server about to be started: free now, outside the kernel's
/// ephemeral range, and never handed out twice by this process.
///
/// The usual `bind("127.0.0.1:0")` trick returns a port from the ephemeral range, the same
/// range the kernel draws from for every outgoing connection. A child that binds its port
/// only after connecting to NATS (seconds, on a loaded machine) can find it taken by one of
/// those connections (the likeliest cause of a CI failure), and so can a NATS server
/// restarted on its old port. Ports below the range are only ever taken by an explicit bind. The `portpicker`
/// crate also draws below the range, but at random per call, so two servers of one test
/// could get the same port; here a process-wide cursor walks the range from a random start.
pub fn unused_loopback_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    static RANGE: std::sync::OnceLock<(u16, u16)> = std::sync::OnceLock::new();
    let (low, high) = *RANGE.get_or_init(outside_ephemeral_range);
    let span = u32::from(high - low) + 1;
    if CURSOR.load(Ordering::Relaxed) == u32::MAX {
        let start = rand::random::<u32>() % span;
        let _ = CURSOR.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let port = low + (CURSOR.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in {low}..={high}")
}

/// Ports no outgoing connection gets: from 10000 to just below the ephemeral range when
/// there is room (Linux defaults to 32768–60999), above it otherwise. A range covering nearly
/// every port leaves none: then any port from 10000 up, with a warning, since a port may
/// again be taken by an outgoing connection before its server binds it.
fn outside_ephemeral_range() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let bounds: Vec<u16> = range
        .as_deref()
        .unwrap_or("32768 60999")
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let (first, last) = match bounds[..] {
        [first, last] => (first, last),
        _ => (32768, 60999),
    };
    if first >= 12_000 {
        (10_000, first - 1)
    } else if last <= 63_000 {
        (last + 1, 65_535)
    } else {
        tracing::warn!(
            first,
            last,
            "the ephemeral port range leaves no room for local servers' ports; they may collide with outgoing connections"
        );
        (10_000, 65_535)
    }
}

/// Where each server listens and where it dials its routes.
#[derive(Clone, Debug)]
pub struct RoutePlan {
    /// Each server's client port.
    pub client: Vec<u16>,
    /// Each server's route port.
    pub route: Vec<u16>,
    /// `dial[i][j]`: the port server `i` dials for its route to server `j`.
    pub dial: Vec<Vec<u16>>,
    /// Routes and clients only where the plan says: no server advertises its own addresses
    /// (this port has nothing listening).
    pub advertise_nowhere: Option<u16>,
}

impl RoutePlan {
    /// Fresh ports, each server dialling the others' route ports directly.
    pub fn direct(count: usize) -> anyhow::Result<RoutePlan> {
        let client = (0..count)
            .map(|_| unused_loopback_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let route = (0..count)
            .map(|_| unused_loopback_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let dial = (0..count).map(|_| route.clone()).collect();
        Ok(RoutePlan {
            client,
            route,
            dial,
            advertise_nowhere: None,
        })
    }
}

struct Server {
    name: String,
    port: u16,
    config: PathBuf,
    child: Option<Child>,
}

/// NATS servers on loopback; killed when dropped.
pub struct LocalNats {
    servers: Vec<Server>,
    binary: PathBuf,
    dir: PathBuf,
}

impl LocalNats {
    /// Starts `count` JetStream servers under `dir` (a cluster when more than one) and
    /// waits until each accepts connections.
    pub fn start(count: usize, dir: &Path) -> anyhow::Result<LocalNats> {
        let plan = RoutePlan::direct(count)?;
        LocalNats::start_planned(&plan, dir)
    }

    /// Starts the servers of `plan` under `dir`: each on its ports, dialling its routes where
    /// the plan says (through the nemesis's proxies, say).
    pub fn start_planned(plan: &RoutePlan, dir: &Path) -> anyhow::Result<LocalNats> {
        let binary = server_binary()?;
        let count = plan.client.len();
        let mut servers = Vec::new();
        for i in 0..count {
            let name = format!("nats-{i}");
            let port = plan.client[i];
            let store = dir.join(&name);
            std::fs::create_dir_all(&store)?;
            // Pings every 2 s, 2 unanswered close a client: a node cut off behind a silent
            // connection loses its subscriptions (its partitions' command queues) within
            // ~6 s instead of the default's 2 to 4 minutes, during which requests NATS gave it
            // would go unanswered.
            let mut config = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
                 ping_interval: \"2s\"\nping_max: 2\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                store.display()
            );
            if count > 1 {
                let routes: Vec<String> = (0..count)
                    .filter(|j| *j != i)
                    .map(|j| format!("nats://127.0.0.1:{}", plan.dial[i][j]))
                    .collect();
                config.push_str(&format!(
                    "cluster {{\n  name: dropline\n  listen: 127.0.0.1:{}\n  routes: [{}]\n",
                    plan.route[i],
                    routes.join(", ")
                ));
                if let Some(nowhere) = plan.advertise_nowhere {
                    // Routes go only where the plan says: a server learning of another through
                    // gossip is given an address nothing listens on, and clients are told of
                    // no server but the ones they were given.
                    config.push_str(&format!("  advertise: \"127.0.0.1:{nowhere}\"\n  no_advertise: true\n"));
                }
                config.push_str("}\n");
            }
            let path = dir.join(format!("{name}.conf"));
            std::fs::write(&path, config)?;
            servers.push(Server {
                name,
                port,
                config: path,
                child: None,
            });
        }
        let mut nats = LocalNats {
            servers,
            binary,
            dir: dir.to_path_buf(),
        };
        for i in 0..count {
            nats.spawn(i)?;
        }
        for i in 0..count {
            nats.wait_ready(i)?;
        }
        Ok(nats)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let server = &mut self.servers[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", server.name)))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&server.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.binary.display()))?;
        server.child = Some(child);
        Ok(())
    }

    fn wait_ready(&self, i: usize) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(20);
        let port = self.servers[i].port;
        while Instant::now() < until {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("NATS server {} did not start on port {port}", self.servers[i].name)
    }

    /// Client URLs of every server, comma-separated.
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Kills server `i` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`stop: true`) or SIGCONT to server `i`: a paused server holds its
    /// connections open and answers nothing.
    pub fn pause(&self, i: usize, stop: bool) -> anyhow::Result<()> {
        let Some(child) = &self.servers[i].child else {
            anyhow::bail!("NATS server {} is not running", self.servers[i].name)
        };
        crate::process::signal(child.id(), if stop { "STOP" } else { "CONT" })
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].child.is_some()
    }

    /// Each server's client port.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.port).collect()
    }

    /// Starts server `i` again on its port and store, and waits until it accepts clients.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_ready(i)
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_for_servers_avoid_the_ephemeral_range_and_never_repeat() {
        let (low, high) = outside_ephemeral_range();
        let ports: Vec<u16> = (0..200).map(|_| unused_loopback_port().unwrap()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        assert!(ports.iter().all(|p| (low..=high).contains(p)));
        if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
            let bounds: Vec<u16> = range.split_whitespace().map(|n| n.parse().unwrap()).collect();
            let room = bounds[0] >= 12_000 || bounds[1] <= 63_000;
            assert!(
                !room || ports.iter().all(|p| *p < bounds[0] || *p > bounds[1]),
                "{ports:?} vs the ephemeral range {bounds:?}"
            );
        }
        // Free when handed out: a server can bind it.
        let port = unused_loopback_port().unwrap();
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
