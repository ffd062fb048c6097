//! DERP wire framing: `[type u8][len u32 BE][payload]`, the frame types the relay speaks,
//! and the NaCl-box helpers used by the login handshake.
//!
//! Layout facts follow tailscale's `derp/derp.go` (protocol version 2).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A 32-byte Curve25519 public key (node key or DERP server key).
pub type Key = [u8; 32];

/// "DERP🔑": prefix of the server-key frame so clients can tell they reached a DERP server.
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91];
pub const PROTOCOL_VERSION: u32 = 2;
pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 24;
pub const HEADER_LEN: usize = 5;
/// Largest packet a client may relay (upstream `MaxPacketSize`).
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest frame we accept at all; anything bigger is a broken or hostile peer.
pub const MAX_FRAME_LEN: u32 = 1 << 20;
/// Largest ClientInfo accepted before the client is trusted (upstream uses 256 KiB).
pub const MAX_CLIENT_INFO_LEN: u32 = 256 << 10;

pub const FRAME_SERVER_KEY: u8 = 0x01;
pub const FRAME_CLIENT_INFO: u8 = 0x02;
pub const FRAME_SERVER_INFO: u8 = 0x03;
pub const FRAME_SEND_PACKET: u8 = 0x04;
pub const FRAME_RECV_PACKET: u8 = 0x05;
pub const FRAME_KEEP_ALIVE: u8 = 0x06;
pub const FRAME_NOTE_PREFERRED: u8 = 0x07;
pub const FRAME_PEER_GONE: u8 = 0x08;
pub const FRAME_PEER_PRESENT: u8 = 0x09;
pub const FRAME_FORWARD_PACKET: u8 = 0x0a;
pub const FRAME_WATCH_CONNS: u8 = 0x10;
pub const FRAME_CLOSE_PEER: u8 = 0x11;
pub const FRAME_PING: u8 = 0x12;
pub const FRAME_PONG: u8 = 0x13;
pub const FRAME_HEALTH: u8 = 0x14;
pub const FRAME_RESTARTING: u8 = 0x15;

/// PeerGone reason: the peer was connected here and left.
pub const PEER_GONE_DISCONNECTED: u8 = 0x00;
/// PeerGone reason: the server has no such peer (reply to a send to an unknown key).
pub const PEER_GONE_NOT_HERE: u8 = 0x01;

/// PeerPresent flag: an ordinary client.
pub const PEER_PRESENT_IS_REGULAR: u8 = 1 << 0;
/// PeerPresent flag: a mesh peer (another DERP server).
pub const PEER_PRESENT_IS_MESH_PEER: u8 = 1 << 1;

/// Framing or handshake failure. Each one ends only the connection it happened on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame type {ty:#04x} length {len} exceeds limit {max}")]
    TooLarge { ty: u8, len: u32, max: u32 },
    #[error("malformed frame type {ty:#04x}: {why}")]
    Malformed { ty: u8, why: &'static str },
    #[error("unexpected frame type {got:#04x}, want {want:#04x}")]
    UnexpectedType { got: u8, want: u8 },
    #[error("naclbox could not be opened (wrong key or corrupted)")]
    BoxOpen,
    #[error("bad handshake json: {0}")]
    Json(#[from] serde_json::Error),
}

/// One decoded DERP frame, either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    ServerKey {
        key: Key,
    },
    /// `sealed` is nonce + box, opened by the receiver with the sender's key.
    ClientInfo {
        key: Key,
        sealed: Vec<u8>,
    },
    ServerInfo {
        sealed: Vec<u8>,
    },
    SendPacket {
        dst: Key,
        data: Vec<u8>,
    },
    RecvPacket {
        src: Key,
        data: Vec<u8>,
    },
    KeepAlive,
    NotePreferred(bool),
    PeerGone {
        key: Key,
        reason: u8,
    },
    /// `addr` and `flags` are absent when an older server sent only the key.
    PeerPresent {
        key: Key,
        addr: Option<SocketAddr>,
        flags: u8,
    },
    ForwardPacket {
        src: Key,
        dst: Key,
        data: Vec<u8>,
    },
    WatchConns,
    ClosePeer {
        key: Key,
    },
    Ping([u8; 8]),
    Pong([u8; 8]),
    Health(String),
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    /// Types we do not know are skipped, as upstream does, for forward compatibility.
    Unknown {
        ty: u8,
        payload: Vec<u8>,
    },
}

fn key_at(b: &[u8], at: usize) -> Key {
    let mut k = [0u8; 32];
    k.copy_from_slice(&b[at..at + KEY_LEN]);
    k
}

