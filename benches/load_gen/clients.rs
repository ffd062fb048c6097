//! The simulated clients: each a machine key and node key, one Noise connection to its
//! member, a zstd map stream read by its own task, and a redial to another member (as a
//! real client follows its dial plan) when its member goes away.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use hsd::control::client::{ControlClient, MapStream, fetch_server_key, keypair};
use hsd::derp::DerpClient;
use hsd::registry::{DiscoKey, NodeKey};

use super::cluster::LocalCluster;

/// How long one step (connect, register, first map) may take before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// A stream silent for longer than the server's keep-alive period plus slack is dead.
const STREAM_SILENCE: Duration = Duration::from_secs(130);
/// A real client cancels a map poll that brought no frame for this long and starts another
/// (tailscale's `controlclient` watchdog).
const MAP_WATCHDOG: Duration = Duration::from_secs(120);
/// How long a real client's Noise dial may take without a dial plan.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SimClient {
    pub idx: usize,
    machine: [u8; 32],
    /// Where the client's dial plan puts each surviving member (`dial_seed`).
    dial_seed: u64,
    node_private: [u8; 32],
    pub node_key: NodeKey,
    disco: DiscoKey,
    /// The member (index) it streams from now.
    pub home: AtomicUsize,
    conn: tokio::sync::Mutex<Option<ControlClient>>,
}

impl SimClient {
    fn new(idx: usize, members: usize) -> SimClient {
        let (machine, machine_public) = keypair();
        let (node_private, node_public) = keypair();
        SimClient {
            idx,
            machine,
            dial_seed: hsd::derp::region::dial_seed(&machine_public),
            node_private,
            node_key: NodeKey(node_public),
            disco: DiscoKey(keypair().1),
            home: AtomicUsize::new(idx % members),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    fn hostname(&self) -> String {
        format!("load{}", self.idx)
    }
}

/// What to look for in the clients' streams while a probe runs.
#[derive(Clone, Debug)]
pub enum Target {
    /// A node joined: its key appears.
    Join { key: String },
    /// A node's endpoints changed to include `marker`.
    Endpoint { id: u64, marker: String },
    /// A node went offline.
    Offline { id: u64 },
    /// A node was deleted.
    Delete { id: u64 },
}

impl Target {
    /// The kind of write, as the report names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Join { .. } => "join",
            Target::Endpoint { .. } => "endpoints",
            Target::Offline { .. } => "offline",
            Target::Delete { .. } => "delete",
        }
    }
}

/// One probe: when each client first saw its target.
pub struct Probe {
    pub target: Target,
    pub started: Instant,
    seen: Vec<AtomicBool>,
    pub count: AtomicUsize,
    pub latencies: Mutex<Vec<Duration>>,
}

impl Probe {
    pub fn new(target: Target, clients: usize) -> Probe {
        Probe {
            target,
            started: Instant::now(),
            seen: (0..clients).map(|_| AtomicBool::new(false)).collect(),
            count: AtomicUsize::new(0),
            latencies: Mutex::default(),
        }
    }

