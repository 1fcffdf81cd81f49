//! The real `dropline serve` as a child process ([`ServeProcess`]), for what only a process
//! shows: kill -9 and a restart on the same data, SIGTERM, cluster nodes.

use crate::fixtures::{connect_when_serving, OPERATOR_TOKEN};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The `dropline` binary for tests: `$DROPLINE_EXE`, else the one cargo builds beside the
/// running test (`target/<profile>/dropline`; `cargo test --workspace` builds it, being a
/// binary of the `client` package, which has integration tests).
pub fn dropline_exe() -> PathBuf {
    if let Some(exe) = std::env::var_os("DROPLINE_EXE") {
        return PathBuf::from(exe);
    }
    // target/<profile>/deps/<test> → target/<profile>/dropline
    let exe = std::env::current_exe().expect("the running test's path");
    let built = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join(format!("dropline{}", std::env::consts::EXE_SUFFIX)))
        .filter(|path| path.is_file());
    built.unwrap_or_else(|| {
        panic!(
            "no dropline binary beside {}: build it (`cargo build -p client`) or set DROPLINE_EXE",
            exe.display()
        )
    })
}

/// Where a server process's log (standard error) goes.
#[derive(Clone, Debug)]
pub enum Log {
    /// This process's standard error (a test's output shows it when the test fails).
    Inherit,
    /// A file, created anew.
    File(PathBuf),
}

/// Starts `exe` (default [`dropline_exe`]) with `args` and `env`, its standard error to `log`.
fn spawn_dropline(exe: Option<&Path>, args: &[OsString], env: &[(&str, &str)], log: &Log) -> anyhow::Result<Child> {
    let exe = exe.map_or_else(dropline_exe, Path::to_path_buf);
    Command::new(&exe)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.stderr()?)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {}: {e}", exe.display()))
}

impl Log {
    /// The child's standard error.
    fn stderr(&self) -> anyhow::Result<Stdio> {
        Ok(match self {
            Log::Inherit => Stdio::inherit(),
            Log::File(path) => std::fs::File::create(path)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?
                .into(),
        })
    }
}

/// `dropline serve` as it is about to be started; [`ServeCommand::spawn`] starts it.
#[derive(Clone, Debug)]
pub struct ServeCommand {
    /// The `dropline` binary [default: [`dropline_exe`], looked up when it starts].
    pub exe: Option<PathBuf>,
    pub listen: SocketAddr,
    /// `--http-listen`: /metrics, health, consoles (a free port of its own, so that servers
    /// started side by side do not all ask for 8080).
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `DROPLINE_OPERATOR_TOKEN`.
    pub operator_token: String,
    /// `DROPLINE_LOG`.
    pub log_filter: String,
    pub log: Log,
    /// More flags (`--nats …`, `--live-actors-max …`).
    pub args: Vec<OsString>,
}

impl ServeCommand {
    /// [`dropline_exe`] serving `data_dir` on a free loopback port with the operator
    /// credential [`OPERATOR_TOKEN`], logging warnings to this process's standard error.
    pub fn new(data_dir: impl Into<PathBuf>) -> anyhow::Result<ServeCommand> {
        Ok(ServeCommand {
            exe: None,
            listen: SocketAddr::from(([127, 0, 0, 1], crate::nats::unused_loopback_port()?)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], crate::nats::unused_loopback_port()?)),
            data_dir: data_dir.into(),
            operator_token: OPERATOR_TOKEN.into(),
            log_filter: "warn".into(),
            log: Log::Inherit,
            args: Vec::new(),
        })
    }

    pub fn exe(mut self, exe: impl Into<PathBuf>) -> ServeCommand {
        self.exe = Some(exe.into());
        self
    }

    pub fn operator_token(mut self, token: &str) -> ServeCommand {
        self.operator_token = token.into();
        self
    }

    pub fn log_filter(mut self, filter: &str) -> ServeCommand {
        self.log_filter = filter.into();
        self
    }

    pub fn log_to(mut self, path: impl Into<PathBuf>) -> ServeCommand {
        self.log = Log::File(path.into());
        self
    }

    pub fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> ServeCommand {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts the process; it answers once [`ServeProcess::connect`] says so.
    pub fn spawn(&self) -> anyhow::Result<ServeProcess> {
        let mut args: Vec<OsString> = ["serve", "--listen", &self.listen.to_string()]
            .into_iter()
            .map(Into::into)
            .collect();
        args.extend([
            "--http-listen".into(),
            self.http_listen.to_string().into(),
            "--data-dir".into(),
        ]);
        args.push(self.data_dir.clone().into());
        args.extend(self.args.iter().cloned());
        let child = spawn_dropline(
            self.exe.as_deref(),
            &args,
            &[
                ("DROPLINE_LOG", &self.log_filter),
                ("DROPLINE_OPERATOR_TOKEN", &self.operator_token),
            ],
            &self.log,
        )?;
        Ok(ServeProcess {
            addr: self.listen,
            http_addr: self.http_listen,
            child: Some(child),
        })
    }
}

