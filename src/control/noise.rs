//! ts2021 Noise: the IK handshake (snow) and the record layer.
//!
//! Tailscale deviates from the Noise spec in the transport nonce: the 12-byte
//! ChaCha20-Poly1305 nonce is 4 zero bytes and then the counter in *big-endian*
//! (control/controlbase/conn.go), where snow writes it little-endian. So snow runs only the
//! handshake (all-zero nonces, where both agree) and hands over the raw split keys; records
//! are sealed here with `chacha20poly1305`.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::registry::MachineKey;

const PROTOCOL_NAME: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE_PREFIX: &str = "Tailscale Control Protocol v";

const MSG_INITIATION: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_ERROR: u8 = 3;
pub(super) const MSG_RECORD: u8 = 4;

/// Whole initiation: u16 version, u8 type, u16 length, 96 bytes of handshake.
pub const INITIATION_BYTES: usize = 101;
const INITIATION_PAYLOAD_BYTES: usize = 96;
const RESPONSE_PAYLOAD_BYTES: usize = 48;
pub(super) const FRAME_HEADER_BYTES: usize = 3;
/// Largest frame either side may send (controlbase maxMessageSize).
pub const MAX_NOISE_FRAME_BYTES: usize = 4096;
pub(super) const TAG_BYTES: usize = 16;
/// Largest plaintext per record.
pub const MAX_PLAINTEXT_BYTES: usize = MAX_NOISE_FRAME_BYTES - FRAME_HEADER_BYTES - TAG_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("handshake initiation must be {INITIATION_BYTES} bytes, got {0}")]
    InitiationLength(usize),
    #[error("handshake initiation has message type {0}, want 1")]
    InitiationType(u8),
    #[error("handshake initiation declares length {0}, want 96")]
    InitiationDeclaredLength(u16),
    #[error("handshake failed")]
    Handshake(#[source] snow::Error),
    #[error("frame type {0} where a transport record was expected")]
    UnexpectedFrame(u8),
    #[error("frame of {0} bytes exceeds the {MAX_NOISE_FRAME_BYTES}-byte limit")]
    FrameTooLarge(usize),
    #[error("record failed to decrypt (bad key, nonce or tampering)")]
    Decrypt,
    #[error("nonce counter exhausted")]
    NonceExhausted,
    #[error("transport I/O")]
    Io(#[from] std::io::Error),
}

/// A parsed client initiation: the capability version and the 96 handshake bytes.
pub struct Initiation {
    pub version: u16,
    payload: [u8; INITIATION_PAYLOAD_BYTES],
}

impl Initiation {
    pub fn parse(bytes: &[u8]) -> Result<Self, NoiseError> {
        if bytes.len() != INITIATION_BYTES {
            return Err(NoiseError::InitiationLength(bytes.len()));
        }
        let version = u16::from_be_bytes([bytes[0], bytes[1]]);
        if bytes[2] != MSG_INITIATION {
            return Err(NoiseError::InitiationType(bytes[2]));
        }
        let declared = u16::from_be_bytes([bytes[3], bytes[4]]);
        if declared as usize != INITIATION_PAYLOAD_BYTES {
            return Err(NoiseError::InitiationDeclaredLength(declared));
        }
        let mut payload = [0u8; INITIATION_PAYLOAD_BYTES];
        payload.copy_from_slice(&bytes[5..]);
        Ok(Initiation { version, payload })
    }
}

/// The responder's result of a successful handshake.
pub struct Accepted {
    /// The client's machine key (its authenticated Noise static key).
    pub peer: MachineKey,
    /// The 51-byte response frame to send to the client.
    pub response: Vec<u8>,
    pub keys: SessionKeys,
}

/// Raw transport keys after Split(): the client sends with the first, we with the second.
pub struct SessionKeys {
    pub receive: [u8; 32],
    pub send: [u8; 32],
}

/// Runs the responder side of the IK handshake on a client initiation.
pub fn accept(server_private: &[u8; 32], init: &Initiation) -> Result<Accepted, NoiseError> {
    let prologue = format!("{PROLOGUE_PREFIX}{}", init.version);
    let params = PROTOCOL_NAME.parse().map_err(NoiseError::Handshake)?;
    // aws-lc's X25519: the handshake's Diffie-Hellman operations are most of its cost.
    let mut hs = snow::Builder::with_resolver(params, Box::new(super::x25519::Resolver))
        .local_private_key(server_private)
        .prologue(prologue.as_bytes())
        .build_responder()
        .map_err(NoiseError::Handshake)?;
    let mut scratch = [0u8; 256];
    hs.read_message(&init.payload, &mut scratch)
        .map_err(NoiseError::Handshake)?;
    let mut peer = [0u8; 32];
    peer.copy_from_slice(
        hs.get_remote_static()
            .ok_or(NoiseError::Handshake(snow::Error::Input))?,
    );
    // A small-order machine key makes every DH with it predictable: not a machine.
    if crate::registry::is_low_order_point(&peer) {
        return Err(NoiseError::Handshake(snow::Error::Input));
    }
    let mut out = [0u8; 128];
    let n = hs
        .write_message(&[], &mut out)
        .map_err(NoiseError::Handshake)?;
    debug_assert_eq!(n, RESPONSE_PAYLOAD_BYTES);
    let mut response = Vec::with_capacity(FRAME_HEADER_BYTES + n);
    response.push(MSG_RESPONSE);
    response.extend_from_slice(&(n as u16).to_be_bytes());
    response.extend_from_slice(&out[..n]);
    let (initiator_to_responder, responder_to_initiator) = hs.dangerously_get_raw_split();
    Ok(Accepted {
        peer: MachineKey(peer),
        response,
        keys: SessionKeys {
            receive: initiator_to_responder,
            send: responder_to_initiator,
        },
    })
}

/// The initiator side (what a Tailscale client does), for `control::client`: returns the
/// 101-byte initiation and the state that `finish_initiation` completes.
pub fn initiate(
    server_public: &[u8; 32],
    client_private: &[u8; 32],
    version: u16,
) -> Result<(Vec<u8>, snow::HandshakeState), NoiseError> {
    let prologue = format!("{PROLOGUE_PREFIX}{version}");
    let mut hs = snow::Builder::new(PROTOCOL_NAME.parse().map_err(NoiseError::Handshake)?)
        .local_private_key(client_private)
        .remote_public_key(server_public)
        .prologue(prologue.as_bytes())
        .build_initiator()
        .map_err(NoiseError::Handshake)?;
    let mut msg = [0u8; 200];
    let n = hs
        .write_message(&[], &mut msg)
        .map_err(NoiseError::Handshake)?;
    let mut init = Vec::with_capacity(INITIATION_BYTES);
    init.extend_from_slice(&version.to_be_bytes());
    init.push(MSG_INITIATION);
    init.extend_from_slice(&(n as u16).to_be_bytes());
    init.extend_from_slice(&msg[..n]);
    Ok((init, hs))
}

/// Completes the initiator's handshake with the server's response frame body.
pub fn finish_initiation(
    mut hs: snow::HandshakeState,
    response: &[u8],
) -> Result<SessionKeys, NoiseError> {
    let mut scratch = [0u8; 128];
    hs.read_message(response, &mut scratch)
        .map_err(NoiseError::Handshake)?;
    let (initiator_to_responder, responder_to_initiator) = hs.dangerously_get_raw_split();
    Ok(SessionKeys {
        receive: responder_to_initiator,
        send: initiator_to_responder,
    })
}

/// A cleartext error frame, readable by a client still waiting for the handshake response.
pub fn error_frame(message: &str) -> Vec<u8> {
    let text = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + text.len());
    out.push(MSG_ERROR);
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text);
    out
}

