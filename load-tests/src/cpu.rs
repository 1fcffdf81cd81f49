//! CPU time of the processes on each side of a burst, so a report can say what a call costs
//! the server and the generator, apart from how fast the calls went.
//!
//! Throughput ratios on a machine whose cores the generator shares mix both sides' costs
//! (a call's time is the generator's share plus the server's). CPU time per call separates
//! them: the server's figure is what a generator on its own cores would leave to compare.
//!
//! Read from `/proc/<pid>/stat` (user + system time of every thread of the process) with the
//! `procfs` crate, which also finds the process listening on a local port. Linux only;
//! elsewhere the figures are simply not reported.

use std::net::SocketAddr;
use std::time::Duration;

/// A process whose CPU time is read around a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pid(pub i32);

impl Pid {
    /// This process (the load generator).
    pub fn myself() -> Pid {
        Pid(std::process::id() as i32)
    }

    /// User plus system time of every thread of the process so far, or `None` when it
    /// cannot be read (the process is gone, or not on Linux).
    pub fn cpu_time(self) -> Option<Duration> {
        #[cfg(target_os = "linux")]
        {
            let stat = procfs::process::Process::new(self.0).ok()?.stat().ok()?;
            let ticks = stat.utime + stat.stime;
            let per_second = procfs::ticks_per_second();
            Some(Duration::from_micros(ticks * 1_000_000 / per_second))
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }
}

/// The process listening on `addr` (or on the wildcard address of its port), if it is on
/// this machine and visible to this user.
pub fn listening_on(addr: SocketAddr) -> Option<Pid> {
    #[cfg(target_os = "linux")]
    {
        use procfs::net::TcpState;
        use procfs::process::FDTarget;
        let tables = [
            procfs::net::tcp().unwrap_or_default(),
            procfs::net::tcp6().unwrap_or_default(),
        ];
        let inode = tables.iter().flatten().find_map(|entry| {
            let local = entry.local_address;
            let same = local.port() == addr.port() && (local.ip() == addr.ip() || local.ip().is_unspecified());
            (entry.state == TcpState::Listen && same).then_some(entry.inode)
        })?;
        procfs::process::all_processes().ok()?.flatten().find_map(|process| {
            let holds = process
                .fd()
                .ok()?
                .flatten()
                .any(|fd| matches!(fd.target, FDTarget::Socket(i) if i == inode));
            holds.then_some(Pid(process.pid))
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = addr;
        None
    }
}

/// CPU time a process spent during a burst.
#[derive(Debug, Clone, Copy)]
pub struct Spent {
    pub server: Option<Duration>,
    pub generator: Option<Duration>,
}

/// Readings taken before a burst; [`Meter::stop`] after it gives what was spent.
pub struct Meter {
    server: Option<(Pid, Duration)>,
    generator: Option<Duration>,
}

impl Meter {
    pub fn start(server: Option<Pid>) -> Meter {
        Meter {
            server: server.and_then(|pid| Some((pid, pid.cpu_time()?))),
            generator: Pid::myself().cpu_time(),
        }
    }

    pub fn stop(self) -> Spent {
        Spent {
            server: self
                .server
                .and_then(|(pid, before)| Some(pid.cpu_time()?.saturating_sub(before))),
            generator: self
                .generator
                .and_then(|before| Some(Pid::myself().cpu_time()?.saturating_sub(before))),
        }
    }
}

/// Microseconds of CPU per call.
pub fn per_call_us(spent: Option<Duration>, calls: usize) -> Option<f64> {
    let spent = spent?;
    (calls > 0).then(|| spent.as_secs_f64() * 1e6 / calls as f64)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_shows_in_this_process_cpu_time() {
        let started = std::time::Instant::now();
        let meter = Meter::start(Some(Pid::myself()));
        let before = Pid::myself().cpu_time().unwrap();
        let mut x = 0u64;
        // Spin until the kernel has counted 200 ms of CPU (however long that takes on a
        // loaded machine): the meter must see at least that, and no more than the wall time
        // on every core.
        while Pid::myself().cpu_time().unwrap() < before + Duration::from_millis(200) {
            assert!(started.elapsed() < Duration::from_secs(30), "CPU time does not grow");
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        let spent = meter.stop();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let most = started.elapsed() * cores + Duration::from_millis(20);
        for spent in [spent.generator.unwrap(), spent.server.unwrap()] {
            assert!(
                spent >= Duration::from_millis(200) && spent <= most,
                "{spent:?}, at most {most:?}"
            );
        }
    }

    #[test]
    fn finds_the_process_listening_on_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(listening_on(addr), Some(Pid::myself()));
        drop(listener);
        assert_eq!(listening_on(addr), None);
    }

    #[test]
    fn per_call_figures() {
        assert_eq!(per_call_us(Some(Duration::from_millis(50)), 1_000), Some(50.0));
        assert_eq!(per_call_us(None, 1_000), None);
        assert_eq!(per_call_us(Some(Duration::from_millis(50)), 0), None);
    }
}
