//! `Config::validate`: one check per section, each naming the key it refuses.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

use super::{
    ClusterConfig, ClusterTlsConfig, Config, ConfigError, DerpConfig, DnsConfig, LimitsConfig,
    LogConfig, OidcConfig, PrefixesConfig, Validated, invalid, parse_addr,
};

impl Config {
    /// Checks every value; the first bad one is returned naming its key.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let listen_addr = parse_addr("listen_addr", &self.listen_addr, false)?.expect("not empty");
        let metrics_listen_addr =
            parse_addr("metrics_listen_addr", &self.metrics_listen_addr, true)?;
        let grpc_listen_addr = parse_addr("grpc_listen_addr", &self.grpc_listen_addr, true)?;
        let stun_listen_addr = self.derp.validate()?;
        let cluster_listen_addr = self.cluster.validate()?;
        validate_server_url(self.server_url.as_deref())?;
        self.validate_control_tls()?;
        let (prefix_v4, prefix_v6) = self.prefixes.validate()?;
        let unix_socket_mode = self.validate_unix_socket()?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        self.dns.validate()?;
        self.log.validate()?;
        self.limits.validate()?;
        self.oidc.validate()?;
        let cap = crate::registry::AUDIT_MAX as u64;
        if !(1..=cap).contains(&self.audit.max_records) {
            return Err(invalid(
                "audit.max_records",
                format!("must be between 1 and {cap}"),
            ));
        }
        if !matches!(self.policy.mode.as_str(), "" | "database" | "file") {
            return Err(invalid(
                "policy.mode",
                format!("{:?}: use database or file", self.policy.mode),
            ));
        }
        if self.policy.mode == "file" && self.policy.path.is_none() {
            return Err(invalid(
                "policy.path",
                "policy.mode file needs the policy file's path".to_string(),
            ));
        }
        Ok(Validated {
            listen_addr,
            metrics_listen_addr,
            grpc_listen_addr,
            stun_listen_addr,
            cluster_listen_addr,
            prefix_v4,
            prefix_v6,
            unix_socket: self.in_data_dir(&self.unix_socket, "hsd.sock"),
            unix_socket_mode,
            noise_key_path: self.in_data_dir(&self.noise.private_key_path, "noise_private.key"),
            derp_key_path: self.in_data_dir(
                &self.derp.server.private_key_path,
                "derp_server_private.key",
            ),
            mesh_key_path: self.in_data_dir(&self.derp.server.mesh_key_path, "derp_mesh.key"),
        })
    }

    /// Both TLS files or neither; a member that serves TLS is reached over https.
    fn validate_control_tls(&self) -> Result<(), ConfigError> {
        match (&self.tls_cert_path, &self.tls_key_path) {
            (None, None) => return Ok(()),
            (Some(_), None) => return Err(invalid("tls_key_path", "needed with tls_cert_path")),
            (None, Some(_)) => return Err(invalid("tls_cert_path", "needed with tls_key_path")),
            (Some(_), Some(_)) => {}
        }
        match &self.server_url {
            Some(url) if !url.starts_with("https://") => Err(invalid(
                "server_url",
                format!("{url:?} must be https:// when tls_cert_path is set"),
            )),
            _ => Ok(()),
        }
    }

    fn validate_unix_socket(&self) -> Result<u32, ConfigError> {
        u32::from_str_radix(self.unix_socket_permission.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "unix_socket_permission",
                    format!(
                        "{:?} is not an octal mode like 0770",
                        self.unix_socket_permission
                    ),
                )
            })
    }
}

impl OidcConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let issuer = self.issuer.as_str();
        if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
            return Err(invalid(
                "oidc.issuer",
                format!("{issuer:?} must be an http(s) URL"),
            ));
        }
        if self.client_id.is_empty() {
            return Err(invalid("oidc.client_id", "needed with oidc.issuer"));
        }
        if !self.client_secret.is_empty() && self.client_secret_path.is_some() {
            return Err(invalid(
                "oidc.client_secret_path",
                "set client_secret or client_secret_path, not both",
            ));
        }
        if self.pkce.method != "S256" {
            return Err(invalid(
                "oidc.pkce.method",
                format!(
                    "{:?}: only S256 is supported (plain sends the verifier in the clear)",
                    self.pkce.method
                ),
            ));
        }
        if let Some(odd) = self.admin_users.iter().find(|u| !u.contains('@')) {
            return Err(invalid(
                "oidc.admin_users",
                format!("{odd:?} is not an email address"),
            ));
        }
        for reserved in [
            "state",
            "nonce",
            "redirect_uri",
            "client_id",
            "response_type",
        ] {
            if self.extra_params.contains_key(reserved) {
                return Err(invalid(
                    "oidc.extra_params",
                    format!("{reserved} is set by hsd itself"),
                ));
            }
        }
        Ok(())
    }
}

