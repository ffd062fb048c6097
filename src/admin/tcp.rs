//! The admin API's TCP connections: bounded per source, idle and in handshake time
//! (`limit::conn::ConnGuard`), and over TLS with the control port's certificate when
//! `tls_cert_path` is set (hsctl then takes `--address https://HOST:PORT`). TLS handshakes
//! run on their own tasks, so a slow client cannot hold up the accept loop.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::limit::conn::{Bounded, ConnGuard};

/// Connections that finished their handshake and wait for tonic to take them.
const READY_QUEUE: usize = 64;

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
/// hands on a task per connection (all in `tasks`); yields the connections ready for gRPC.
pub fn incoming(
    listener: tokio::net::TcpListener,
    guard: ConnGuard,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
    tasks: TaskTracker,
) -> impl futures::Stream<Item = io::Result<AdminConn>> + Send + 'static {
    let (ready, rx) = mpsc::channel(READY_QUEUE);
    tasks.clone().spawn(async move {
        loop {
            let (io, remote) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = guard.accept(&listener, "admin") => accepted,
            };
            let Some(acceptor) = tls.clone() else {
                if ready.send(Ok(AdminConn::Plain(io))).await.is_err() {
                    return;
                }
                continue;
            };
            let (ready, guard) = (ready.clone(), guard.clone());
            tasks.spawn(async move {
                if let Some(tls) = guard.tls_handshake(&acceptor, io, remote).await {
                    let _ = ready.send(Ok(AdminConn::Tls(Box::new(tls)))).await;
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}
