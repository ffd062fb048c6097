//! The DERP relay: accepts upgraded `/derp` connections, logs clients in, relays packets
//! between local clients, and hands packets for clients on other cluster members to the
//! mesh links (see `mesh.rs`). Also the small probe / captive-portal HTTP handlers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frame::{
    self, ClientInfo, FRAME_CLIENT_INFO, Frame, FrameError, KEY_LEN, Key, MAX_CLIENT_INFO_LEN,
    MAX_FRAME_LEN, PEER_GONE_DISCONNECTED, PEER_GONE_NOT_HERE, PEER_PRESENT_IS_REGULAR,
    PROTOCOL_VERSION, ServerInfo,
};
use super::mesh::{Forward, MeshLink};
use crate::limit::RateLimiter;

/// Read and write buffer per connection: a dozen full-size packets each way per syscall,
/// without costing thousands of idle connections much memory.
const CONN_BUFFER_BYTES: usize = 16 << 10;
/// Login (server key → client info → server info) must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream's keepalive period; a jitter of up to 5s spreads the wakeups.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// A client that does not drain its socket for this long is dropped rather than buffered for.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Packets queued per client before new ones are dropped (DERP is best-effort, like UDP).
const PACKET_QUEUE: usize = 256;
/// Control frames (pongs, presence) queued per client. Watchers that overflow are
/// disconnected so they resync on reconnect rather than silently missing updates.
const CONTROL_QUEUE: usize = 4096;
/// A mesh peer's control queue: on `WatchConns` it is sent one frame per client of this
/// relay at once, so it must hold the whole client list (bounded channels reserve no
/// memory for unused slots; about 60 bytes per queued frame).
const MESH_CONTROL_QUEUE: usize = 1 << 18;
/// Sent in FrameRestarting on shutdown: reconnect soon, and give up on this node after a while
/// so the client moves to another cluster member.
const RESTART_RECONNECT_IN_MS: u32 = 200;
const RESTART_TRY_FOR_MS: u32 = 10_000;

/// Errors that end one client connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("write stalled for {0:?}")]
    WriteTimeout(Duration),
    #[error("first frame was type {0:#04x}, want client info")]
    NotClientInfo(u8),
    #[error("client info: {0}")]
    ClientInfo(#[source] FrameError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A packet for a local client: (source key, payload).
type Delivery = (Key, Vec<u8>);

/// What the rest of the server holds to reach one client connection.
#[derive(Clone)]
struct ConnHandle {
    id: u64,
    /// Mesh peers are not announced to watchers: they are servers, not destinations.
    is_mesh: bool,
    addr: Option<SocketAddr>,
    packets: mpsc::Sender<Delivery>,
    control: mpsc::Sender<Frame>,
    close: CancellationToken,
}

#[derive(Default)]
struct State {
    /// Connections per client key; the last one is the active one (newest wins).
    clients: HashMap<Key, Vec<ConnHandle>>,
    /// Mesh clients that sent WatchConns, by connection id.
    watchers: HashMap<u64, ConnHandle>,
    /// Mesh links to other cluster members, indexed by link id.
    links: Vec<Arc<MeshLink>>,
    /// Which mesh links currently report a client key as present there.
    mesh_routes: HashMap<Key, Vec<usize>>,
}

/// Where a packet for some key should go.
enum Route {
    Local(mpsc::Sender<Delivery>),
    Mesh(Arc<MeshLink>),
    Unknown,
}

/// Whether a client public key may use the relay (e.g. "is a registered node key").
pub type ClientVerifier = Box<dyn Fn(&Key) -> bool + Send + Sync>;

/// One cluster member's DERP relay.
pub struct DerpServer {
    pub(super) private: Key,
    public: Key,
    pub(super) mesh_key: Option<Key>,
    pub(super) stop: CancellationToken,
    pub(super) tasks: TaskTracker,
    next_id: AtomicU64,
    state: Mutex<State>,
    /// Decides whether a (non-mesh) client key may use this relay; unset = anyone.
    verifier: std::sync::OnceLock<ClientVerifier>,
    /// Decides whether a peer holding the mesh key may mesh (its DERP key must be a
    /// current member's); unset = the mesh key suffices.
    mesh_verifier: std::sync::OnceLock<ClientVerifier>,
    /// Connections per client key (`limits.derp_connects_per_minute`); unset = no limit.
    connect_limit: std::sync::OnceLock<RateLimiter<Key>>,
    /// Packets handed to a local client (from a local sender or from the mesh).
    relayed_local: AtomicU64,
    /// Packets sent to another member's relay for a client homed there.
    forwarded_to_mesh: AtomicU64,
}

/// Constant-time equality so mesh-key checks leak nothing through timing.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn short(k: &Key) -> String {
    hex::encode(&k[..4])
}

