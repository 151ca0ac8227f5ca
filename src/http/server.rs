//! The accept loop and what it bounds: at most [`MAX_CONNECTIONS`] connections at once, one
//! request each (no keep-alive), [`READ_TIMEOUT`] to send a request head and body,
//! [`WRITE_STALL_TIMEOUT`] to take each next byte of an answer, and the oldest connection
//! still waiting for its head closed when a new one needs its place. Slow or stalled clients
//! cannot take the daemon's file descriptors, which its cold reads need, and a fresh
//! `/health` is answered however many clients stall. What a request may do is the router's
//! (`routes`, `auth`, `blobs`).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::service::Service as _;
use tokio::sync::{Notify, watch};

use crate::control::Control;

/// Connections served at once. Each holds a file descriptor, and the daemon's descriptors also
/// hold the cache's blob files and the sources' sockets: unbounded, stalled clients took them
/// all and every cold read failed. Operators, the CLI and a scraper need a handful; 128 leaves
/// room for bursts of `wan models` runs and stays far below any soft `RLIMIT_NOFILE` (1024).
pub(super) const MAX_CONNECTIONS: usize = 128;

/// How long a client has to send its request head (hyper's timer), and then its body. Every
/// client we serve sends both at once; 10 s absorbs a congested link, not a stalled client.
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an answer may wait for the client to take its next byte. A client that asks for a
/// blob and never reads held its connection (and the piece in flight) for good: 140 of them
/// took every connection, and `/health` failed as long as they stayed. A peer reading at any
/// rate takes bytes every few milliseconds; 10 s without one is a client that is gone.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's per-connection buffer, for the request head and for an answer's bytes not yet
/// taken by the socket. hyper's default (~400 KiB) is memory a stalled client keeps; heads
/// here are a few hundred bytes (64 KiB still takes a path of 20,000 characters).
pub(super) const CONN_BUF_BYTES: usize = 64 << 10;

/// How long shutdown waits for requests in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves until `shutdown` resolves, then gives requests in progress [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Arc<Control>,
    http: crate::config::HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = super::router(control, &http);
    let conns = Arc::new(Conns::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    // Both warnings below can come once per connection attempt: one line per 10 s is enough.
    let mut last_warning: Option<Instant> = None;
    let mut warn_now = move || {
        let due = last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10));
        if due {
            last_warning = Some(Instant::now());
        }
        due
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Typically EMFILE: wait for descriptors to come back rather than spin.
                    if warn_now() {
                        tracing::warn!(error = %e, "HTTP endpoint: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        match conns.admit() {
            Some(slot) => {
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    app.clone(),
                    slot,
                    stop_rx.clone(),
                ));
            }
            None if warn_now() => {
                tracing::warn!(%peer, "HTTP endpoint: {MAX_CONNECTIONS} requests in progress; connections refused");
            }
            None => {}
        }
    }
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while conns.open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connection: its request (keep-alive is off, so a served connection frees its slot and
/// an idle one cannot hold it), the header-read timeout, being shed, and shutdown.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) {
    let started = slot.started.clone();
    let inner = hyper_util::service::TowerToHyperService::new(app);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            started.store(true, Ordering::Relaxed);
            req.extensions_mut().insert(ConnectInfo(peer));
            inner.call(req)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(CONN_BUF_BYTES)
        .keep_alive(false);
    let io = hyper_util::rt::TokioIo::new(StallGuard::new(stream, WRITE_STALL_TIMEOUT));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                // hyper's error names the step; its source says why (a stalled client).
                let why = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
                tracing::debug!(%peer, error = %e, %why, "HTTP connection ended with an error");
            }
        }
        _ = slot.shed.notified() => {
            tracing::debug!(%peer, "HTTP connection shed: no request head while the endpoint was full");
        }
        _ = async { drop(stop.wait_for(|s| *s).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// A connection's socket whose writes fail once one has waited `limit` without the client
/// taking a byte: hyper has no write timeout, and a body a client does not read would wait on
/// the socket for ever. Progress of any size restarts the clock, so a slow reader is served.
struct StallGuard<T> {
    inner: T,
    limit: Duration,
    /// Running while a write waits; `None` after a write that made progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallGuard<T> {
    fn new(inner: T, limit: Duration) -> StallGuard<T> {
        StallGuard {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After the inner write answered `poll`: restarts the clock on progress, and on a wait
    /// polls the clock (so the task wakes when it runs out) and fails the write if it has.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let clock = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match clock.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took no byte of its answer for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Conns {
    open: Mutex<VecDeque<Entry>>,
    next_id: AtomicU64,
}

/// A connection as [`Conns`] sees it.
struct Entry {
    id: u64,
    /// Set once its request head has been read.
    started: Arc<AtomicBool>,
    /// Notified to close it.
    shed: Arc<Notify>,
}

/// A connection's place in [`Conns`], held by its task; dropping it frees the place.
struct Slot {
    id: u64,
    conns: Arc<Conns>,
    started: Arc<AtomicBool>,
    shed: Arc<Notify>,
}

impl Conns {
    /// A slot for a new connection. When all are taken, the oldest connection that has not
    /// sent a whole request head is closed to make room: a stalled client, not one being
    /// served, loses its place, so a fresh `/health` is answered at once however many clients
    /// stall. `None` when every connection is in a request.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.open.lock().unwrap();
        if open.len() >= MAX_CONNECTIONS {
            let idle = open
                .iter()
                .position(|e| !e.started.load(Ordering::Relaxed))?;
            let victim = open.remove(idle).expect("index in range");
            victim.shed.notify_one();
        }
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            started: Arc::new(AtomicBool::new(false)),
            shed: Arc::new(Notify::new()),
        };
        let slot = Slot {
            id: entry.id,
            conns: self.clone(),
            started: entry.started.clone(),
            shed: entry.shed.clone(),
        };
        open.push_back(entry);
        Some(slot)
    }

    fn open(&self) -> usize {
        self.open.lock().unwrap().len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.open.lock().unwrap().retain(|e| e.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_endpoint_sheds_the_oldest_connection_without_a_request() {
        use futures::FutureExt;
        let conns = Arc::new(Conns::default());
        let slots: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|_| conns.admit().expect("room"))
            .collect();
        slots[0].started.store(true, Ordering::Relaxed);
        let newcomer = conns.admit().expect("room made");
        assert_eq!(conns.open(), MAX_CONNECTIONS);
        assert!(
            slots[1].shed.notified().now_or_never().is_some(),
            "oldest idle not shed"
        );
        assert!(
            slots[0].shed.notified().now_or_never().is_none(),
            "a served one was shed"
        );
        for s in &slots {
            s.started.store(true, Ordering::Relaxed);
        }
        newcomer.started.store(true, Ordering::Relaxed);
        assert!(conns.admit().is_none(), "every connection is in a request");
        drop(newcomer);
        assert_eq!(
            conns.open(),
            MAX_CONNECTIONS - 1,
            "a closed connection frees its place"
        );
        assert!(conns.admit().is_some());
    }
}