fn validate_server_url(url: Option<&str>) -> Result<(), ConfigError> {
    let Some(url) = url else { return Ok(()) };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            invalid(
                "server_url",
                format!("{url:?} must start with http:// or https://"),
            )
        })?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(invalid(
            "server_url",
            format!("{url:?} must be scheme://host[:port] with no path"),
        ));
    }
    Ok(())
}

impl PrefixesConfig {
    fn validate(&self) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), ConfigError> {
        let v4 = match self.v4.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(p) => Some(p.parse::<Ipv4Net>().map_err(|_| {
                invalid(
                    "prefixes.v4",
                    format!("{p:?} is not an IPv4 prefix like 100.64.0.0/10"),
                )
            })?),
        };
        let v6 = match self.v6.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(p) => Some(p.parse::<Ipv6Net>().map_err(|_| {
                invalid(
                    "prefixes.v6",
                    format!("{p:?} is not an IPv6 prefix like fd7a:115c:a1e0::/48"),
                )
            })?),
        };
        if v4.is_none() && v6.is_none() {
            return Err(invalid("prefixes", "at least one of v4 and v6 must be set"));
        }
        if let Some(net) = v4
            && net.prefix_len() > 30
        {
            return Err(invalid(
                "prefixes.v4",
                format!("{net} is too small to hold any node"),
            ));
        }
        if let Some(net) = v6
            && net.prefix_len() > 126
        {
            return Err(invalid(
                "prefixes.v6",
                format!("{net} is too small to hold any node"),
            ));
        }
        if self.allocation != "sequential" {
            return Err(invalid(
                "prefixes.allocation",
                format!(
                    "{:?} is not supported: only \"sequential\" (replicas must allocate identically)",
                    self.allocation
                ),
            ));
        }
        Ok((v4, v6))
    }
}

impl DerpConfig {
    /// Returns the STUN address to bind, if the relay runs.
    fn validate(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if !self.urls.is_empty() || !self.paths.is_empty() {
            return Err(invalid(
                "derp.urls",
                "external DERP maps are not supported; every member runs its own relay",
            ));
        }
        let server = &self.server;
        if !server.enabled {
            return Ok(None);
        }
        if !(1..=65535).contains(&server.region_id) {
            return Err(invalid(
                "derp.server.region_id",
                "must be between 1 and 65535",
            ));
        }
        if server.region_code.trim().is_empty() {
            return Err(invalid("derp.server.region_code", "must not be empty"));
        }
        for (key, value) in [
            ("derp.server.ipv4", &server.ipv4),
            ("derp.server.ipv6", &server.ipv6),
        ] {
            if let Some(v) = value
                && v.parse::<IpAddr>().is_err()
            {
                return Err(invalid(key, format!("{v:?} is not an IP address")));
            }
        }
        parse_addr(
            "derp.server.stun_listen_addr",
            &server.stun_listen_addr,
            true,
        )
    }
}

