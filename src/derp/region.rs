//! The cluster's shape as clients see it: the DERP map (one DERP region per member
//! region, one node per member), the control dial plan naming every member, and which
//! relays this member meshes with. Computed from the Raft membership (the config's member
//! list stands in until this member learns it).

use crate::config::{ClusterMemberConfig, Config};

/// One DERP node as the DERPMap advertises it.
#[derive(Clone, Debug, PartialEq)]
pub struct DerpNodeInfo {
    pub name: String,
    pub host: String,
    pub ipv4: String,
    pub derp_port: u16,
    /// -1 disables STUN for this node.
    pub stun_port: i32,
}

/// The DERP region this cluster advertises.
#[derive(Clone, Debug, PartialEq)]
pub struct DerpRegionInfo {
    pub region_id: i32,
    pub region_code: String,
    pub region_name: String,
    pub nodes: Vec<DerpNodeInfo>,
}

/// What clients are told about the cluster's shape. Follows Raft membership changes; every
/// map session sends a fresh full map when it changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Topology {
    /// The DERP regions of the cluster, this member's region and node first; empty = no relay.
    pub derp: Vec<DerpRegionInfo>,
    /// The members' addresses for the `ControlDialPlan`, this member's first, so a running
    /// client whose member dies redials a survivor (protocol.md §7). Empty for a
    /// one-member cluster. Each node gets them in its own order (`dial_plan_for`).
    pub dial_ips: Vec<String>,
}

impl Topology {
    /// The `ControlDialPlan` for the machine with `dial_seed` (`dial_seed`): this member
    /// first, then the others rotated by the seed, so that when a member dies its clients
    /// spread over the survivors instead of all redialing the same one.
    pub fn dial_plan_for(&self, seed: u64) -> Option<serde_json::Value> {
        let (own, others) = self.dial_ips.split_first()?;
        if others.is_empty() {
            return None;
        }
        let order = std::iter::once(own).chain(dial_order(own, others, seed));
        let count = self.dial_ips.len();
        let candidates: Vec<serde_json::Value> = order
            .enumerate()
            .map(|(i, ip)| {
                serde_json::json!({
                    "IP": ip,
                    "DialStartDelaySec": 0.25 * i as f64,
                    "DialTimeoutSec": 2.0,
                    "Priority": (count - i) as i64,
                })
            })
            .collect();
        Some(serde_json::json!({ "Candidates": candidates }))
    }
}

/// The other members in the order a client on member `own` (its address) tries them:
/// rotated by a mix of its machine's `dial_seed` and `own`. The seed alone spreads one
/// member's clients evenly, but the clients that came to a member from another then all
/// leave it for the same next one: when two members die in turn (a rolling restart), one
/// survivor took two thirds of the second one's clients. (The load generator redials in
/// this order too.)
pub fn dial_order<'a, T>(own: &str, others: &'a [T], seed: u64) -> impl Iterator<Item = &'a T> {
    let shift = if others.is_empty() {
        0
    } else {
        (mix(seed, own) % others.len() as u64) as usize
    };
    others[shift..].iter().chain(&others[..shift])
}

