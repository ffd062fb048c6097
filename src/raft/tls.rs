//! Mutual TLS between members, always on: a cluster CA (`hsd cluster init-ca`, or made in
//! the data dir on a one-member cluster's first start) signs one certificate per member
//! (`hsd cluster issue-cert`); every member-to-member call presents its member certificate
//! and accepts only peers whose certificate that CA signed.
//!
//! Every member certificate carries the DNS name `hsd-member`, which clients verify instead
//! of the address they dial (members move between addresses; the CA is what they trust),
//! and `member-<id>.hsd-member`, which names the member: the service accepts a peer only
//! while that id is in the Raft membership, so a removed member is refused at once.

use std::path::{Path, PathBuf};
use std::sync::Once;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name every member certificate holds and every member checks.
pub const MEMBER_NAME: &str = "hsd-member";
const CA_NAME: &str = "hsd cluster CA";

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// Where a one-member cluster keeps the CA and certificate it makes for itself.
pub const DEFAULT_DIR: &str = "tls";
/// How long an issued member certificate is valid by default.
pub const DEFAULT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// The certificate name that says which member holds it.
pub fn member_name(member_id: u64) -> String {
    format!("member-{member_id}.{MEMBER_NAME}")
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a cluster CA")]
    Exists { path: PathBuf },
    #[error("{what}: {source}")]
    Cert {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

/// rustls needs one process-wide crypto provider when more than one is compiled in.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    crate::util::write_private_file(path, text.as_bytes()).map_err(|source| TlsError::Write {
        path: path.into(),
        source,
    })
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Creates `dir/ca.pem` and `dir/ca.key`. Never overwrites an existing CA.
pub fn init_ca(dir: &Path) -> Result<PathBuf, TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    if cert_path.exists() {
        return Err(TlsError::Exists { path: cert_path });
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.into(),
        source,
    })?;
    let key = KeyPair::generate().map_err(|source| TlsError::Cert {
        what: "generating the CA key",
        source,
    })?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(|source| TlsError::Cert {
            what: "signing the CA",
            source,
        })?;
    write_private(&dir.join(CA_KEY_FILE), &key.serialize_pem())?;
    write_private(&cert_path, &cert.pem())?;
    Ok(cert_path)
}

/// Issues `out_dir/member-<id>.pem` and `.key`, signed by the CA in `ca_dir`, valid for
/// `valid_for` from now (re-issue to renew). `extra_names` (IPs or DNS names) are added
/// beside the member names, for operators' own tooling.
pub fn issue_member_cert(
    ca_dir: &Path,
    member_id: u64,
    out_dir: &Path,
    extra_names: &[String],
    valid_for: std::time::Duration,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let ca_key_pem = read(&ca_dir.join(CA_KEY_FILE))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| TlsError::Cert {
        what: "reading the CA key",
        source,
    })?;
    // Signing needs the issuer's name and key; both are fixed, so rebuild the CA from them.
    let ca = ca_params()
        .self_signed(&ca_key)
        .map_err(|source| TlsError::Cert {
            what: "loading the CA",
            source,
        })?;

    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("hsd member {member_id}"));
    for name in [MEMBER_NAME.to_string(), member_name(member_id)] {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.try_into().expect("a valid DNS name")));
    }
    let now = chrono::Utc::now();
    // Capped at a century: X.509 dates end in 9999, and no member key should live longer.
    let days = (valid_for.as_secs() / 86_400).clamp(1, 36_500) as i64;
    let until = now + chrono::Duration::days(days);
    let (y, m, d) = ymd(now - chrono::Duration::days(1));
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = ymd(until);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    for name in extra_names {
        let san = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                SanType::DnsName(name.clone().try_into().map_err(|source| TlsError::Cert {
                    what: "an extra certificate name",
                    source,
                })?)
            }
        };
        params.subject_alt_names.push(san);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(|source| TlsError::Cert {
        what: "generating the member key",
        source,
    })?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(|source| TlsError::Cert {
            what: "signing the member certificate",
            source,
        })?;
    std::fs::create_dir_all(out_dir).map_err(|source| TlsError::Write {
        path: out_dir.into(),
        source,
    })?;
    let cert_path = out_dir.join(format!("member-{member_id}.pem"));
    let key_path = out_dir.join(format!("member-{member_id}.key"));
    write_private(&key_path, &key.serialize_pem())?;
    write_private(&cert_path, &cert.pem())?;
    Ok((cert_path, key_path))
}

