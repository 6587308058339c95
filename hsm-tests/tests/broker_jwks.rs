//! The apiserver's signing keys from `--jwks-file`, as an operator rotates them: a real
//! `broker` process, the file edited under it. A key removed from the file stops verifying
//! tokens within `--jwks-refresh-interval` (2 s by default), also tokens the broker has
//! already seen; a key added is trusted without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hsm_tests::broker::{broker_token, BrokerProc};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::process::runtime;
use keyhaven_broker::auth::{DevIssuer, DEV_ISSUER};
use tonic::Code;

const POLICY: &str = r#"
policies:
- name: app
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

/// Longest wait for an edit of the file to take effect here: the default refresh interval
/// (2 s) with room for a loaded machine.
const BOUND: Duration = Duration::from_secs(10);

fn write_jwks(path: &std::path::Path, issuers: &[&DevIssuer]) {
    let keys: Vec<_> = issuers.iter().flat_map(|i| i.jwks().keys).collect();
    let set = serde_json::json!({ "keys": keys });
    // Written aside and renamed in, as a ConfigMap update swaps the file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&set).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn token(issuer: &DevIssuer) -> String {
    issuer
        .mint("shop", "web", None, Duration::from_secs(600))
        .unwrap()
}

/// Leases until the outcome's code is `want` (Ok as `Code::Ok`), at most [`BOUND`].
async fn lease_until(c: &mut BrokerClient, token: &str, want: Code, log: impl Fn() -> String) {
    let deadline = Instant::now() + BOUND;
    loop {
        let got = match c.lease(token, "shop/db").await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Lease still {got:?}, want {want:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_key_removed_from_the_jwks_file_is_refused_without_a_restart() {
    let (hsm, pki) = broker_token();
    // Two cluster signing keys; the broker's own dev key (dev.pem) is neither.
    let (old, new) = (
        DevIssuer::generate().unwrap(),
        DevIssuer::generate().unwrap(),
    );
    let jwks = hsm.dir().join("jwks.json");
    write_jwks(&jwks, &[&old]);
    let b = BrokerProc::start(
        &hsm,
        &pki,
        &[
            "--jwks-file",
            jwks.to_str().unwrap(),
            "--issuer",
            DEV_ISSUER,
        ],
    );
    let rt = runtime();
    rt.block_on(async {
        let mut c = BrokerClient::connect(&b, &pki).await;
        c.apply(POLICY, false).await;
        c.put("shop/db").await;
        let (old_token, new_token) = (token(&old), token(&new));
        c.lease(&old_token, "shop/db").await.unwrap();
        let refused = c.lease(&new_token, "shop/db").await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

        // The rotation: the new key published beside the old one, then the old one removed.
        write_jwks(&jwks, &[&old, &new]);
        lease_until(&mut c, &new_token, Code::Ok, || b.log_text()).await;
        c.lease(&old_token, "shop/db").await.unwrap();
        write_jwks(&jwks, &[&new]);
        // The old token was verified (and remembered) a moment ago; it is refused all the same.
        lease_until(&mut c, &old_token, Code::Unauthenticated, || b.log_text()).await;
        c.lease(&new_token, "shop/db").await.unwrap();
        // A file that cannot be read keeps the keys in use.
        std::fs::remove_file(&jwks).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.lease(&new_token, "shop/db").await.unwrap();
        c.audit_verifies().await;
    });
}
