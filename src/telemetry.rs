//! Logging (tracing) and Prometheus metrics.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Installs the global tracing subscriber. `level` is a tracing filter (`info`,
/// `hsd=debug,info`); `RUST_LOG` overrides it.
pub fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter_for(level)))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests starting several in-process members) is harmless.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// A bare `info` (or `warn`, `error`) keeps openraft at `warn`: its info lines dump whole
/// vote and log states, one readable line per event is ours. `debug`, `trace` and any
/// filter naming targets are taken as written.
fn filter_for(level: &str) -> String {
    let level = level.trim();
    if level.contains('=') || matches!(level, "debug" | "trace") {
        level.to_string()
    } else {
        format!("{level},openraft=warn")
    }
}

/// A gauge raised by one while this guard lives: counts what is under way, also when the
/// future doing it is dropped midway.
pub struct GaugeRaised<'a>(&'a IntGauge);

impl<'a> GaugeRaised<'a> {
    pub fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        GaugeRaised(gauge)
    }
}

impl Drop for GaugeRaised<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every metric this member exports. Cheap to share (`Arc`); counters are atomics.
pub struct Metrics {
    registry: Registry,
    pub connected_clients: IntGauge,
    pub noise_connections: IntCounter,
    pub map_responses: IntCounterVec,
    pub map_bytes: IntCounter,
    pub full_map_waiting: IntGauge,
    pub full_map_turns_skipped: IntCounter,
    pub registrations: IntCounterVec,
    pub raft_applied_index: IntGauge,
    pub raft_is_leader: IntGauge,
    pub limit_refusals: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub audit_dropped: IntCounter,
    pub raft_snapshot_index: IntGauge,
    pub raft_purged_index: IntGauge,
    pub memtable_bytes: IntGaugeVec,
    pub presence_polls_failed: IntCounterVec,
    pub policy_compiles: IntCounterVec,
    pub derp_clients: IntGauge,
    pub derp_mesh_links_up: IntGauge,
    pub derp_packets_relayed: IntCounter,
    pub derp_packets_mesh_forwarded: IntCounter,
    pub bad_requests: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric name");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric name");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric name");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric name");
            c
        };
        Metrics {
            connected_clients: gauge(
                "hsd_connected_clients",
                "Nodes with a live map stream on this member",
            ),
            noise_connections: counter(
                "hsd_noise_connections_total",
                "Noise (ts2021) connections accepted",
            ),
            map_responses: counter_vec(
                "hsd_map_responses_total",
                "Map responses sent, by kind",
                "kind",
            ),
            map_bytes: counter(
                "hsd_map_response_bytes_total",
                "Compressed map response bytes sent",
            ),
            full_map_waiting: gauge(
                "hsd_full_map_waiting",
                "Map sessions waiting for a turn to send a full netmap",
            ),
            full_map_turns_skipped: counter(
                "hsd_full_map_turns_skipped_total",
                "Full netmaps sent without a turn, after waiting the longest a session waits",
            ),
            registrations: counter_vec(
                "hsd_registrations_total",
                "Register requests by outcome",
                "outcome",
            ),
            raft_applied_index: gauge(
                "hsd_raft_applied_index",
                "Last log index applied on this member",
            ),
            raft_is_leader: gauge("hsd_raft_is_leader", "1 if this member is the Raft leader"),
            audit_dropped: counter(
                "hsd_audit_dropped_total",
                "Refused admin authentications not recorded because the audit queue was full",
            ),
            limit_refusals: counter_vec(
                "hsd_limit_refusals_total",
                "Requests refused by a configured limit, by limit",
                "limit",
            ),
            tls_reloads: counter_vec(
                "hsd_tls_reloads_total",
                "Control-port TLS certificate reloads, by result (ok, failed)",
                "result",
            ),
            raft_snapshot_index: gauge(
                "hsd_raft_snapshot_index",
                "Last log index covered by this member's current snapshot",
            ),
            raft_purged_index: gauge(
                "hsd_raft_purged_index",
                "Last log index this member has purged (compacted into a snapshot)",
            ),
            policy_compiles: counter_vec(
                "hsd_policy_compiles_total",
                "Policies compiled: kept for the sessions at a hub tick (kept), or for one \
                 view the kept one does not hold for (alone)",
                "kind",
            ),
            presence_polls_failed: counter_vec(
                "hsd_presence_polls_failed_total",
                "Polls of another member's sessions that got no answer, by reason \
                 (slow: timed out; refused: refused, reset or not made)",
                "reason",
            ),
            memtable_bytes: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "hsd_rocksdb_memtable_bytes",
                        "Memory held by rocksdb's memtables, by column family",
                    ),
                    &["cf"],
                )
                .expect("valid metric name");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric name");
                g
            },
            derp_clients: gauge(
                "hsd_derp_clients",
                "Clients connected to this member's DERP relay",
            ),
            derp_mesh_links_up: gauge(
                "hsd_derp_mesh_links_up",
                "This relay's mesh links to other members that are up",
            ),
            derp_packets_relayed: counter(
                "hsd_derp_packets_relayed_total",
                "Packets this relay delivered to its clients (from local senders or the mesh)",
            ),
            derp_packets_mesh_forwarded: counter(
                "hsd_derp_packets_mesh_forwarded_total",
                "Packets this relay forwarded to another member's relay",
            ),
            bad_requests: counter_vec(
                "hsd_bad_requests_total",
                "Requests refused as malformed, by surface",
                "surface",
            ),
            registry,
        }
    }

    /// Brings a counter mirrored from elsewhere up to `total` (counters only go up).
    pub fn mirror_counter(counter: &IntCounter, total: u64) {
        let seen = counter.get();
        if total > seen {
            counter.inc_by(total - seen);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod logging_tests {
    use super::filter_for;

    #[test]
    fn openraft_is_quiet_at_info_and_as_asked_otherwise() {
        assert_eq!(filter_for("info"), "info,openraft=warn");
        assert_eq!(filter_for("debug"), "debug");
        assert_eq!(filter_for("info,openraft=info"), "info,openraft=info");
    }
}
