//! Minimal async DERP client over plain TCP (http:// URLs only): enough for mesh links
//! between cluster members and for tests.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::frame::{
    self, ClientInfo, FRAME_SERVER_INFO, FRAME_SERVER_KEY, Frame, FrameError, Key, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};

/// Time allowed for TCP connect + HTTP upgrade + DERP login.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("unsupported DERP url {0:?} (only http://host:port/path)")]
    BadUrl(String),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("http upgrade refused: {0}")]
    Upgrade(String),
    #[error("DERP login timed out")]
    Timeout,
    #[error("DERP framing: {0}")]
    Frame(#[from] FrameError),
}

/// Receiving half of a DERP connection.
pub struct DerpReader {
    r: BufReader<OwnedReadHalf>,
}

/// Sending half of a DERP connection.
pub struct DerpWriter {
    w: OwnedWriteHalf,
}

/// A logged-in DERP connection.
pub struct DerpClient {
    reader: DerpReader,
    writer: DerpWriter,
    public: Key,
    server_public: Key,
}

/// Splits `http://host[:port][/path]` into (`host:port`, host header, path).
fn parse_url(url: &str) -> Result<(String, String, String), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::BadUrl(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/derp"),
    };
    if authority.is_empty() {
        return Err(ClientError::BadUrl(url.into()));
    }
    // A port is present if the text after the last ':' is digits and not inside [v6] brackets.
    let has_port = authority.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty()
            && p.bytes().all(|c| c.is_ascii_digit())
            && (!h.starts_with('[') || h.ends_with(']'))
    });
    let addr = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_string(), path.to_string()))
}

impl DerpClient {
    /// Connects, upgrades to DERP and completes the login handshake. `mesh_key` marks this
    /// client as a trusted mesh peer of the server.
    pub async fn connect(
        url: &str,
        private: Key,
        mesh_key: Option<Key>,
    ) -> Result<DerpClient, ClientError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(url, private, mesh_key))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    async fn connect_inner(
        url: &str,
        private: Key,
        mesh_key: Option<Key>,
    ) -> Result<DerpClient, ClientError> {
        let (addr, host, path) = parse_url(url)?;
        let stream = TcpStream::connect(&addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
        );
        w.write_all(req.as_bytes())
            .await
            .map_err(FrameError::from)?;

        // Read the response head line by line; the BufReader keeps any DERP bytes that follow.
        let mut status = String::new();
        r.read_line(&mut status).await.map_err(FrameError::from)?;
        if !status.starts_with("HTTP/1.1 101") {
            return Err(ClientError::Upgrade(status.trim().to_string()));
        }
        let mut total = status.len();
        loop {
            let mut line = String::new();
            let n = r.read_line(&mut line).await.map_err(FrameError::from)?;
            total += n;
            if n == 0 || total > 16 << 10 {
                return Err(ClientError::Upgrade(
                    "truncated or oversized response head".into(),
                ));
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }

        let server_public = match frame::read_frame(&mut r, MAX_FRAME_LEN).await? {
            Frame::ServerKey { key } => key,
            other => {
                return Err(FrameError::UnexpectedType {
                    got: other.frame_type(),
                    want: FRAME_SERVER_KEY,
                }
                .into());
            }
        };
        let public = frame::public_key(&private);
        let info = ClientInfo {
            mesh_key: mesh_key.map(hex::encode),
            version: PROTOCOL_VERSION,
            can_ack_pings: true,
            is_prober: false,
        };
        let sealed = frame::seal(
            &private,
            &server_public,
            &serde_json::to_vec(&info).map_err(FrameError::from)?,
        );
        frame::write_frame(
            &mut w,
            &Frame::ClientInfo {
                key: public,
                sealed,
            },
        )
        .await?;
        match frame::read_frame(&mut r, MAX_FRAME_LEN).await? {
            Frame::ServerInfo { sealed } => {
                let msg = frame::open(&private, &server_public, &sealed)?;
                let _: frame::ServerInfo =
                    serde_json::from_slice(&msg).map_err(FrameError::from)?;
            }
            other => {
                return Err(FrameError::UnexpectedType {
                    got: other.frame_type(),
                    want: FRAME_SERVER_INFO,
                }
                .into());
            }
        }
        Ok(DerpClient {
            reader: DerpReader { r },
            writer: DerpWriter { w },
            public,
            server_public,
        })
    }

    pub fn public_key(&self) -> Key {
        self.public
    }

    pub fn server_public_key(&self) -> Key {
        self.server_public
    }

    /// Separates the halves so one task can read while another writes.
    pub fn split(self) -> (DerpReader, DerpWriter) {
        (self.reader, self.writer)
    }

    pub async fn send(&mut self, dst: Key, packet: &[u8]) -> Result<(), FrameError> {
        self.writer.send(dst, packet).await
    }

    pub async fn recv(&mut self) -> Result<Frame, FrameError> {
        self.reader.recv().await
    }

    pub async fn watch_conns(&mut self) -> Result<(), FrameError> {
        self.writer.watch_conns().await
    }

    pub async fn forward(&mut self, src: Key, dst: Key, packet: &[u8]) -> Result<(), FrameError> {
        self.writer.forward(src, dst, packet).await
    }

    pub async fn write(&mut self, f: &Frame) -> Result<(), FrameError> {
        self.writer.write(f).await
    }
}

impl DerpReader {
    /// Next frame from the server (packets, presence changes, keepalives, pings, ...).
    pub async fn recv(&mut self) -> Result<Frame, FrameError> {
        frame::read_frame(&mut self.r, MAX_FRAME_LEN).await
    }
}

impl DerpWriter {
    pub async fn write(&mut self, f: &Frame) -> Result<(), FrameError> {
        frame::write_frame(&mut self.w, f).await
    }

    pub async fn send(&mut self, dst: Key, packet: &[u8]) -> Result<(), FrameError> {
        self.write(&Frame::SendPacket {
            dst,
            data: packet.to_vec(),
        })
        .await
    }

    /// Subscribes to PeerPresent/PeerGone for the server's clients (mesh key required).
    pub async fn watch_conns(&mut self) -> Result<(), FrameError> {
        self.write(&Frame::WatchConns).await
    }

    /// Hands a packet from `src` (connected elsewhere) to the server's local client `dst`.
    pub async fn forward(&mut self, src: Key, dst: Key, packet: &[u8]) -> Result<(), FrameError> {
        self.write(&Frame::ForwardPacket {
            src,
            dst,
            data: packet.to_vec(),
        })
        .await
    }

    pub async fn pong(&mut self, data: [u8; 8]) -> Result<(), FrameError> {
        self.write(&Frame::Pong(data)).await
    }

    /// Writes frames already encoded back to back (one syscall for many packets).
    pub async fn write_encoded(&mut self, frames: &[u8]) -> Result<(), FrameError> {
        use tokio::io::AsyncWriteExt;
        self.w.write_all(frames).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (a, h, p) = parse_url("http://127.0.0.2:8080/derp").unwrap();
        assert_eq!(
            (a.as_str(), h.as_str(), p.as_str()),
            ("127.0.0.2:8080", "127.0.0.2:8080", "/derp")
        );
        let (a, _, p) = parse_url("http://example.com").unwrap();
        assert_eq!((a.as_str(), p.as_str()), ("example.com:80", "/derp"));
        let (a, _, _) = parse_url("http://[::1]:9/derp").unwrap();
        assert_eq!(a, "[::1]:9");
        let (a, _, _) = parse_url("http://[::1]/derp").unwrap();
        assert_eq!(a, "[::1]:80");
        assert!(parse_url("https://x/derp").is_err());
    }
}