impl Frame {
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::ServerKey { .. } => FRAME_SERVER_KEY,
            Frame::ClientInfo { .. } => FRAME_CLIENT_INFO,
            Frame::ServerInfo { .. } => FRAME_SERVER_INFO,
            Frame::SendPacket { .. } => FRAME_SEND_PACKET,
            Frame::RecvPacket { .. } => FRAME_RECV_PACKET,
            Frame::KeepAlive => FRAME_KEEP_ALIVE,
            Frame::NotePreferred(_) => FRAME_NOTE_PREFERRED,
            Frame::PeerGone { .. } => FRAME_PEER_GONE,
            Frame::PeerPresent { .. } => FRAME_PEER_PRESENT,
            Frame::ForwardPacket { .. } => FRAME_FORWARD_PACKET,
            Frame::WatchConns => FRAME_WATCH_CONNS,
            Frame::ClosePeer { .. } => FRAME_CLOSE_PEER,
            Frame::Ping(_) => FRAME_PING,
            Frame::Pong(_) => FRAME_PONG,
            Frame::Health(_) => FRAME_HEALTH,
            Frame::Restarting { .. } => FRAME_RESTARTING,
            Frame::Unknown { ty, .. } => *ty,
        }
    }

    /// Serializes the payload (without the 5-byte header).
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Frame::ServerKey { key } => [&MAGIC[..], &key[..]].concat(),
            Frame::ClientInfo { key, sealed } => [&key[..], &sealed[..]].concat(),
            Frame::ServerInfo { sealed } => sealed.clone(),
            Frame::SendPacket { dst: k, data } | Frame::RecvPacket { src: k, data } => {
                [&k[..], &data[..]].concat()
            }
            Frame::KeepAlive | Frame::WatchConns => Vec::new(),
            Frame::NotePreferred(p) => vec![u8::from(*p)],
            Frame::PeerGone { key, reason } => [&key[..], &[*reason][..]].concat(),
            Frame::PeerPresent { key, addr, flags } => {
                let mut b = key.to_vec();
                if let Some(a) = addr {
                    let ip = match a.ip() {
                        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                        IpAddr::V6(v6) => v6,
                    };
                    b.extend_from_slice(&ip.octets());
                    b.extend_from_slice(&a.port().to_be_bytes());
                    b.push(*flags);
                }
                b
            }
            Frame::ForwardPacket { src, dst, data } => [&src[..], &dst[..], &data[..]].concat(),
            Frame::ClosePeer { key } => key.to_vec(),
            Frame::Ping(d) | Frame::Pong(d) => d.to_vec(),
            Frame::Health(s) => s.as_bytes().to_vec(),
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => [reconnect_in_ms.to_be_bytes(), try_for_ms.to_be_bytes()].concat(),
            Frame::Unknown { payload, .. } => payload.clone(),
        }
    }

    /// Full wire encoding: header + payload.
    pub fn encode(&self) -> Vec<u8> {
        let payload = self.payload();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.push(self.frame_type());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses a payload of frame type `ty`. Packet frames longer than [`MAX_PACKET_SIZE`] are
    /// rejected; extra trailing bytes on fixed-size frames are tolerated (future fields).
    pub fn decode(ty: u8, b: Vec<u8>) -> Result<Frame, FrameError> {
        let bad = |why| FrameError::Malformed { ty, why };
        let need = |n: usize| {
            if b.len() < n {
                Err(bad("short payload"))
            } else {
                Ok(())
            }
        };
        Ok(match ty {
            FRAME_SERVER_KEY => {
                need(MAGIC.len() + KEY_LEN)?;
                if b[..8] != MAGIC {
                    return Err(bad("bad magic"));
                }
                Frame::ServerKey { key: key_at(&b, 8) }
            }
            FRAME_CLIENT_INFO => {
                need(KEY_LEN + NONCE_LEN)?;
                Frame::ClientInfo {
                    key: key_at(&b, 0),
                    sealed: b[KEY_LEN..].to_vec(),
                }
            }
            FRAME_SERVER_INFO => {
                need(NONCE_LEN)?;
                Frame::ServerInfo { sealed: b }
            }
            FRAME_SEND_PACKET | FRAME_RECV_PACKET => {
                need(KEY_LEN)?;
                if b.len() - KEY_LEN > MAX_PACKET_SIZE {
                    return Err(bad("packet larger than 64KiB"));
                }
                let k = key_at(&b, 0);
                let data = b[KEY_LEN..].to_vec();
                if ty == FRAME_SEND_PACKET {
                    Frame::SendPacket { dst: k, data }
                } else {
                    Frame::RecvPacket { src: k, data }
                }
            }
            FRAME_KEEP_ALIVE => Frame::KeepAlive,
            FRAME_NOTE_PREFERRED => {
                need(1)?;
                Frame::NotePreferred(b[0] != 0)
            }
            FRAME_PEER_GONE => {
                need(KEY_LEN)?;
                // The reason byte was added later; its absence means "disconnected".
                Frame::PeerGone {
                    key: key_at(&b, 0),
                    reason: b.get(KEY_LEN).copied().unwrap_or(PEER_GONE_DISCONNECTED),
                }
            }
            FRAME_PEER_PRESENT => {
                need(KEY_LEN)?;
                let key = key_at(&b, 0);
                let (addr, flags) = if b.len() >= KEY_LEN + 18 {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&b[KEY_LEN..KEY_LEN + 16]);
                    let ip = Ipv6Addr::from(ip).to_canonical();
                    let port = u16::from_be_bytes([b[KEY_LEN + 16], b[KEY_LEN + 17]]);
                    (
                        Some(SocketAddr::new(ip, port)),
                        b.get(KEY_LEN + 18).copied().unwrap_or(0),
                    )
                } else {
                    (None, 0)
                };
                Frame::PeerPresent { key, addr, flags }
            }
            FRAME_FORWARD_PACKET => {
                need(2 * KEY_LEN)?;
                if b.len() - 2 * KEY_LEN > MAX_PACKET_SIZE {
                    return Err(bad("packet larger than 64KiB"));
                }
                Frame::ForwardPacket {
                    src: key_at(&b, 0),
                    dst: key_at(&b, KEY_LEN),
                    data: b[2 * KEY_LEN..].to_vec(),
                }
            }
            FRAME_WATCH_CONNS => Frame::WatchConns,
            FRAME_CLOSE_PEER => {
                need(KEY_LEN)?;
                Frame::ClosePeer { key: key_at(&b, 0) }
            }
            FRAME_PING | FRAME_PONG => {
                need(8)?;
                let mut d = [0u8; 8];
                d.copy_from_slice(&b[..8]);
                if ty == FRAME_PING {
                    Frame::Ping(d)
                } else {
                    Frame::Pong(d)
                }
            }
            FRAME_HEALTH => Frame::Health(String::from_utf8_lossy(&b).into_owned()),
            FRAME_RESTARTING => {
                need(8)?;
                Frame::Restarting {
                    reconnect_in_ms: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    try_for_ms: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                }
            }
            _ => Frame::Unknown { ty, payload: b },
        })
    }
}

