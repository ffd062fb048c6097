//! A minimal ts2021 client — the control half of what a Tailscale client does: fetch the
//! server key, upgrade `/ts2021` to Noise, speak HTTP/2 inside it, register and stream
//! maps. Used by the protocol tests and the load generator (`benches/control_load.rs`);
//! the server never uses it. Real-client interoperability is tested with real clients.

use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::noise::{self, NoiseError};
use crate::registry::{DiscoKey, NodeKey};

/// The capability version this client claims (tailscale v1.90 sends about this).
pub const CLIENT_VERSION: u16 = 125;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O with the server")]
    Io(#[from] std::io::Error),
    #[error("the server answered {0}")]
    Http(String),
    #[error("noise")]
    Noise(#[from] NoiseError),
    #[error("http/2")]
    H2(#[from] h2::Error),
    #[error("decoding a server message")]
    Json(#[from] serde_json::Error),
    #[error("map stream ended")]
    StreamEnded,
}

/// A random x25519 key pair: (private, public).
pub fn keypair() -> ([u8; 32], [u8; 32]) {
    let private: [u8; 32] = rand::random();
    (private, super::keys::public_key(&private))
}

/// One Noise connection to a member, carrying HTTP/2 requests.
pub struct ControlClient {
    host: String,
    /// The hostname last registered, repeated in map requests' Hostinfo.
    hostname: String,
    /// Routes offered in every Hostinfo (`RoutableIPs`), as a subnet router does.
    routes: Vec<String>,
    sender: h2::client::SendRequest<Bytes>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Reads an HTTP/1.1 response head byte by byte (so no byte after it is consumed).
async fn read_head(stream: &mut TcpStream) -> Result<String, ClientError> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(ClientError::Http("an oversized response head".into()));
        }
        head.push(stream.read_u8().await?);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// `GET /key`: the server's Noise public key.
pub async fn fetch_server_key(addr: &str) -> Result<[u8; 32], ClientError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.into(),
            source,
        })?;
    let req = format!(
        "GET /key?v={CLIENT_VERSION} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: Value = serde_json::from_str(body)?;
    let key = v["publicKey"].as_str().unwrap_or("");
    let key = crate::registry::MachineKey::parse(key)
        .map_err(|_| ClientError::Http(format!("a bad /key body {body:?}")))?;
    Ok(key.0)
}

impl ControlClient {
    /// Connects to `addr` (`host:port`) as the machine `machine_private`.
    pub async fn connect(
        addr: &str,
        machine_private: &[u8; 32],
    ) -> Result<ControlClient, ClientError> {
        let server_key = fetch_server_key(addr).await?;
        Self::connect_with_key(addr, &server_key, machine_private).await
    }

    /// Connects with a server key fetched earlier (every member shares it).
    pub async fn connect_with_key(
        addr: &str,
        server_key: &[u8; 32],
        machine_private: &[u8; 32],
    ) -> Result<ControlClient, ClientError> {
        let (init, hs) = noise::initiate(server_key, machine_private, CLIENT_VERSION)?;
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.into(),
                source,
            })?;
        stream.set_nodelay(true)?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&init);
        let req = format!(
            "POST /ts2021 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {b64}\r\nContent-Length: 0\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let head = read_head(&mut stream).await?;
        if !head.starts_with("HTTP/1.1 101") {
            return Err(ClientError::Http(
                head.lines().next().unwrap_or("").to_string(),
            ));
        }
        let (_, body) = noise::read_frame(&mut stream).await?;
        let keys = noise::finish_initiation(hs, &body)?;
        // Flow-control windows as Tailscale's client opens them (Go's HTTP/2 transport:
        // 4 MiB per stream, 1 GiB per connection), so a large netmap is not paced by
        // window updates every 64 KiB as h2's defaults would.
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(4 << 20)
            .initial_connection_window_size(1 << 30)
            .handshake(super::noise_stream::NoiseStream::new(stream, &keys))
            .await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(ControlClient {
            host: addr.to_string(),
            hostname: String::new(),
            routes: Vec::new(),
            sender,
            tasks: vec![conn],
        })
    }

    async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, h2::RecvStream), ClientError> {
        let req = http::Request::post(format!("http://{}{path}", self.host))
            .header("content-type", "application/json")
            .body(())
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let mut sender = self.sender.clone().ready().await?;
        let (response, mut send) = sender.send_request(req, false)?;
        send.send_data(Bytes::from(body), true)?;
        let response = response.await?;
        Ok((response.status().as_u16(), response.into_body()))
    }

    /// POSTs `body` and reads the whole answer.
    pub async fn post_all(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let (status, mut recv) = self.post(path, body).await?;
        let mut out = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        Ok((status, out))
    }

    /// The hostname map requests carry in their Hostinfo (set by `register`; a client that
    /// reconnects without registering again sets it so its Hostinfo stays the same).
    pub fn set_hostname(&mut self, hostname: &str) {
        self.hostname = hostname.to_string();
    }

    /// Advertises `routes` (CIDRs) in every later Hostinfo, as `--advertise-routes` does.
    pub fn advertise_routes(&mut self, routes: &[&str]) {
        self.routes = routes.iter().map(ToString::to_string).collect();
    }

    /// The Hostinfo this client sends.
    fn hostinfo(&self) -> Value {
        let mut info = json!({ "Hostname": self.hostname, "OS": "linux" });
        if !self.routes.is_empty() {
            info["RoutableIPs"] = json!(self.routes);
        }
        info
    }

    /// `/machine/register` with a pre-auth key; returns (HTTP status, response JSON or text).
    pub async fn register(
        &mut self,
        node_key: &NodeKey,
        auth_key: &str,
        hostname: &str,
    ) -> Result<(u16, Value), ClientError> {
        self.hostname = hostname.to_string();
        let body = json!({
            "Version": CLIENT_VERSION,
            "NodeKey": node_key.to_text(),
            "OldNodeKey": NodeKey([0; 32]).to_text(),
            "Auth": { "AuthKey": auth_key },
            "Hostinfo": self.hostinfo(),
            "Expiry": "0001-01-01T00:00:00Z",
            "Followup": "",
            "Ephemeral": false,
        });
        self.register_raw(&body).await
    }

    /// `/machine/register` rotating to `new` from `old` (no auth: the machine key and the
    /// old node key prove who it is), as a client does before its key expires.
    pub async fn rotate(
        &mut self,
        old: &NodeKey,
        new: &NodeKey,
        hostname: &str,
    ) -> Result<(u16, Value), ClientError> {
        self.hostname = hostname.to_string();
        let body = json!({
            "Version": CLIENT_VERSION,
            "NodeKey": new.to_text(),
            "OldNodeKey": old.to_text(),
            "Hostinfo": self.hostinfo(),
            "Expiry": "0001-01-01T00:00:00Z",
        });
        self.register_raw(&body).await
    }

    /// Posts any RegisterRequest body; returns (HTTP status, response JSON or text).
    pub async fn register_raw(&mut self, body: &Value) -> Result<(u16, Value), ClientError> {
        let (status, body) = self
            .post_all("/machine/register", serde_json::to_vec(body)?)
            .await?;
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
        Ok((status, value))
    }

    /// Opens a streaming `/machine/map` (uncompressed) and returns the stream.
    pub async fn map_stream(
        &mut self,
        node_key: &NodeKey,
        disco_key: &DiscoKey,
        endpoint: &str,
    ) -> Result<MapStream, ClientError> {
        self.map_stream_with(node_key, disco_key, endpoint, false)
            .await
    }

    /// Opens a streaming `/machine/map`, asking for zstd (as real clients do) or not.
    pub async fn map_stream_with(
        &mut self,
        node_key: &NodeKey,
        disco_key: &DiscoKey,
        endpoint: &str,
        zstd: bool,
    ) -> Result<MapStream, ClientError> {
        let body = json!({
            "Version": CLIENT_VERSION,
            "NodeKey": node_key.to_text(),
            "DiscoKey": disco_key.to_text(),
            "Stream": true,
            "KeepAlive": true,
            "Compress": if zstd { "zstd" } else { "" },
            "Hostinfo": self.hostinfo(),
            "Endpoints": [endpoint],
            "EndpointTypes": [1],
        });
        let (status, recv) = self
            .post("/machine/map", serde_json::to_vec(&body)?)
            .await?;
        if status != 200 {
            return Err(ClientError::Http(format!("map request answered {status}")));
        }
        Ok(MapStream {
            recv,
            buf: bytes::BytesMut::new(),
            zstd,
        })
    }

    /// A "lite" map update (no stream, no peers): new endpoints, as a client sends after a
    /// netcheck. Returns the HTTP status.
    pub async fn lite_update(
        &mut self,
        node_key: &NodeKey,
        disco_key: &DiscoKey,
        endpoints: &[String],
    ) -> Result<u16, ClientError> {
        let body = json!({
            "Version": CLIENT_VERSION,
            "NodeKey": node_key.to_text(),
            "DiscoKey": disco_key.to_text(),
            "Stream": false,
            "OmitPeers": true,
            "Hostinfo": self.hostinfo(),
            "Endpoints": endpoints,
        });
        let (status, _) = self
            .post_all("/machine/map", serde_json::to_vec(&body)?)
            .await?;
        Ok(status)
    }
}