impl DerpServer {
    pub fn new(
        private: Key,
        mesh_key: Option<Key>,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<DerpServer> {
        Arc::new(DerpServer {
            private,
            public: frame::public_key(&private),
            mesh_key,
            stop,
            tasks,
            next_id: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            verifier: std::sync::OnceLock::new(),
            connect_limit: std::sync::OnceLock::new(),
            mesh_verifier: std::sync::OnceLock::new(),
            relayed_local: AtomicU64::new(0),
            forwarded_to_mesh: AtomicU64::new(0),
        })
    }

    pub fn public_key(&self) -> Key {
        self.public
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of distinct client keys connected here (mesh peers excluded).
    pub fn connected_clients(&self) -> usize {
        self.state()
            .clients
            .values()
            .filter(|v| v.iter().any(|h| !h.is_mesh))
            .count()
    }

    /// Only clients `verify` accepts may connect (mesh peers authenticate by mesh key).
    /// Set once, before serving.
    pub fn set_client_verifier(&self, verify: ClientVerifier) {
        let _ = self.verifier.set(verify);
    }

    /// Closes mesh connections the mesh verifier now refuses (a member was removed);
    /// returns how many peers were cut off.
    pub fn drop_refused_mesh_peers(&self) -> usize {
        let Some(verify) = self.mesh_verifier.get() else {
            return 0;
        };
        let st = self.state();
        let mut refused = 0;
        for (key, conns) in st.clients.iter() {
            if conns.iter().any(|c| c.is_mesh) && !verify(key) {
                refused += 1;
                for conn in conns.iter().filter(|c| c.is_mesh) {
                    conn.close.cancel();
                }
                tracing::warn!(peer = %short(key), "derp mesh peer cut off: no longer a member");
            }
        }
        refused
    }

    /// Only mesh peers `verify` accepts may mesh. Set once, before serving.
    pub fn set_mesh_verifier(&self, verify: ClientVerifier) {
        let _ = self.mesh_verifier.set(verify);
    }

    /// Limits how often one client key may connect. Set once, before serving.
    pub fn set_connect_limit(&self, limit: RateLimiter<Key>) {
        let _ = self.connect_limit.set(limit);
    }

    /// Closes the connections of every client the verifier now refuses (a node removed,
    /// expired, unapproved or with a rotated key); returns how many keys were cut off.
    pub fn drop_refused_clients(&self) -> usize {
        let Some(verify) = self.verifier.get() else {
            return 0;
        };
        let keys: Vec<Key> = {
            let st = self.state();
            st.clients
                .iter()
                .filter(|(_, conns)| conns.iter().any(|c| !c.is_mesh))
                .map(|(key, _)| *key)
                .collect()
        };
        let refused: Vec<Key> = keys.into_iter().filter(|k| !verify(k)).collect();
        let st = self.state();
        for key in &refused {
            for conn in st.clients.get(key).into_iter().flatten() {
                if !conn.is_mesh {
                    conn.close.cancel();
                }
            }
            tracing::info!(client = %short(key), "derp client cut off: its node key is no longer valid");
        }
        refused.len()
    }

    /// Packets delivered to clients of this relay, and packets forwarded over the mesh.
    pub fn packet_counts(&self) -> (u64, u64) {
        (
            self.relayed_local.load(Ordering::Relaxed),
            self.forwarded_to_mesh.load(Ordering::Relaxed),
        )
    }

    /// Mesh links to other members that are currently up.
    pub fn mesh_peers_connected(&self) -> usize {
        self.state()
            .links
            .iter()
            .filter(|l| l.is_connected())
            .count()
    }

    /// Starts one mesh link per peer DERP URL (other cluster members sharing the mesh key).
    /// Without a mesh key there is nothing to authenticate with, so it does nothing.
    pub fn start_mesh(self: &Arc<Self>, peers: Vec<String>) {
        let Some(_) = self.mesh_key else {
            tracing::warn!("derp mesh requested without a mesh key; not meshing");
            return;
        };
        for url in peers {
            // Idempotent: called again when membership changes; known peers keep their link.
            if self.state().links.iter().any(|l| l.url == url) {
                continue;
            }
            let (link, rx) = MeshLink::new(url);
            let idx = {
                let mut st = self.state();
                st.links.push(link.clone());
                st.links.len() - 1
            };
            self.tasks
                .spawn(super::mesh::run_link(self.clone(), idx, link, rx));
        }
    }

    pub(super) fn mesh_peer_present(&self, link: usize, key: Key) {
        let mut st = self.state();
        let v = st.mesh_routes.entry(key).or_default();
        if !v.contains(&link) {
            v.push(link);
        }
    }

    pub(super) fn mesh_peer_gone(&self, link: usize, key: &Key) {
        let mut st = self.state();
        if let Some(v) = st.mesh_routes.get_mut(key) {
            v.retain(|l| *l != link);
            if v.is_empty() {
                st.mesh_routes.remove(key);
            }
        }
    }

    /// Forgets everything a link reported, because its connection broke.
    pub(super) fn mesh_link_down(&self, link: usize) {
        let mut st = self.state();
        st.mesh_routes.retain(|_, v| {
            v.retain(|l| *l != link);
            !v.is_empty()
        });
    }

    /// Local clients win over mesh routes; among duplicate connections the newest wins.
    fn route(&self, dst: &Key) -> Route {
        let st = self.state();
        if let Some(h) = st.clients.get(dst).and_then(|v| v.last()) {
            return Route::Local(h.packets.clone());
        }
        if let Some(&l) = st.mesh_routes.get(dst).and_then(|v| v.last()) {
            return Route::Mesh(st.links[l].clone());
        }
        Route::Unknown
    }

    fn local_route(&self, dst: &Key) -> Option<mpsc::Sender<Delivery>> {
        self.state()
            .clients
            .get(dst)
            .and_then(|v| v.last())
            .map(|h| h.packets.clone())
    }

    /// Tells every watcher about a presence change; a watcher too far behind is dropped.
    fn broadcast(st: &State, f: Frame) {
        for w in st.watchers.values() {
            if w.control.try_send(f.clone()).is_err() {
                tracing::warn!(
                    conn = w.id,
                    "derp watcher queue full; disconnecting it to force a resync"
                );
                w.close.cancel();
            }
        }
    }

    fn register(&self, key: Key, h: ConnHandle) {
        let mut st = self.state();
        let conns = st.clients.entry(key).or_default();
        let first = conns.iter().all(|c| c.is_mesh);
        conns.push(h.clone());
        if first && !h.is_mesh {
            Self::broadcast(&st, present_frame(key, h.addr));
        }
    }

    fn unregister(&self, key: Key, id: u64) {
        let mut st = self.state();
        st.watchers.remove(&id);
        let Some(conns) = st.clients.get_mut(&key) else {
            return;
        };
        let was_regular = conns.iter().any(|c| c.id == id && !c.is_mesh);
        conns.retain(|c| c.id != id);
        let still_regular = conns.iter().any(|c| !c.is_mesh);
        if conns.is_empty() {
            st.clients.remove(&key);
        }
        // Only announce once the last regular connection for the key is gone.
        if was_regular && !still_regular {
            Self::broadcast(
                &st,
                Frame::PeerGone {
                    key,
                    reason: PEER_GONE_DISCONNECTED,
                },
            );
        }
    }

    fn add_watcher(&self, h: &ConnHandle) {
        let mut st = self.state();
        for (key, conns) in &st.clients {
            if let Some(c) = conns.iter().rev().find(|c| !c.is_mesh)
                && h.control.try_send(present_frame(*key, c.addr)).is_err()
            {
                h.close.cancel();
                return;
            }
        }
        st.watchers.insert(h.id, h.clone());
    }

    fn close_peer(&self, key: &Key) {
        if let Some(conns) = self.state().clients.get(key) {
            tracing::info!(peer = %short(key), n = conns.len(), "derp mesh peer asked to close client");
            for c in conns {
                c.close.cancel();
            }
        }
    }

    /// Handles `GET /derp`: answers 101 and serves the upgraded connection on the tracker.
    ///
    /// `Derp-Fast-Start: 1` asks the server to skip the HTTP response. Go clients send it only
    /// when the TLS chain carried the server's DERP meta-certificate, which hsd never serves,
    /// and hyper cannot suppress the 101; so such requests still get a 101 (logged).
    pub async fn handle_upgrade(self: &Arc<Self>, mut req: Request) -> Response {
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default();
        if upgrade != "derp" {
            // Includes "websocket": browser (js/wasm) clients are not supported here.
            if !upgrade.is_empty() {
                tracing::debug!(upgrade, "derp: unsupported upgrade protocol");
            }
            return (
                StatusCode::UPGRADE_REQUIRED,
                "DERP requires connection upgrade",
            )
                .into_response();
        }
        if req
            .headers()
            .get("derp-fast-start")
            .is_some_and(|v| v.as_bytes() == b"1")
        {
            tracing::debug!("derp: client requested fast start; sending 101 anyway");
        }
        if self.stop.is_cancelled() {
            return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
        }
        let remote = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let server = self.clone();
        self.tasks.spawn(async move {
            let upgraded = tokio::select! {
                _ = server.stop.cancelled() => return,
                r = on_upgrade => r,
            };
            match upgraded {
                Ok(io) => server.serve_conn(TokioIo::new(io), remote).await,
                Err(error) => tracing::debug!(%error, "derp: http upgrade failed"),
            }
        });
        let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let h = resp.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("DERP"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert("Derp-Version", HeaderValue::from(PROTOCOL_VERSION));
        h.insert(
            "Derp-Public-Key",
            HeaderValue::from_str(&hex::encode(self.public)).expect("hex is a valid header"),
        );
        resp
    }

    /// Serves one DERP connection (any byte stream that has finished the HTTP upgrade) until
    /// it fails, the client leaves, a mesh peer closes it, or the server stops.
    pub async fn serve_conn<IO>(self: Arc<Self>, io: IO, remote: Option<SocketAddr>)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(io);
        let mut r = BufReader::with_capacity(CONN_BUFFER_BYTES, r);
        let mut w = BufWriter::with_capacity(CONN_BUFFER_BYTES, w);

        let login = tokio::select! {
            _ = self.stop.cancelled() => return,
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.login(&mut r, &mut w)) => {
                r.unwrap_or(Err(ConnError::HandshakeTimeout))
            }
        };
        let (key, info) = match login {
            Ok(v) => v,
            Err(error) => {
                tracing::debug!(%error, ?remote, "derp login failed");
                return;
            }
        };
        let is_mesh = match (&self.mesh_key, &info.mesh_key) {
            (Some(ours), Some(theirs)) => {
                let ok = hex::decode(theirs).is_ok_and(|t| ct_eq(&t, ours));
                if !ok {
                    tracing::warn!(client = %short(&key), ?remote, "derp client sent a wrong mesh key");
                }
                ok
            }
            _ => false,
        };
        if is_mesh
            && let Some(verify) = self.mesh_verifier.get()
            && !verify(&key)
        {
            tracing::warn!(peer = %short(&key), ?remote, "derp mesh peer refused: it holds the mesh key, but its DERP key is no current member's");
            return;
        }
        if !is_mesh
            && let Some(limit) = self.connect_limit.get()
            && !limit.allow(&key)
        {
            tracing::info!(client = %short(&key), ?remote, "derp client refused: reconnecting too often (limits.derp_connects_per_minute)");
            return;
        }
        if !is_mesh
            && let Some(verify) = self.verifier.get()
            && !verify(&key)
        {
            tracing::info!(client = %short(&key), ?remote, "derp client refused: not a valid node key");
            return;
        }

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (ptx, prx) = mpsc::channel(PACKET_QUEUE);
        let (ctx, crx) = mpsc::channel(if is_mesh {
            MESH_CONTROL_QUEUE
        } else {
            CONTROL_QUEUE
        });
        let close = self.stop.child_token();
        let handle = ConnHandle {
            id,
            is_mesh,
            addr: remote,
            packets: ptx,
            control: ctx,
            close: close.clone(),
        };
        tracing::debug!(client = %short(&key), ?remote, is_mesh, "derp client connected");
        self.register(key, handle.clone());

        let result = tokio::select! {
            r = self.read_loop(&mut r, key, &handle) => r,
            r = self.write_loop(&mut w, prx, crx, &close) => r,
        };
        self.unregister(key, id);
        match result {
            Ok(()) => tracing::debug!(client = %short(&key), "derp client disconnected"),
            Err(error) => tracing::debug!(client = %short(&key), %error, "derp client dropped"),
        }
    }

    /// Sends the server key, opens the client's sealed info, and answers with server info.
    async fn login<R, W>(&self, r: &mut R, w: &mut W) -> Result<(Key, ClientInfo), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        frame::write_frame(w, &Frame::ServerKey { key: self.public }).await?;
        let (ty, payload) = frame::read_raw(r, MAX_CLIENT_INFO_LEN).await?;
        if ty != FRAME_CLIENT_INFO {
            return Err(ConnError::NotClientInfo(ty));
        }
        let Frame::ClientInfo { key, sealed } = Frame::decode(ty, payload)? else {
            return Err(ConnError::NotClientInfo(ty));
        };
        let msg = frame::open(&self.private, &key, &sealed).map_err(ConnError::ClientInfo)?;
        let info: ClientInfo =
            serde_json::from_slice(&msg).map_err(|e| ConnError::ClientInfo(FrameError::Json(e)))?;
        let reply = serde_json::to_vec(&ServerInfo {
            version: PROTOCOL_VERSION,
            ..Default::default()
        })
        .map_err(FrameError::from)?;
        frame::write_frame(
            w,
            &Frame::ServerInfo {
                sealed: frame::seal(&self.private, &key, &reply),
            },
        )
        .await?;
        Ok((key, info))
    }

