//! The durable-store baseline of `hot-sku`: Redis with `appendfsync always` (every write is
//! in the append-only file and fsync'd before its reply, as Dropline's journal fdatasyncs
//! before its own) and a Lua check-and-decrement per reserve, the classic way to sell one
//! hot item from Redis. The server is started here on a temporary directory and a free
//! port and stopped with the run; `redis-server` comes from Debian's package
//! (`scripts/install-redis.sh`), and without it the baseline is skipped with a message.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use proto::checkout::v1::ReserveOutcome;
use redis::aio::MultiplexedConnection;
use tokio::process::{Child, Command};
use tonic::Status;

use crate::burst::{run_burst, BurstStats};
use crate::cpu::{Meter, Pid, Spent};

/// Holds `ARGV[1]` units of the stock at `KEYS[1]` if that many are left: 1 if held, 0 if
/// not (SOLD_OUT).
const CHECK_AND_DECREMENT: &str = r"
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = tonumber(ARGV[1])
if left < wanted then
  return 0
end
redis.call('DECRBY', KEYS[1], wanted)
return 1
";

/// How long a freshly started redis-server may take to answer PING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A redis-server of this run, killed when dropped.
pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// What a Redis burst measured, and the stock check after it.
pub struct RedisRound {
    pub stats: BurstStats<ReserveOutcome>,
    pub spent: Spent,
    /// Units left once the burst is over (never below zero: no oversell).
    pub left: i64,
}

impl RedisServer {
    /// Starts `redis_server` with the append-only file fsync'd on every write, or says why
    /// it cannot run (the caller reports the baseline skipped).
    pub async fn start(redis_server: &str) -> anyhow::Result<RedisServer> {
        let found = Command::new(redis_server)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if !found.is_ok_and(|status| status.success()) {
            bail!("{redis_server} not found; scripts/install-redis.sh installs Debian's redis-server");
        }
        let dir = tempfile::tempdir().context("a temporary directory for redis-server")?;
        let port = testkit::free_port();
        let child = Command::new(redis_server)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--dir"])
            .arg(dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                // No RDB snapshots: the append-only file is the durability being compared.
                "--save",
                "",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {redis_server}"))?;
        let server = RedisServer { child, port, _dir: dir };
        let started = Instant::now();
        loop {
            match server.connect().await {
                Ok(mut connection) => {
                    let fsync: Vec<String> = redis::cmd("CONFIG")
                        .arg("GET")
                        .arg("appendfsync")
                        .query_async(&mut connection)
                        .await?;
                    anyhow::ensure!(
                        fsync.get(1).map(String::as_str) == Some("always"),
                        "redis-server runs with appendfsync {fsync:?}, not always"
                    );
                    return Ok(server);
                }
                Err(_) if started.elapsed() < STARTUP_TIMEOUT => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(error) => return Err(error.context("redis-server did not answer")),
            }
        }
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.id().and_then(|id| i32::try_from(id).ok()).map(Pid)
    }

    async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        Ok(client.get_multiplexed_async_connection().await?)
    }

    /// `attempts` reserves of one unit of a fresh key holding `stock`, from `concurrency`
    /// workers over `connections` connections, each call pipelined with the others on its
    /// connection: the shape of the Dropline burst.
    pub async fn burst(
        &self,
        key: &str,
        stock: u32,
        attempts: usize,
        concurrency: usize,
        connections: usize,
    ) -> anyhow::Result<RedisRound> {
        let mut first = self.connect().await?;
        redis::cmd("SET")
            .arg(key)
            .arg(stock)
            .query_async::<()>(&mut first)
            .await?;
        let script = redis::Script::new(CHECK_AND_DECREMENT);
        // Loaded once before the burst, so every call is an EVALSHA.
        script.prepare_invoke().load_async(&mut first).await?;
        let mut pool = vec![first];
        for _ in 1..connections {
            pool.push(self.connect().await?);
        }
        let pool: Arc<[MultiplexedConnection]> = pool.into();
        let (script, key): (Arc<redis::Script>, Arc<str>) = (Arc::new(script), key.into());
        let meter = Meter::start(self.pid());
        let calls = {
            let (pool, script, key) = (pool.clone(), script.clone(), key.clone());
            run_burst(attempts, concurrency, move |index| {
                let mut connection = pool[index % pool.len()].clone();
                let (script, key) = (script.clone(), key.clone());
                async move {
                    let held: i64 = script
                        .key(&*key)
                        .arg(1)
                        .invoke_async(&mut connection)
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                    Ok(if held == 1 {
                        ReserveOutcome::Held
                    } else {
                        ReserveOutcome::SoldOut
                    })
                }
            })
            .await?
        };
        let spent = meter.stop();
        let mut connection = pool[0].clone();
        let left: i64 = redis::cmd("GET").arg(&*key).query_async(&mut connection).await?;
        Ok(RedisRound {
            stats: calls,
            spent,
            left,
        })
    }
}
