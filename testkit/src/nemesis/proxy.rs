//! A TCP proxy per network link, which the nemesis cuts or slows.
//!
//! Every connection of a link (a Dropline node to a NATS server, or a NATS server's route to
//! another) goes through its own [`LinkProxy`] on loopback. A cut is what a partition looks
//! like from either end: silence. Bytes already sent wait in the proxy, nothing is answered,
//! no connection is reset, so each side finds out only through its own timeouts and pings.
//! When the cut heals, every connection that lived through it is closed (after a partition
//! longer than a few seconds a real TCP connection is usually dead too, and its peer must
//! reconnect); connections made after the heal work. A delay holds every chunk of bytes for
//! a fixed time before passing it on, in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a link does with the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    Up,
    /// Every chunk is held this long before it is passed on.
    Delayed(Duration),
    /// Nothing passes, in either direction.
    Cut,
}

#[derive(Clone, Copy, Debug)]
struct LinkState {
    mode: LinkMode,
    /// Cuts so far: a connection older than the last cut is closed when the cut heals.
    cuts: u64,
}

/// Bytes read per chunk; also what a delayed link holds at most per connection and direction.
const CHUNK: usize = 16 * 1024;
/// Connections a link carries at once (NATS opens a few per route, a client one).
const CONNECTIONS_MAX: usize = 64;

/// One link: listens on a loopback port and forwards every connection to `target`.
pub struct LinkProxy {
    addr: SocketAddr,
    target: SocketAddr,
    state: Arc<watch::Sender<LinkState>>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    /// A proxy to `target` on `port` (127.0.0.1), passing everything until told otherwise.
    pub async fn start(port: u16, target: SocketAddr) -> std::io::Result<LinkProxy> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(LinkState {
            mode: LinkMode::Up,
            cuts: 0,
        });
        let state = Arc::new(state);
        let task = tokio::spawn(accept(listener, target, state.clone()));
        Ok(LinkProxy {
            addr,
            target,
            state,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn mode(&self) -> LinkMode {
        self.state.borrow().mode
    }

    pub fn set(&self, mode: LinkMode) {
        self.state.send_modify(|s| {
            if mode == LinkMode::Cut && s.mode != LinkMode::Cut {
                s.cuts += 1;
            }
            s.mode = mode;
        });
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, state: Arc<watch::Sender<LinkState>>) {
    let open = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Reap finished connections so the set stays as small as the open ones.
        while connections.try_join_next().is_some() {}
        let Ok(permit) = open.clone().try_acquire_owned() else {
            continue; // dropped: refused
        };
        let state = state.subscribe();
        connections.spawn(async move {
            let _permit = permit;
            carry(inbound, target, state).await;
        });
    }
}

/// One connection, both directions; when either ends, both do.
async fn carry(inbound: TcpStream, target: SocketAddr, mut state: watch::Receiver<LinkState>) {
    let born = state.borrow().cuts;
    // A connection made while the link is cut hears nothing until it heals (a delay applies
    // to its bytes, not to its making).
    loop {
        let now = *state.borrow_and_update();
        if now.mode != LinkMode::Cut {
            break;
        }
        if state.changed().await.is_err() {
            return;
        }
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::select! {
        _ = pump(in_read, out_write, state.clone(), born) => {}
        _ = pump(out_read, in_write, state, born) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<LinkState>,
    born: u64,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !pass(&mut state, born).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits until the link lets bytes through (after its delay, if it has one); false when the
/// connection must close instead: a cut began since it was made, and has healed.
async fn pass(state: &mut watch::Receiver<LinkState>, born: u64) -> bool {
    loop {
        let now = *state.borrow_and_update();
        match now.mode {
            LinkMode::Cut => {
                if state.changed().await.is_err() {
                    return false;
                }
            }
            _ if now.cuts != born => return false,
            LinkMode::Up => return true,
            LinkMode::Delayed(delay) => {
                tokio::time::sleep(delay).await;
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(socket: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        socket.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, socket.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf.to_vec()),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_is_silence_and_its_heal_closes_the_connections_that_lived_through_it() {
        let target = echo_server().await;
        let proxy = LinkProxy::start(0, target).await.unwrap();
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut old, Duration::from_secs(1)).await.unwrap(), b"ping");

        proxy.set(LinkMode::Cut);
        // Silence, not a reset: the write succeeds and nothing comes back.
        assert_eq!(round_trip(&mut old, Duration::from_secs(30)).await, None);
        let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut during, Duration::from_secs(30)).await, None);

        proxy.set(LinkMode::Up);
        // The old connection is closed once the link heals (the bytes held are not delivered).
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), old.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?} {rest:?}");
        // One made during the cut goes on: its held bytes arrive now.
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), during.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"ping");
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut new, Duration::from_secs(1)).await.unwrap(), b"ping");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_every_chunk_for_its_time() {
        let target = echo_server().await;
        let proxy = LinkProxy::start(0, target).await.unwrap();
        proxy.set(LinkMode::Delayed(Duration::from_millis(400)));
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(round_trip(&mut socket, Duration::from_secs(5)).await.unwrap(), b"ping");
        // Once each way.
        assert!(
            started.elapsed() >= Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_millis(1_200),
            "{:?}",
            started.elapsed()
        );
    }
}
