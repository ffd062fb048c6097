//! Every decoder that takes bytes from outside, with seeds of its format. A target returns
//! normally for any input (accepted or refused); a panic is a bug.

use std::net::SocketAddr;

use hsd::control::keys::public_key;
use hsd::control::noise::{self, CipherState, SessionKeys};
use hsd::derp::frame::{self, Frame};
use hsd::registry::secrets::{self, SecretKind};
use hsd::registry::{DiscoKey, MachineKey, NodeKey};
use tokio::io::AsyncReadExt;

pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    pub check: fn(&[u8]),
}

/// The keys the Noise targets use; seeds are sealed with them.
fn session_keys() -> SessionKeys {
    SessionKeys {
        receive: [3; 32],
        send: [4; 32],
    }
}

const SERVER_PRIVATE: [u8; 32] = [5; 32];

fn register_seed(extra: &str) -> Vec<u8> {
    format!(
        r#"{{"Version":125,"NodeKey":"{}","OldNodeKey":"{}","Auth":{{"AuthKey":"hskey-auth-abc-def"}},"Expiry":"0001-01-01T00:00:00Z","Followup":"","Hostinfo":{{"Hostname":"h","OS":"linux","RequestTags":["tag:a"]}},"Ephemeral":false{extra}}}"#,
        NodeKey([1; 32]).to_text(),
        NodeKey([0; 32]).to_text()
    )
    .into_bytes()
}

pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "ts2021_upgrade",
            seeds: {
                let server_public = public_key(&SERVER_PRIVATE);
                (0..3u8)
                    .map(|i| {
                        let (init, _) = noise::initiate(&server_public, &[i + 9; 32], 125).unwrap();
                        base64_encode(&init).into_bytes()
                    })
                    .collect()
            },
            check: |b| {
                // The X-Tailscale-Handshake header: base64, then the initiation, then the
                // responder's handshake on it.
                let Ok(text) = std::str::from_utf8(b) else { return };
                let Some(bytes) = base64_decode(text.trim()) else { return };
                if let Ok(init) = noise::Initiation::parse(&bytes) {
                    let _ = noise::accept(&SERVER_PRIVATE, &init);
                }
            },
        },
        Target {
            name: "noise_records",
            seeds: {
                let keys = session_keys();
                let mut tx = CipherState::new(&keys.receive);
                let mut stream = Vec::new();
                for chunk in [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0u8; 100], &[7u8; 4000]] {
                    stream.extend(tx.seal_frame(chunk).unwrap());
                }
                vec![stream.clone(), stream[..stream.len() / 2].to_vec()]
            },
            check: |b| {
                let keys = session_keys();
                let mut stream = hsd::control::noise_stream::NoiseStream::new(b, &keys);
                let mut out = Vec::new();
                let _ = futures::executor::block_on(stream.read_to_end(&mut out));
            },
        },
        Target {
            name: "derp_frames",
            seeds: vec![
                [
                    Frame::SendPacket {
                        dst: [1; 32],
                        data: vec![9; 40],
                    }
                    .encode(),
                    Frame::ClientInfo {
                        key: [2; 32],
                        sealed: vec![1; 60],
                    }
                    .encode(),
                    Frame::Ping([1; 8]).encode(),
                    Frame::WatchConns.encode(),
                    Frame::NotePreferred(true).encode(),
                ]
                .concat(),
                Frame::ForwardPacket {
                    src: [1; 32],
                    dst: [2; 32],
                    data: vec![3; 100],
                }
                .encode(),
                br#"{"version":2,"meshKey":"00","CanAckPings":true,"IsProber":false}"#.to_vec(),
            ],
            check: |b| {
                let mut rest = b;
                while rest.len() >= frame::HEADER_LEN {
                    let ty = rest[0];
                    let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
                    if len > frame::MAX_FRAME_LEN {
                        return;
                    }
                    let end = (frame::HEADER_LEN + len as usize).min(rest.len());
                    let _ = Frame::decode(ty, rest[frame::HEADER_LEN..end].to_vec());
                    rest = &rest[end..];
                }
                // The JSON a client seals into ClientInfo.
                let _ = serde_json::from_slice::<frame::ClientInfo>(b);
            },
        },
        Target {
            name: "stun",
            seeds: vec![
                hsd::derp::stun::request(&[7; 12]),
                hsd::derp::stun::response(&[7; 12], "127.0.0.1:41641".parse().unwrap()),
            ],
            check: |b| {
                let from: SocketAddr = "10.0.0.1:3478".parse().unwrap();
                let _ = hsd::derp::stun::handle_packet(b, from);
                let _ = hsd::derp::stun::parse_response(b);
            },
        },
        Target {
            name: "register_request",
            seeds: vec![
                register_seed(""),
                register_seed(r#","Followup":"http://x/register/abc""#),
            ],
            check: |b| {
                let _ = hsd::control::register::parse(b);
            },
        },
        Target {
            name: "map_request",
            seeds: vec![format!(
                r#"{{"Version":125,"NodeKey":"{}","DiscoKey":"{}","Stream":true,"Compress":"zstd","Hostinfo":{{"Hostname":"h","NetInfo":{{"PreferredDERP":999}}}},"Endpoints":["1.2.3.4:41641","[::1]:41641"],"EndpointTypes":[1,2],"OmitPeers":false}}"#,
                NodeKey([1; 32]).to_text(),
                DiscoKey([2; 32]).to_text()
            )
            .into_bytes()],
            check: |b| {
                let _ = hsd::control::map::parse(b);
            },
        },
        Target {
            name: "rest_input",
            seeds: vec![
                b"\x00{\"name\":\"alice\",\"displayName\":\"A\",\"email\":\"a@b.c\"}".to_vec(),
                b"\x01{\"user\":\"1\",\"reusable\":true,\"expiration\":\"2030-01-01T00:00:00Z\",\"aclTags\":[\"tag:x\"]}"
                    .to_vec(),
                b"\x02{\"id\":7}".to_vec(),
                b"\x03{\"expiration\":\"2030-01-01T00:00:00Z\"}".to_vec(),
                b"\x04{\"prefix\":\"hskey-api-abc-***\",\"id\":\"3\"}".to_vec(),
                b"\x05{\"user\":\"bob\",\"authId\":\"abcdef\"}".to_vec(),
                b"\x06expiry=2030-01-01T00:00:00Z&disableExpiry=false".to_vec(),
                b"\x07local=true&id=12".to_vec(),
            ],
            check: |b| {
                if let Some((which, rest)) = b.split_first() {
                    let _ = hsd::admin::rest::check_request_input(*which, rest);
                }
            },
        },
        Target {
            name: "config_yaml",
            seeds: vec![
                b"server_url: http://127.0.0.1:8080\nlisten_addr: 127.0.0.1:8080\nprefixes:\n  v4: 100.64.0.0/10\ndns:\n  base_domain: example.com\ncluster:\n  member_id: 2\n  members:\n    - { id: 1, address: \"10.0.0.1:50444\" }\n    - { id: 2, address: \"10.0.0.2:50444\", region_id: 901 }\n".to_vec(),
                b"log:\n  level: hsd=debug\nnode:\n  expiry: 90d\nephemeral_node_inactivity_timeout: 30m\n".to_vec(),
            ],
            check: |b| {
                if let Ok(config) = hsd::config::Config::from_yaml(&String::from_utf8_lossy(b)) {
                    let _ = config.validate();
                }
            },
        },
        Target {
            name: "snapshot",
            seeds: vec![br#"{"last_applied":{"leader_id":{"term":1,"node_id":1},"index":5},"membership":{"log_id":null,"membership":{"configs":[[1]],"nodes":{"1":{"name":"m1","raft_addr":"127.0.0.1:50444","control_url":"http://x"}}}},"records":[["meta","{\"next_user\":1,\"next_node\":1,\"next_preauth\":0,\"next_api\":0,\"dns\":null,\"policy\":\"\"}"],["user/00000000000000000001","{\"id\":1,\"name\":\"a\",\"created_at\":5}"],["clock","7"]]}"#.to_vec()],
            check: |b| {
                let _ = hsd::raft::check_snapshot(b);
            },
        },
        Target {
            name: "raft_rpc",
            seeds: vec![
                [&[0u8][..], br#"{"vote":{"leader_id":{"term":2,"node_id":1},"committed":true},"prev_log_id":null,"entries":[{"log_id":{"leader_id":{"term":2,"node_id":1},"index":1},"payload":"Blank"}],"leader_commit":null}"#].concat(),
                [&[1u8][..], br#"{"vote":{"leader_id":{"term":3,"node_id":2},"committed":false},"last_log_id":null}"#].concat(),
                [&[3u8][..], br#"{"Propose":{"id":"0000000000000000000000000000002a","command":{"CreateUser":{"name":"x"}}}}"#].concat(),
            ],
            check: |b| {
                if let Some((method, rest)) = b.split_first() {
                    let _ = hsd::raft::check_member_message(*method, rest);
                }
            },
        },
        Target {
            name: "key_text",
            seeds: vec![
                NodeKey([9; 32]).to_text().into_bytes(),
                MachineKey([9; 32]).to_text().into_bytes(),
                secrets::generate(SecretKind::PreAuth).full.into_bytes(),
                b"90d".to_vec(),
                b"1h30m".to_vec(),
            ],
            check: |b| {
                let text = String::from_utf8_lossy(b);
                let _ = NodeKey::parse(&text);
                let _ = MachineKey::parse(&text);
                let _ = DiscoKey::parse(&text);
                let _ = secrets::parse(SecretKind::PreAuth, &text);
                let _ = secrets::parse(SecretKind::Api, &text);
                let _ = hsd::config::parse_duration(&text);
            },
        },
    ]
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}