/// Decodes one message of a zstd map stream: one or more frames, decoded as one. The
/// decompression context is kept per thread: making one per message (`decode_all`) cost a
/// load generator decoding tens of thousands of messages a second more than decoding them.
pub fn zstd_decode(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    thread_local! {
        static DECODER: std::cell::RefCell<Option<Decoder<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decoder = match cell.as_mut() {
            Some(d) => d,
            None => cell.insert(Decoder::new()?),
        };
        decoder.reinit()?;
        let mut out: Vec<u8> = Vec::with_capacity(raw.len().saturating_mul(4).max(1024));
        let mut input = InBuffer::around(raw);
        let mut remaining = 0;
        // Frames follow one another: the decoder starts the next once one ends.
        while input.pos() < raw.len() || out.len() == out.capacity() {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity());
            }
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            let before = (input.pos(), output.pos());
            remaining = decoder.run(&mut input, &mut output)?;
            if (input.pos(), output.pos()) == before && input.pos() == raw.len() {
                break;
            }
        }
        if remaining != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "a zstd frame ends early",
            ));
        }
        Ok(out)
    })
}

/// Length-prefixed (u32 little-endian) JSON map responses, zstd-compressed if asked for.
pub struct MapStream {
    recv: h2::RecvStream,
    buf: bytes::BytesMut,
    zstd: bool,
}

