//! KMS v2 clients over a Unix socket, dialled the way the kube-apiserver dials the plugin
//! (insecure HTTP/2 on the socket, one connection per channel).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use keyhaven_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
use tonic::transport::{Channel, Endpoint};

/// A KMS v2 client on a shared channel.
pub type KmsClient = KeyManagementServiceClient<Channel>;

/// Opens one channel (one HTTP/2 connection) to the socket at `socket`.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://[::]:50051")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("connect to {}", socket.display()))
}

/// One client on its own channel.
pub async fn client(socket: &Path) -> anyhow::Result<KmsClient> {
    Ok(KeyManagementServiceClient::new(connect(socket).await?))
}

/// `clients` clients, `per_channel` of them sharing each channel.
pub async fn clients(
    socket: &Path,
    clients: usize,
    per_channel: usize,
) -> anyhow::Result<Vec<KmsClient>> {
    let mut channels = Vec::new();
    for _ in 0..clients.div_ceil(per_channel.max(1)) {
        channels.push(connect(socket).await?);
    }
    Ok((0..clients)
        .map(|i| KeyManagementServiceClient::new(channels[i / per_channel.max(1)].clone()))
        .collect())
}