/// Reads one raw frame, refusing lengths above `max` before allocating.
pub async fn read_raw<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<(u8, Vec<u8>), FrameError> {
    let mut hdr = [0u8; HEADER_LEN];
    r.read_exact(&mut hdr).await?;
    let ty = hdr[0];
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
    if len > max {
        return Err(FrameError::TooLarge { ty, len, max });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok((ty, payload))
}

/// Reads and decodes one frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<Frame, FrameError> {
    let (ty, payload) = read_raw(r, max).await?;
    Frame::decode(ty, payload)
}

/// Appends a `ForwardPacket` frame to `out` without building a `Frame` (the mesh's hot
/// path: one copy of the packet, into a buffer written out for many packets at once).
pub fn append_forward(out: &mut Vec<u8>, src: &Key, dst: &Key, data: &[u8]) {
    out.push(FRAME_FORWARD_PACKET);
    out.extend_from_slice(&((2 * KEY_LEN + data.len()) as u32).to_be_bytes());
    out.extend_from_slice(src);
    out.extend_from_slice(dst);
    out.extend_from_slice(data);
}

/// Writes one frame and flushes (callers batch by building bigger buffers when they care).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), FrameError> {
    w.write_all(&f.encode()).await?;
    w.flush().await?;
    Ok(())
}

/// Public key for an x25519 private key.
pub fn public_key(private: &Key) -> Key {
    *SecretKey::from(*private).public_key().as_bytes()
}

/// NaCl box (XSalsa20-Poly1305) to `peer`, returning `nonce || ciphertext` as DERP expects.
pub fn seal(private: &Key, peer: &Key, msg: &[u8]) -> Vec<u8> {
    let b = SalsaBox::new(&PublicKey::from(*peer), &SecretKey::from(*private));
    let nonce = SalsaBox::generate_nonce(&mut OsRng);
    // Encryption with a fresh nonce over an in-memory buffer cannot fail.
    let ct = b.encrypt(&nonce, msg).expect("salsabox encrypt");
    [nonce.as_slice(), &ct].concat()
}

/// Opens `nonce || ciphertext` sealed by `peer` for `private`.
pub fn open(private: &Key, peer: &Key, sealed: &[u8]) -> Result<Vec<u8>, FrameError> {
    if sealed.len() < NONCE_LEN {
        return Err(FrameError::BoxOpen);
    }
    let b = SalsaBox::new(&PublicKey::from(*peer), &SecretKey::from(*private));
    let nonce = crypto_box::Nonce::from_slice(&sealed[..NONCE_LEN]);
    b.decrypt(nonce, &sealed[NONCE_LEN..])
        .map_err(|_| FrameError::BoxOpen)
}

