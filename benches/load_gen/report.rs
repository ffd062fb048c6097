//! The run's figures: a short human summary and one JSON object (the shape
//! `interfaces.md` promises for `benches/load --json`).

use std::time::Duration;

use serde_json::{Value, json};

#[derive(Default)]
pub struct Propagation {
    /// Per client and probe: from the write until the client had it.
    pub latencies: Vec<Duration>,
    /// Client × probe pairs that never saw it within the probe timeout.
    pub missed: usize,
    /// The same latencies by kind of write (join, endpoints, offline, delete).
    pub by_kind: std::collections::BTreeMap<&'static str, Vec<Duration>>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// {"p50", "p99", "max"} of `values`, in milliseconds or seconds.
fn spread(values: &[Duration], unit_s: bool) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let f = |d: Duration| {
        if unit_s {
            (d.as_secs_f64() * 1e3).round() / 1e3
        } else {
            ms(d)
        }
    };
    json!({
        "p50": f(percentile(&sorted, 0.50)),
        "p99": f(percentile(&sorted, 0.99)),
        "max": f(sorted.last().copied().unwrap_or_default()),
    })
}

impl Propagation {
    pub fn json(&self) -> Value {
        let mut v = spread(&self.latencies, false);
        v["samples"] = json!(self.latencies.len());
        v["missed"] = json!(self.missed);
        v["by_kind"] = self
            .by_kind
            .iter()
            .map(|(kind, l)| (kind.to_string(), spread(l, false)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        v
    }

    pub fn summary(&self) -> String {
        let v = self.json();
        let kinds: Vec<String> = self
            .by_kind
            .keys()
            .map(|k| format!("{k} p99 {} ms", v["by_kind"][*k]["p99"]))
            .collect();
        format!(
            "p50 {} ms, p99 {} ms, max {} ms over {} deliveries ({} missed; {})",
            v["p50"],
            v["p99"],
            v["max"],
            v["samples"],
            v["missed"],
            kinds.join(", ")
        )
    }
}

#[derive(Default)]
pub struct FailoverReport {
    /// Why the phase stopped early, if it did.
    pub error: Option<String>,
    pub writes_resume_s: f64,
    pub restream: Vec<Duration>,
    pub clients_on_victims: usize,
}

impl FailoverReport {
    pub fn json(&self) -> Value {
        json!({
            "writes_resume_s": (self.writes_resume_s * 1e3).round() / 1e3,
            "clients_restream_s": spread(&self.restream, true),
            "clients_on_killed_members": self.clients_on_victims,
            "clients_restreamed": self.restream.len(),
            "error": self.error,
        })
    }
}

pub struct Report {
    pub clients: usize,
    pub members: usize,
    pub joined: usize,
    /// Map requests answered 404 right after the registration succeeded.
    pub map_retries: u64,
    /// Registrations answered 503 and retried.
    pub register_retries: u64,
    pub handshakes_per_s: f64,
    pub registrations_per_s: f64,
    pub propagation: Propagation,
    pub rss_kib_per_client: f64,
    /// Of that, what an idle Noise + HTTP/2 connection costs before its client registers.
    pub rss_kib_per_connection: f64,
    pub rss_kib_members: u64,
    pub cpu_s_by_member: Vec<f64>,
    pub failover: Option<FailoverReport>,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

impl Report {
    pub fn new(clients: usize, members: usize) -> Report {
        Report {
            clients,
            members,
            joined: 0,
            map_retries: 0,
            register_retries: 0,
            handshakes_per_s: 0.0,
            registrations_per_s: 0.0,
            propagation: Propagation::default(),
            rss_kib_per_client: 0.0,
            rss_kib_per_connection: 0.0,
            rss_kib_members: 0,
            cpu_s_by_member: Vec::new(),
            failover: None,
        }
    }

    pub fn json(&self) -> Value {
        let cpu = &self.cpu_s_by_member;
        json!({
            "clients": self.clients,
            "members": self.members,
            "joined": self.joined,
            "map_not_registered_retries": self.map_retries,
            "register_unavailable_retries": self.register_retries,
            "registrations_per_s": round1(self.registrations_per_s),
            "handshakes_per_s": round1(self.handshakes_per_s),
            "propagation_ms": self.propagation.json(),
            "rss_kib_per_client": round1(self.rss_kib_per_client),
            "rss_kib_per_connection": round1(self.rss_kib_per_connection),
            "rss_kib_members": self.rss_kib_members,
            "cpu_s_per_member": round1(cpu.iter().sum::<f64>() / cpu.len().max(1) as f64),
            "cpu_s_by_member": cpu.iter().map(|c| round1(*c)).collect::<Vec<_>>(),
            "failover": self.failover.as_ref().map(FailoverReport::json),
        })
    }

    pub fn print(&self) {
        let v = self.json();
        println!(
            "{} clients on {} members: {} joined; {}/s handshakes, {}/s registrations (each streaming its first netmap)",
            self.clients,
            self.members,
            self.joined,
            v["handshakes_per_s"],
            v["registrations_per_s"],
        );
        println!("propagation: {}", self.propagation.summary());
        println!(
            "memory: {} KiB per client on the members ({} KiB of it the connection before registering; {} MiB in all); CPU per member {} s",
            v["rss_kib_per_client"],
            v["rss_kib_per_connection"],
            self.rss_kib_members / 1024,
            v["cpu_s_per_member"]
        );
        if let Some(f) = &self.failover {
            let fj = f.json();
            println!(
                "failover: writes resumed after {} s; {} clients streamed again: {}",
                fj["writes_resume_s"], fj["clients_restreamed"], fj["clients_restream_s"]
            );
        }
    }
}
