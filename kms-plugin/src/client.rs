//! A KMS v2 client over the plugin's socket, as the kube-apiserver dials it, and the
//! `kms-plugin probe` command built on it.

use std::time::Duration;

use keyhaven_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
use keyhaven_proto::kms::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tonic::transport::Channel;

/// Connects to `unix:///path` or `unix:///@name`.
pub async fn connect(
    listen: &str,
) -> Result<KeyManagementServiceClient<Channel>, tonic::transport::Error> {
    Ok(KeyManagementServiceClient::new(channel(listen).await?))
}

/// A gRPC channel to `unix:///path` or `unix:///@name` (for the KMS and health services).
pub async fn channel(listen: &str) -> Result<Channel, tonic::transport::Error> {
    let target = listen.strip_prefix("unix://").unwrap_or(listen).to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let target = target.clone();
            async move {
                let stream = if let Some(name) = target.strip_prefix("/@") {
                    use std::os::linux::net::SocketAddrExt;
                    let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                    let s = std::os::unix::net::UnixStream::connect_addr(&sa)?;
                    s.set_nonblocking(true)?;
                    tokio::net::UnixStream::from_std(s)?
                } else {
                    tokio::net::UnixStream::connect(target).await?
                };
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}

/// What `probe` found.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// Status.healthz.
    pub healthz: String,
    /// Status.key_id.
    pub key_id: String,
    /// Length of the ciphertext Encrypt returned for a 32-byte seed.
    pub ciphertext_len: usize,
    /// Whether Decrypt gave the seed back.
    pub round_trip_ok: bool,
}

/// Does what the apiserver does: Status, then Encrypt a random 32-byte seed and Decrypt it.
pub async fn probe(listen: &str) -> Result<ProbeReport, String> {
    let mut c = connect(listen)
        .await
        .map_err(|e| format!("cannot connect to {listen}: {e}"))?;
    let st = c
        .status(StatusRequest {})
        .await
        .map_err(|e| format!("Status: {}", e.message()))?
        .into_inner();
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut seed[..]).map_err(|e| format!("random seed: {e}"))?;
    let enc = c
        .encrypt(EncryptRequest {
            plaintext: seed.to_vec(),
            uid: "kms-plugin-probe".into(),
        })
        .await
        .map_err(|e| format!("Encrypt: {:?}: {}", e.code(), e.message()))?
        .into_inner();
    let dec = c
        .decrypt(DecryptRequest {
            ciphertext: enc.ciphertext.clone(),
            uid: "kms-plugin-probe".into(),
            key_id: enc.key_id.clone(),
            annotations: enc.annotations.clone(),
        })
        .await
        .map_err(|e| format!("Decrypt: {:?}: {}", e.code(), e.message()))?
        .into_inner();
    let dec = zeroize::Zeroizing::new(dec.plaintext);
    if enc.key_id != st.key_id {
        return Err(format!(
            "Encrypt used key_id {} but Status reports {}",
            enc.key_id, st.key_id
        ));
    }
    Ok(ProbeReport {
        healthz: st.healthz,
        key_id: st.key_id,
        ciphertext_len: enc.ciphertext.len(),
        round_trip_ok: dec.as_slice() == seed.as_slice(),
    })
}
