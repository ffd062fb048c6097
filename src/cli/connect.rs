//! Connecting to a member: its unix socket, or its TCP admin address with an API key.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use super::CliError;
use crate::proto::admin::admin_service_client::AdminServiceClient;

pub type Client = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Socket(PathBuf),
    Address {
        address: String,
        api_key: Option<String>,
    },
}

/// Adds `authorization: Bearer <api key>` to every call, when a key is set.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Dials a unix socket for tonic (the URI is a placeholder).
#[derive(Clone)]
struct UnixConnector(PathBuf);

impl tonic::codegen::Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

pub use crate::util::error_chain;

pub async fn connect(target: &Target, timeout: Duration) -> Result<Client, CliError> {
    match target {
        Target::Socket(path) => {
            let endpoint = Endpoint::from_static("http://[::]:50051")
                .connect_timeout(timeout)
                .timeout(timeout);
            let channel = endpoint
                .connect_with_connector(UnixConnector(path.clone()))
                .await
                .map_err(|e| {
                    CliError::unreachable(format!(
                        "cannot connect to {}: {}",
                        path.display(),
                        error_chain(&e)
                    ))
                })?;
            Ok(AdminServiceClient::with_interceptor(
                channel,
                Bearer::default(),
            ))
        }
        Target::Address { address, api_key } => {
            let bearer = match api_key {
                Some(key) => Bearer(Some(format!("Bearer {}", key.trim()).parse().map_err(
                    |_| CliError::usage("--api-key contains characters not allowed in a header"),
                )?)),
                None => Bearer(None),
            };
            let url = if address.contains("://") {
                address.clone()
            } else {
                format!("http://{address}")
            };
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|_| {
                    CliError::usage(format!("invalid --address {address:?}: expected HOST:PORT"))
                })?
                .connect_timeout(timeout)
                .timeout(timeout);
            // https: the member serves its control certificate here too; trusted through
            // the system's roots or SSL_CERT_FILE.
            let endpoint = if url.starts_with("https://") {
                crate::raft::tls::install_crypto_provider();
                endpoint
                    .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                    .map_err(|e| CliError::usage(format!("TLS for {address}: {e}")))?
            } else {
                endpoint
            };
            let channel = endpoint.connect().await.map_err(|e| {
                CliError::unreachable(format!("cannot connect to {address}: {}", error_chain(&e)))
            })?;
            Ok(AdminServiceClient::with_interceptor(channel, bearer))
        }
    }
}
