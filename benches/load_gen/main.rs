//! The ts2021 load generator behind `benches/load`: N simulated Tailscale clients against
//! a running local cluster (started by `cluster/up`, in a network namespace the script
//! made). Each client speaks the real protocol — Noise IK, HTTP/2 inside it, register
//! with a pre-auth key, a zstd map stream — and, with `--derp`, holds a DERP connection.
//!
//! Phases, each bounded: handshakes, registrations and first maps (rates); settle; memory;
//! propagation probes (a node joins, changes endpoints, goes offline, is deleted — from the
//! write until every client has the delta); failover (kill -9 of the leader, then of a
//! client-holding follower: how soon writes resume and every client streams again).
//!
//! Run through the script: `benches/load --clients N [--members 3] [--json FILE]`.

mod clients;
mod cluster;
mod probes;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

use clients::Fleet;
use cluster::LocalCluster;
use report::Report;

#[derive(Parser, Debug)]
#[command(about = "ts2021 load generator (run by benches/load)")]
struct Args {
    /// members.json written by cluster/up.
    #[arg(long)]
    members_json: PathBuf,
    /// Reusable pre-auth keys, comma-separated: client i uses key i mod their count.
    #[arg(long)]
    auth_key: String,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Clients connecting, registering or opening streams at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Probes per kind of write.
    #[arg(long, default_value_t = 3)]
    probes: usize,
    /// Also open one DERP connection per client.
    #[arg(long)]
    derp: bool,
    /// Skip the failover phase.
    #[arg(long)]
    no_failover: bool,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let report = runtime.block_on(async {
        tokio::time::timeout_at(deadline.into(), run(&args))
            .await
            .context("the run took longer than --max-seconds")?
    })?;
    report.print();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.json())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // Tens of thousands of tasks: dropping them one by one takes longer than exiting.
    std::process::exit(0);
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let cluster = Arc::new(LocalCluster::load(&args.members_json)?);
    let mut report = Report::new(args.clients, cluster.members.len());
    let cpu_before = cluster.cpu_seconds();
    let rss_before = cluster.rss_kib();

    let fleet = Fleet::new(cluster.clone(), args.clients, args.auth_key.clone()).await?;
    eprintln!(
        "load: {} clients against {} members",
        args.clients,
        cluster.members.len()
    );
    report.handshakes_per_s = fleet.connect_all(args.concurrency).await?;
    eprintln!("load: handshakes {:.0}/s", report.handshakes_per_s);
    report.rss_kib_per_connection =
        cluster.rss_kib().saturating_sub(rss_before) as f64 / args.clients as f64;
    report.registrations_per_s = fleet.join_all(args.concurrency).await?;
    report.joined = fleet.streaming();
    report.map_retries = fleet
        .events
        .map_retries
        .load(std::sync::atomic::Ordering::SeqCst);
    report.register_retries = fleet
        .events
        .register_retries
        .load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "load: {} joined and streaming ({:.0} registrations with first netmap /s)",
        report.joined, report.registrations_per_s
    );
    if args.derp {
        fleet.connect_derp(args.concurrency).await?;
    }
    fleet
        .settle(Duration::from_secs(2), Duration::from_secs(120))
        .await;
    let rss_after = cluster.rss_kib();
    report.rss_kib_per_client = (rss_after.saturating_sub(rss_before)) as f64 / args.clients as f64;
    report.rss_kib_members = rss_after;

    report.propagation = probes::run(&fleet, &cluster, args.probes).await?;
    eprintln!("load: propagation {}", report.propagation.summary());

    if !args.no_failover {
        let failover = probes::failover(&fleet, &cluster).await;
        if let Some(error) = &failover.error {
            eprintln!("load: the failover phase stopped early: {error}");
        }
        report.failover = Some(failover);
    }
    report.cpu_s_by_member = cluster
        .cpu_seconds()
        .iter()
        .zip(cpu_before.iter())
        .map(|(after, before)| after - before)
        .collect();
    Ok(report)
}