/// One direction of the record layer.
pub struct CipherState {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl CipherState {
    pub fn new(key: &[u8; 32]) -> Self {
        CipherState {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            counter: 0,
        }
    }

    pub(super) fn cipher(&self) -> &ChaCha20Poly1305 {
        &self.cipher
    }

    pub(super) fn next_nonce(&mut self) -> Result<Nonce, NoiseError> {
        if self.counter == u64::MAX {
            return Err(NoiseError::NonceExhausted);
        }
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Ok(*Nonce::from_slice(&nonce))
    }

    /// Seals `plaintext` (≤ MAX_PLAINTEXT_BYTES) into a complete record frame.
    pub fn seal_frame(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        debug_assert!(plaintext.len() <= MAX_PLAINTEXT_BYTES);
        let nonce = self.next_nonce()?;
        let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + plaintext.len() + TAG_BYTES);
        frame.push(MSG_RECORD);
        frame.extend_from_slice(&((plaintext.len() + TAG_BYTES) as u16).to_be_bytes());
        let mut body = plaintext.to_vec();
        self.cipher
            .encrypt_in_place(&nonce, b"", &mut body)
            .map_err(|_| NoiseError::Decrypt)?;
        frame.extend_from_slice(&body);
        Ok(frame)
    }

    /// Opens a record body (ciphertext + tag) in place, returning the plaintext.
    pub fn open(&mut self, mut body: Vec<u8>) -> Result<Vec<u8>, NoiseError> {
        let nonce = self.next_nonce()?;
        self.cipher
            .decrypt_in_place(&nonce, b"", &mut body)
            .map_err(|_| NoiseError::Decrypt)?;
        Ok(body)
    }
}

