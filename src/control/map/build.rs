//! Builds `MapResponse`s: one node's JSON (a peer's is encoded once per change and shared
//! by every receiver, see `hub.rs`), the full netmap assembled from those shared pieces,
//! and the framing (`u32 LE length` + one zstd frame) every message on the stream uses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::control::ControlSettings;
use crate::control::policy::{Access, FilterChanges};
use crate::control::tailcfg::{
    GO_ZERO_TIME, MapResponse, NodeJson, PeerChange, RawJson, UserProfile,
};
use crate::policy::{Piece, SharedText};
use crate::presence::Presence;
use crate::registry::{Node, NodeId, Registry, Timestamp, UserId};

/// The `Node` capability that stops the client probing public hosts for captive portals.
const CAP_DISABLE_CAPTIVE_PORTAL: &str = "disable-captive-portal-detection";

/// Everything a netmap is built from: a registry view and this member's presence.
pub struct MapContext<'a> {
    pub view: &'a Registry,
    pub presence: &'a Presence,
    pub settings: &'a ControlSettings,
}

impl MapContext<'_> {
    pub fn fqdn(&self, node: &Node) -> String {
        if self.settings.base_domain.is_empty() {
            format!("{}.", node.given_name)
        } else {
            format!("{}.{}.", node.given_name, self.settings.base_domain)
        }
    }

    /// One node as the client sees it. `is_self` adds the self-only capabilities and omits
    /// presence fields (the client knows whether it is online).
    pub fn node_json(&self, node: &Node, is_self: bool) -> NodeJson {
        let now = Timestamp::now();
        let live = self.presence.get(node.id);
        let online = self.presence.is_online(node.id);
        // Until a node reports its home DERP, point at this member's region: its relays
        // mesh, so they reach the node wherever in the region it is homed.
        let cluster_region = self
            .settings
            .topology
            .borrow()
            .derp
            .first()
            .map(|r| r.region_id)
            .unwrap_or(0);
        let home_derp = live
            .as_ref()
            .map(|p| p.home_derp)
            .filter(|d| *d > 0)
            .unwrap_or(cluster_region);
        let addresses: Vec<String> = node
            .ipv4
            .map(|ip| format!("{ip}/32"))
            .into_iter()
            .chain(node.ipv6.map(|ip| format!("{ip}/128")))
            .collect();
        let hostinfo = stored_hostinfo(&node.hostinfo);
        let mut cap_map = BTreeMap::new();
        if is_self {
            cap_map.insert(CAP_DISABLE_CAPTIVE_PORTAL.to_string(), Value::Null);
        }
        NodeJson {
            id: node.id.0,
            stable_id: node.id.0.to_string(),
            name: self.fqdn(node),
            user: node.user.0,
            key: node.node_key.to_text(),
            key_expiry: node
                .expiry
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| GO_ZERO_TIME.into()),
            machine: node.machine_key.to_text(),
            disco_key: node.disco_key.to_text(),
            allowed_ips: addresses.clone(),
            primary_routes: Vec::new(),
            addresses,
            endpoints: live.map(|p| p.endpoints).unwrap_or_default(),
            home_derp,
            legacy_derp: if home_derp > 0 {
                format!("127.3.3.40:{home_derp}")
            } else {
                String::new()
            },
            hostinfo,
            created: node.created_at.to_rfc3339(),
            tags: node.tags.clone(),
            online: (!is_self).then_some(online),
            // Only offline peers carry LastSeen; on an online peer it confuses clients.
            last_seen: if is_self || online {
                None
            } else {
                node.last_seen.map(Timestamp::to_rfc3339)
            },
            machine_authorized: node.approved,
            expired: node.is_expired(now),
            cap_map,
        }
    }

    /// The access decisions for this view (the member's compiled policy).
    pub fn access(&self) -> Access {
        self.settings
            .access
            .access(self.view, self.presence, &self.settings.server_url)
    }

    /// Compiles the policy for this view as the one the member keeps (the hub's, at a tick).
    pub fn keep_access(&self) {
        self.settings
            .access
            .keep(self.view, self.presence, &self.settings.server_url);
    }

    /// A peer's JSON as every receiver sees it.
    pub fn peer_json(&self, node: &Node) -> RawJson {
        raw(&self.node_json(node, false))
    }

    /// A router peer's JSON as `viewer` sees it (the routes it may use through it);
    /// `None` when the shared JSON is right.
    pub fn peer_json_for(&self, access: &Access, viewer: &Node, peer: &Node) -> Option<RawJson> {
        let routes = access.peer_routes(viewer, peer)?;
        let mut json = self.node_json(peer, false);
        with_routes(&mut json, &routes);
        Some(raw(&json))
    }

    /// A node's own JSON (`MapResponse.Node`): its routes and `nodeAttrs` capabilities.
    pub fn self_json(&self, node: &Node) -> RawJson {
        let mut json = self.node_json(node, true);
        let access = self.access();
        if let Some(routes) = access.self_routes(node) {
            with_routes(&mut json, &routes);
        }
        for attr in access.node_attrs(node) {
            json.cap_map.entry(attr).or_insert(Value::Null);
        }
        raw(&json)
    }

    /// The peers `viewer` may see, sorted by id, each with its JSON for this viewer.
    pub fn visible_peers(&self, viewer: &Node) -> Vec<(&Node, RawJson)> {
        let access = self.access();
        self.view
            .nodes()
            .map(|n| n.as_ref())
            .filter(|peer| access.can_see(viewer, peer))
            .map(|peer| {
                let json = self
                    .peer_json_for(&access, viewer, peer)
                    .unwrap_or_else(|| self.peer_json(peer));
                (peer, json)
            })
            .collect()
    }

    pub fn user_profiles(&self, users: impl IntoIterator<Item = UserId>) -> Vec<RawJson> {
        let ids: BTreeSet<UserId> = users.into_iter().collect();
        ids.into_iter()
            .filter_map(|id| self.user_profile(id))
            .collect()
    }

    /// A user's `UserProfile` (`None` for no user: tagged nodes have none).
    pub fn user_profile(&self, id: UserId) -> Option<RawJson> {
        let u = self.view.user(id)?;
        Some(raw(&UserProfile {
            id: u.id.0,
            login_name: u.name.clone(),
            display_name: u.name.clone(),
            ..Default::default()
        }))
    }

    pub fn dns_config(&self) -> Value {
        let s = self.settings;
        let mut domains: Vec<String> = Vec::new();
        if s.magic_dns && !s.base_domain.is_empty() {
            domains.push(s.base_domain.clone());
        }
        domains.extend(s.search_domains.iter().cloned());
        let resolvers: Vec<Value> = s
            .nameservers
            .iter()
            .map(|ns| json!({ "Addr": ns }))
            .collect();
        let mut dns = json!({ "Domains": domains, "Proxied": s.magic_dns });
        if !resolvers.is_empty() {
            dns["Resolvers"] = Value::Array(resolvers);
        }
        dns
    }

    pub fn derp_map(&self) -> Value {
        let mut regions = serde_json::Map::new();
        let topology = self.settings.topology.borrow().clone();
        for region in &topology.derp {
            let nodes: Vec<Value> = region
                .nodes
                .iter()
                .map(|n| {
                    let mut node = json!({
                        "Name": n.name,
                        "RegionID": region.region_id,
                        "HostName": n.host,
                        "IPv6": "none",
                        "STUNPort": n.stun_port,
                        "DERPPort": n.derp_port,
                    });
                    // An address saves the client a DNS lookup (none may be reachable).
                    if !n.ipv4.is_empty() {
                        node["IPv4"] = json!(n.ipv4);
                    }
                    node
                })
                .collect();
            regions.insert(
                region.region_id.to_string(),
                json!({
                    "RegionID": region.region_id,
                    "RegionCode": region.region_code,
                    "RegionName": region.region_name,
                    "Nodes": nodes,
                }),
            );
        }
        json!({ "Regions": regions, "OmitDefaultRegions": true })
    }

    /// The complete netmap for `me` from its peers' shared JSON (`peers`, sorted by id)
    /// and their owners.
    pub fn full_map(
        &self,
        me: &Node,
        peers: Vec<RawJson>,
        owners: BTreeSet<UserId>,
    ) -> MapResponse {
        let users = std::iter::once(me.user).chain(owners);
        let access = self.access();
        MapResponse {
            node: Some(self.self_json(me)),
            derp_map: Some(self.derp_map()),
            user_profiles: self.user_profiles(users),
            peers: Some(peers),
            dns_config: Some(self.dns_config()),
            domain: if self.settings.base_domain.is_empty() {
                "hsd".into()
            } else {
                self.settings.base_domain.clone()
            },
            packet_filters: Some(access.packet_filters(me).0),
            ssh_policy: access.ssh_policy(me),
            control_time: Some(Timestamp::now().to_rfc3339()),
            // Stops the client uploading logs to Tailscale's log service.
            debug: Some(json!({ "DisableLogTail": true })),
            control_dial_plan: self
                .settings
                .topology
                .borrow()
                .dial_plan_for(crate::derp::region::dial_seed(&me.machine_key.0)),
            ..Default::default()
        }
    }

    /// The complete netmap for `me`, encoding every visible peer now (one-shot polls).
    pub fn full_map_now(&self, me: &Node) -> MapResponse {
        let mut owners = BTreeSet::new();
        let peers = self
            .visible_peers(me)
            .into_iter()
            .map(|(p, json)| {
                owners.insert(p.user);
                json
            })
            .collect();
        self.full_map(me, peers, owners)
    }

    /// A patch for a peer whose endpoints or home DERP changed.
    pub fn peer_patch(&self, id: NodeId) -> RawJson {
        let live = self.presence.get(id).unwrap_or_default();
        // Zero and empty mean "unchanged" to the client, so leave unknown fields out.
        raw(&PeerChange {
            node_id: id.0,
            derp_region: (live.home_derp > 0).then_some(live.home_derp),
            endpoints: (!live.endpoints.is_empty()).then_some(live.endpoints),
            ..Default::default()
        })
    }
}

