//! Propagation probes and failover.
//!
//! A probe node (not one of the fleet) makes one write at a time — it joins, changes its
//! endpoints, goes offline, is deleted — and every fleet client records when its stream
//! first carried it. Failover kills the leader (writes must resume, its clients must stream
//! from the others), restarts it, then kills a follower that holds clients.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use hsd::control::client::{ControlClient, MapStream, keypair};
use hsd::proto::admin as pb;
use hsd::registry::{DiscoKey, NodeKey};

use super::clients::{Failover, Fleet, Probe, Target};
use super::cluster::LocalCluster;
use super::report::{FailoverReport, Propagation};

/// How long every client has to see one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The node that makes the probed writes.
struct ProbeNode {
    conn: ControlClient,
    stream: Option<MapStream>,
    node_key: NodeKey,
    disco: DiscoKey,
    id: u64,
}

/// Waits until every client saw `probe` (or the timeout); returns how many did.
async fn wait_seen(probe: &Probe, clients: usize) -> usize {
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while probe.count.load(Ordering::SeqCst) < clients && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    probe.count.load(Ordering::SeqCst)
}

/// Runs one probe: starts watching, makes the write, waits for the fleet.
async fn probe<F: std::future::Future<Output = anyhow::Result<()>>>(
    fleet: &Fleet,
    target: Target,
    write: F,
    out: &mut Propagation,
) -> anyhow::Result<()> {
    let n = fleet.clients.len();
    let probe = Arc::new(Probe::new(target, n));
    fleet.events.start_probe(probe.clone());
    write.await?;
    let seen = wait_seen(&probe, n).await;
    fleet.events.end_probe();
    out.missed += n - seen;
    let latencies = probe.latencies.lock().unwrap();
    out.latencies.extend(latencies.iter().copied());
    out.by_kind
        .entry(probe.target.kind())
        .or_default()
        .extend(latencies.iter().copied());
    Ok(())
}

pub async fn run(
    fleet: &Fleet,
    cluster: &LocalCluster,
    rounds: usize,
) -> anyhow::Result<Propagation> {
    let mut out = Propagation::default();
    let mut admin = cluster.admin(0).await?;
    for round in 0..rounds {
        let member = round % cluster.members.len();
        let addr = cluster.members[member].control_addr.clone();
        let (machine, _) = keypair();
        let node_key = NodeKey(keypair().1);
        let mut conn = ControlClient::connect_with_key(&addr, &fleet.server_key, &machine).await?;
        let mut node = None;
        // 1. A node joins: from its registration until every client has it as a peer.
        probe(
            fleet,
            Target::Join {
                key: node_key.to_text(),
            },
            async {
                let (status, resp) = conn
                    .register(&node_key, &fleet.auth_key, &format!("probe{round}"))
                    .await?;
                anyhow::ensure!(status == 200, "probe register: {status} {resp}");
                let disco = DiscoKey(keypair().1);
                let mut stream = conn
                    .map_stream_with(&node_key, &disco, "10.250.0.1:41641", true)
                    .await?;
                let first = stream.next(Duration::from_secs(60)).await?;
                let id = first["Node"]["ID"].as_u64().context("probe node id")?;
                node = Some((stream, disco, id));
                Ok(())
            },
            &mut out,
        )
        .await?;
        let (stream, disco, id) = node.context("probe node")?;
        let mut node = ProbeNode {
            conn,
            stream: Some(stream),
            node_key,
            disco,
            id,
        };
        // 2. Its endpoints change (a lite map update, as after a netcheck).
        let marker = format!("10.251.{round}.1:41641");
        probe(
            fleet,
            Target::Endpoint {
                id,
                marker: marker.clone(),
            },
            async {
                let status = node
                    .conn
                    .lite_update(&node.node_key, &node.disco, std::slice::from_ref(&marker))
                    .await?;
                anyhow::ensure!(status == 200, "lite update: {status}");
                Ok(())
            },
            &mut out,
        )
        .await?;
        // 3. It goes offline: its stream ends.
        probe(
            fleet,
            Target::Offline { id },
            async {
                node.stream.take();
                Ok(())
            },
            &mut out,
        )
        .await?;
        // 4. It is deleted.
        probe(
            fleet,
            Target::Delete { id },
            async {
                admin
                    .delete_node(pb::NodeIdRequest { id: node.id })
                    .await
                    .context("deleting the probe node")?;
                Ok(())
            },
            &mut out,
        )
        .await?;
    }
    Ok(out)
}

/// How often the failover writer starts a write, and how many may be in flight at once.
const WRITE_EVERY: Duration = Duration::from_millis(50);
const WRITES_IN_FLIGHT: usize = 64;

