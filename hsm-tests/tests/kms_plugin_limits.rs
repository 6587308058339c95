//! `kms-plugin` limits at its edge, on the real binary: the message-size bound of the gRPC
//! transport and the guard an abstract socket needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use hsm_tests::process::{connect, kms_plugin_cli, runtime, KmsPlugin, PluginOpts};
use keyhaven_proto::kms::v2::*;
use kms_plugin::limits::{MAX_REQUEST_MESSAGE, MESSAGE_TOO_LARGE};
use testkit::softhsm::SoftHsm;
use tonic::Code;

fn init_keys(hsm: &SoftHsm) {
    let out = kms_plugin_cli(hsm, &["keys", "init"]);
    assert!(
        out.status.success(),
        "keys init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_oversized_request_is_invalid_argument_whatever_its_size() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let p = KmsPlugin::start(&hsm, PluginOpts::default());
    let rt = runtime();
    rt.block_on(async {
        let mut c = connect(&p.listen).await.unwrap();
        let good = c
            .encrypt(EncryptRequest {
                plaintext: vec![5u8; 32],
                uid: "u".into(),
            })
            .await
            .unwrap()
            .into_inner();

        // Below the transport's bound the plugin's own check answers, naming its limit; above
        // it, the transport's refusal is mapped to the same code.
        for size in [
            996,
            64 * 1024 + 1,
            MAX_REQUEST_MESSAGE - 64,
            MAX_REQUEST_MESSAGE + 1,
            8 * 1024 * 1024,
        ] {
            let err = c
                .encrypt(EncryptRequest {
                    plaintext: vec![0u8; size],
                    uid: "u".into(),
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "Encrypt {size}: {err:?}");
            let want = if size < MAX_REQUEST_MESSAGE {
                "exceeds the 995-byte limit"
            } else {
                MESSAGE_TOO_LARGE
            };
            assert!(err.message().contains(want), "Encrypt {size}: {err:?}");
        }

        let decrypt = |ciphertext: Vec<u8>, annotations: HashMap<String, Vec<u8>>| {
            let mut c = c.clone();
            let key_id = good.key_id.clone();
            async move {
                c.decrypt(DecryptRequest {
                    ciphertext,
                    uid: "u".into(),
                    key_id,
                    annotations,
                })
                .await
            }
        };
        for size in [2000, 128 * 1024, 2 * MAX_REQUEST_MESSAGE] {
            let err = decrypt(vec![1u8; size], good.annotations.clone())
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "Decrypt {size}: {err:?}");
        }
        let mut huge = good.annotations.clone();
        huge.insert(
            "big.example.com".into(),
            vec![b'x'; 2 * MAX_REQUEST_MESSAGE],
        );
        let err = decrypt(good.ciphertext.clone(), huge).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(err.message(), MESSAGE_TOO_LARGE);

        // The connection and the plugin are fine afterwards.
        let pt = decrypt(good.ciphertext.clone(), good.annotations.clone())
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(pt, vec![5u8; 32]);
    });
}

#[test]
fn abstract_socket_without_allow_list_refuses_to_start() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let name = format!("unix:///@keyhaven-unguarded-{}", std::process::id());
    let out = kms_plugin_cli(&hsm, &["serve", "--listen", &name]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is an abstract socket, which has no file permissions")
            && err.contains("--allow-uid"),
        "{err}"
    );
}