/// A node's `AllowedIPs` and `PrimaryRoutes` as one viewer (or itself) sees them.
fn with_routes(json: &mut NodeJson, routes: &crate::policy::PeerRoutes) {
    let strings = |nets: &[ipnet::IpNet]| nets.iter().map(ToString::to_string).collect();
    json.allowed_ips = strings(&routes.allowed_ips);
    json.primary_routes = strings(&routes.primary_routes);
}

/// Encodes a value once, to be embedded in many messages.
pub fn raw<T: Serialize>(value: &T) -> RawJson {
    Arc::from(serde_json::value::to_raw_value(value).expect("map types always serialize"))
}

/// The stored Hostinfo as raw JSON: it was encoded from a JSON object when recorded, so it
/// is embedded without parsing; anything else becomes `{}`.
fn stored_hostinfo(text: &str) -> Box<RawValue> {
    let looks_like_object = text.starts_with('{') && text.ends_with('}');
    looks_like_object
        .then(|| RawValue::from_string(text.to_string()).ok())
        .flatten()
        .unwrap_or_else(|| RawValue::from_string("{}".into()).expect("valid JSON"))
}

/// Frames one message: u32 little-endian length, then one complete zstd frame of JSON.
/// `compress` is false only for clients that did not ask for zstd.
pub fn encode_frame(response: &MapResponse, compress: bool) -> Bytes {
    let json = serde_json::to_vec(response).expect("map responses always serialize");
    let body = if compress { zstd_frame(&json) } else { json };
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// The JSON of `response` up to where its `PacketFilters` go: the opening brace and each
/// field with its comma (see `encode_with_filters`).
pub fn head_before_filters(response: &MapResponse) -> String {
    let mut head = serde_json::to_string(response).expect("map responses always serialize");
    let closing = head.pop();
    debug_assert_eq!(closing, Some('}'), "a map response is a JSON object");
    if head != "{" {
        head.push(',');
    }
    head
}

/// Frames a response with `filters` as its `PacketFilters`; `head` is the rest of it (see
/// `head_before_filters`): this receiver's own, or one shared by the receivers of a delta
/// that see the same of it. The body is assembled from pieces, each its own zstd frame:
/// this receiver's text compressed here, shared text (the head, the sources: a source
/// joining a group changes that bucket in thousands of filters at once) compressed once
/// for every receiver and copied in.
pub fn encode_with_filters(head: Piece<'_>, filters: &FilterChanges<'_>, compress: bool) -> Bytes {
    let mut body = FrameWriter::new(compress);
    body.piece(&head);
    body.own("\"PacketFilters\":{");
    for (n, (name, chunk)) in filters.iter().enumerate() {
        if n > 0 {
            body.own(",");
        }
        body.own(&serde_json::to_string(name).expect("strings serialize"));
        body.own(":");
        match chunk {
            None => body.own("null"),
            Some(pieces) => pieces.iter().for_each(|piece| body.piece(piece)),
        }
    }
    body.own("}}");
    body.finish()
}

/// One framed message from text pieces, in one buffer: runs of a receiver's own text
/// become one zstd frame each (when compressing), shared text its cached frame.
struct FrameWriter {
    compress: bool,
    pending: String,
    out: Vec<u8>,
}

impl FrameWriter {
    fn new(compress: bool) -> Self {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(&[0; 4]); // the length, once known
        FrameWriter {
            compress,
            pending: String::new(),
            out,
        }
    }

    fn own(&mut self, text: &str) {
        self.pending.push_str(text);
    }

    fn piece(&mut self, piece: &Piece<'_>) {
        match piece {
            Piece::Own(text) => self.own(text),
            Piece::Shared(shared) => self.shared(shared),
        }
    }

    fn shared(&mut self, text: &SharedText) {
        self.flush();
        if self.compress {
            let frame = text.compressed(|plain| Bytes::from(zstd_frame(plain)));
            self.out.extend_from_slice(&frame);
        } else {
            self.out.extend_from_slice(text.plain());
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if self.compress {
            self.out
                .extend_from_slice(&zstd_frame_for_one(self.pending.as_bytes()));
        } else {
            self.out.extend_from_slice(self.pending.as_bytes());
        }
        self.pending.clear();
    }

    fn finish(mut self) -> Bytes {
        self.flush();
        let len = (self.out.len() - 4) as u32;
        self.out[..4].copy_from_slice(&len.to_le_bytes());
        Bytes::from(self.out)
    }
}

/// One zstd frame of `data` at level 1 (what tailscale's own control sends): for text many
/// receivers share, where the bytes saved count once per receiver.
pub fn zstd_frame(data: &[u8]) -> Vec<u8> {
    compress_with(SHARED_LEVEL, data)
}

/// One zstd frame of text that goes to one receiver only. Runs of a few hundred bytes (a
/// filter chunk's own part, around shared sources) are most of what each receiver of a
/// delta costs to compress: at zstd's fast level -1 they cost a third of level 1's time
/// for about a tenth more bytes. Longer runs keep level 1.
pub fn zstd_frame_for_one(data: &[u8]) -> Vec<u8> {
    let level = if data.len() <= FAST_LEVEL_MAX_BYTES {
        FAST_LEVEL
    } else {
        SHARED_LEVEL
    };
    compress_with(level, data)
}

const SHARED_LEVEL: i32 = 1;
const FAST_LEVEL: i32 = -1;
const FAST_LEVEL_MAX_BYTES: usize = 4096;
/// zstd sizes a context's block buffers by its window (up to 128 KiB blocks). A hub's
/// blocks of peers are larger than that, so at zstd's default window each compressing
/// thread's context grew to ~576 KiB; a 64 KiB window halves that, and peer JSON repeats
/// itself within a few peers, so frames come out no larger (a 1,000-peer netmap: 14,226
/// bytes against 14,706).
const WINDOW_LOG: u32 = 16;

fn compress_with(level: i32, data: &[u8]) -> Vec<u8> {
    // One compression context per thread, its level switched as needed (a parameter, not a
    // new context: a second context per thread cost each member about a megabyte). Making
    // one per frame was a few percent of the CPU when thousands of clients fetched netmaps.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, i32)>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (compressor, set) = match cell.as_mut() {
            Some(c) => c,
            None => cell.insert((new_compressor(level), level)),
        };
        if *set != level {
            compressor
                .set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
                .expect("zstd accepts levels -1 and 1");
            *set = level;
        }
        let mut frame = compressor
            .compress(data)
            .expect("zstd compression into a Vec cannot fail");
        // `compress` reserves room for the worst case, about the input's size, and frames
        // are kept (a hub's shared blocks of peers, deltas): give the slack back.
        frame.shrink_to_fit();
        frame
    })
}