/// A day as rcgen takes it: (year, month, day).
fn ymd(t: chrono::DateTime<chrono::Utc>) -> (i32, u8, u8) {
    use chrono::Datelike;
    (t.year(), t.month() as u8, t.day() as u8)
}

/// Makes the cluster CA and this member's certificate under `data_dir/tls` unless they
/// exist: the default of a one-member cluster, so its member port is never plaintext.
/// Returns the CA certificate, member certificate and key paths.
pub fn provision_default(
    data_dir: &Path,
    member_id: u64,
) -> Result<(PathBuf, PathBuf, PathBuf), TlsError> {
    let dir = data_dir.join(DEFAULT_DIR);
    let ca = dir.join(CA_CERT_FILE);
    if !ca.exists() {
        init_ca(&dir)?;
        tracing::info!(ca = %ca.display(), "created the cluster CA for member certificates");
    }
    let cert = dir.join(format!("member-{member_id}.pem"));
    let key = dir.join(format!("member-{member_id}.key"));
    if !cert.exists() || !key.exists() {
        issue_member_cert(&dir, member_id, &dir, &[], DEFAULT_VALIDITY)?;
    }
    Ok((ca, cert, key))
}

/// Which of `members` the (CA-verified) certificate `cert` names, if any.
pub fn member_of(cert: &[u8], members: impl IntoIterator<Item = u64>) -> Option<u64> {
    let der = rustls::pki_types::CertificateDer::from(cert);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    members.into_iter().find(|id| {
        rustls::pki_types::ServerName::try_from(member_name(*id))
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

/// This member's TLS settings for both directions of member-to-member gRPC.
#[derive(Clone, Debug)]
pub struct MemberTls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
}

impl MemberTls {
    pub fn load(ca_cert: &Path, cert: &Path, key: &Path) -> Result<MemberTls, TlsError> {
        install_crypto_provider();
        let ca = Certificate::from_pem(read(ca_cert)?);
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        Ok(MemberTls {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone()),
            client: ClientTlsConfig::new()
                .ca_certificate(ca)
                .identity(identity)
                .domain_name(MEMBER_NAME),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::raft::MemberStatusRequest;
    use crate::proto::raft::raft_service_client::RaftServiceClient;

    /// A tiny server that only answers MemberStatus, behind mTLS.
    struct Echo;

    #[tonic::async_trait]
    impl crate::proto::raft::raft_service_server::RaftService for Echo {
        async fn append_entries(
            &self,
            _: tonic::Request<crate::proto::raft::Json>,
        ) -> Result<tonic::Response<crate::proto::raft::Json>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn vote(
            &self,
            _: tonic::Request<crate::proto::raft::Json>,
        ) -> Result<tonic::Response<crate::proto::raft::Json>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn install_snapshot(
            &self,
            _: tonic::Request<crate::proto::raft::Json>,
        ) -> Result<tonic::Response<crate::proto::raft::Json>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn forward(
            &self,
            _: tonic::Request<crate::proto::raft::Json>,
        ) -> Result<tonic::Response<crate::proto::raft::Json>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn member_status(
            &self,
            _: tonic::Request<MemberStatusRequest>,
        ) -> Result<tonic::Response<crate::proto::raft::MemberStatusReply>, tonic::Status> {
            Ok(tonic::Response::new(
                crate::proto::raft::MemberStatusReply {
                    id: 7,
                    ..Default::default()
                },
            ))
        }
        async fn campaign(
            &self,
            _: tonic::Request<crate::proto::raft::CampaignRequest>,
        ) -> Result<tonic::Response<crate::proto::raft::CampaignReply>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn watch_presence(
            &self,
            _: tonic::Request<crate::proto::raft::WatchPresenceRequest>,
        ) -> Result<tonic::Response<crate::proto::raft::PresenceSnapshot>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn drain(
            &self,
            _: tonic::Request<crate::proto::raft::DrainRequest>,
        ) -> Result<tonic::Response<crate::proto::raft::DrainReply>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
    }

    async fn call(addr: std::net::SocketAddr, tls: Option<ClientTlsConfig>) -> Result<u64, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
        if let Some(tls) = tls {
            ep = ep.tls_config(tls).unwrap();
        }
        let ch = ep.connect().await.map_err(|e| format!("connect: {e}"))?;
        let r = RaftServiceClient::new(ch)
            .member_status(MemberStatusRequest {})
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.into_inner().id)
    }

    #[tokio::test]
    async fn only_members_of_the_same_ca_get_in() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, other_ca) = (dir.path().join("ca"), dir.path().join("other"));
        init_ca(&ca).unwrap();
        assert!(
            matches!(init_ca(&ca), Err(TlsError::Exists { .. })),
            "never overwrites a CA"
        );
        init_ca(&other_ca).unwrap();
        let (c1, k1) = issue_member_cert(
            &ca,
            1,
            &dir.path().join("m1"),
            &["127.0.0.1".into()],
            DEFAULT_VALIDITY,
        )
        .unwrap();
        let (c2, k2) =
            issue_member_cert(&ca, 2, &dir.path().join("m2"), &[], DEFAULT_VALIDITY).unwrap();
        let (c3, k3) =
            issue_member_cert(&other_ca, 3, &dir.path().join("m3"), &[], DEFAULT_VALIDITY).unwrap();
        let ca_pem = ca.join(CA_CERT_FILE);
        let server_tls = MemberTls::load(&ca_pem, &c1, &k1).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(server_tls.server)
                .unwrap()
                .add_service(crate::proto::raft::raft_service_server::RaftServiceServer::new(Echo))
                .serve_with_incoming(incoming),
        );

        let member2 = MemberTls::load(&ca_pem, &c2, &k2).unwrap();
        assert_eq!(
            call(addr, Some(member2.client)).await,
            Ok(7),
            "a member of the cluster CA is served"
        );
        // Signed by another CA (and trusting that CA): refused.
        let stranger = MemberTls::load(&other_ca.join(CA_CERT_FILE), &c3, &k3).unwrap();
        assert!(call(addr, Some(stranger.client)).await.is_err());
        // Trusts our CA but presents another CA's certificate: refused.
        let forged = MemberTls::load(&ca_pem, &c3, &k3).unwrap();
        assert!(call(addr, Some(forged.client)).await.is_err());
        // Trusts our CA but presents no certificate at all: refused.
        let anonymous = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&ca_pem).unwrap()))
            .domain_name(MEMBER_NAME);
        assert!(call(addr, Some(anonymous)).await.is_err());
        // Plaintext: refused.
        assert!(call(addr, None).await.is_err());
        server.abort();
    }

    #[test]
    fn a_certificate_names_its_member_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        let (cert, _) = issue_member_cert(&ca, 2, dir.path(), &[], DEFAULT_VALIDITY).unwrap();
        let pem = std::fs::read(cert).unwrap();
        let der = rustls_pemfile_der(&pem);
        assert_eq!(member_of(&der, [1, 2, 3]), Some(2));
        assert_eq!(member_of(&der, [1, 3, 22]), None, "member 2 only, not 22");
        assert_eq!(member_of(b"not a certificate", [2]), None);
    }

    #[test]
    fn the_default_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = provision_default(dir.path(), 1).unwrap();
        let ca = std::fs::read(&first.0).unwrap();
        let second = provision_default(dir.path(), 1).unwrap();
        assert_eq!(first, second);
        assert_eq!(
            std::fs::read(&second.0).unwrap(),
            ca,
            "the CA is not replaced"
        );
        MemberTls::load(&first.0, &first.1, &first.2).unwrap();
    }

    fn rustls_pemfile_der(pem: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(pem).unwrap();
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body).unwrap()
    }
}
