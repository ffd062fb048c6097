//! Configuration: YAML with headscale's key names, defaults beside their fields, validation
//! that names the offending key. `Config::default()` is the embedded one-member cluster, so
//! `hsd` runs with no file at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer};

/// A bad configuration value. `key` is the dotted YAML path, e.g. `derp.server.stun_listen_addr`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// A duration written like "30s", "10m", "1h", "90d" or "0" (zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConfigDuration(pub Duration);

/// Parses "90d", "1h30m", "0": humantime, plus a bare "0".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 30s, 10m, 1h or 90d ({e})"))
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(secs) => Ok(ConfigDuration(Duration::from_secs(secs))),
            Raw::Text(t) => parse_duration(&t)
                .map(ConfigDuration)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeApproval {
    /// New nodes may use the tailnet at once.
    #[default]
    Auto,
    /// New nodes wait for `hsctl nodes approve ID`.
    Manual,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Public URL clients use to reach this member (`http://host:port`, `https://…` when
    /// this member serves TLS). Default: derived from the bound `listen_addr`.
    pub server_url: Option<String>,
    /// PEM certificate chain for TLS on the control port (with `/derp`), as headscale
    /// names it. Reloaded on SIGHUP and when the file changes. Needs `tls_key_path`.
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key for `tls_cert_path`.
    pub tls_key_path: Option<PathBuf>,
    /// Control HTTP: `/key`, `/ts2021`, `/derp`, `/health`, …
    pub listen_addr: String,
    pub metrics_listen_addr: String,
    /// Admin gRPC over TCP, API-key authenticated. Empty disables it.
    pub grpc_listen_addr: String,
    /// Accepted for headscale compatibility; TCP admin gRPC here is plaintext with API keys.
    pub grpc_allow_insecure: bool,
    /// Admin gRPC over a unix socket (file-permission auth). Default `<data_dir>/hsd.sock`.
    pub unix_socket: Option<PathBuf>,
    /// Octal mode of the unix socket.
    pub unix_socket_permission: String,
    /// Where rocksdb and generated keys live.
    pub data_dir: PathBuf,
    pub noise: NoiseConfig,
    pub prefixes: PrefixesConfig,
    pub derp: DerpConfig,
    pub dns: DnsConfig,
    pub log: LogConfig,
    /// `auto` or `manual`.
    pub node_approval: NodeApproval,
    /// Ephemeral nodes are removed after being offline this long.
    pub ephemeral_node_inactivity_timeout: ConfigDuration,
    pub node: NodeConfig,
    pub policy: PolicyConfig,
    pub cluster: ClusterConfig,
    /// How long SIGTERM may take: drain clients, hand off leadership, flush.
    pub shutdown_grace: ConfigDuration,
    /// Bounds on what outsiders can make a member hold.
    pub limits: LimitsConfig,
    pub audit: AuditConfig,
    /// Login through an OpenID Connect provider (headscale's `oidc.*` keys). Off while
    /// `oidc.issuer` is empty.
    pub oidc: OidcConfig,
}

/// An OpenID Connect provider for interactive logins, with headscale's key names.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// A file holding the client secret (instead of `client_secret`).
    pub client_secret_path: Option<PathBuf>,
    /// Scopes asked for; `openid` is always sent.
    pub scope: Vec<String>,
    /// Extra query parameters for the provider's authorization endpoint.
    pub extra_params: std::collections::BTreeMap<String, String>,
    /// When set, only users whose email is in one of these domains may log in.
    pub allowed_domains: Vec<String>,
    /// When set, only these emails may log in.
    pub allowed_users: Vec<String>,
    /// When set, only members of one of these groups (the `groups` claim) may log in.
    pub allowed_groups: Vec<String>,
    /// hsd's own: these emails may log in to the web console through the provider.
    pub admin_users: Vec<String>,
    /// hsd's own: members of these groups may log in to the web console.
    pub admin_groups: Vec<String>,
    pub pkce: OidcPkceConfig,
    /// Key expiry of a node registered through the provider; 0 = never.
    pub expiry: ConfigDuration,
    /// Use the ID token's expiry as the node's key expiry instead of `expiry`.
    pub use_expiry_from_token: bool,
}

