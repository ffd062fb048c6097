//! Load generator for one member: N synthetic nodes register over ts2021 (each on its own
//! Noise connection), open streaming map sessions, then one more node joins and we time
//! how long its `PeersChanged` delta takes to reach every open stream. Also prints the
//! member's resident memory before and after.
//!
//! Run: `cargo bench --bench control_load` (env `LOAD_NODES`, default 300; `LOAD_CONCURRENCY`,
//! default 32). Loopback only: the member binds 127.0.0.1 ports chosen by the OS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hsd::config::Config;
use hsd::control::client::{ControlClient, MapStream, keypair};
use hsd::registry::secrets::{self, SecretKind};
use hsd::registry::{Command, DiscoKey, NodeKey};
use hsd::server::Server;

const T: Duration = Duration::from_secs(60);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Node {
    _client: ControlClient,
    stream: MapStream,
}

async fn join(addr: Arc<String>, key: Arc<String>, i: usize) -> Node {
    let (machine, _) = keypair();
    let node_key = NodeKey(keypair().1);
    let mut client = ControlClient::connect(&addr, &machine)
        .await
        .expect("connect");
    let (status, resp) = client
        .register(&node_key, &key, &format!("load{i}"))
        .await
        .expect("register");
    assert_eq!(status, 200, "{resp}");
    let mut stream = client
        .map_stream(
            &node_key,
            &DiscoKey(keypair().1),
            &format!("127.0.0.1:{}", 20000 + i),
        )
        .await
        .expect("map");
    stream.next_update(T).await.expect("first map");
    Node {
        _client: client,
        stream,
    }
}

fn main() {
    let nodes = env_usize("LOAD_NODES", 300);
    let concurrency = env_usize("LOAD_CONCURRENCY", 32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            listen_addr: "127.0.0.1:0".into(),
            grpc_listen_addr: String::new(),
            metrics_listen_addr: String::new(),
            ..Default::default()
        };
        config.derp.server.stun_listen_addr = String::new();
        config.cluster.listen_addr = "127.0.0.1:0".into();
        config.log.level = "warn".into();
        let server = Server::start(config).await.expect("start member");
        let addr = Arc::new(server.addrs().control_addr.to_string());
        let cluster = server.cluster().clone();
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.propose(Command::CreateUser { name: "load".into() }).await.unwrap();
        let secret = secrets::generate(SecretKind::PreAuth);
        cluster
            .propose(Command::CreatePreAuthKey {
                user: "load".into(),
                prefix: secret.prefix.clone(),
                hash: secret.hash,
                reusable: true,
                ephemeral: false,
                expiration: None,
                tags: Vec::new(),
            })
            .await
            .unwrap();
        let key = Arc::new(secret.full);
        let rss_before = rss_mib();

        let t0 = Instant::now();
        let mut joined: Vec<Node> = futures::stream::iter(0..nodes)
            .map(|i| join(addr.clone(), key.clone(), i))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let join_secs = t0.elapsed().as_secs_f64();
        println!(
            "control_load: {nodes} nodes registered and streaming in {join_secs:.2} s ({:.0} joins/s, concurrency {concurrency})",
            nodes as f64 / join_secs
        );
        // Let the burst of PeersChanged from the joins drain before timing one change.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for n in joined.iter_mut() {
            while n.stream.next(Duration::from_millis(50)).await.is_ok() {}
        }

        let t1 = Instant::now();
        let _late = join(addr.clone(), key.clone(), nodes).await;
        let waits = joined.iter_mut().map(|n| async {
            loop {
                let v = n.stream.next_update(T).await.expect("delta");
                if v.get("PeersChanged").is_some() {
                    return t1.elapsed();
                }
            }
        });
        let mut lat: Vec<Duration> = futures::future::join_all(waits).await;
        lat.sort();
        println!(
            "control_load: one join reached all {nodes} streams: p50 {:?}, p99 {:?}, max {:?}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat[lat.len() - 1]
        );
        println!(
            "control_load: resident memory {rss_before:.0} MiB before, {:.0} MiB with {nodes} streams (this process: member + load clients)",
            rss_mib()
        );
        drop(joined);
        server.shutdown().await;
    });
}