/// A running `dropline serve`; killed (SIGKILL) when dropped.
pub struct ServeProcess {
    pub addr: SocketAddr,
    /// The HTTP side's address (`/metrics`, `/readyz`).
    pub http_addr: SocketAddr,
    child: Option<Child>,
}

impl ServeProcess {
    /// A channel to the server once it serves, waiting up to `within`; fails at once should
    /// the process exit instead.
    pub async fn connect(&mut self, within: Duration) -> anyhow::Result<Channel> {
        let child = &mut self.child;
        connect_when_serving(self.addr, within, || match child.as_mut() {
            Some(child) => child.try_wait(),
            None => Err(std::io::Error::other("the server process was stopped")),
        })
        .await
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait(),
            None => Err(std::io::Error::other("the server process was stopped")),
        }
    }

    /// SIGKILL: no shutdown hook runs, nothing is flushed on the way out. Waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (std can only SIGKILL; kill(1) sends the SIGTERM a graceful stop needs).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let Some(id) = self.id() else {
            anyhow::bail!("the server process was stopped")
        };
        signal(id, "TERM")
    }

    /// SIGSTOP (`stop: true`) or SIGCONT: a stopped server keeps its sockets and answers
    /// nothing, its timers and leases frozen until it continues.
    pub fn pause(&self, stop: bool) -> anyhow::Result<()> {
        let Some(id) = self.id() else {
            anyhow::bail!("the server process was stopped")
        };
        signal(id, if stop { "STOP" } else { "CONT" })
    }

    /// SIGTERM (the server drains and, as a cluster node, hands its partitions over), then
    /// SIGKILL if it is still running after `within`.
    pub fn terminate(&mut self, within: Duration) {
        if self.sigterm().is_ok() {
            let until = Instant::now() + within;
            while Instant::now() < until {
                if let Ok(Some(_)) = self.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }
}

impl Drop for ServeProcess {
    /// A server a test or a failed start left running is not left behind.
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `signal` (TERM, STOP, CONT: kill(1)'s names) to process `pid`.
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid}: {status}");
    Ok(())
}

/// `dropline edge` as it is about to be started: a pop-up's till server selling the leases
/// of `drop_id` from `upstream`, with its own `data_dir`. [`EdgeCommand::spawn`] starts it;
/// the running edge is a [`ServeProcess`] (its `addr` is where the tills call).
#[derive(Clone, Debug)]
pub struct EdgeCommand {
    pub exe: Option<PathBuf>,
    pub upstream: String,
    pub token: String,
    pub drop_id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub log_filter: String,
    pub log: Log,
    /// More flags (`--offline-after-ms …`, `--sync-secs …`).
    pub args: Vec<OsString>,
}

impl EdgeCommand {
    /// An edge on a free loopback port, logging warnings to this process's standard error.
    pub fn new(
        upstream: &str,
        token: &str,
        drop_id: &str,
        data_dir: impl Into<PathBuf>,
    ) -> anyhow::Result<EdgeCommand> {
        Ok(EdgeCommand {
            exe: None,
            upstream: upstream.into(),
            token: token.into(),
            drop_id: drop_id.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], crate::nats::unused_loopback_port()?)),
            data_dir: data_dir.into(),
            log_filter: "warn".into(),
            log: Log::Inherit,
            args: Vec::new(),
        })
    }

    pub fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> EdgeCommand {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn log_filter(mut self, filter: &str) -> EdgeCommand {
        self.log_filter = filter.into();
        self
    }

    pub fn spawn(&self) -> anyhow::Result<ServeProcess> {
        let mut args: Vec<OsString> = ["edge", "--upstream", &self.upstream, "--drop", &self.drop_id]
            .into_iter()
            .map(Into::into)
            .collect();
        args.extend(["--listen".into(), self.listen.to_string().into(), "--data-dir".into()]);
        args.push(self.data_dir.clone().into());
        args.extend(self.args.iter().cloned());
        let child = spawn_dropline(
            self.exe.as_deref(),
            &args,
            &[("DROPLINE_LOG", &self.log_filter), ("DROPLINE_EDGE_TOKEN", &self.token)],
            &self.log,
        )?;
        Ok(ServeProcess {
            addr: self.listen,
            http_addr: self.listen,
            child: Some(child),
        })
    }
}
