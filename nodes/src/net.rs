//! The one place that knows whether the network is simulated.
//!
//! madsim's simulated TCP sends bytes only on flush and errors when flushing an empty buffer
//! to a dead peer, where real TCP would not. [`Stream`] hides that: under `cfg(madsim)` every
//! write is flushed at once and `poll_flush` is a no-op, so tungstenite and hyper behave as on
//! real tokio (see MADSIM_NOTES.md). On real tokio it is a plain pass-through.
//!
//! Also here: [`SimTimer`], a `hyper::rt::Timer` over `tokio::time` (hyper-util's `TokioTimer`
//! calls real tokio and panics under madsim), and [`connect`]/[`bind`] helpers.
//!
//! It does not retry, buffer or time out anything: callers own their deadlines.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A TCP stream that behaves like real TCP in both worlds.
pub struct Stream {
    inner: TcpStream,
    /// (local, peer) addresses: the simulation counts bytes per pair (`sim_wire_bytes_by_path`).
    /// Boxed: a stream is inlined in enums of streams, which should stay small.
    #[cfg(madsim)]
    path: Box<(std::net::IpAddr, std::net::IpAddr)>,
}

impl Stream {
    pub fn new(inner: TcpStream) -> Self {
        let _ = inner.set_nodelay(true);
        #[cfg(madsim)]
        {
            let unspecified = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
            let ip = |a: io::Result<SocketAddr>| a.map_or(unspecified, |a| a.ip());
            let path = Box::new((ip(inner.local_addr()), ip(inner.peer_addr())));
            Self { inner, path }
        }
        #[cfg(not(madsim))]
        Self { inner }
    }
}

/// Shortest interval between two flushes of one connection by a coalescing writer (`rpc`).
///
/// madsim delivers at most one message per millisecond per connection (its receiver sleeps at
/// least 1 ms per message) and each flush is one message, so a writer that flushes faster
/// only builds a queue in the simulated network. Pacing flushes to that rate and sending
/// everything queued in between is what a real TCP send buffer does under load. On real tokio
/// the kernel coalesces, so there is no pacing.
#[cfg(madsim)]
pub const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(1);
#[cfg(not(madsim))]
pub const MIN_FLUSH_INTERVAL: Duration = Duration::ZERO;

#[cfg(madsim)]
thread_local! {
    /// Bytes written to simulated TCP streams on this thread. Each simulated run has its own
    /// OS thread (and madsim runs every node on it), so this is the run's wire total.
    static SIM_WIRE_BYTES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The same bytes by (writer's address, peer's address).
    static SIM_WIRE_PATHS: std::cell::RefCell<WirePaths> = const {
        std::cell::RefCell::new(std::collections::BTreeMap::new())
    };
    /// The bytes written inside [`heartbeat_write`].
    static SIM_HEARTBEAT_BYTES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(madsim)]
tokio::task_local! {
    /// Set while a task writes a heartbeat or its answer (`heartbeat_write`).
    static HEARTBEAT_WRITE: ();
}

/// Bytes written by (writer's address, peer's address).
pub type WirePaths = std::collections::BTreeMap<(std::net::IpAddr, std::net::IpAddr), u64>;

/// The simulated run's wire bytes by (writer's address, peer's address).
#[cfg(madsim)]
pub fn sim_wire_bytes_by_path() -> WirePaths {
    SIM_WIRE_PATHS.with(|p| p.borrow().clone())
}

/// The simulated run's bytes written inside [`heartbeat_write`]: the devices' heartbeats and
/// the chat servers' answers, as the wire carries them (WebSocket framing and TLS included).
#[cfg(madsim)]
pub fn sim_heartbeat_bytes() -> u64 {
    SIM_HEARTBEAT_BYTES.with(|b| b.get())
}

/// Runs `write` (the write of a heartbeat or of its answer) so that the simulation counts its
/// bytes as heartbeat bytes as well. No effect on real tokio.
pub async fn heartbeat_write<F: std::future::Future>(write: F) -> F::Output {
    #[cfg(madsim)]
    return HEARTBEAT_WRITE.scope((), write).await;
    #[cfg(not(madsim))]
    write.await
}