    /// Reads client frames and acts on them. Returns Ok on clean EOF.
    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        r: &mut R,
        me: Key,
        h: &ConnHandle,
    ) -> Result<(), ConnError> {
        loop {
            let frame = match frame::read_frame(r, MAX_FRAME_LEN).await {
                Ok(f) => f,
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            match frame {
                Frame::SendPacket { dst, data } => match self.route(&dst) {
                    // A full queue means the receiver is slow; drop like a congested link would.
                    Route::Local(tx) => {
                        if tx.try_send((me, data)).is_ok() {
                            self.relayed_local.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Route::Mesh(link) => {
                        self.forwarded_to_mesh.fetch_add(1, Ordering::Relaxed);
                        link.forward(Forward { src: me, dst, data })
                    }
                    Route::Unknown => {
                        let _ = h.control.try_send(Frame::PeerGone {
                            key: dst,
                            reason: PEER_GONE_NOT_HERE,
                        });
                    }
                },
                Frame::ForwardPacket { src, dst, data } if h.is_mesh => {
                    match self.local_route(&dst) {
                        // Never re-forward: a packet crosses the mesh at most once.
                        Some(tx) => {
                            if tx.try_send((src, data)).is_ok() {
                                self.relayed_local.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None => {
                            let _ = h.control.try_send(Frame::PeerGone {
                                key: dst,
                                reason: PEER_GONE_NOT_HERE,
                            });
                        }
                    }
                }
                Frame::WatchConns if h.is_mesh => self.add_watcher(h),
                Frame::ClosePeer { key } if h.is_mesh => self.close_peer(&key),
                Frame::ForwardPacket { .. } | Frame::WatchConns | Frame::ClosePeer { .. } => {
                    tracing::debug!(client = %short(&me), "derp: ignoring mesh-only frame from non-mesh client");
                }
                Frame::Ping(d) => {
                    // Pinging faster than we answer just loses pongs.
                    let _ = h.control.try_send(Frame::Pong(d));
                }
                // NotePreferred, KeepAlive, Pong, unknown and server-only frames need no action.
                _ => {}
            }
        }
    }

    /// Writes queued packets and control frames, batching into one flush, plus keepalives.
    /// On server stop, tells the client to reconnect elsewhere-or-later before closing.
    async fn write_loop<W: AsyncWrite + Unpin>(
        &self,
        w: &mut BufWriter<W>,
        mut packets: mpsc::Receiver<Delivery>,
        mut control: mpsc::Receiver<Frame>,
        close: &CancellationToken,
    ) -> Result<(), ConnError> {
        let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..5000));
        let period = KEEP_ALIVE + jitter;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                _ = close.cancelled() => {
                    if self.stop.is_cancelled() {
                        let f = Frame::Restarting { reconnect_in_ms: RESTART_RECONNECT_IN_MS, try_for_ms: RESTART_TRY_FOR_MS };
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            w.write_all(&f.encode()).await?;
                            w.flush().await?;
                            w.shutdown().await
                        }).await;
                    }
                    return Ok(());
                }
                Some(f) = control.recv() => write_buf(w, &f).await?,
                Some((src, data)) = packets.recv() => write_packet(w, &src, &data).await?,
                _ = keepalive.tick() => write_buf(w, &Frame::KeepAlive).await?,
            }
            // Drain whatever else is ready, then flush once.
            loop {
                if let Ok(f) = control.try_recv() {
                    write_buf(w, &f).await?;
                } else if let Ok((src, data)) = packets.try_recv() {
                    write_packet(w, &src, &data).await?;
                } else {
                    break;
                }
            }
            match tokio::time::timeout(WRITE_TIMEOUT, w.flush()).await {
                Ok(r) => r.map_err(FrameError::from)?,
                Err(_) => return Err(ConnError::WriteTimeout(WRITE_TIMEOUT)),
            }
        }
    }
}

