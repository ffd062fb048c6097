//! The local cluster under load, as `cluster/up` described it: members' addresses, admin
//! sockets and processes (for memory, CPU and kill -9).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hsd::cli::connect::{self, Target};
use hsd::proto::admin as pb;

pub struct Member {
    pub id: u64,
    /// `host:port` of the control listener.
    pub control_addr: String,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
}

pub struct LocalCluster {
    pub dir: PathBuf,
    pub members: Vec<Member>,
}

impl LocalCluster {
    pub fn load(members_json: &Path) -> anyhow::Result<LocalCluster> {
        let text = std::fs::read_to_string(members_json)
            .with_context(|| format!("reading {}", members_json.display()))?;
        let list: serde_json::Value = serde_json::from_str(&text)?;
        let members = list
            .as_array()
            .context("members.json is an array")?
            .iter()
            .map(|m| {
                let url = m["control_url"].as_str().unwrap_or_default();
                Member {
                    id: m["id"].as_u64().unwrap_or_default(),
                    control_addr: url.trim_start_matches("http://").to_string(),
                    socket: m["socket"].as_str().unwrap_or_default().into(),
                    data_dir: m["data_dir"].as_str().unwrap_or_default().into(),
                }
            })
            .collect();
        Ok(LocalCluster {
            dir: members_json
                .parent()
                .context("members.json lives in the cluster dir")?
                .to_path_buf(),
            members,
        })
    }

    /// The running process of member `i` (index), from its pid file.
    pub fn pid(&self, i: usize) -> Option<u32> {
        std::fs::read_to_string(self.members[i].data_dir.join("hsd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Resident memory of all members, KiB.
    pub fn rss_kib(&self) -> u64 {
        (0..self.members.len())
            .filter_map(|i| self.pid(i))
            .filter_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .sum()
    }

    /// CPU seconds (user + system) each member used so far.
    pub fn cpu_seconds(&self) -> Vec<f64> {
        // clock ticks per second; 100 on Linux.
        const TICKS: f64 = 100.0;
        (0..self.members.len())
            .map(|i| {
                self.pid(i)
                    .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
                    .and_then(|stat| {
                        let after_comm = stat.rsplit_once(')')?.1;
                        let fields: Vec<&str> = after_comm.split_whitespace().collect();
                        let utime: f64 = fields.get(11)?.parse().ok()?;
                        let stime: f64 = fields.get(12)?.parse().ok()?;
                        Some((utime + stime) / TICKS)
                    })
                    .unwrap_or(0.0)
            })
            .collect()
    }

    pub async fn admin(&self, i: usize) -> anyhow::Result<connect::Client> {
        connect::connect(
            &Target::Socket(self.members[i].socket.clone()),
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| anyhow::anyhow!("admin socket of member {}: {e}", self.members[i].id))
    }

    /// The leader's index, asking each member in turn until one knows (bounded).
    pub async fn wait_leader(&self, timeout: Duration) -> Option<usize> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            for i in 0..self.members.len() {
                if let Some(leader) = self.leader(i).await {
                    return Some(leader);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// The leader's index, as member `i` sees it.
    pub async fn leader(&self, asking: usize) -> Option<usize> {
        let mut admin = self.admin(asking).await.ok()?;
        let status = admin
            .cluster_status(pb::ClusterStatusRequest { local: true })
            .await
            .ok()?
            .into_inner();
        let leader = status.leader?;
        self.members.iter().position(|m| m.id == leader)
    }

    /// kill -9 of member `i`.
    pub fn kill(&self, i: usize) -> anyhow::Result<()> {
        let pid = self.pid(i).context("member has no pid")?;
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -9 {pid} failed");
        Ok(())
    }

    /// Starts member `i` again with `cluster/member`, reusing its data.
    pub fn start(&self, i: usize) -> anyhow::Result<()> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/member");
        let status = std::process::Command::new(script)
            .arg(&self.dir)
            .arg(self.members[i].id.to_string())
            .arg("start")
            .status()
            .context("running cluster/member")?;
        anyhow::ensure!(status.success(), "cluster/member start failed");
        Ok(())
    }
}
