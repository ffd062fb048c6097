//! Per-connection bounds on the control port and the admin TCP port: how many connections
//! one source address may hold open, and how long a connection may stay silent. Both
//! outlive HTTP: a Noise or DERP upgrade keeps the same socket, so its slot and idle timer
//! go with it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// Pause after a failed accept (out of file descriptors and the like), so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A connection accepted and admitted by a `ConnGuard`.
pub type Bounded = IdleIo<TcpStream>;

/// Admits connections: the per-source cap (`limits.max_connections_per_source`), the idle
/// timeout (`limits.idle_timeout`) and the TLS handshake's time limit
/// (`limits.http_header_timeout`), refusals counted.
#[derive(Clone)]
pub struct ConnGuard {
    sources: SourceCounter,
    idle: Duration,
    handshake: Duration,
    refusals: prometheus::IntCounterVec,
}

impl ConnGuard {
    pub fn new(limits: &crate::config::LimitsConfig, refusals: prometheus::IntCounterVec) -> Self {
        ConnGuard {
            sources: SourceCounter::new(limits.max_connections_per_source),
            idle: limits.idle_timeout.0,
            handshake: limits.http_header_timeout.0,
            refusals,
        }
    }

    /// The next connection on `listener` that this guard admits. Accept errors are logged
    /// (naming `what` listens) and retried after a pause. Cancel-safe.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        what: &'static str,
    ) -> (Bounded, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(io) = self.admit(stream, remote.ip()) {
                        return (io, remote);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, listener = what, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    /// The TLS side of `io`, or `None` (logged at debug) when the handshake fails or takes
    /// longer than the limit.
    pub async fn tls_handshake(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        io: Bounded,
        remote: SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<Bounded>> {
        match tokio::time::timeout(self.handshake, acceptor.accept(io)).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(error)) => {
                tracing::debug!(%error, ?remote, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(?remote, "TLS handshake timed out");
                None
            }
        }
    }

    /// The stream, bounded, or `None` (counted) when its source is at the cap.
    pub fn admit<S>(&self, stream: S, source: IpAddr) -> Option<IdleIo<S>> {
        let Some(slot) = self.sources.admit(source) else {
            self.refusals
                .with_label_values(&["max_connections_per_source"])
                .inc();
            tracing::debug!(%source, "connection refused: too many from this source");
            return None;
        };
        Some(IdleIo::new(stream, self.idle, Some(slot)))
    }
}

/// The admin gRPC listener learns the caller's address through this (rate limits).
impl tonic::transport::server::Connected for IdleIo<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Open connections per source address, capped.
#[derive(Clone)]
pub struct SourceCounter {
    max: u32,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

/// One admitted connection; dropping it frees the slot.
pub struct SourceSlot {
    source: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl SourceCounter {
    /// `max == 0`: no cap.
    pub fn new(max: u32) -> Self {
        SourceCounter {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection from `source`, or `None` at the cap.
    pub fn admit(&self, source: IpAddr) -> Option<SourceSlot> {
        let mut open = self.open.lock().expect("source counter lock");
        let count = open.entry(source).or_insert(0);
        if self.max != 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            source,
            open: self.open.clone(),
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("source counter lock");
        if let Some(count) = open.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

/// A stream that fails with `TimedOut` once no byte has moved either way for `idle`.
/// The timer is polled with every pending read, so it works for any reader (hyper, an
/// upgraded Noise or DERP connection) without a task of its own. It also holds the
/// connection's `SourceSlot`.
pub struct IdleIo<S> {
    inner: S,
    idle: Option<Duration>,
    timer: Pin<Box<Sleep>>,
    _slot: Option<SourceSlot>,
}

impl<S> IdleIo<S> {
    /// `idle == 0` disables the timeout.
    pub fn new(inner: S, idle: Duration, slot: Option<SourceSlot>) -> Self {
        let idle = (!idle.is_zero()).then_some(idle);
        // Far in the future when disabled; never polled to completion then.
        let first = Instant::now() + idle.unwrap_or(Duration::from_secs(86_400 * 365));
        IdleIo {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep_until(first)),
            _slot: slot,
        }
    }

    fn touch(&mut self) {
        if let Some(idle) = self.idle {
            self.timer.as_mut().reset(Instant::now() + idle);
        }
    }

    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.idle.is_some() && self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle past limits.idle_timeout",
            ));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_cap_counts_open_connections_per_source() {
        let counter = SourceCounter::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = counter.admit(a).unwrap();
        let _second = counter.admit(a).unwrap();
        assert!(counter.admit(a).is_none(), "third from one source");
        assert!(counter.admit(b).is_some(), "another source");
        drop(first);
        assert!(
            counter.admit(a).is_some(),
            "a closed connection frees its slot"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_ends_the_stream_and_traffic_keeps_it() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = IdleIo::new(near, Duration::from_secs(90), None);
        let mut buf = [0u8; 8];
        // Traffic every 60 s keeps it open past several idle periods.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            far.write_all(b"ping").await.unwrap();
            assert_eq!(io.read(&mut buf).await.unwrap(), 4);
        }
        let started = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(90));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_count_as_traffic() {
        let (near, far) = tokio::io::duplex(1024);
        let (mut r, mut w) = tokio::io::split(IdleIo::new(near, Duration::from_secs(90), None));
        let reader = tokio::spawn(async move {
            let started = Instant::now();
            let mut buf = [0u8; 8];
            let err = r.read(&mut buf).await.unwrap_err();
            (err.kind(), started.elapsed())
        });
        // A server that only sends keep-alives (a quiet map stream) stays connected.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            w.write_all(b"ka").await.unwrap();
        }
        let (kind, elapsed) = reader.await.unwrap();
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert_eq!(elapsed, Duration::from_secs(4 * 60 + 90));
        drop(far);
    }
}