    fn saw(&self, idx: usize) {
        if !self.seen[idx].swap(true, Ordering::SeqCst) {
            let elapsed = self.started.elapsed();
            self.latencies.lock().unwrap().push(elapsed);
            self.count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The clients' view of a member's death: when it died, and when each client that lost
/// its stream streamed again (the first time only).
pub struct Failover {
    pub killed_at: Instant,
    pub restreamed: Mutex<Vec<Duration>>,
    pub counted: Mutex<std::collections::HashSet<usize>>,
}

/// How often a client retries a registration answered 503 (backoff n² × 100 ms).
const REGISTER_ATTEMPTS: u64 = 5;

/// Shared between the fleet and every client task.
#[derive(Default)]
pub struct Events {
    pub frames: AtomicU64,
    /// Map requests refused as "not registered" right after a successful registration.
    pub map_retries: AtomicU64,
    /// Registrations answered 503 (a member could not get the write committed in time).
    pub register_retries: AtomicU64,
    pub streaming: AtomicUsize,
    probe: Mutex<Option<Arc<Probe>>>,
    probing: AtomicBool,
    failover: Mutex<Option<Arc<Failover>>>,
}

impl Events {
    pub fn start_probe(&self, probe: Arc<Probe>) {
        *self.probe.lock().unwrap() = Some(probe);
        self.probing.store(true, Ordering::SeqCst);
    }

    pub fn end_probe(&self) {
        self.probing.store(false, Ordering::SeqCst);
        *self.probe.lock().unwrap() = None;
    }

    pub fn start_failover(&self, failover: Arc<Failover>) {
        *self.failover.lock().unwrap() = Some(failover);
    }

    fn restreamed(&self, idx: usize) {
        let failover = self.failover.lock().unwrap().clone();
        if let Some(f) = failover
            && f.counted.lock().unwrap().insert(idx)
        {
            f.restreamed.lock().unwrap().push(f.killed_at.elapsed());
        }
    }

    fn check(&self, client: &SimClient, stream: &MapStream, raw: &[u8]) {
        if !self.probing.load(Ordering::Relaxed) {
            return;
        }
        let Some(probe) = self.probe.lock().unwrap().clone() else {
            return;
        };
        let Ok(json) = stream.decode(raw) else { return };
        let Ok(msg) = serde_json::from_slice::<Seen>(&json) else {
            return;
        };
        if msg.shows(&probe.target) {
            probe.saw(client.idx);
        }
    }
}

/// What a probe looks for in a map response; everything else (packet filters, DNS, …) is
/// skipped without being built, so checking ten thousand responses stays cheap next to
/// the members that send them. (Every field may be absent or `null`.)
#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct Seen {
    peers: Option<Vec<SeenPeer>>,
    peers_changed: Option<Vec<SeenPeer>>,
    peers_changed_patch: Option<Vec<SeenPeer>>,
    peers_removed: Option<Vec<u64>>,
    online_change: Option<std::collections::HashMap<String, bool>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct SeenPeer {
    #[serde(rename = "ID", alias = "NodeID")]
    id: u64,
    #[serde(rename = "Key")]
    key: Option<String>,
    #[serde(rename = "Endpoints")]
    endpoints: Option<Vec<String>>,
    #[serde(rename = "Online")]
    online: Option<bool>,
}

impl Seen {
    /// Whether the response carries the probe's target.
    fn shows(&self, target: &Target) -> bool {
        let peers = || self.peers_changed.iter().chain(&self.peers).flatten();
        let has_marker =
            |p: &SeenPeer, marker: &str| p.endpoints.iter().flatten().any(|e| e == marker);
        match target {
            Target::Join { key } => peers().any(|p| p.key.as_deref() == Some(key)),
            Target::Endpoint { id, marker } => self
                .peers_changed_patch
                .iter()
                .flatten()
                .chain(peers())
                .any(|p| p.id == *id && has_marker(p, marker)),
            Target::Offline { id } => {
                self.online_change
                    .as_ref()
                    .is_some_and(|c| c.get(&id.to_string()) == Some(&false))
                    || peers().any(|p| p.id == *id && p.online == Some(false))
            }
            Target::Delete { id } => {
                self.peers_removed.iter().flatten().any(|r| r == id)
                    || self
                        .peers
                        .as_ref()
                        .is_some_and(|all| !all.iter().any(|p| p.id == *id))
            }
        }
    }
}

pub struct Fleet {
    pub cluster: Arc<LocalCluster>,
    pub server_key: [u8; 32],
    /// The first pre-auth key (probes register with it).
    pub auth_key: String,
    /// Every pre-auth key; client i registers with key i mod their count (one per user).
    auth_keys: Vec<String>,
    pub clients: Vec<Arc<SimClient>>,
    pub events: Arc<Events>,
}

/// Runs `step` for every client, `concurrency` at a time; returns completions per second.
async fn for_each<F, Fut>(
    clients: &[Arc<SimClient>],
    concurrency: usize,
    step: F,
) -> anyhow::Result<f64>
where
    F: Fn(Arc<SimClient>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(clients.iter().cloned())
        .map(|c| async {
            tokio::time::timeout(STEP_TIMEOUT, step(c))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        anyhow::bail!("{failed} of {} clients failed; first: {e:#}", clients.len());
    }
    Ok(clients.len() as f64 / started.elapsed().as_secs_f64())
}

impl Fleet {
    pub async fn new(
        cluster: Arc<LocalCluster>,
        n: usize,
        auth_key: String,
    ) -> anyhow::Result<Fleet> {
        let server_key = fetch_server_key(&cluster.members[0].control_addr)
            .await
            .context("fetching the server key")?;
        let members = cluster.members.len();
        Ok(Fleet {
            clients: (0..n)
                .map(|i| Arc::new(SimClient::new(i, members)))
                .collect(),
            cluster,
            server_key,
            auth_keys: auth_key.split(',').map(str::to_string).collect(),
            auth_key: auth_key.split(',').next().unwrap_or_default().to_string(),
            events: Arc::default(),
        })
    }

    fn addr(&self, member: usize) -> &str {
        &self.cluster.members[member].control_addr
    }

    /// Noise handshakes (and HTTP/2 set-up) for every client; handshakes per second.
    pub async fn connect_all(&self, concurrency: usize) -> anyhow::Result<f64> {
        for_each(&self.clients, concurrency, |c| async move {
            let addr = self.addr(c.home.load(Ordering::SeqCst));
            let conn = ControlClient::connect_with_key(addr, &self.server_key, &c.machine).await?;
            *c.conn.lock().await = Some(conn);
            Ok(())
        })
        .await
    }

    /// Every client registers with the pre-auth key and at once opens its map stream, as a
    /// real client does, so each join reaches the streams of all who joined before it.
    /// Waits for each first netmap; returns joins (registration to first netmap) per second.
    pub async fn join_all(&self, concurrency: usize) -> anyhow::Result<f64> {
        for_each(&self.clients, concurrency, |c| async move {
            let mut conn = c.conn.lock().await.take().context("not connected")?;
            // A member that could not get the write committed in time (its leader busy or
            // being elected) answers 503; a real client retries after a backoff, and so
            // does this one (and it is counted).
            let mut attempt = 0;
            let (status, resp) = loop {
                let auth_key = &self.auth_keys[c.idx % self.auth_keys.len()];
                let (status, resp) = conn.register(&c.node_key, auth_key, &c.hostname()).await?;
                if status != 503 || attempt == REGISTER_ATTEMPTS {
                    break (status, resp);
                }
                attempt += 1;
                self.events.register_retries.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100 * attempt * attempt)).await;
            };
            anyhow::ensure!(
                status == 200 && resp["Error"].as_str().unwrap_or("").is_empty(),
                "register answered {status}: {resp}"
            );
            // A member that answers the map request before it applied the registration says
            // 404; a real client retries, and so does this one (and it is counted).
            let mut stream = loop {
                match conn
                    .map_stream_with(&c.node_key, &c.disco, &endpoint(c.idx), true)
                    .await
                {
                    Ok(stream) => break stream,
                    Err(e) if e.to_string().contains("404") => {
                        self.events.map_retries.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            stream.next_raw(STEP_TIMEOUT).await?;
            self.events.streaming.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(follow(
                c.clone(),
                conn,
                stream,
                self.events.clone(),
                self.cluster.clone(),
                self.server_key,
            ));
            Ok(())
        })
        .await
    }

    /// One DERP connection per client, to its member's relay.
    pub async fn connect_derp(&self, concurrency: usize) -> anyhow::Result<f64> {
        for_each(&self.clients, concurrency, |c| async move {
            let url = format!("http://{}/derp", self.addr(c.home.load(Ordering::SeqCst)));
            let mut derp = DerpClient::connect(&url, c.node_private, None)
                .await
                .map_err(|e| anyhow::anyhow!("derp: {e}"))?;
            tokio::spawn(async move { while derp.recv().await.is_ok() {} });
            Ok(())
        })
        .await
    }

    pub fn streaming(&self) -> usize {
        self.events.streaming.load(Ordering::SeqCst)
    }

    /// Waits until no map message arrived for `quiet` (the join storm's deltas settled),
    /// at most `max`.
    pub async fn settle(&self, quiet: Duration, max: Duration) {
        let deadline = Instant::now() + max;
        let mut last = self.events.frames.load(Ordering::SeqCst);
        while Instant::now() < deadline {
            tokio::time::sleep(quiet).await;
            let now = self.events.frames.load(Ordering::SeqCst);
            if now == last {
                return;
            }
            last = now;
        }
    }
}

fn endpoint(idx: usize) -> String {
    format!(
        "10.{}.{}.{}:41641",
        100 + idx / 65536,
        (idx / 256) % 256,
        idx % 256
    )
}

/// Reads one client's stream; when it breaks, redials the next members in turn.
async fn follow(
    client: Arc<SimClient>,
    conn: ControlClient,
    mut stream: MapStream,
    events: Arc<Events>,
    cluster: Arc<LocalCluster>,
    server_key: [u8; 32],
) {
    // The connection carries the stream: it lives as long as the stream is read.
    let mut _conn = conn;
    loop {
        match stream.next_raw(STREAM_SILENCE).await {
            Ok(raw) => {
                events.frames.fetch_add(1, Ordering::Relaxed);
                events.check(&client, &stream, &raw);
            }
            Err(_) => {
                events.streaming.fetch_sub(1, Ordering::SeqCst);
                (_conn, stream) = redial(&client, &cluster, &server_key).await;
                events.restreamed(client.idx);
                events.streaming.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Dials the other members in the dial plan's order, backing off between failures as a
/// real client does, until one streams.
async fn redial(
    client: &SimClient,
    cluster: &LocalCluster,
    server_key: &[u8; 32],
) -> (ControlClient, MapStream) {
    // The order the server's dial plan gives this machine: its member's others, rotated.
    let home = client.home.load(Ordering::SeqCst);
    let others: Vec<usize> = (0..cluster.members.len()).filter(|i| *i != home).collect();
    let own = hsd::derp::region::url_host(&cluster.members[home].control_addr);
    let order: Vec<usize> = hsd::derp::region::dial_order(&own, &others, client.dial_seed)
        .copied()
        .collect();
    // The broken stream is the first failure.
    let mut failures = 1;
    loop {
        tokio::time::sleep(control_backoff(failures)).await;
        match dial_and_poll(client, cluster, &order, server_key).await {
            Ok((member, pair)) => {
                client.home.store(member, Ordering::SeqCst);
                return pair;
            }
            Err(_) => failures += 1,
        }
    }
}

/// One new Noise dial and map poll, as a real client makes after its stream broke. The
/// dial goes down the plan: a member that refuses falls through to the next within the
/// same dial. The poll sends the same Hostinfo as before and is given up once no frame
/// came for `MAP_WATCHDOG`.
async fn dial_and_poll(
    client: &SimClient,
    cluster: &LocalCluster,
    order: &[usize],
    server_key: &[u8; 32],
) -> anyhow::Result<(usize, (ControlClient, MapStream))> {
    let dial = async {
        let mut refused = anyhow::anyhow!("an empty dial plan");
        for &member in order {
            let addr = &cluster.members[member].control_addr;
            match ControlClient::connect_with_key(addr, server_key, &client.machine).await {
                Ok(conn) => return Ok((member, conn)),
                Err(e) => refused = e.into(),
            }
        }
        Err(refused)
    };
    let (member, mut conn) = tokio::time::timeout(DIAL_TIMEOUT, dial).await??;
    conn.set_hostname(&client.hostname());
    let poll = async {
        let mut stream = conn
            .map_stream_with(&client.node_key, &client.disco, &endpoint(client.idx), true)
            .await?;
        stream.next_raw(MAP_WATCHDOG).await?;
        anyhow::Ok(stream)
    };
    let stream = tokio::time::timeout(MAP_WATCHDOG, poll).await??;
    Ok((member, (conn, stream)))
}

/// A real client's pause after its n-th failure in a row (tailscale's `util/backoff`):
/// n²·10 ms, at most 30 s, times a random factor in [0.5, 1.5).
fn control_backoff(failures: u32) -> Duration {
    let n = u64::from(failures);
    let base = Duration::from_millis(10 * n * n).min(Duration::from_secs(30));
    base.mul_f64(0.5 + rand::random::<f64>())
}
