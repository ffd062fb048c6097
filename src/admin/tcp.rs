//! The admin API's TCP connections: bounded per source and idle (`limit::conn`), and over
//! TLS with the control port's certificate when `tls_cert_path` is set (hsctl then takes
//! `--address https://HOST:PORT`). TLS handshakes run on their own tasks, bounded in time,
//! so a slow client cannot hold up the accept loop.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::limit::conn::{ConnGuard, IdleIo};

/// Time a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that finished their handshake and wait for tonic to take them.
const READY_QUEUE: usize = 64;

type Bounded = IdleIo<TcpStream>;

/// One admin connection, plain or TLS.
pub enum AdminConn {
    Plain(Bounded),
    Tls(Box<tokio_rustls::server::TlsStream<Bounded>>),
}

impl Connected for AdminConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            AdminConn::Plain(io) => io.connect_info(),
            AdminConn::Tls(tls) => tls.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for AdminConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AdminConn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            AdminConn::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AdminConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AdminConn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            AdminConn::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AdminConn::Plain(io) => Pin::new(io).poll_flush(cx),
            AdminConn::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AdminConn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            AdminConn::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts on `listener` until `stop`, admitting through `guard` and, with `tls`, shaking
/// hands on a task per connection; yields the connections ready for gRPC.
pub fn incoming(
    listener: tokio::net::TcpListener,
    guard: ConnGuard,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = io::Result<AdminConn>> + Send + 'static {
    let (ready, rx) = mpsc::channel(READY_QUEUE);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(v) => v,
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        tokio::time::sleep(super::ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let Some(io) = guard.admit(stream, remote.ip()) else {
                continue;
            };
            let Some(acceptor) = tls.clone() else {
                if ready.send(Ok(AdminConn::Plain(io))).await.is_err() {
                    return;
                }
                continue;
            };
            let ready = ready.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => {
                        let _ = ready.send(Ok(AdminConn::Tls(Box::new(tls)))).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, ?remote, "admin TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(?remote, "admin TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}