impl DnsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.magic_dns && self.base_domain.trim().is_empty() {
            return Err(invalid(
                "dns.base_domain",
                "must be set when dns.magic_dns is true",
            ));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if !self.base_domain.is_empty() && !self.base_domain.split('.').all(label_ok) {
            return Err(invalid(
                "dns.base_domain",
                format!("{:?} is not a domain name", self.base_domain),
            ));
        }
        for ns in &self.nameservers.global {
            if ns.parse::<IpAddr>().is_err() && !ns.starts_with("https://") {
                return Err(invalid(
                    "dns.nameservers.global",
                    format!("{ns:?} is not an IP address or DoH URL"),
                ));
            }
        }
        Ok(())
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.format.as_str(), "text" | "json") {
            return Err(invalid(
                "log.format",
                format!("{:?}: use text or json", self.format),
            ));
        }
        let level_ok = if self.level.contains('=') {
            tracing_subscriber::EnvFilter::try_new(&self.level).is_ok()
        } else {
            matches!(
                self.level.to_ascii_lowercase().as_str(),
                "trace" | "debug" | "info" | "warn" | "error" | "off"
            )
        };
        if !level_ok {
            return Err(invalid(
                "log.level",
                format!("{:?}: use trace, debug, info, warn or error", self.level),
            ));
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_pending_registrations == 0 {
            return Err(invalid(
                "limits.max_pending_registrations",
                "must be 1 or more",
            ));
        }
        if self.http_header_timeout.0 < Duration::from_millis(100) {
            return Err(invalid(
                "limits.http_header_timeout",
                "must be at least 100ms",
            ));
        }
        // A real client's Hostinfo is a few KiB; below 1 KiB nobody could register.
        if !(1024..=1 << 20).contains(&self.max_hostinfo_bytes) {
            return Err(invalid(
                "limits.max_hostinfo_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        if !(4..=1024).contains(&self.max_endpoints) {
            return Err(invalid(
                "limits.max_endpoints",
                "must be between 4 and 1024",
            ));
        }
        let idle = self.idle_timeout.0;
        if !idle.is_zero() && idle < Duration::from_secs(90) {
            // Map keep-alives come about every minute; a shorter timeout cuts live clients.
            return Err(invalid(
                "limits.idle_timeout",
                "must be 0 (off) or at least 90s",
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(invalid(
                "limits.max_concurrent_streams",
                "must be 1 or more",
            ));
        }
        Ok(())
    }
}

impl ClusterTlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let set = [&self.ca_cert_path, &self.cert_path, &self.key_path]
            .iter()
            .filter(|p| p.is_some())
            .count();
        if set != 0 && set != 3 {
            return Err(invalid(
                "cluster.tls",
                "set all of ca_cert_path, cert_path and key_path, or none",
            ));
        }
        for (key, path) in [
            ("cluster.tls.ca_cert_path", &self.ca_cert_path),
            ("cluster.tls.cert_path", &self.cert_path),
            ("cluster.tls.key_path", &self.key_path),
        ] {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(invalid(
                    key,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// Returns the member-to-member address to bind.
    fn validate(&self) -> Result<SocketAddr, ConfigError> {
        let listen =
            parse_addr("cluster.listen_addr", &self.listen_addr, false)?.expect("not empty");
        self.tls.validate()?;
        if self.members.len() > 1 && self.tls.ca_cert_path.is_none() {
            return Err(invalid(
                "cluster.tls",
                "a member of a multi-member cluster needs a certificate from the cluster's CA \
                 (`hsd cluster init-ca --dir CA`, then `hsd cluster issue-cert --ca-dir CA \
                 --member-id ID --out-dir DIR` for each member); member-to-member traffic is \
                 never plaintext",
            ));
        }
        if self.member_id == 0 {
            return Err(invalid("cluster.member_id", "must be 1 or more"));
        }
        self.validate_members()?;
        if self.election_timeout.0 < Duration::from_millis(100) {
            return Err(invalid(
                "cluster.election_timeout",
                "must be at least 100ms",
            ));
        }
        if self.heartbeat_interval.0.is_zero()
            || self.heartbeat_interval.0 * 2 > self.election_timeout.0
        {
            return Err(invalid(
                "cluster.heartbeat_interval",
                "must be above zero and at most half of cluster.election_timeout",
            ));
        }
        if self.snapshot_every == 0 {
            return Err(invalid("cluster.snapshot_every", "must be 1 or more"));
        }
        Ok(listen)
    }

    fn validate_members(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.id == 0 || !seen.insert(m.id) {
                return Err(invalid(
                    &format!("cluster.members[{i}].id"),
                    "must be unique and 1 or more",
                ));
            }
            if m.address.parse::<SocketAddr>().is_err() && !m.address.contains(':') {
                return Err(invalid(
                    &format!("cluster.members[{i}].address"),
                    format!("{:?} is not host:port", m.address),
                ));
            }
        }
        if !self.members.is_empty() && !seen.contains(&self.member_id) {
            return Err(invalid(
                "cluster.members",
                format!(
                    "does not list this member (cluster.member_id {})",
                    self.member_id
                ),
            ));
        }
        Ok(())
    }
}
