//! The policy seam: who may see whom, and each node's packet filter.
//!
//! Today this is allow-all between approved nodes. The ACL engine replaces these two
//! functions; map building calls nothing else for access decisions.

use serde_json::{Value, json};

use crate::registry::{Node, Registry};

/// Whether `viewer` gets `peer` in its netmap. Nodes waiting for approval see no one and
/// are seen by no one.
pub fn can_see(_view: &Registry, viewer: &Node, peer: &Node) -> bool {
    viewer.id != peer.id && viewer.approved && peer.approved
}

/// The packet filter for `node`, as `PacketFilters` (named filters, capver ≥ 81). An empty
/// `base` list denies everything, which is what an unapproved node gets.
pub fn packet_filters(_view: &Registry, node: &Node) -> Value {
    if !node.approved {
        return json!({ "base": [] });
    }
    json!({
        "base": [{
            "SrcIPs": ["*"],
            "DstPorts": [{ "IP": "*", "Ports": { "First": 0, "Last": 65535 } }],
        }]
    })
}

/// Whether every node that `sees_all_shared` has `peer` in its netmap. Such peers are
/// encoded once into shared blocks that full netmaps are assembled from.
pub fn seen_by_all(_view: &Registry, peer: &Node) -> bool {
    peer.approved
}

/// Whether `viewer` sees exactly the peers `seen_by_all` selects (except itself), so its
/// full netmap can be assembled from the shared blocks.
pub fn sees_all_shared(_view: &Registry, viewer: &Node) -> bool {
    viewer.approved
}
