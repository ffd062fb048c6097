//! Minimal async DERP client over TCP or TLS (`http://` and `https://` URLs): enough for
//! mesh links between cluster members and for tests. TLS trusts the system's roots and
//! `SSL_CERT_FILE`, as Go clients do.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::frame::{
    self, ClientInfo, FRAME_SERVER_INFO, FRAME_SERVER_KEY, Frame, FrameError, Key, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};

/// Time allowed for TCP connect + HTTP upgrade + DERP login.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("unsupported DERP url {0:?} (only http(s)://host[:port][/path])")]
    BadUrl(String),
    #[error("TLS to {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
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

/// A byte stream to a DERP server: TCP, or TLS over TCP.
trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}
type BoxConn = Box<dyn Conn>;

/// Receiving half of a DERP connection.
pub struct DerpReader {
    r: BufReader<ReadHalf<BoxConn>>,
}

/// Sending half of a DERP connection.
pub struct DerpWriter {
    w: WriteHalf<BoxConn>,
}

/// A logged-in DERP connection.
pub struct DerpClient {
    reader: DerpReader,
    writer: DerpWriter,
    public: Key,
    server_public: Key,
}

/// A DERP URL taken apart.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header: the URL's authority.
    authority: String,
    /// The name the TLS certificate must carry (an IP literal is checked against IP names).
    host: String,
    path: String,
}

/// Splits `http(s)://host[:port][/path]` (path default `/derp`).
fn parse_url(url: &str) -> Result<Target, ClientError> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(ClientError::BadUrl(url.into()));
    };
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
    let (addr, host) = if has_port {
        let (host, _) = authority.rsplit_once(':').expect("has a port");
        (authority.to_string(), host)
    } else {
        let port = if tls { 443 } else { 80 };
        (format!("{authority}:{port}"), authority)
    };
    Ok(Target {
        tls,
        addr,
        authority: authority.to_string(),
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        path: path.to_string(),
    })
}

/// TLS settings for DERP over https: the system's roots plus `SSL_CERT_FILE`/`SSL_CERT_DIR`.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        crate::raft::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "reading trusted certificates for DERP over TLS");
        }
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "trusted certificates for DERP over TLS");
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

/// Connects to `target`, with TLS when its URL is https.
async fn dial(target: &Target) -> Result<BoxConn, ClientError> {
    let stream = TcpStream::connect(&target.addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: target.addr.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    if !target.tls {
        return Ok(Box::new(stream));
    }
    let tls_error = |source| ClientError::Tls {
        addr: target.addr.clone(),
        source,
    };
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| tls_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let stream = tls_connector()
        .connect(name, stream)
        .await
        .map_err(tls_error)?;
    Ok(Box::new(stream))
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
        let target = parse_url(url)?;
        let (r, mut w) = tokio::io::split(dial(&target).await?);
        let mut r = BufReader::new(r);
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
            target.path, target.authority
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
        let t = parse_url("http://127.0.0.2:8080/derp").unwrap();
        assert_eq!(
            (
                t.tls,
                t.addr.as_str(),
                t.authority.as_str(),
                t.path.as_str()
            ),
            (false, "127.0.0.2:8080", "127.0.0.2:8080", "/derp")
        );
        let t = parse_url("http://example.com").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("example.com:80", "/derp")
        );
        assert_eq!(parse_url("http://[::1]:9/derp").unwrap().addr, "[::1]:9");
        assert_eq!(parse_url("http://[::1]/derp").unwrap().addr, "[::1]:80");
        let t = parse_url("https://relay.example.com/derp").unwrap();
        assert_eq!(
            (t.tls, t.addr.as_str(), t.host.as_str()),
            (true, "relay.example.com:443", "relay.example.com")
        );
        let t = parse_url("https://[::1]:8443").unwrap();
        assert_eq!((t.addr.as_str(), t.host.as_str()), ("[::1]:8443", "::1"));
        assert!(parse_url("ftp://x/derp").is_err());
    }
}
