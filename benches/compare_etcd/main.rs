//! hsd and etcd side by side, behind `benches/compare-etcd`: one driver, one load shape.
//! Both are 3-member clusters on loopback in the same namespace; the driver keeps the same
//! number of writes in flight over gRPC against each (spread over all three members), each
//! write carrying the same value size — an etcd `Put` of a fresh key, and for hsd a real
//! registry mutation: a new pre-auth key whose tags hold the value — for the same time.
//! Then it kills each leader with SIGKILL and measures how long until a write is
//! acknowledged again.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hsd::cli::connect::{self, Target};
use hsd::proto::admin as pb;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// hsd's members.json (cluster/up).
    #[arg(long)]
    members_json: PathBuf,
    /// Unused (the harness creates it); hsd is driven through its admin API.
    #[arg(long)]
    auth_key: String,
    /// An hsd API key for the admin gRPC port.
    #[arg(long)]
    api_key: String,
    /// etcd client URLs, comma-separated.
    #[arg(long)]
    etcd: String,
    /// etcd data dirs' parent: member i's pid is in ETCD_DIR/e<i>/pid.
    #[arg(long)]
    etcd_dir: PathBuf,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Drive hsd only, for this many seconds (profiling); prints its figures.
    #[arg(long)]
    hsd_only: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

/// etcd's KV `Put`, the fields this driver uses (etcd's rpc.proto, package etcdserverpb).
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    cluster_id: u64,
    #[prost(uint64, tag = "2")]
    member_id: u64,
    #[prost(int64, tag = "3")]
    revision: i64,
    #[prost(uint64, tag = "4")]
    raft_term: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(uint64, tag = "4")]
    leader: u64,
}