/// Bytes every node and device of the current simulated run wrote to TCP (WebSocket, HTTP
/// and RPC payloads with their framing; not TCP/IP headers).
#[cfg(madsim)]
pub fn sim_wire_bytes() -> u64 {
    SIM_WIRE_BYTES.with(|b| b.get())
}

/// A random number generator for a node's secrets (password salts): seeded by the simulation
/// under `cfg(madsim)` (same seed, same run), from the operating system otherwise.
pub fn node_rng() -> rand::rngs::StdRng {
    use rand::SeedableRng;
    #[cfg(madsim)]
    return rand::rngs::StdRng::seed_from_u64(madsim::rand::random());
    #[cfg(not(madsim))]
    rand::rngs::StdRng::from_entropy()
}

/// Runs CPU-heavy `f` (a password hash) off the async workers: on a blocking thread for
/// real, inline in the simulation (madsim has no threads; simulated time does not pass).
pub async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    #[cfg(madsim)]
    return f();
    #[cfg(not(madsim))]
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking task does not panic")
}

/// Connects to `addr`.
pub async fn connect(addr: SocketAddr) -> io::Result<Stream> {
    Ok(Stream::new(TcpStream::connect(addr).await?))
}

/// Connects to `addr` from the local address `source` (a load driver spreads its clients over
/// many, past one address's ephemeral ports); `None` lets the system choose. A simulated node
/// has one address, so the simulation ignores `source`.
pub async fn connect_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> io::Result<Stream> {
    #[cfg(not(madsim))]
    if let Some(src) = source {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        sock.bind(SocketAddr::new(src, 0))
            .map_err(|e| io::Error::new(e.kind(), format!("bind {src}: {e}")))?;
        return Ok(Stream::new(sock.connect(addr).await?));
    }
    #[cfg(madsim)]
    let _ = source;
    connect(addr).await
}

/// Binds a listener on `addr`; the error names the address.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        // Simulated TCP only moves bytes on flush: flush every write so the peer sees it.
        #[cfg(madsim)]
        if n > 0 {
            SIM_WIRE_BYTES.with(|b| b.set(b.get() + n as u64));
            SIM_WIRE_PATHS.with(|p| *p.borrow_mut().entry(*self.path).or_default() += n as u64);
            if HEARTBEAT_WRITE.try_with(|_| ()).is_ok() {
                SIM_HEARTBEAT_BYTES.with(|b| b.set(b.get() + n as u64));
            }
            match Pin::new(&mut self.inner).poll_flush(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(n))
    }

    /// All of `bufs` in one write: TLS writes its records vectored. In the simulation the
    /// default would send one record per message.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        #[cfg(madsim)]
        {
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.as_mut().poll_write(cx, &joined)
        }
        #[cfg(not(madsim))]
        {
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        #[cfg(madsim)]
        {
            let _ = (&mut self, cx);
            Poll::Ready(Ok(()))
        }
        #[cfg(not(madsim))]
        {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `hyper::rt::Timer` over `tokio::time` (simulated under madsim).
#[derive(Clone, Copy, Debug, Default)]
pub struct SimTimer;

struct SleepFut {
    /// hyper's `Sleep` must be `Sync`; the simulated `Sleep` is not. A mutex makes it so at no
    /// cost: it is only ever reached through `&mut` (`get_mut`), never locked.
    inner: std::sync::Mutex<Pin<Box<tokio::time::Sleep>>>,
}

impl std::future::Future for SleepFut {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let sleep = self
            .inner
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for SleepFut {}

impl hyper::rt::Timer for SimTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(SleepFut {
            inner: std::sync::Mutex::new(Box::pin(tokio::time::sleep(duration))),
        })
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let now = Instant::now();
        self.sleep(deadline.saturating_duration_since(now))
    }
}

/// hyper executor that spawns on the current (possibly simulated) runtime.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}