/// Reads one frame header and body. Rejects oversized frames before reading the body.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<(u8, Vec<u8>), NoiseError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    reader.read_exact(&mut header).await?;
    let len = u16::from_be_bytes([header[1], header[2]]) as usize;
    if FRAME_HEADER_BYTES + len > MAX_NOISE_FRAME_BYTES {
        return Err(NoiseError::FrameTooLarge(FRAME_HEADER_BYTES + len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok((header[0], body))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A client-side handshake with snow, to test the responder and the record layer.
    fn client_handshake(
        server_public: &[u8; 32],
        client_private: &[u8; 32],
        version: u16,
    ) -> (Vec<u8>, snow::HandshakeState) {
        let prologue = format!("{PROLOGUE_PREFIX}{version}");
        let mut hs = snow::Builder::new(PROTOCOL_NAME.parse().unwrap())
            .local_private_key(client_private)
            .remote_public_key(server_public)
            .prologue(prologue.as_bytes())
            .build_initiator()
            .unwrap();
        let mut msg = [0u8; 200];
        let n = hs.write_message(&[], &mut msg).unwrap();
        assert_eq!(n, 96);
        let mut init = Vec::new();
        init.extend_from_slice(&version.to_be_bytes());
        init.push(MSG_INITIATION);
        init.extend_from_slice(&96u16.to_be_bytes());
        init.extend_from_slice(&msg[..n]);
        (init, hs)
    }

    fn keypair() -> ([u8; 32], [u8; 32]) {
        let kp = snow::Builder::new(PROTOCOL_NAME.parse().unwrap())
            .generate_keypair()
            .unwrap();
        (
            kp.private.try_into().unwrap(),
            kp.public.try_into().unwrap(),
        )
    }

    #[test]
    fn handshake_and_several_records_each_way_interoperate() {
        let (server_priv, server_pub) = keypair();
        let (client_priv, client_pub) = keypair();
        let (init_bytes, mut client) = client_handshake(&server_pub, &client_priv, 130);
        let init = Initiation::parse(&init_bytes).unwrap();
        assert_eq!(init.version, 130);
        let accepted = accept(&server_priv, &init).unwrap();
        assert_eq!(accepted.peer.0, client_pub);
        assert_eq!(accepted.response.len(), 51);
        let mut scratch = [0u8; 64];
        client
            .read_message(&accepted.response[3..], &mut scratch)
            .unwrap();
        let (c2s, s2c) = client.dangerously_get_raw_split();

        // Client-side ciphers built the same way; more than one record each way, so a
        // little-endian nonce bug would show from the second record on.
        let mut client_tx = CipherState::new(&c2s);
        let mut client_rx = CipherState::new(&s2c);
        let mut server_rx = CipherState::new(&accepted.keys.receive);
        let mut server_tx = CipherState::new(&accepted.keys.send);
        for i in 0..5u8 {
            let frame = client_tx.seal_frame(&[i; 10]).unwrap();
            assert_eq!(server_rx.open(frame[3..].to_vec()).unwrap(), vec![i; 10]);
            let frame = server_tx.seal_frame(&[i + 100; 7]).unwrap();
            assert_eq!(
                client_rx.open(frame[3..].to_vec()).unwrap(),
                vec![i + 100; 7]
            );
        }
    }

    #[test]
    fn nonce_is_big_endian_counter() {
        let mut c = CipherState::new(&[7u8; 32]);
        c.counter = 1;
        let n = c.next_nonce().unwrap();
        assert_eq!(n.as_slice(), &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn wrong_prologue_version_fails_the_handshake() {
        let (server_priv, server_pub) = keypair();
        let (client_priv, _) = keypair();
        let (mut init_bytes, _) = client_handshake(&server_pub, &client_priv, 130);
        init_bytes[1] = 131; // header says 131, the client hashed 130
        let init = Initiation::parse(&init_bytes).unwrap();
        assert!(matches!(
            accept(&server_priv, &init),
            Err(NoiseError::Handshake(_))
        ));
    }

    #[test]
    fn malformed_initiations_are_rejected_without_panicking() {
        let (server_priv, _) = keypair();
        assert!(Initiation::parse(&[]).is_err());
        assert!(Initiation::parse(&[0u8; 100]).is_err());
        let mut bad_type = [0u8; INITIATION_BYTES];
        bad_type[2] = 9;
        assert!(matches!(
            Initiation::parse(&bad_type),
            Err(NoiseError::InitiationType(9))
        ));
        // Random bytes of the right shape fail the handshake, never panic.
        for seed in 0..200u32 {
            let mut bytes = [0u8; INITIATION_BYTES];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (seed.wrapping_mul(2654435761).wrapping_add(i as u32 * 40503) >> 7) as u8;
            }
            bytes[2] = MSG_INITIATION;
            bytes[3] = 0;
            bytes[4] = 96;
            let init = Initiation::parse(&bytes).unwrap();
            assert!(accept(&server_priv, &init).is_err());
        }
    }

    #[tokio::test]
    async fn oversized_and_tampered_frames_are_errors() {
        let mut oversized: &[u8] = &[MSG_RECORD, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut oversized).await,
            Err(NoiseError::FrameTooLarge(_))
        ));
        let mut c = CipherState::new(&[1u8; 32]);
        let mut frame = c.seal_frame(b"hello").unwrap();
        frame[5] ^= 1;
        let mut d = CipherState::new(&[1u8; 32]);
        assert!(matches!(
            d.open(frame[3..].to_vec()),
            Err(NoiseError::Decrypt)
        ));
    }

    #[tokio::test]
    async fn the_stream_speaks_the_record_format_both_ways() {
        let keys_server = SessionKeys {
            receive: [1; 32],
            send: [2; 32],
        };
        let (net_server, mut net_client) = tokio::io::duplex(1 << 16);
        let mut server = crate::control::noise_stream::NoiseStream::new(net_server, &keys_server);

        let mut client_tx = CipherState::new(&[1; 32]);
        let mut client_rx = CipherState::new(&[2; 32]);
        let big = vec![42u8; 10_000];
        for chunk in big.chunks(MAX_PLAINTEXT_BYTES) {
            net_client
                .write_all(&client_tx.seal_frame(chunk).unwrap())
                .await
                .unwrap();
        }
        let mut got = vec![0u8; big.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);

        server.write_all(&big).await.unwrap();
        server.flush().await.unwrap();
        let mut received = Vec::new();
        while received.len() < big.len() {
            let (kind, body) = read_frame(&mut net_client).await.unwrap();
            assert_eq!(kind, MSG_RECORD);
            received.extend(client_rx.open(body).unwrap());
        }
        assert_eq!(received, big);
    }
}