impl Default for OidcConfig {
    fn default() -> Self {
        OidcConfig {
            issuer: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            client_secret_path: None,
            scope: vec!["openid".into(), "profile".into(), "email".into()],
            extra_params: Default::default(),
            allowed_domains: Vec::new(),
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
            admin_users: Vec::new(),
            admin_groups: Vec::new(),
            pkce: OidcPkceConfig::default(),
            expiry: ConfigDuration(Duration::from_secs(180 * 24 * 3600)),
            use_expiry_from_token: false,
        }
    }
}

impl OidcConfig {
    pub fn enabled(&self) -> bool {
        !self.issuer.is_empty()
    }
}

/// Proof Key for Code Exchange (RFC 7636) on the code flow.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcPkceConfig {
    /// On by default here (headscale's default is off): it costs nothing with providers
    /// that support it.
    pub enabled: bool,
    /// `S256`, the only method hsd sends.
    pub method: String,
}

impl Default for OidcPkceConfig {
    fn default() -> Self {
        OidcPkceConfig {
            enabled: true,
            method: "S256".into(),
        }
    }
}

/// How long the replicated audit log keeps records. The leader prunes by its own values,
/// so give every member the same ones.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Records older than this are dropped; `0` keeps them up to `max_records`.
    pub retention: ConfigDuration,
    /// Most records kept (the oldest go first); at most 100000.
    pub max_records: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention: ConfigDuration(Duration::from_secs(365 * 86_400)),
            max_records: 100_000,
        }
    }
}