/// Writes through member `via` until `stop`, starting a write every `WRITE_EVERY` whatever
/// the earlier ones are doing: the first write acknowledged after a kill is seen within
/// that interval, not only once an attempt that hung at the kill has timed out. Returns
/// (started, acknowledged) per acknowledged write.
async fn writer(cluster: &LocalCluster, via: usize, stop: Instant) -> Vec<(Instant, Instant)> {
    use futures::StreamExt;
    let mut attempts = futures::stream::FuturesUnordered::new();
    let mut done = Vec::new();
    let mut next = tokio::time::Instant::now();
    let mut i = 0u64;
    loop {
        let may_start = Instant::now() < stop && attempts.len() < WRITES_IN_FLIGHT;
        tokio::select! {
            Some(acked) = attempts.next(), if !attempts.is_empty() => done.extend(acked),
            () = tokio::time::sleep_until(next), if may_start => {
                i += 1;
                attempts.push(write_once(cluster, via, i));
                next = tokio::time::Instant::now() + WRITE_EVERY;
            }
            else => break,
        }
    }
    done
}

/// `writer` on a thread and runtime of its own, as an admin's `hsctl` on another machine
/// would be: in this process it shares the CPU with ten thousand simulated clients, and a
/// reconnect storm would otherwise delay when its acknowledgements are seen.
async fn write_apart(
    cluster: Arc<LocalCluster>,
    via: usize,
    stop: Instant,
) -> Vec<(Instant, Instant)> {
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the writer");
        runtime.block_on(writer(&cluster, via, stop))
    })
    .await
    .expect("the failover writer ended without its results (it panicked)")
}

/// One user created through member `via`: (started, acknowledged), or `None` if it failed
/// or took longer than 5 s.
async fn write_once(cluster: &LocalCluster, via: usize, i: u64) -> Option<(Instant, Instant)> {
    let started = Instant::now();
    let write = async {
        let mut admin = cluster.admin(via).await?;
        admin
            .create_user(pb::CreateUserRequest {
                name: format!("failover-{}-{i}", std::process::id()),
                ..Default::default()
            })
            .await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), write).await {
        Ok(Ok(())) => Some((started, Instant::now())),
        _ => None,
    }
}

/// Kills member `victim` while a writer writes through `via`; waits for its clients to
/// stream from the others. Returns (seconds until a write succeeded after the kill, each
/// of its clients' time to stream again, how many clients it held).
async fn kill_and_watch(
    fleet: &Fleet,
    cluster: &LocalCluster,
    victim: usize,
    via: usize,
) -> anyhow::Result<(f64, Vec<Duration>, usize)> {
    let holding = fleet
        .clients
        .iter()
        .filter(|c| c.home.load(Ordering::SeqCst) == victim)
        .count();
    let stop = Instant::now() + Duration::from_secs(15);
    let kill = async {
        // Writes flow for a moment before the fault.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let failover = Arc::new(Failover {
            killed_at: Instant::now(),
            restreamed: Default::default(),
            counted: Default::default(),
        });
        fleet.events.start_failover(failover.clone());
        cluster.kill(victim)?;
        anyhow::Ok(failover)
    };
    let writes = write_apart(fleet.cluster.clone(), via, stop);
    let (done, failover) = tokio::join!(writes, kill);
    let failover = failover?;
    let killed = failover.killed_at;
    // The earliest acknowledgement of a write started after the kill (one in flight at
    // the kill may still be answered by the dying leader's commit).
    let resumed = done
        .iter()
        .filter(|(started, _)| *started >= killed)
        .map(|(_, acked)| acked.duration_since(killed).as_secs_f64())
        .reduce(f64::min)
        .unwrap_or(f64::NAN);
    let deadline = Instant::now() + Duration::from_secs(60);
    while failover.restreamed.lock().unwrap().len() < holding && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restream = failover.restreamed.lock().unwrap().clone();
    Ok((resumed, restream, holding))
}

/// Kills the leader, then (once it is back) a follower holding clients. Whatever was
/// measured before a step failed is kept in the report, with the error.
pub async fn failover(fleet: &Fleet, cluster: &LocalCluster) -> FailoverReport {
    let mut report = FailoverReport::default();
    if let Err(e) = failover_steps(fleet, cluster, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    report
}

async fn failover_steps(
    fleet: &Fleet,
    cluster: &LocalCluster,
    report: &mut FailoverReport,
) -> anyhow::Result<()> {
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .context("no leader to kill")?;
    let via = (leader + 1) % cluster.members.len();
    let (resumed, restream, holding) = kill_and_watch(fleet, cluster, leader, via).await?;
    report.writes_resume_s = resumed;
    report.clients_on_victims += holding;
    report.restream.extend(restream);
    cluster.start(leader)?;
    let leader = cluster
        .wait_leader(Duration::from_secs(120))
        .await
        .context("no leader after the old leader restarted")?;
    let victim = (0..cluster.members.len())
        .filter(|i| *i != leader)
        .max_by_key(|i| {
            fleet
                .clients
                .iter()
                .filter(|c| c.home.load(Ordering::SeqCst) == *i)
                .count()
        })
        .context("a follower")?;
    let (_, restream, holding) = kill_and_watch(fleet, cluster, victim, leader).await?;
    report.clients_on_victims += holding;
    report.restream.extend(restream);
    cluster.start(victim)?;
    Ok(())
}