async fn unary<Req, Resp>(
    channel: Channel,
    path: &'static str,
    req: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic::codec::ProstCodec::<Req, Resp>::default();
    grpc.unary(
        tonic::Request::new(req),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(|r| r.into_inner())
}

/// One write against one of the systems, through member `i`.
#[derive(Clone)]
enum System {
    Etcd(Vec<Channel>),
    Hsd(Vec<connect::Client>),
}

impl System {
    fn members(&self) -> usize {
        match self {
            System::Etcd(c) => c.len(),
            System::Hsd(c) => c.len(),
        }
    }

    async fn write(&self, member: usize, n: u64, value: &str) -> bool {
        match self {
            System::Etcd(channels) => {
                let req = PutRequest {
                    key: format!("/bench/{n}").into_bytes(),
                    value: value.as_bytes().to_vec(),
                };
                unary::<_, PutResponse>(channels[member].clone(), "/etcdserverpb.KV/Put", req)
                    .await
                    .is_ok()
            }
            System::Hsd(clients) => {
                let mut client = clients[member].clone();
                let req = pb::CreatePreAuthKeyRequest {
                    user: "bench".into(),
                    tags: value_tags(value, n),
                    ..Default::default()
                };
                client.create_pre_auth_key(req).await.is_ok()
            }
        }
    }
}

/// `value` as tags (labels of at most 63 characters), the first one unique to write `n`.
fn value_tags(value: &str, n: u64) -> Vec<String> {
    let mut tags = vec![format!("tag:n{n}")];
    let mut rest = value;
    while !rest.is_empty() {
        let take = rest.len().min(59);
        tags.push(format!("tag:{}", &rest[..take]));
        rest = &rest[take..];
    }
    tags
}

struct Run {
    writes_per_s: f64,
    p99_ms: f64,
    p50_ms: f64,
}

/// `concurrency` writers for `dur`; completed writes per second and latency percentiles.
async fn throughput(system: &System, concurrency: usize, value: &str, dur: Duration) -> Run {
    let next = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + dur;
    let tasks: Vec<_> = (0..concurrency)
        .map(|w| {
            let (system, next, value) = (system.clone(), next.clone(), value.to_string());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < stop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    if system.write(w % system.members(), n, &value).await {
                        latencies.push(started.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize)
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    Run {
        writes_per_s: all.len() as f64 / dur.as_secs_f64(),
        p99_ms: pct(0.99),
        p50_ms: pct(0.50),
    }
}

/// Kills the leader (pid from `pid_of`) while writers keep writing through every member;
/// seconds from the kill until a write begun after it is acknowledged.
async fn failover(system: &System, leader_pid: u32, value: &str) -> f64 {
    let done = Arc::new(AtomicBool::new(false));
    let resumed = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let killed_at = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &leader_pid.to_string()])
        .status();
    let writers: Vec<_> = (0..system.members())
        .map(|m| {
            let (system, done, resumed, value) = (
                system.clone(),
                done.clone(),
                resumed.clone(),
                value.to_string(),
            );
            tokio::spawn(async move {
                let mut n = 1_000_000_000 + m as u64 * 1_000_000;
                while !done.load(Ordering::SeqCst) && killed_at.elapsed() < Duration::from_secs(30)
                {
                    n += 1;
                    let ok =
                        tokio::time::timeout(Duration::from_secs(2), system.write(m, n, &value))
                            .await
                            .unwrap_or(false);
                    if ok {
                        let mut r = resumed.lock().unwrap();
                        if r.is_none() {
                            *r = Some(killed_at.elapsed());
                        }
                        done.store(true, Ordering::SeqCst);
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    for w in writers {
        let _ = w.await;
    }
    let r = *resumed.lock().unwrap();
    r.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
}

async fn etcd_leader_pid(channels: &[Channel], etcd_dir: &std::path::Path) -> anyhow::Result<u32> {
    for (i, ch) in channels.iter().enumerate() {
        let Ok(status) = unary::<_, StatusResponse>(
            ch.clone(),
            "/etcdserverpb.Maintenance/Status",
            StatusRequest {},
        )
        .await
        else {
            continue;
        };
        let me = status.header.map(|h| h.member_id).unwrap_or_default();
        if status.leader == me {
            let pid = std::fs::read_to_string(etcd_dir.join(format!("e{}/pid", i + 1)))?;
            return Ok(pid.trim().parse()?);
        }
    }
    anyhow::bail!("no etcd leader found")
}

async fn hsd_leader_pid(
    clients: &[connect::Client],
    members: &serde_json::Value,
) -> anyhow::Result<u32> {
    let mut client = clients[0].clone();
    let status = client
        .cluster_status(pb::ClusterStatusRequest { local: true })
        .await?
        .into_inner();
    let leader = status.leader.context("no hsd leader")?;
    let dir = members
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == leader))
        .and_then(|m| m["data_dir"].as_str())
        .context("leader's data dir")?;
    Ok(std::fs::read_to_string(PathBuf::from(dir).join("hsd.pid"))?
        .trim()
        .parse()?)
}

fn ratio(a: f64, b: f64) -> f64 {
    ((a / b) * 100.0).round() / 100.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let members: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&args.members_json)?)?;
        let mut hsd_clients = Vec::new();
        for m in members.as_array().context("members.json")? {
            let target = Target::Address {
                address: m["grpc_addr"].as_str().unwrap_or_default().to_string(),
                api_key: Some(args.api_key.clone()),
            };
            hsd_clients.push(
                connect::connect(&target, Duration::from_secs(5))
                    .await
                    .map_err(|e| anyhow::anyhow!("hsd admin: {e}"))?,
            );
        }
        let mut etcd_channels = Vec::new();
        for url in args.etcd.split(',') {
            etcd_channels.push(Endpoint::from_shared(url.to_string())?.connect_lazy());
        }
        let value = "v".repeat(args.value_bytes);
        let dur = Duration::from_secs(args.seconds);
        if args.hsd_only {
            let run = throughput(&System::Hsd(hsd_clients.clone()), args.concurrency, &value, dur).await;
            println!(
                "hsd: {:.0} writes/s, p50 {:.1} ms, p99 {:.1} ms",
                run.writes_per_s, run.p50_ms, run.p99_ms
            );
            return anyhow::Ok(());
        }
        let etcd = System::Etcd(etcd_channels.clone());
        let hsd = System::Hsd(hsd_clients.clone());
        // A short warm-up each (connections, caches), then the measured runs.
        throughput(&etcd, args.concurrency, &value, Duration::from_secs(1)).await;
        throughput(&hsd, args.concurrency, &value, Duration::from_secs(1)).await;
        let etcd_run = throughput(&etcd, args.concurrency, &value, dur).await;
        let hsd_run = throughput(&hsd, args.concurrency, &value, dur).await;
        eprintln!(
            "writes/s: hsd {:.0} (p50 {:.1} ms, p99 {:.1} ms), etcd {:.0} (p50 {:.1} ms, p99 {:.1} ms)",
            hsd_run.writes_per_s, hsd_run.p50_ms, hsd_run.p99_ms,
            etcd_run.writes_per_s, etcd_run.p50_ms, etcd_run.p99_ms
        );
        let etcd_failover = failover(&etcd, etcd_leader_pid(&etcd_channels, &args.etcd_dir).await?, &value).await;
        let hsd_failover = failover(&hsd, hsd_leader_pid(&hsd_clients, &members).await?, &value).await;
        let report = json!({
            "writes_per_s": {
                "hsd": hsd_run.writes_per_s.round(),
                "etcd": etcd_run.writes_per_s.round(),
                "ratio": ratio(hsd_run.writes_per_s, etcd_run.writes_per_s),
            },
            "write_p99_ms": {
                "hsd": (hsd_run.p99_ms * 10.0).round() / 10.0,
                "etcd": (etcd_run.p99_ms * 10.0).round() / 10.0,
                "ratio": ratio(hsd_run.p99_ms, etcd_run.p99_ms),
            },
            "failover_s": {
                "hsd": (hsd_failover * 1000.0).round() / 1000.0,
                "etcd": (etcd_failover * 1000.0).round() / 1000.0,
                "ratio": ratio(hsd_failover, etcd_failover),
            },
            "load": {
                "concurrency": args.concurrency,
                "value_bytes": args.value_bytes,
                "seconds": args.seconds,
            },
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        }
        anyhow::Ok(())
    })?;
    std::process::exit(0);
}
