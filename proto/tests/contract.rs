//! The generated code matches the Kubernetes KMS v2 contract: method paths, and field
//! names/numbers checked on the wire. The round trip runs a real tonic server and client
//! over a Unix socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use keyhaven_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
use keyhaven_proto::kms::v2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use keyhaven_proto::kms::v2::*;
use prost::Message;
use tonic::{Request, Response, Status};

fn dec<M: Message + Default>(bytes: &[u8]) -> M {
    M::decode(bytes).expect("decode")
}

#[test]
fn field_numbers_and_wire_types_match_upstream() {
    // Tag byte = field_number << 3 | wire_type (2 = length-delimited).
    let b = StatusResponse {
        version: "v2".into(),
        healthz: "ok".into(),
        key_id: "k".into(),
    }
    .encode_to_vec();
    assert_eq!(b, [0x0a, 2, b'v', b'2', 0x12, 2, b'o', b'k', 0x1a, 1, b'k']);
    assert_eq!(dec::<StatusResponse>(&b).key_id, "k");

    let b = EncryptRequest {
        plaintext: vec![7],
        uid: "u".into(),
    }
    .encode_to_vec();
    assert_eq!(b, [0x0a, 1, 7, 0x12, 1, b'u']);
    assert_eq!(dec::<EncryptRequest>(&b).uid, "u");

    let b = EncryptResponse {
        ciphertext: vec![1],
        key_id: "k".into(),
        annotations: [("a.b".to_string(), vec![2u8])].into(),
    }
    .encode_to_vec();
    // map entry: field 3, entry{ key=1 "a.b", value=2 [2] }
    assert_eq!(
        b,
        [0x0a, 1, 1, 0x12, 1, b'k', 0x1a, 8, 0x0a, 3, b'a', b'.', b'b', 0x12, 1, 2]
    );
    assert_eq!(dec::<EncryptResponse>(&b).annotations["a.b"], vec![2]);

    let b = DecryptRequest {
        ciphertext: vec![1],
        uid: "u".into(),
        key_id: "k".into(),
        annotations: [("x.y".to_string(), vec![])].into(),
    }
    .encode_to_vec();
    // (prost leaves the empty map value out of the entry)
    assert_eq!(
        b,
        [0x0a, 1, 1, 0x12, 1, b'u', 0x1a, 1, b'k', 0x22, 5, 0x0a, 3, b'x', b'.', b'y']
    );
    let d: DecryptRequest = dec(&b);
    assert_eq!((d.key_id.as_str(), d.uid.as_str()), ("k", "u"));

    let b = DecryptResponse { plaintext: vec![9] }.encode_to_vec();
    assert_eq!(b, [0x0a, 1, 9]);
    assert!(StatusRequest {}.encode_to_vec().is_empty());
}

#[test]
fn encrypted_object_matches_the_apiserver_etcd_record() {
    // Upstream kmsv2/v2/api.proto: 1 encryptedData, 2 keyID, 3 encryptedDEKSource,
    // 4 annotations (map), 5 encryptedDEKSourceType (enum, varint).
    let b = EncryptedObject {
        encrypted_data: vec![1],
        key_id: "k".into(),
        encrypted_dek_source: vec![2],
        annotations: [("a.b".to_string(), vec![3u8])].into(),
        encrypted_dek_source_type: EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed as i32,
    }
    .encode_to_vec();
    assert_eq!(
        b,
        [
            0x0a, 1, 1, 0x12, 1, b'k', 0x1a, 1, 2, 0x22, 8, 0x0a, 3, b'a', b'.', b'b', 0x12, 1, 3,
            0x28, 1
        ]
    );
    let o: EncryptedObject = dec(&b);
    assert_eq!(o.key_id, "k");
    assert_eq!(
        o.encrypted_dek_source_type(),
        EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed
    );
}

#[test]
fn broker_messages_round_trip() {
    use keyhaven_proto::broker::v1::*;
    let m = LeaseResponse {
        lease_id: "id".into(),
        version: 3,
        data: [("k".to_string(), b"v".to_vec())].into(),
        ttl_seconds: 60,
        renewable_until: 1_800_000_000,
    };
    assert_eq!(dec::<LeaseResponse>(&m.encode_to_vec()), m);
    let r = RenewResponse {
        ttl_seconds: 1,
        renewable_until: 2,
        newer_version: true,
    };
    assert_eq!(dec::<RenewResponse>(&r.encode_to_vec()), r);
}

struct Echo;

#[tonic::async_trait]
impl KeyManagementService for Echo {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "echo".into(),
        }))
    }
    async fn decrypt(
        &self,
        r: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(DecryptResponse {
            plaintext: r.ciphertext.into_iter().rev().collect(),
        }))
    }
    async fn encrypt(
        &self,
        r: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(EncryptResponse {
            ciphertext: r.plaintext.into_iter().rev().collect(),
            key_id: "echo".into(),
            annotations: [("version.encryption.keyhaven.dev".to_string(), b"1".to_vec())].into(),
        }))
    }
}

#[tokio::test]
async fn method_paths_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen2 = seen.clone();
    let record = tower::util::MapRequestLayer::new(move |req: http::Request<tonic::body::Body>| {
        seen2.lock().unwrap().push(req.uri().path().to_owned());
        req
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(record)
            .add_service(KeyManagementServiceServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );

    let path = sock.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut client = KeyManagementServiceClient::new(channel);
    let st = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.version.as_str(), st.healthz.as_str()), ("v2", "ok"));
    let enc = client
        .encrypt(EncryptRequest {
            plaintext: vec![1, 2, 3],
            uid: "u1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enc.ciphertext, vec![3, 2, 1]);
    let dec = client
        .decrypt(DecryptRequest {
            ciphertext: enc.ciphertext,
            uid: "u2".into(),
            key_id: enc.key_id,
            annotations: enc.annotations,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plaintext, vec![1, 2, 3]);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "/v2.KeyManagementService/Status",
            "/v2.KeyManagementService/Encrypt",
            "/v2.KeyManagementService/Decrypt",
        ]
    );
    server.abort();
}