/// `seed` and `own` mixed so that every bit of the result depends on both: FNV-1a of the
/// address, then splitmix64's finalizer (FNV alone leaves the low bits, which pick among
/// a few members, tied to the seed's). Stable across processes and versions.
fn mix(seed: u64, own: &str) -> u64 {
    let fnv = own.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut z = (seed ^ fnv).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A machine's place in the dial order, from its public machine key (stable across node
/// key rotations; spread evenly because keys are random).
pub fn dial_seed(machine_key: &[u8; 32]) -> u64 {
    u64::from_le_bytes(machine_key[..8].try_into().expect("8 bytes"))
}

/// What the topology is computed from, fixed at start.
#[derive(Clone)]
pub struct TopologyInputs {
    pub config: Config,
    pub member_id: u64,
    pub server_url: String,
    pub stun_port: i32,
}

impl TopologyInputs {
    /// The topology and the DERP URLs to mesh with, for the current `members` (empty =
    /// not known yet: the configured members stand in).
    pub fn topology(&self, members: &[ClusterMemberConfig]) -> (Topology, Vec<String>) {
        let config = with_members(&self.config, members);
        let topology = topology(&config, self.member_id, &self.server_url, self.stun_port);
        let mesh = if config.derp.server.enabled {
            mesh_peers(&config, self.member_id)
        } else {
            Vec::new()
        };
        (topology, mesh)
    }
}

/// The config with `cluster.members` replaced by the Raft membership, when known (empty =
/// not yet: the configured list stands in).
fn with_members(config: &Config, members: &[ClusterMemberConfig]) -> Config {
    let mut config = config.clone();
    if members.is_empty() {
        return config;
    }
    let configured = |id: u64| config.cluster.members.iter().find(|m| m.id == id).cloned();
    config.cluster.members = members
        .iter()
        .map(|m| {
            // Region names are not replicated; keep the configured ones where known.
            let known = configured(m.id);
            ClusterMemberConfig {
                region_code: m
                    .region_code
                    .clone()
                    .or_else(|| known.as_ref().and_then(|k| k.region_code.clone())),
                region_name: m
                    .region_name
                    .clone()
                    .or_else(|| known.and_then(|k| k.region_name)),
                ..m.clone()
            }
        })
        .collect();
    if config.cluster.members.len() == 1 {
        config.cluster.members.clear();
    }
    config
}

/// The DERP map and dial plan for `config`'s members (see `with_members`).
pub fn topology(config: &Config, member_id: u64, server_url: &str, stun_port: i32) -> Topology {
    Topology {
        derp: if config.derp.server.enabled {
            derp_regions(config, member_id, server_url, stun_port)
        } else {
            Vec::new()
        },
        dial_ips: dial_ips(config, member_id, server_url),
    }
}

/// The cluster's DERP regions, one node per member, this member's region and node first.
/// Members of one region are nodes of one DERP region (not a region each): a client homes
/// on the member it talks to, and when that relay dies its reconnect walks on to the next
/// node of the same region at once, with no control round trip, while the mesh keeps every
/// member's clients reachable. Members configured in other regions form their own regions.
fn derp_regions(
    config: &Config,
    member_id: u64,
    server_url: &str,
    stun_port: i32,
) -> Vec<DerpRegionInfo> {
    let own = &config.derp.server;
    let node = |id: u64, region_id: i32, url: &str, ipv4: Option<&String>| {
        let host = url_host(url);
        let ipv4 = ipv4.cloned().unwrap_or_else(|| {
            if host.parse::<std::net::Ipv4Addr>().is_ok() {
                host.clone()
            } else {
                String::new()
            }
        });
        DerpNodeInfo {
            name: format!("{region_id}{id}"),
            host,
            ipv4,
            derp_port: url_port(url).unwrap_or(if url.starts_with("https://") { 443 } else { 80 }),
            stun_port,
        }
    };
    let mut regions = vec![DerpRegionInfo {
        region_id: own.region_id,
        region_code: own.region_code.clone(),
        region_name: own.region_name.clone(),
        nodes: vec![node(
            member_id,
            own.region_id,
            server_url,
            own.ipv4.as_ref(),
        )],
    }];
    for m in &config.cluster.members {
        let Some(url) = m.control_url.as_ref().filter(|_| m.id != member_id) else {
            continue;
        };
        let region_id = m.region_id.unwrap_or(own.region_id);
        let pos = match regions.iter().position(|r| r.region_id == region_id) {
            Some(pos) => pos,
            None => {
                regions.push(DerpRegionInfo {
                    region_id,
                    region_code: m
                        .region_code
                        .clone()
                        .unwrap_or_else(|| format!("r{region_id}")),
                    region_name: m
                        .region_name
                        .clone()
                        .unwrap_or_else(|| format!("region {region_id}")),
                    nodes: Vec::new(),
                });
                regions.len() - 1
            }
        };
        regions[pos].nodes.push(node(m.id, region_id, url, None));
    }
    regions
}

/// The DERP URLs of the other members of this member's region, whose relays this one meshes
/// with. Other regions are reached by clients directly, not through the mesh.
fn mesh_peers(config: &Config, member_id: u64) -> Vec<String> {
    let own_region = config.derp.server.region_id;
    config
        .cluster
        .members
        .iter()
        .filter(|m| m.id != member_id && m.region_id.unwrap_or(own_region) == own_region)
        .filter_map(|m| {
            m.control_url
                .as_ref()
                .map(|u| format!("{}/derp", u.trim_end_matches('/')))
        })
        .collect()
}

/// A dial plan listing every member's address, this member first and the others after
/// short start delays (v1.90 takes the first success; v1.86 also honours Priority).
/// `DialTimeoutSec` must be above zero, or the candidate always fails.
/// This member's address, then the other members' (IP literals only: a dial plan names
/// addresses). Empty for a one-member cluster.
fn dial_ips(config: &Config, member_id: u64, server_url: &str) -> Vec<String> {
    if config.cluster.members.len() < 2 {
        return Vec::new();
    }
    let others = config
        .cluster
        .members
        .iter()
        .filter(|m| m.id != member_id)
        .filter_map(|m| m.control_url.as_deref().map(url_host));
    std::iter::once(url_host(server_url))
        .chain(others)
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

/// The host of a URL or `host:port` (an IPv6 literal without its brackets).
pub fn url_host(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
        .to_string()
}

fn url_port(url: &str) -> Option<u16> {
    let rest = url.split("://").nth(1)?;
    let authority = rest.split('/').next()?;
    let port = authority.rsplit_once(':')?.1;
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_of_two_regions_make_two_derp_regions_meshed_inside() {
        let yaml = r#"
derp:
  server:
    region_id: 900
    region_code: eu
cluster:
  member_id: 1
  members:
    - { id: 1, address: "10.0.0.1:50444", control_url: "http://10.0.0.1:8080" }
    - { id: 2, address: "10.0.0.2:50444", control_url: "http://10.0.0.2:8080" }
    - { id: 3, address: "10.1.0.3:50444", control_url: "http://10.1.0.3:8080", region_id: 901, region_code: us }
"#;
        let config = Config::from_yaml(yaml).unwrap();
        let regions = derp_regions(&config, 1, "http://10.0.0.1:8080", 3478);
        assert_eq!(regions.len(), 2);
        assert_eq!((regions[0].region_id, regions[0].nodes.len()), (900, 2));
        assert_eq!(
            regions[0].nodes[0].ipv4, "10.0.0.1",
            "this member's node first"
        );
        assert_eq!(
            (
                regions[1].region_id,
                regions[1].region_code.as_str(),
                regions[1].nodes.len()
            ),
            (901, "us", 1)
        );
        assert_eq!(
            mesh_peers(&config, 1),
            vec!["http://10.0.0.2:8080/derp".to_string()]
        );
        let topology = Topology {
            derp: Vec::new(),
            dial_ips: dial_ips(&config, 1, "http://10.0.0.1:8080"),
        };
        let ips = |node: u64| -> Vec<String> {
            let plan = topology.dial_plan_for(node).unwrap();
            plan["Candidates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["IP"].as_str().unwrap().to_string())
                .collect()
        };
        // Every member, this one first, then the others in an order that differs between
        // nodes, so a dead member's clients split over the survivors.
        let orders: std::collections::BTreeSet<Vec<String>> = (0..64).map(ips).collect();
        assert_eq!(
            orders.into_iter().collect::<Vec<_>>(),
            [
                ["10.0.0.1", "10.0.0.2", "10.1.0.3"],
                ["10.0.0.1", "10.1.0.3", "10.0.0.2"]
            ]
        );
    }

    /// Clients fail over evenly twice in a row: those a dead member sent to a survivor do
    /// not all leave that survivor for the same member when it dies in turn.
    #[test]
    fn failing_over_twice_spreads_evenly_both_times() {
        let (a, b, c) = ("10.0.0.1", "10.0.0.2", "10.0.0.3");
        let next = |own: &str, others: &[&'static str], seed: u64| -> &'static str {
            dial_order(own, others, seed).next().copied().unwrap()
        };
        let seeds: Vec<u64> = (0..20_000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 7))
            .collect();
        // A dies: its clients go to B or C, about half each.
        let to_c: Vec<u64> = (seeds.iter().copied())
            .filter(|s| next(a, &[b, c], *s) == c)
            .collect();
        let share = to_c.len() as f64 / seeds.len() as f64;
        assert!(
            (0.45..0.55).contains(&share),
            "{share} of A's clients went to C"
        );
        // A is back and C dies: the clients that came from A split over A and B as well.
        let back_to_a = (to_c.iter()).filter(|s| next(c, &[a, b], **s) == a).count();
        let share = back_to_a as f64 / to_c.len() as f64;
        assert!((0.45..0.55).contains(&share), "{share} of them went to A");
    }

    #[test]
    fn url_parts() {
        assert_eq!(url_host("http://127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(url_port("http://127.0.0.1:8080"), Some(8080));
        assert_eq!(url_host("https://hs.example.com"), "hs.example.com");
        assert_eq!(url_port("https://hs.example.com"), None);
        assert_eq!(url_host("http://[::1]:80"), "::1");
    }
}