impl MapStream {
    /// The next map response, or an error once `timeout` passes without one.
    pub async fn next(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        let raw = self.next_raw(timeout).await?;
        Ok(serde_json::from_slice(&self.decode(&raw)?)?)
    }

    /// Decompresses a message from `next_raw` (a no-op on an uncompressed stream).
    pub fn decode(&self, raw: &[u8]) -> Result<Vec<u8>, ClientError> {
        if self.zstd {
            Ok(zstd_decode(raw)?)
        } else {
            Ok(raw.to_vec())
        }
    }

    /// The next message as received (compressed on a zstd stream).
    pub async fn next_raw(&mut self, timeout: Duration) -> Result<bytes::Bytes, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let message = self.buf.split_to(len).freeze();
                    if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
                        // A large netmap passed: do not keep its buffer for small deltas.
                        self.buf = bytes::BytesMut::new();
                    }
                    return Ok(message);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.recv.data())
                .await
                .map_err(|_| ClientError::Http(format!("no map response within {timeout:?}")))?
                .ok_or(ClientError::StreamEnded)??;
            let _ = self.recv.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Skips keep-alives; returns the next response with content.
    pub async fn next_update(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        loop {
            let v = self.next(timeout).await?;
            if v.get("KeepAlive").and_then(Value::as_bool) != Some(true)
                || v.as_object().is_some_and(|o| o.len() > 1)
            {
                return Ok(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::zstd_decode;

    #[test]
    fn concatenated_frames_decode_as_one_message_on_a_reused_decoder() {
        let big: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i * 7919).to_le_bytes())
            .collect();
        let parts: [&[u8]; 4] = [b"{\"a\":", &big, b"", b"1}"];
        let mut raw = Vec::new();
        for p in parts {
            raw.extend(zstd::bulk::compress(p, 1).unwrap());
        }
        for _ in 0..3 {
            assert_eq!(zstd_decode(&raw).unwrap(), parts.concat());
        }
        assert_eq!(zstd_decode(b"").unwrap(), b"");
    }

    #[test]
    fn a_cut_or_corrupt_message_is_an_error_and_the_next_one_decodes() {
        let raw = zstd::bulk::compress(&[7u8; 10_000], 1).unwrap();
        assert!(zstd_decode(&raw[..raw.len() - 3]).is_err());
        assert!(zstd_decode(b"not zstd at all").is_err());
        assert_eq!(zstd_decode(&raw).unwrap(), vec![7u8; 10_000]);
    }
}
