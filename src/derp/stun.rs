//! Minimal RFC 5389 STUN server: answers binding requests with the sender's address so
//! clients can discover their public ip:port (tailscale `net/stun`). Anything else is ignored.

use std::net::{IpAddr, SocketAddr};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const HEADER_LEN: usize = 20;
const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// Why a datagram got no answer; only logged at trace level since the port is public.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("not a STUN packet")]
    NotStun,
    #[error("not a binding request")]
    NotBindingRequest,
    #[error("malformed attributes")]
    MalformedAttrs,
    #[error("bad fingerprint")]
    BadFingerprint,
}

/// Serves STUN on `socket` until `stop` is cancelled.
pub async fn serve(socket: UdpSocket, stop: CancellationToken) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(error) => {
                    // ICMP-induced errors (e.g. port unreachable) surface here on some OSes; keep serving.
                    tracing::debug!(%error, "stun recv failed");
                    continue;
                }
            },
        };
        match handle_packet(&buf[..n], from) {
            Ok(resp) => {
                if let Err(error) = socket.send_to(&resp, from).await {
                    tracing::debug!(%error, %from, "stun send failed");
                }
            }
            Err(error) => tracing::trace!(%error, %from, "ignored stun packet"),
        }
    }
}

/// Turns a binding request from `from` into its success response.
pub fn handle_packet(b: &[u8], from: SocketAddr) -> Result<Vec<u8>, StunError> {
    let txid = parse_binding_request(b)?;
    // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; answer with the real family.
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    Ok(response(&txid, from))
}

fn is_stun(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && b[0] & 0xc0 == 0 && b[4..8] == MAGIC_COOKIE
}

/// Walks the TLV attributes (4-byte aligned values).
fn for_each_attr(mut b: &[u8], mut f: impl FnMut(u16, &[u8])) -> Result<(), StunError> {
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(StunError::MalformedAttrs);
        }
        let ty = u16::from_be_bytes([b[0], b[1]]);
        let len = u16::from_be_bytes([b[2], b[3]]) as usize;
        let padded = (len + 3) & !3;
        b = &b[4..];
        if padded > b.len() {
            return Err(StunError::MalformedAttrs);
        }
        f(ty, &b[..len]);
        b = &b[padded..];
    }
    Ok(())
}

/// Validates a binding request and returns its transaction id. Tailscale clients add SOFTWARE
/// and FINGERPRINT; we check the fingerprint when present but do not require it, so generic
/// STUN tools also work.
pub fn parse_binding_request(b: &[u8]) -> Result<[u8; 12], StunError> {
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    if b[..2] != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest);
    }
    let declared = u16::from_be_bytes([b[2], b[3]]) as usize;
    if HEADER_LEN + declared > b.len() {
        return Err(StunError::MalformedAttrs);
    }
    let b = &b[..HEADER_LEN + declared];
    let mut fp: Option<(usize, u32)> = None;
    let mut offset = HEADER_LEN;
    let mut last = 0u16;
    for_each_attr(&b[HEADER_LEN..], |ty, v| {
        if ty == ATTR_FINGERPRINT && v.len() == 4 {
            fp = Some((offset, u32::from_be_bytes([v[0], v[1], v[2], v[3]])));
        }
        last = ty;
        offset += 4 + ((v.len() + 3) & !3);
    })?;
    if let Some((at, got)) = fp
        && (last != ATTR_FINGERPRINT || fingerprint(&b[..at]) != got)
    {
        return Err(StunError::BadFingerprint);
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&b[8..20]);
    Ok(txid)
}

/// Binding success response with one XOR-MAPPED-ADDRESS (what tailscale's `stun.Response`
/// emits; its parser needs no FINGERPRINT).
pub fn response(txid: &[u8; 12], addr: SocketAddr) -> Vec<u8> {
    let (fam, ip): (u8, Vec<u8>) = match addr.ip() {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => (2, v6.octets().to_vec()),
    };
    let attr_len = 4 + ip.len();
    let mut b = Vec::with_capacity(HEADER_LEN + 4 + attr_len);
    b.extend_from_slice(&BINDING_SUCCESS);
    b.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(txid);
    b.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    b.extend_from_slice(&(attr_len as u16).to_be_bytes());
    b.push(0);
    b.push(fam);
    b.extend_from_slice(&(addr.port() ^ 0x2112).to_be_bytes());
    let mask: Vec<u8> = MAGIC_COOKIE.iter().chain(txid.iter()).copied().collect();
    b.extend(ip.iter().zip(mask.iter()).map(|(o, m)| o ^ m));
    b
}