fn new_compressor(level: i32) -> zstd::bulk::Compressor<'static> {
    let mut compressor = zstd::bulk::Compressor::new(level).expect("a zstd context");
    compressor
        .set_parameter(zstd::zstd_safe::CParameter::WindowLog(WINDOW_LOG))
        .expect("zstd accepts a 64 KiB window");
    compressor
}

/// One message on the map stream as the chunks it is written in: the length prefix, then
/// the body — one zstd frame, or several that the client decodes as one (tailscale's
/// `zstdframe.AppendDecode` takes "zero or more frames"). Chunks shared by many receivers
/// (blocks of peers) are the same memory for all of them.
#[derive(Clone, Debug, Default)]
pub struct Message {
    chunks: Vec<Bytes>,
}

impl Message {
    /// A message already framed with its length prefix.
    pub fn framed(frame: Bytes) -> Message {
        Message {
            chunks: vec![frame],
        }
    }

    /// A message from body chunks; the length prefix is added here.
    pub fn from_body(body: Vec<Bytes>) -> Message {
        let len: usize = body.iter().map(Bytes::len).sum();
        let mut chunks = Vec::with_capacity(body.len() + 1);
        chunks.push(Bytes::copy_from_slice(&(len as u32).to_le_bytes()));
        chunks.extend(body);
        Message { chunks }
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn into_chunks(self) -> Vec<Bytes> {
        self.chunks
    }

    /// The whole message in one buffer (tests, tools).
    pub fn to_bytes(&self) -> Bytes {
        if let [one] = self.chunks.as_slice() {
            return one.clone();
        }
        let mut out = Vec::with_capacity(self.len());
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        Bytes::from(out)
    }
}