fn present_frame(key: Key, addr: Option<SocketAddr>) -> Frame {
    // Upstream always sends ip:port (zero when unknown) and flags.
    let addr = addr.or(Some(SocketAddr::from(([0u8; 16], 0))));
    Frame::PeerPresent {
        key,
        addr,
        flags: PEER_PRESENT_IS_REGULAR,
    }
}

async fn write_buf<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    f: &Frame,
) -> Result<(), ConnError> {
    timed_write(w, &f.encode()).await
}

/// RecvPacket without building an intermediate Frame (the hot path).
async fn write_packet<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    src: &Key,
    data: &[u8],
) -> Result<(), ConnError> {
    let mut hdr = [0u8; 5 + KEY_LEN];
    hdr[0] = frame::FRAME_RECV_PACKET;
    hdr[1..5].copy_from_slice(&((KEY_LEN + data.len()) as u32).to_be_bytes());
    hdr[5..].copy_from_slice(src);
    timed_write(w, &hdr).await?;
    timed_write(w, data).await
}

async fn timed_write<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    b: &[u8],
) -> Result<(), ConnError> {
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(b)).await {
        Ok(r) => r.map_err(|e| ConnError::Frame(e.into())),
        Err(_) => Err(ConnError::WriteTimeout(WRITE_TIMEOUT)),
    }
}