/// Bounds on input from outside; each refusal is counted in
/// `hsd_limit_refusals_total{limit}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Interactive registrations waiting for an admin, cluster-wide (each machine has at
    /// most one; asking again returns or replaces it).
    pub max_pending_registrations: u32,
    /// Largest Hostinfo (JSON bytes) a register or map request may carry.
    pub max_hostinfo_bytes: usize,
    /// Most endpoints (`ip:port` candidates) a map request may carry; each is at most
    /// 64 bytes.
    pub max_endpoints: usize,
    /// A connection to the control port that has not sent a whole request head within
    /// this is closed (slow clients holding connections open).
    pub http_header_timeout: ConfigDuration,
    /// A control-port connection that moves no bytes either way for this long is closed
    /// (map streams and DERP send keep-alives well within it). `0` disables.
    pub idle_timeout: ConfigDuration,
    /// Control-port connections one source address may hold open at once. `0`: no cap.
    pub max_connections_per_source: u32,
    /// Concurrent HTTP/2 streams per connection: the control port, inside each Noise
    /// connection, and the admin gRPC listeners.
    pub max_concurrent_streams: u32,
    /// Register requests per source address per minute (a burst of this many, then
    /// refilled over the minute). `0`: no limit.
    pub registrations_per_minute: u32,
    /// Failed admin authentications (gRPC and REST) per source address per minute; once
    /// spent, the source is refused without its key being checked until it refills.
    pub failed_admin_auth_per_minute: u32,
    /// Map requests (streams, Hostinfo and endpoint updates) per node per minute.
    pub node_updates_per_minute: u32,
    /// DERP connections per client key per minute.
    pub derp_connects_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_pending_registrations: 1000,
            max_hostinfo_bytes: 16 * 1024,
            max_endpoints: 64,
            http_header_timeout: ConfigDuration(Duration::from_secs(10)),
            idle_timeout: ConfigDuration(Duration::from_secs(300)),
            max_connections_per_source: 4096,
            max_concurrent_streams: 100,
            registrations_per_minute: 300,
            failed_admin_auth_per_minute: 10,
            node_updates_per_minute: 120,
            derp_connects_per_minute: 60,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseConfig {
    /// The cluster's Noise private key (`privkey:<hex>`); generated on first start. Every
    /// member must share it. Default `<data_dir>/noise_private.key`.
    pub private_key_path: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixesConfig {
    pub v4: Option<String>,
    pub v6: Option<String>,
    /// Only `sequential` (deterministic, required by replication).
    pub allocation: String,
}

impl Default for PrefixesConfig {
    fn default() -> Self {
        PrefixesConfig {
            v4: Some("100.64.0.0/10".into()),
            v6: Some("fd7a:115c:a1e0::/48".into()),
            allocation: "sequential".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DerpConfig {
    pub server: DerpServerConfig,
    /// External DERP maps; not supported yet (the embedded relay is always used).
    pub urls: Vec<String>,
    pub paths: Vec<String>,
    pub auto_update_enabled: bool,
    pub update_frequency: Option<ConfigDuration>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DerpServerConfig {
    pub enabled: bool,
    pub region_id: i32,
    pub region_code: String,
    pub region_name: String,
    pub stun_listen_addr: String,
    /// This member's DERP server key. Default `<data_dir>/derp_server_private.key`.
    pub private_key_path: Option<PathBuf>,
    /// The DERP mesh key shared by all members (64 hex chars in the file). Default
    /// `<data_dir>/derp_mesh.key`.
    pub mesh_key_path: Option<PathBuf>,
    /// Accepted for headscale compatibility.
    pub automatically_add_embedded_derp_region: bool,
    /// Address clients dial for DERP and STUN; default: the host of `server_url`.
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    /// Only clients whose node key is registered may use the relay.
    pub verify_clients: bool,
}

impl Default for DerpServerConfig {
    fn default() -> Self {
        DerpServerConfig {
            enabled: true,
            region_id: 999,
            region_code: "hsd".into(),
            region_name: "hsd embedded DERP".into(),
            stun_listen_addr: "127.0.0.1:3478".into(),
            private_key_path: None,
            mesh_key_path: None,
            automatically_add_embedded_derp_region: true,
            ipv4: None,
            ipv6: None,
            verify_clients: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    pub magic_dns: bool,
    /// The tailnet's domain; nodes are `<given_name>.<base_domain>`.
    pub base_domain: String,
    pub override_local_dns: bool,
    pub nameservers: NameserversConfig,
    pub search_domains: Vec<String>,
    pub extra_records: Vec<serde_yaml::Value>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            magic_dns: true,
            base_domain: "hsd.internal".into(),
            override_local_dns: false,
            nameservers: NameserversConfig::default(),
            search_domains: Vec::new(),
            extra_records: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct NameserversConfig {
    pub global: Vec<String>,
    pub split: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// trace, debug, info, warn or error (or a tracing filter such as `hsd=debug`).
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Key expiry for newly registered nodes; 0 = never.
    pub expiry: ConfigDuration,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// `database` (policy set with `hsctl policy set`) or `file`.
    pub mode: String,
    pub path: Option<PathBuf>,
}

impl Config {
    /// The policy file the member follows (`policy.mode: file`), if any.
    pub fn policy_file(&self) -> Option<&std::path::Path> {
        (self.policy.mode == "file")
            .then_some(self.policy.path.as_deref())
            .flatten()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterMemberConfig {
    pub id: u64,
    /// Member-to-member address (host:port).
    pub address: String,
    /// Control URL clients may use for this member.
    pub control_url: Option<String>,
    /// The DERP region this member's relay belongs to; default: this member's own
    /// (`derp.server.region_id`). Members of one region form one DERP region and mesh;
    /// different regions are different DERP regions (multi-region clusters).
    pub region_id: Option<i32>,
    pub region_code: Option<String>,
    pub region_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub member_id: u64,
    /// A human name for this member; default `m<id>`.
    pub name: Option<String>,
    /// Member-to-member gRPC (Raft, forwarding). Default 127.0.0.1:50444.
    pub listen_addr: String,
    /// How other members reach this one; default `listen_addr`.
    pub advertise_addr: Option<String>,
    /// The initial voters; empty = a one-member cluster of this member.
    pub members: Vec<ClusterMemberConfig>,
    pub election_timeout: ConfigDuration,
    pub heartbeat_interval: ConfigDuration,
    /// Build a snapshot (and compact the log) every this many applied entries.
    pub snapshot_every: u64,
    /// Mutual TLS for member-to-member traffic (`hsd cluster init-ca` / `issue-cert`).
    pub tls: ClusterTlsConfig,
}

/// All three set: member-to-member gRPC uses mTLS. None set: plaintext (one member, or a
/// trusted private network).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterTlsConfig {
    /// The cluster CA certificate (PEM) that every member's certificate must chain to.
    pub ca_cert_path: Option<PathBuf>,
    /// This member's certificate (PEM), issued by `hsd cluster issue-cert`.
    pub cert_path: Option<PathBuf>,
    /// This member's private key (PEM).
    pub key_path: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            member_id: 1,
            name: None,
            listen_addr: "127.0.0.1:50444".into(),
            advertise_addr: None,
            members: Vec::new(),
            // A dead leader is replaced within about twice this (its lease, then a vote);
            // heartbeats every 100 ms keep live leaders' leases fresh, as etcd's do.
            election_timeout: ConfigDuration(Duration::from_millis(300)),
            heartbeat_interval: ConfigDuration(Duration::from_millis(100)),
            // A snapshot encodes and stores the whole registry (with its ten minutes of
            // remembered request ids and the audit trail); every 5,000 entries it took 13 %
            // of the CPU under sustained writes. The log tail it trims lives in rocksdb,
            // not memory, so waiting longer costs disk, not RAM.
            snapshot_every: 20_000,
            tls: ClusterTlsConfig::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_url: None,
            tls_cert_path: None,
            tls_key_path: None,
            listen_addr: "127.0.0.1:8080".into(),
            metrics_listen_addr: "127.0.0.1:9090".into(),
            grpc_listen_addr: "127.0.0.1:50443".into(),
            grpc_allow_insecure: false,
            unix_socket: None,
            unix_socket_permission: "0770".into(),
            data_dir: PathBuf::from("hsd-data"),
            noise: NoiseConfig::default(),
            prefixes: PrefixesConfig::default(),
            derp: DerpConfig::default(),
            dns: DnsConfig::default(),
            log: LogConfig::default(),
            node_approval: NodeApproval::Auto,
            ephemeral_node_inactivity_timeout: ConfigDuration(Duration::from_secs(30 * 60)),
            node: NodeConfig::default(),
            policy: PolicyConfig::default(),
            cluster: ClusterConfig::default(),
            shutdown_grace: ConfigDuration(Duration::from_secs(30)),
            limits: LimitsConfig::default(),
            audit: AuditConfig::default(),
            oidc: OidcConfig::default(),
        }
    }
}

/// Checked, typed values derived from `Config`; produced only by `Config::validate`.
#[derive(Clone, Debug)]
pub struct Validated {
    pub listen_addr: SocketAddr,
    pub metrics_listen_addr: Option<SocketAddr>,
    pub grpc_listen_addr: Option<SocketAddr>,
    pub stun_listen_addr: Option<SocketAddr>,
    pub cluster_listen_addr: SocketAddr,
    pub prefix_v4: Option<Ipv4Net>,
    pub prefix_v6: Option<Ipv6Net>,
    pub unix_socket: PathBuf,
    pub unix_socket_mode: u32,
    pub noise_key_path: PathBuf,
    pub derp_key_path: PathBuf,
    pub mesh_key_path: PathBuf,
}

fn parse_addr(
    key: &str,
    value: &str,
    allow_empty: bool,
) -> Result<Option<SocketAddr>, ConfigError> {
    if value.trim().is_empty() {
        return if allow_empty {
            Ok(None)
        } else {
            Err(invalid(key, "must not be empty"))
        };
    }
    value.parse::<SocketAddr>().map(Some).map_err(|_| {
        invalid(
            key,
            format!("{value:?} is not an address like 127.0.0.1:8080"),
        )
    })
}

impl Config {
    /// Reads and parses a YAML file; unknown keys are errors.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::from_yaml(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })
    }

    pub fn from_yaml(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    fn in_data_dir(&self, configured: &Option<PathBuf>, default_name: &str) -> PathBuf {
        match configured {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => self.data_dir.join(p),
            None => self.data_dir.join(default_name),
        }
    }
}

mod validate;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Result<Validated, String> {
        let cfg = Config::from_yaml(yaml)?;
        cfg.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        let v = check("").unwrap();
        assert_eq!(v.listen_addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(v.unix_socket, PathBuf::from("hsd-data/hsd.sock"));
        assert_eq!(v.prefix_v4.unwrap().to_string(), "100.64.0.0/10");
    }

    #[test]
    fn headscale_style_file_parses() {
        let yaml = r#"
server_url: http://127.0.0.1:8080
listen_addr: 0.0.0.0:8080
metrics_listen_addr: 127.0.0.1:9090
grpc_listen_addr: 127.0.0.1:50443
noise:
  private_key_path: /var/lib/hsd/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: true
    region_id: 999
    stun_listen_addr: 0.0.0.0:3478
dns:
  magic_dns: true
  base_domain: example.com
  nameservers:
    global: [1.1.1.1]
log:
  level: debug
node_approval: manual
ephemeral_node_inactivity_timeout: 30m
"#;
        let v = check(yaml).unwrap();
        assert_eq!(
            v.noise_key_path,
            PathBuf::from("/var/lib/hsd/noise_private.key")
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (yaml, key) in [
            ("listen_addr: nope", "listen_addr"),
            ("prefixes: {v4: 300.0.0.0/8}", "prefixes.v4"),
            (
                "derp: {server: {stun_listen_addr: x}}",
                "derp.server.stun_listen_addr",
            ),
            ("log: {level: loud}", "log.level"),
            ("server_url: ftp://x", "server_url"),
            ("unix_socket_permission: '999'", "unix_socket_permission"),
            ("dns: {base_domain: 'a..b'}", "dns.base_domain"),
            ("tls_cert_path: /c.pem", "tls_key_path"),
            ("tls_key_path: /c.key", "tls_cert_path"),
            (
                "{server_url: 'http://a:1', tls_cert_path: /c, tls_key_path: /k}",
                "server_url",
            ),
        ] {
            let err = check(yaml).unwrap_err();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_rejected() {
        assert!(
            check("listen_adr: 127.0.0.1:1")
                .unwrap_err()
                .contains("listen_adr")
        );
        assert!(
            check("ephemeral_node_inactivity_timeout: soon")
                .unwrap_err()
                .contains("duration")
        );
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
    }

    /// The example configs under deploy/ must stay valid as the config grows.
    #[test]
    fn deploy_examples_parse() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        for file in ["systemd/config.yaml", "compose/member.yaml"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            Config::from_yaml(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        // The Kubernetes ConfigMap embeds its config.yaml as an indented block.
        let k8s = std::fs::read_to_string(root.join("kubernetes/hsd.yaml")).unwrap();
        let start = k8s.find("config.yaml: |").expect("configmap") + "config.yaml: |\n".len();
        let block: String = k8s[start..]
            .lines()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let config = Config::from_yaml(&block)
            .unwrap_or_else(|e| panic!("kubernetes configmap: {e}\n{block}"));
        assert_eq!(config.cluster.members.len(), 3);
    }
}