/// The JSON a client seals into FrameClientInfo. Go marshals untagged fields with their Go
/// names and unmarshals case-insensitively, so accept both spellings.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ClientInfo {
    #[serde(
        rename = "meshKey",
        alias = "MeshKey",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mesh_key: Option<String>,
    #[serde(rename = "version", alias = "Version", default)]
    pub version: u32,
    #[serde(rename = "CanAckPings", alias = "canAckPings", default)]
    pub can_ack_pings: bool,
    #[serde(rename = "IsProber", alias = "isProber", default)]
    pub is_prober: bool,
}

/// The JSON the server seals into FrameServerInfo.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ServerInfo {
    #[serde(rename = "version", alias = "Version", default)]
    pub version: u32,
    #[serde(
        rename = "TokenBucketBytesPerSecond",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub token_bucket_bytes_per_second: u64,
    #[serde(
        rename = "TokenBucketBytesBurst",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub token_bucket_bytes_burst: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        let k = [7u8; 32];
        let k2 = [9u8; 32];
        vec![
            Frame::ServerKey { key: k },
            Frame::ClientInfo {
                key: k,
                sealed: vec![1; 40],
            },
            Frame::ServerInfo {
                sealed: vec![2; 30],
            },
            Frame::SendPacket {
                dst: k,
                data: b"hello".to_vec(),
            },
            Frame::RecvPacket {
                src: k,
                data: vec![],
            },
            Frame::KeepAlive,
            Frame::NotePreferred(true),
            Frame::PeerGone {
                key: k,
                reason: PEER_GONE_NOT_HERE,
            },
            Frame::PeerPresent {
                key: k,
                addr: None,
                flags: 0,
            },
            Frame::PeerPresent {
                key: k,
                addr: Some("1.2.3.4:5".parse().unwrap()),
                flags: PEER_PRESENT_IS_REGULAR,
            },
            Frame::PeerPresent {
                key: k,
                addr: Some("[2001:db8::1]:443".parse().unwrap()),
                flags: 3,
            },
            Frame::ForwardPacket {
                src: k,
                dst: k2,
                data: vec![3; 100],
            },
            Frame::WatchConns,
            Frame::ClosePeer { key: k2 },
            Frame::Ping([1, 2, 3, 4, 5, 6, 7, 8]),
            Frame::Pong([8, 7, 6, 5, 4, 3, 2, 1]),
            Frame::Health("bad".into()),
            Frame::Restarting {
                reconnect_in_ms: 100,
                try_for_ms: 5000,
            },
            Frame::Unknown {
                ty: 0x7f,
                payload: vec![1, 2],
            },
        ]
    }

    #[tokio::test]
    async fn frame_round_trip() {
        let mut buf = Vec::new();
        for f in all_frames() {
            buf.extend_from_slice(&f.encode());
        }
        let mut r = &buf[..];
        for f in all_frames() {
            let got = read_frame(&mut r, MAX_FRAME_LEN).await.unwrap();
            assert_eq!(got, f);
        }
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn rejects_oversized_and_malformed() {
        let mut b = vec![FRAME_SEND_PACKET];
        b.extend_from_slice(&(MAX_FRAME_LEN + 1).to_be_bytes());
        assert!(matches!(
            read_frame(&mut &b[..], MAX_FRAME_LEN).await,
            Err(FrameError::TooLarge { .. })
        ));
        let big = Frame::SendPacket {
            dst: [0; 32],
            data: vec![0; MAX_PACKET_SIZE + 1],
        }
        .encode();
        assert!(matches!(
            read_frame(&mut &big[..], MAX_FRAME_LEN).await,
            Err(FrameError::Malformed { .. })
        ));
        let short = Frame::Unknown {
            ty: FRAME_PING,
            payload: vec![1, 2],
        }
        .encode();
        assert!(read_frame(&mut &short[..], MAX_FRAME_LEN).await.is_err());
        let magic = Frame::Unknown {
            ty: FRAME_SERVER_KEY,
            payload: vec![0; 40],
        }
        .encode();
        assert!(read_frame(&mut &magic[..], MAX_FRAME_LEN).await.is_err());
    }

    #[test]
    fn seal_open() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let sealed = seal(&a, &public_key(&b), b"{}");
        assert_eq!(open(&b, &public_key(&a), &sealed).unwrap(), b"{}");
        assert!(open(&a, &public_key(&a), &sealed).is_err());
    }

    #[test]
    fn client_info_json_go_spellings() {
        let ci: ClientInfo = serde_json::from_str(
            r#"{"meshKey":"ab","version":2,"CanAckPings":true,"IsProber":false}"#,
        )
        .unwrap();
        assert_eq!(ci.mesh_key.as_deref(), Some("ab"));
        assert!(ci.can_ack_pings);
        let s = serde_json::to_string(&ServerInfo {
            version: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s, r#"{"version":2}"#);
    }
}
