//! TokenReview mode through `Broker::authenticate`: a fake apiserver on loopback, a real
//! SoftHSM2 KEK and SQLite file; refusals and outages are audited with their reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hsm_tests::broker::{broker_keystore, test_store};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use keyhaven_broker::audit::{EventKind, Outcome};
use keyhaven_broker::auth::{Authenticator, DevIssuer, TokenReviewConfig, TokenReviewer, Verifier};
use keyhaven_broker::crypto::{DekCache, Envelope};
use keyhaven_broker::service::{Broker, BrokerConfig, BrokerError, Caller};
use testkit::softhsm::SoftHsm;

/// Fake apiserver (plain http on loopback): authenticates only tokens in `good`; `broken`
/// answers 500; everything else "not authenticated, pod not found".
#[derive(Default)]
struct Fake {
    good: Mutex<Vec<String>>,
    broken: Mutex<Vec<String>>,
    calls: Mutex<usize>,
}

async fn handle(
    st: Arc<Fake>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    assert_eq!(
        req.headers()
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap(),
        "Bearer broker-token"
    );
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let token = v["spec"]["token"].as_str().unwrap().to_owned();
    *st.calls.lock().unwrap() += 1;
    let (code, body) = if st.broken.lock().unwrap().contains(&token) {
        (500, "boom".to_string())
    } else if st.good.lock().unwrap().contains(&token) {
        (
            201,
            serde_json::json!({"status": {"authenticated": true, "audiences": ["keyhaven"],
            "user": {"username": "system:serviceaccount:team-a:app",
                     "extra": {"authentication.kubernetes.io/pod-name": ["app-1"]}}}})
            .to_string(),
        )
    } else {
        (201, serde_json::json!({"status": {"authenticated": false, "error": "pod \"app-1\" not found"}}).to_string())
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
    Ok(r)
}

#[test]
fn authenticate_with_token_review() {
    let hsm = SoftHsm::new().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = test_store(&hsm, None).await;
        let ks = broker_keystore(&hsm).await;
        ks.generate_kek().await.unwrap();
        let envelope = Envelope::new(ks, DekCache::new(1000, Duration::from_secs(60)));
        let dev = DevIssuer::generate().unwrap();
        let verifier = Arc::new(
            Verifier::new(
                keyhaven_broker::auth::dev_verifier_config(),
                keyhaven_broker::auth::dev_jwks_source(&dev),
            )
            .unwrap(),
        );

        let fake = Arc::new(Fake::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = fake.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        let tok_file = hsm.dir().join("broker-token");
        std::fs::write(&tok_file, "broker-token\n").unwrap();
        let reviewer = TokenReviewer::new(&TokenReviewConfig::new(
            format!("http://{addr}"),
            None,
            &tok_file,
        ))
        .unwrap();

        let authenticator = Authenticator::new(verifier).with_token_review(Arc::new(reviewer));
        let broker = Broker::new(store, envelope, authenticator, BrokerConfig::default())
            .await
            .unwrap();

        let good = dev
            .mint("team-a", "app", Some("app-1"), Duration::from_secs(600))
            .unwrap();
        let deleted = dev
            .mint("team-a", "app", Some("app-1"), Duration::from_secs(600))
            .unwrap();
        let broken = dev
            .mint("team-a", "app", Some("app-1"), Duration::from_secs(600))
            .unwrap();
        fake.good.lock().unwrap().push(good.clone());
        fake.broken.lock().unwrap().push(broken.clone());

        match broker.authenticate(&good).await.unwrap() {
            Caller::Workload(id) => assert_eq!(id.subject(), "team-a/app"),
            other => panic!("{other:?}"),
        }
        let e = broker.authenticate(&deleted).await.unwrap_err();
        assert!(
            matches!(&e, BrokerError::Unauthenticated(r) if r == "token_review_denied"),
            "{e}"
        );
        let e = broker.authenticate(&broken).await.unwrap_err();
        assert!(matches!(&e, BrokerError::Unavailable { .. }), "{e}");
        assert!(!e.to_string().contains(&broken));
        // A bad signature never reaches the apiserver.
        let calls = *fake.calls.lock().unwrap();
        let e = broker.authenticate("a.b.c").await.unwrap_err();
        assert!(matches!(e, BrokerError::Unauthenticated(_)));
        assert_eq!(*fake.calls.lock().unwrap(), calls);
        // Cached: the good token again makes no call.
        broker.authenticate(&good).await.unwrap();
        assert_eq!(*fake.calls.lock().unwrap(), calls);

        let recs = broker.store().audit_records(0, 100).await.unwrap();
        let auth: Vec<_> = recs
            .iter()
            .filter(|r| r.event.kind == EventKind::Authenticate)
            .map(|r| {
                (
                    r.event.outcome,
                    r.event.identity.clone(),
                    r.event.pod.clone(),
                    r.event.reason.clone(),
                )
            })
            .collect();
        println!("{auth:#?}");
        let who = Some("team-a/app".to_string());
        let pod = Some("app-1".to_string());
        assert_eq!(
            auth,
            vec![
                (Outcome::Ok, who.clone(), pod.clone(), None),
                (
                    Outcome::Denied,
                    who.clone(),
                    pod.clone(),
                    Some("token_review_denied".into())
                ),
                (
                    Outcome::Error,
                    who.clone(),
                    pod.clone(),
                    Some("token_review_unavailable".into())
                ),
                (Outcome::Ok, who.clone(), pod.clone(), None),
            ]
        );
        for r in &recs {
            let text = format!("{r:?}");
            for t in [&good, &deleted, &broken] {
                assert!(!text.contains(t.as_str()));
            }
        }
        // The malformed token has no identity: one aggregated record.
        assert_eq!(broker.flush_auth_failures().await.unwrap(), 1);
        let last = broker
            .store()
            .audit_records(0, 100)
            .await
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(last.event.kind, EventKind::AuthFailures(1));
        assert_eq!(last.event.reason.as_deref(), Some("malformed"));
        assert!(broker.store().verify_audit().await.unwrap().is_ok());
        let m = broker.metrics().encode();
        println!(
            "{}",
            m.lines()
                .filter(|l| l.contains("token_review"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
}
