//! Full netmaps, assembled from the hub's blocks: the node's own head and tail, the blocks
//! it sees only part of (its own, or under a policy) rebuilt from the peer cache, and
//! every block it sees whole as the very bytes (zstd frame) every other full netmap of
//! this state uses — so a full netmap of N peers costs a few blocks' encoding, not N
//! peers'.

use std::collections::BTreeSet;

use bytes::Bytes;

use super::build::{self, MapContext, Message};
use super::hub::{BLOCK_IDS, HubState};
use crate::control::policy::Seen;
use crate::control::tailcfg::MapResponse;
use crate::registry::{Node, UserId};

/// `me`'s full netmap as of `state` (and `ctx.view` for everything but the peers).
///
/// A block of peers that `me` sees whole (every approved peer in it visible, none needing
/// JSON of its own for this viewer: routes) goes out as the block's shared bytes; any
/// other block as the visible peers' JSON. Without a policy every block but `me`'s own is
/// shared; under a policy, as many as the policy allows.
pub fn full_message(ctx: &MapContext<'_>, state: &HubState, me: &Node, compress: bool) -> Message {
    let access = ctx.access();
    let everyone = access.sees_all_shared(me);
    // Under a policy, how `me` sees each peer of each block, asked once per peer (three
    // times, with two lookups each, cost a 10,000-peer netmap more than its encoding).
    let seen: Vec<Vec<Seen>> = if everyone {
        Vec::new()
    } else {
        let viewer = access.viewer(me);
        let blocks = state.blocks.values();
        blocks
            .map(|block| block.entries.iter().map(|e| viewer.sees(&e.node)).collect())
            .collect()
    };
    let sight = |block: usize, i: usize| seen.get(block).map_or(Seen::Shared, |s| s[i]);
    let mut owners = BTreeSet::new();
    for (k, block) in state.blocks.values().enumerate() {
        owners.extend(
            (block.entries.iter().enumerate())
                .filter(|(i, _)| sight(k, *i) != Seen::Hidden)
                .map(|(_, e)| e.node.user),
        );
    }
    owners.remove(&UserId(0));
    let (head, tail) = head_and_tail(ctx, me, owners);

    let mut out = Assembly::new(head, compress);
    out.text(br#","Peers":["#);
    for (k, (b, block)) in state.blocks.iter().enumerate() {
        let whole = *b != me.id.0 / BLOCK_IDS
            && (everyone || (0..block.entries.len()).all(|i| sight(k, i) == Seen::Shared));
        if whole {
            if !block.entries.is_empty() {
                out.shared(block.bytes(compress));
            }
            continue;
        }
        for (i, e) in block.entries.iter().enumerate() {
            let own = match sight(k, i) {
                _ if e.node.id == me.id => continue,
                Seen::Hidden => continue,
                Seen::Shared => None,
                Seen::Routed => ctx.peer_json_for(&access, me, &e.node),
            };
            out.peer(own.as_ref().unwrap_or(&e.json).get().as_bytes());
        }
    }
    out.text(b"],");
    out.text(&tail[1..]);
    out.finish()
}

/// A netmap as a sequence of frames: text written here, shared blocks as they are.
struct Assembly {
    frames: Vec<Bytes>,
    pending: Vec<u8>,
    any_peer: bool,
    compress: bool,
}

impl Assembly {
    fn new(head: Vec<u8>, compress: bool) -> Self {
        Assembly {
            frames: Vec::new(),
            pending: head,
            any_peer: false,
            compress,
        }
    }

    fn text(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    /// One peer's JSON, comma-separated from the previous one.
    fn peer(&mut self, json: &[u8]) {
        if self.any_peer {
            self.pending.push(b',');
        }
        self.pending.extend_from_slice(json);
        self.any_peer = true;
    }

    /// A shared block (its peers joined by commas, possibly a zstd frame).
    fn shared(&mut self, block: Bytes) {
        if self.any_peer {
            self.pending.push(b',');
        }
        self.flush();
        self.frames.push(block);
        self.any_peer = true;
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let text = std::mem::take(&mut self.pending);
            self.frames.push(encode(&text, self.compress));
        }
    }

    fn finish(mut self) -> Message {
        self.flush();
        Message::from_body(self.frames)
    }
}

fn encode(data: &[u8], compress: bool) -> Bytes {
    if compress {
        Bytes::from(build::zstd_frame_for_one(data))
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
