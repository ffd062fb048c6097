//! DERP relay throughput, behind `benches/derp`: two registered nodes relay 1,400-byte
//! packets (a full-size WireGuard packet) through one member, then through two meshed
//! members, and the same writes go over a raw loopback TCP connection for comparison —
//! all in one run, against a cluster `cluster/up` started in a network namespace.
//!
//! Each side sends one packet per write, as fast as it can, for a fixed time; the figure is
//! what the receiver got (DERP drops packets for a receiver that falls behind, as a
//! congested link would).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hsd::control::client::{ControlClient, fetch_server_key, keypair};
use hsd::derp::DerpClient;
use hsd::derp::frame::Frame;
use hsd::registry::NodeKey;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PACKET_BYTES: usize = 1400;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    members_json: PathBuf,
    #[arg(long)]
    auth_key: String,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, hide = true)]
    bench: bool,
}

/// A registered node's DERP identity.
struct Node {
    private: [u8; 32],
    public: [u8; 32],
}

async fn register(
    addr: &str,
    server_key: &[u8; 32],
    auth_key: &str,
    name: &str,
) -> anyhow::Result<Node> {
    let (private, public) = keypair();
    let mut client = ControlClient::connect_with_key(addr, server_key, &keypair().0).await?;
    let (status, resp) = client.register(&NodeKey(public), auth_key, name).await?;
    anyhow::ensure!(status == 200, "register: {status} {resp}");
    Ok(Node { private, public })
}

/// Relays from `a` (on `from_url`) to `b` (on `to_url`) for `dur`; bits per second received.
async fn relay(
    from_url: &str,
    to_url: &str,
    a: &Node,
    b: &Node,
    dur: Duration,
) -> anyhow::Result<f64> {
    let sender = DerpClient::connect(from_url, a.private, None)
        .await
        .map_err(|e| anyhow::anyhow!("derp {from_url}: {e}"))?;
    let receiver = DerpClient::connect(to_url, b.private, None)
        .await
        .map_err(|e| anyhow::anyhow!("derp {to_url}: {e}"))?;
    // Let the mesh learn where b is before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut sender_rd, mut sender_wr) = sender.split();
    let (mut receiver_rd, _receiver_wr) = receiver.split();
    tokio::spawn(async move { while sender_rd.recv().await.is_ok() {} });
    let received = Arc::new(AtomicU64::new(0));
    let counting = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(frame) = receiver_rd.recv().await {
                if let Frame::RecvPacket { data, .. } = frame {
                    received.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let packet = vec![0x42u8; PACKET_BYTES];
    let started = Instant::now();
    let before = received.load(Ordering::Relaxed);
    while started.elapsed() < dur {
        sender_wr
            .send(b.public, &packet)
            .await
            .map_err(|e| anyhow::anyhow!("send: {e}"))?;
    }
    let bytes = received.load(Ordering::Relaxed) - before;
    let secs = started.elapsed().as_secs_f64();
    counting.abort();
    Ok(bytes as f64 * 8.0 / secs)
}

/// The same writes (a 5-byte header and 1,400 bytes each) over loopback TCP.
async fn loopback_tcp(dur: Duration) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let done = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = conn.read(&mut buf).await?;
                if n == 0 {
                    return anyhow::Ok(());
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    let message = Frame::SendPacket {
        dst: [1; 32],
        data: vec![0x42; PACKET_BYTES],
    }
    .encode();
    let started = Instant::now();
    while started.elapsed() < dur {
        conn.write_all(&message).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let bytes = received.load(Ordering::Relaxed);
    drop(conn);
    let _ = reader.await;
    // Count packet payload only, as the relays' figures do.
    Ok(bytes as f64 * PACKET_BYTES as f64 / message.len() as f64 * 8.0 / secs)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let members: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&args.members_json)?)?;
        let urls: Vec<String> = members
            .as_array()
            .context("members.json")?
            .iter()
            .map(|m| m["control_url"].as_str().unwrap_or_default().to_string())
            .collect();
        anyhow::ensure!(urls.len() >= 2, "the meshed case needs two members");
        let addr = urls[0].trim_start_matches("http://").to_string();
        let server_key = fetch_server_key(&addr).await?;
        let a = register(&addr, &server_key, &args.auth_key, "derp-a").await?;
        let b = register(&addr, &server_key, &args.auth_key, "derp-b").await?;
        let dur = Duration::from_secs(args.seconds);
        let derp = |i: usize| format!("{}/derp", urls[i]);
        let one = relay(&derp(0), &derp(0), &a, &b, dur).await?;
        let meshed = relay(&derp(0), &derp(1), &a, &b, dur).await?;
        let tcp = loopback_tcp(dur).await?;
        let gbit = |bps: f64| (bps / 1e9 * 1000.0).round() / 1000.0;
        let report = json!({
            "gbit_per_s": {
                "one_member": gbit(one),
                "meshed": gbit(meshed),
                "loopback_tcp": gbit(tcp),
            },
            "ratio_to_loopback": {
                "one_member": ((one / tcp) * 100.0).round() / 100.0,
                "meshed": ((meshed / tcp) * 100.0).round() / 100.0,
            },
            "packet_bytes": PACKET_BYTES,
            "seconds_each": args.seconds,
        });
        println!(
            "DERP relay, {PACKET_BYTES}-byte packets: one member {} Gbit/s, meshed {} Gbit/s, loopback TCP {} Gbit/s",
            report["gbit_per_s"]["one_member"],
            report["gbit_per_s"]["meshed"],
            report["gbit_per_s"]["loopback_tcp"]
        );
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        }
        anyhow::Ok(())
    })?;
    std::process::exit(0);
}
