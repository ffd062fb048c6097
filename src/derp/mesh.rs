//! Mesh links between cluster members. Each member keeps one mesh-authenticated DERP client
//! connection to every other member, subscribes to its connection list (WatchConns), and
//! forwards packets for clients connected there (ForwardPacket). Clients can therefore pick
//! any member as their home DERP node and still reach each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::client::{DerpClient, DerpReader, DerpWriter};
use super::frame::{self, Frame, FrameError, Key};
use super::server::DerpServer;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A link up at least this long counts as healthy: its next failure retries quickly.
const STABLE_LINK: Duration = Duration::from_secs(10);
/// Forwarded packets written to a peer in one go, at most (about 45 full-size packets).
const WRITE_BATCH_BYTES: usize = 64 << 10;
/// Packets queued for one peer; beyond this they are dropped (best-effort, like UDP).
const FORWARD_QUEUE: usize = 1024;

/// A packet to hand to a peer member for its local client `dst`.
#[derive(Debug)]
pub(crate) struct Forward {
    pub src: Key,
    pub dst: Key,
    pub data: Vec<u8>,
}

/// The server-side handle of one mesh link.
pub(crate) struct MeshLink {
    pub url: String,
    tx: mpsc::Sender<Forward>,
    connected: AtomicBool,
}

impl MeshLink {
    pub(crate) fn new(url: String) -> (Arc<MeshLink>, mpsc::Receiver<Forward>) {
        let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
        (
            Arc::new(MeshLink {
                url,
                tx,
                connected: AtomicBool::new(false),
            }),
            rx,
        )
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Queues a packet for the peer; dropped if the link is congested.
    pub(crate) fn forward(&self, f: Forward) {
        if self.tx.try_send(f).is_err() {
            tracing::trace!(peer = %self.url, "derp mesh queue full; dropping packet");
        }
    }
}

/// Keeps the link to one peer up until the server stops, reconnecting with backoff.
pub(crate) async fn run_link(
    server: Arc<DerpServer>,
    idx: usize,
    link: Arc<MeshLink>,
    mut rx: mpsc::Receiver<Forward>,
) {
    let stop = server.stop.clone();
    let mut backoff = BACKOFF_MIN;
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = DerpClient::connect(&link.url, server.private, server.mesh_key) => c,
        };
        match conn {
            Ok(client) => {
                let up_since = tokio::time::Instant::now();
                tracing::info!(peer = %link.url, "derp mesh link up");
                link.connected.store(true, Ordering::Relaxed);
                // Packets queued while down were for routes we no longer trust; drop them.
                while rx.try_recv().is_ok() {}
                let (reader, writer) = client.split();
                let result = tokio::select! {
                    _ = stop.cancelled() => Ok(()),
                    r = run_connected(&server, idx, reader, writer, &mut rx) => r,
                };
                link.connected.store(false, Ordering::Relaxed);
                server.mesh_link_down(idx);
                if stop.is_cancelled() {
                    return;
                }
                match result {
                    Ok(()) => tracing::warn!(peer = %link.url, "derp mesh link closed"),
                    Err(error) => tracing::warn!(peer = %link.url, %error, "derp mesh link broke"),
                }
                // A link that held is retried at once; one the peer drops right after
                // login (it refuses us, or is restarting) keeps backing off.
                if up_since.elapsed() >= STABLE_LINK {
                    backoff = BACKOFF_MIN;
                }
            }
            // Warn on the first failure and then at the slowest retry pace, so a member
            // that stays down is visible without a line per attempt.
            Err(error) if backoff == BACKOFF_MIN || backoff == BACKOFF_MAX => {
                tracing::warn!(peer = %link.url, %error, retry_in = ?backoff, "derp mesh connect failed");
            }
            Err(error) => {
                tracing::debug!(peer = %link.url, %error, retry_in = ?backoff, "derp mesh connect failed");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Runs one established link: subscribes to the peer's clients, tracks presence, and
/// writes forwarded packets (plus pongs) until either direction fails.
async fn run_connected(
    server: &DerpServer,
    idx: usize,
    mut reader: DerpReader,
    mut writer: DerpWriter,
    rx: &mut mpsc::Receiver<Forward>,
) -> Result<(), FrameError> {
    writer.watch_conns().await?;
    let (pong_tx, mut pong_rx) = mpsc::channel::<[u8; 8]>(8);
    let read = async {
        loop {
            match reader.recv().await? {
                Frame::PeerPresent { key, .. } => server.mesh_peer_present(idx, key),
                // Either the client left the peer, or the peer told us it never had it.
                Frame::PeerGone { key, .. } => server.mesh_peer_gone(idx, &key),
                Frame::Ping(d) => {
                    let _ = pong_tx.try_send(d);
                }
                Frame::Restarting { .. } => {
                    tracing::info!("derp mesh peer is restarting");
                }
                _ => {}
            }
        }
    };
    let write = async {
        let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES);
        loop {
            tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => {
                        // Everything queued goes out in one write, not one per packet.
                        buf.clear();
                        frame::append_forward(&mut buf, &f.src, &f.dst, &f.data);
                        while buf.len() < WRITE_BATCH_BYTES {
                            let Ok(f) = rx.try_recv() else { break };
                            frame::append_forward(&mut buf, &f.src, &f.dst, &f.data);
                        }
                        writer.write_encoded(&buf).await?;
                    }
                    None => return Ok::<(), FrameError>(()),
                },
                Some(d) = pong_rx.recv() => writer.pong(d).await?,
            }
        }
    };
    tokio::select! {
        r = read => r,
        r = write => r,
    }
}