/// Builds a Tailscale-style binding request (SOFTWARE "tailnode" + FINGERPRINT).
pub fn request(txid: &[u8; 12]) -> Vec<u8> {
    let software = b"tailnode";
    let mut b = Vec::with_capacity(HEADER_LEN + 12 + 8);
    b.extend_from_slice(&BINDING_REQUEST);
    b.extend_from_slice(&((4 + software.len() + 8) as u16).to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(txid);
    b.extend_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    b.extend_from_slice(&(software.len() as u16).to_be_bytes());
    b.extend_from_slice(software);
    let fp = fingerprint(&b);
    b.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    b.extend_from_slice(&4u16.to_be_bytes());
    b.extend_from_slice(&fp.to_be_bytes());
    b
}

/// Parses a binding success response into (txid, mapped address).
pub fn parse_response(b: &[u8]) -> Result<([u8; 12], SocketAddr), StunError> {
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&b[8..20]);
    if b[..2] != BINDING_SUCCESS {
        return Err(StunError::NotBindingRequest);
    }
    let declared = u16::from_be_bytes([b[2], b[3]]) as usize;
    let attrs = b
        .get(HEADER_LEN..HEADER_LEN + declared)
        .ok_or(StunError::MalformedAttrs)?;
    let mut found = None;
    for_each_attr(attrs, |ty, v| {
        if (ty == ATTR_XOR_MAPPED_ADDRESS || ty == ATTR_XOR_MAPPED_ADDRESS_ALT) && v.len() >= 4 {
            let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
            let mask: Vec<u8> = MAGIC_COOKIE.iter().chain(txid.iter()).copied().collect();
            let ip = match (v[1], v.len()) {
                (1, 8..) => {
                    let o: Vec<u8> = v[4..8].iter().zip(&mask).map(|(a, m)| a ^ m).collect();
                    Some(IpAddr::from([o[0], o[1], o[2], o[3]]))
                }
                (2, 20..) => {
                    let mut o = [0u8; 16];
                    for (i, (a, m)) in v[4..20].iter().zip(&mask).enumerate() {
                        o[i] = a ^ m;
                    }
                    Some(IpAddr::from(o))
                }
                _ => None,
            };
            if let Some(ip) = ip {
                found = Some(SocketAddr::new(ip, port));
            }
        }
    })?;
    found.map(|a| (txid, a)).ok_or(StunError::MalformedAttrs)
}

/// STUN FINGERPRINT: CRC-32 (IEEE) of the message so far, XORed with 0x5354554e.
fn fingerprint(b: &[u8]) -> u32 {
    crc32_ieee(b) ^ FINGERPRINT_XOR
}

/// Bitwise CRC-32 (reflected, poly 0xEDB88320); STUN messages are tiny, so no table needed.
fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_known_value() {
        assert_eq!(crc32_ieee(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn binding_round_trip_v4_v6() {
        let txid = [5u8; 12];
        for from in [
            "203.0.113.7:41641",
            "[2001:db8::42]:3478",
            "[::ffff:198.51.100.1]:9",
        ] {
            let from: SocketAddr = from.parse().unwrap();
            let resp = handle_packet(&request(&txid), from).unwrap();
            let (got_tx, addr) = parse_response(&resp).unwrap();
            assert_eq!(got_tx, txid);
            assert_eq!(addr, SocketAddr::new(from.ip().to_canonical(), from.port()));
        }
    }

    #[test]
    fn rejects_garbage() {
        let from: SocketAddr = "1.2.3.4:5".parse().unwrap();
        assert_eq!(handle_packet(b"hello", from), Err(StunError::NotStun));
        let mut req = request(&[1; 12]);
        let n = req.len();
        req[n - 1] ^= 1;
        assert_eq!(handle_packet(&req, from), Err(StunError::BadFingerprint));
        let mut req = request(&[1; 12]);
        req[1] = 0x11;
        assert_eq!(handle_packet(&req, from), Err(StunError::NotBindingRequest));
        let mut req = request(&[1; 12]);
        req[3] = 0xff; // declared length beyond the datagram
        assert_eq!(handle_packet(&req, from), Err(StunError::MalformedAttrs));
    }

    #[tokio::test]
    async fn serves_over_udp() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(server, stop.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&request(&[9; 12]), addr).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        let (_, mapped) = parse_response(&buf[..n]).unwrap();
        assert_eq!(mapped, client.local_addr().unwrap());
        stop.cancel();
        task.await.unwrap();
    }
}