/// `/derp/probe` and `/derp/latency-check`: HTTP latency probe for clients without UDP.
pub async fn probe_handler(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        ([(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")], "").into_response()
    } else {
        (StatusCode::METHOD_NOT_ALLOWED, "bogus probe method").into_response()
    }
}

/// `/generate_204`: captive-portal check. Echoes a well-formed `X-Tailscale-Challenge` as
/// `X-Tailscale-Response: response <challenge>` so clients know no portal rewrote the reply.
pub async fn generate_204_handler(headers: HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    if let Some(challenge) = headers
        .get("X-Tailscale-Challenge")
        .and_then(|v| v.to_str().ok())
    {
        let ok = challenge.len() <= 64
            && challenge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if ok && let Ok(v) = HeaderValue::from_str(&format!("response {challenge}")) {
            h.insert("X-Tailscale-Response", v);
        }
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate, no-transform, max-age=0"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::super::client::DerpClient;
    use super::*;
    use axum::Router;
    use axum::extract::State;
    use axum::routing::{any, get};

    const T: Duration = Duration::from_secs(10);

    async fn start(
        mesh_key: Option<Key>,
        stop: &CancellationToken,
        tasks: &TaskTracker,
    ) -> (Arc<DerpServer>, String) {
        let private: Key = rand::random();
        let derp = DerpServer::new(private, mesh_key, stop.clone(), tasks.clone());
        let app =
            Router::new()
                .route(
                    "/derp",
                    get(|State(s): State<Arc<DerpServer>>, req| async move {
                        s.handle_upgrade(req).await
                    }),
                )
                .route("/derp/probe", any(probe_handler))
                .route("/generate_204", get(generate_204_handler))
                .with_state(derp.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop2 = stop.clone();
        tasks.spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stop2.cancelled().await })
            .await
            .unwrap();
        });
        (derp, format!("http://{addr}/derp"))
    }

    /// Next packet, skipping keepalives and presence frames.
    async fn next_packet(c: &mut DerpClient) -> (Key, Vec<u8>) {
        loop {
            match tokio::time::timeout(T, c.recv())
                .await
                .expect("timeout")
                .expect("recv")
            {
                Frame::RecvPacket { src, data } => return (src, data),
                _ => continue,
            }
        }
    }

    #[tokio::test]
    async fn only_verified_client_keys_are_served() {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (derp, url) = start(None, &stop, &tasks).await;
        let known: Key = rand::random();
        let known_public = frame::public_key(&known);
        derp.set_client_verifier(Box::new(move |k| *k == known_public));
        let mut stranger = DerpClient::connect(&url, rand::random(), None)
            .await
            .unwrap();
        // The stranger's connection is closed right after login: reads end with an error.
        let ended = tokio::time::timeout(T, async {
            loop {
                if stranger.recv().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "an unregistered key is disconnected");
        let _member = DerpClient::connect(&url, known, None).await.unwrap();
        for _ in 0..100 {
            if derp.connected_clients() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            derp.connected_clients(),
            1,
            "only the registered key is connected"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn relays_between_local_clients() {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (derp, url) = start(None, &stop, &tasks).await;
        let (ka, kb): (Key, Key) = (rand::random(), rand::random());
        let mut a = DerpClient::connect(&url, ka, None).await.unwrap();
        let mut b = DerpClient::connect(&url, kb, None).await.unwrap();
        assert_eq!(a.server_public_key(), derp.public_key());
        // Registration happens right after ServerInfo; give the server a moment.
        for _ in 0..100 {
            if derp.connected_clients() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(derp.connected_clients(), 2);

        a.send(b.public_key(), b"hello b").await.unwrap();
        let (src, data) = next_packet(&mut b).await;
        assert_eq!((src, data.as_slice()), (a.public_key(), &b"hello b"[..]));

        // Unknown destination → PeerGone(not here).
        let nobody: Key = [3; 32];
        a.send(nobody, b"x").await.unwrap();
        // Ping → Pong.
        a.write(&Frame::Ping([1; 8])).await.unwrap();
        let mut saw_gone = false;
        let mut saw_pong = false;
        while !(saw_gone && saw_pong) {
            match tokio::time::timeout(T, a.recv()).await.unwrap().unwrap() {
                Frame::PeerGone { key, reason } => {
                    assert_eq!((key, reason), (nobody, PEER_GONE_NOT_HERE));
                    saw_gone = true;
                }
                Frame::Pong(d) => {
                    assert_eq!(d, [1; 8]);
                    saw_pong = true;
                }
                _ => {}
            }
        }

        // Mesh-only frames from a regular client are ignored, not obeyed.
        a.forward([9; 32], b.public_key(), b"spoof").await.unwrap();
        a.send(b.public_key(), b"after").await.unwrap();
        let (_, data) = next_packet(&mut b).await;
        assert_eq!(data, b"after");

        // A malformed frame disconnects only that client; unknown frame types are skipped.
        a.write(&Frame::Unknown {
            ty: 0x7e,
            payload: vec![],
        })
        .await
        .unwrap();
        let (mut ar, mut aw) = a.split();
        aw.write(&Frame::Unknown {
            ty: frame::FRAME_SEND_PACKET,
            payload: vec![0; 10],
        })
        .await
        .unwrap();
        assert!(
            tokio::time::timeout(T, async {
                loop {
                    if ar.recv().await.is_err() {
                        break;
                    }
                }
            })
            .await
            .is_ok()
        );
        b.send(b.public_key(), b"self").await.unwrap();
        let (_, data) = next_packet(&mut b).await;
        assert_eq!(data, b"self");

        // Shutdown: clients are told the server is restarting.
        stop.cancel();
        let mut restarting = false;
        while let Ok(Ok(f)) = tokio::time::timeout(T, b.recv()).await {
            if matches!(f, Frame::Restarting { .. }) {
                restarting = true;
            }
        }
        assert!(restarting);
        tasks.close();
        tokio::time::timeout(T, tasks.wait()).await.unwrap();
    }

    #[tokio::test]
    async fn http_handlers() {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (_derp, url) = start(None, &stop, &tasks).await;
        let base = url
            .trim_end_matches("/derp")
            .trim_start_matches("http://")
            .to_string();
        let get = |path: &str, extra: &str| {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
            let base = base.clone();
            async move {
                use tokio::io::AsyncReadExt;
                let mut s = tokio::net::TcpStream::connect(base).await.unwrap();
                s.write_all(req.as_bytes()).await.unwrap();
                // Read only the response head: after a 101 the DERP server key frame follows.
                let mut out = Vec::new();
                let mut buf = [0u8; 1024];
                while !out.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
                String::from_utf8_lossy(&out).into_owned()
            }
        };
        assert!(get("/derp/probe", "").await.starts_with("HTTP/1.1 200"));
        let r = get("/generate_204", "X-Tailscale-Challenge: abc123\r\n").await;
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("x-tailscale-response: response abc123"),
            "{r}"
        );
        assert!(get("/derp", "").await.starts_with("HTTP/1.1 426"));
        assert!(
            get("/derp", "Upgrade: websocket\r\nConnection: Upgrade\r\n")
                .await
                .starts_with("HTTP/1.1 426")
        );
        let r = get("/derp", "Upgrade: DERP\r\nConnection: Upgrade\r\n").await;
        assert!(r.starts_with("HTTP/1.1 101"), "{r}");
        assert!(r.to_ascii_lowercase().contains("derp-version: 2"), "{r}");
        stop.cancel();
        tasks.close();
        tokio::time::timeout(T, tasks.wait()).await.unwrap();
    }

    /// A mesh peer watching a relay with more clients than a client's control queue holds
    /// gets every one of them (the mesh used to break past 4,096 clients per member).
    #[tokio::test]
    async fn a_mesh_watcher_gets_a_large_client_list() {
        const CLIENTS: usize = CONTROL_QUEUE + 1000;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mesh: Key = rand::random();
        let (server, url) = start(Some(mesh), &stop, &tasks).await;
        let mut keep = Vec::new();
        for i in 0..CLIENTS {
            let (packets, prx) = mpsc::channel(1);
            let (control, crx) = mpsc::channel(1);
            keep.push((prx, crx));
            let key: Key = rand::random();
            server.register(
                key,
                ConnHandle {
                    id: 1_000_000 + i as u64,
                    is_mesh: false,
                    addr: None,
                    packets,
                    control,
                    close: CancellationToken::new(),
                },
            );
        }
        let mut watcher = DerpClient::connect(&url, rand::random(), Some(mesh))
            .await
            .unwrap();
        watcher.watch_conns().await.unwrap();
        let mut present = 0;
        tokio::time::timeout(T, async {
            while present < CLIENTS {
                match watcher.recv().await.expect("the watcher stays connected") {
                    Frame::PeerPresent { .. } => present += 1,
                    _ => continue,
                }
            }
        })
        .await
        .expect("every client announced");
        stop.cancel();
        tasks.close();
        tokio::time::timeout(T, tasks.wait()).await.unwrap();
    }

    #[tokio::test]
    async fn mesh_forwards_between_members() {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mesh: Key = rand::random();
        let (s1, url1) = start(Some(mesh), &stop, &tasks).await;
        let (s2, url2) = start(Some(mesh), &stop, &tasks).await;
        s1.start_mesh(vec![url2.clone()]);
        s2.start_mesh(vec![url1.clone()]);

        let (ka, kb): (Key, Key) = (rand::random(), rand::random());
        let mut a = DerpClient::connect(&url1, ka, None).await.unwrap();
        let mut b = DerpClient::connect(&url2, kb, None).await.unwrap();
        let b_pub = b.public_key();

        // Wait for the mesh links and B's presence to propagate, then send A→B and B→A.
        let ok = tokio::time::timeout(T, async {
            loop {
                if s1.mesh_peers_connected() == 1 && matches!(s1.route(&b_pub), Route::Mesh(_)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "route to B never appeared on server 1");
        assert_eq!(s2.mesh_peers_connected(), 1);
        // Mesh links are not counted as clients.
        assert_eq!(s1.connected_clients(), 1);

        a.send(b_pub, b"via mesh").await.unwrap();
        let (src, data) = next_packet(&mut b).await;
        assert_eq!((src, data.as_slice()), (a.public_key(), &b"via mesh"[..]));

        tokio::time::timeout(T, async {
            loop {
                if matches!(s2.route(&a.public_key()), Route::Mesh(_)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        b.send(a.public_key(), b"back").await.unwrap();
        let (src, data) = next_packet(&mut a).await;
        assert_eq!((src, data.as_slice()), (b_pub, &b"back"[..]));

        // B leaves: server 1 learns it is gone.
        drop(b);
        tokio::time::timeout(T, async {
            while !matches!(s1.route(&b_pub), Route::Unknown) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();

        // A client with the wrong mesh key gets no mesh powers.
        let mut rogue = DerpClient::connect(&url2, rand::random(), Some([0; 32]))
            .await
            .unwrap();
        rogue.watch_conns().await.unwrap();
        rogue.write(&Frame::Ping([2; 8])).await.unwrap();
        loop {
            match tokio::time::timeout(T, rogue.recv())
                .await
                .unwrap()
                .unwrap()
            {
                Frame::PeerPresent { .. } => panic!("non-mesh client got presence"),
                Frame::Pong(_) => break,
                _ => {}
            }
        }

        stop.cancel();
        tasks.close();
        tokio::time::timeout(T, tasks.wait()).await.unwrap();
    }
}
