//! Full netmaps. A node that sees every shared peer (`Access::sees_all_shared`) gets its
//! netmap assembled from the hub's blocks: its own head and tail, the block holding itself
//! rebuilt without it, and every other block as the very bytes (zstd frame) every other
//! full netmap of this state uses — so a full netmap of N peers costs one block's encoding
//! and no per-peer work. Any other node gets one encoded from the peer cache.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;

use super::build::{self, MapContext, Message};
use super::hub::{self, BLOCK_IDS, HubState, PeerEntry};
use crate::control::tailcfg::MapResponse;
use crate::registry::{Node, UserId};

/// `me`'s full netmap as of `state` (and `ctx.view` for everything but the shared peers).
pub fn full_message(ctx: &MapContext<'_>, state: &HubState, me: &Node, compress: bool) -> Message {
    if !ctx.access().sees_all_shared(me) {
        let (peers, owners) = hub::visible_peers(ctx, state, me);
        return Message::framed(build::encode_frame(
            &ctx.full_map(me, peers, owners),
            compress,
        ));
    }
    let own_block = me.id.0 / BLOCK_IDS;
    let mut owners = BTreeSet::new();
    let mut custom: Vec<&Arc<PeerEntry>> = Vec::new();
    for (b, block) in state.blocks.iter() {
        owners.extend(block.entries.iter().map(|e| e.node.user));
        if *b == own_block {
            custom.extend(block.entries.iter().filter(|e| e.node.id != me.id));
        }
    }
    owners.remove(&UserId(0));
    let (head, tail) = head_and_tail(ctx, me, owners);

    // head + `"Peers":[` + the own block without `me`
    let mut first = head;
    first.extend_from_slice(br#","Peers":["#);
    for (i, e) in custom.iter().enumerate() {
        if i > 0 {
            first.push(b',');
        }
        first.extend_from_slice(e.json.get().as_bytes());
    }
    let mut any_peer = !custom.is_empty();
    let mut body = vec![encode(&first, compress)];
    for (b, block) in state.blocks.iter() {
        if *b == own_block {
            continue;
        }
        if any_peer {
            body.push(encode(b",", compress));
        }
        body.push(block.bytes(compress));
        any_peer = true;
    }
    let mut last = b"],".to_vec();
    last.extend_from_slice(&tail[1..]);
    body.push(encode(&last, compress));
    Message::from_body(body)
}

fn encode(data: &[u8], compress: bool) -> Bytes {
    if compress {
        Bytes::from(build::zstd_frame(data))
    } else {
        Bytes::copy_from_slice(data)
    }
}

/// The netmap's fields before and after `Peers`: `{"Node":…,"DERPMap":…` (no closing
/// brace) and `{…}` with the rest.
fn head_and_tail(ctx: &MapContext<'_>, me: &Node, owners: BTreeSet<UserId>) -> (Vec<u8>, Vec<u8>) {
    let mut rest = ctx.full_map(me, Vec::new(), owners);
    rest.peers = None;
    let head = MapResponse {
        node: rest.node.take(),
        derp_map: rest.derp_map.take(),
        ..Default::default()
    };
    let mut head = serde_json::to_vec(&head).expect("map responses always serialize");
    head.pop(); // the closing brace: `"Peers"` follows
    let tail = serde_json::to_vec(&rest).expect("map responses always serialize");
    (head, tail)
}
