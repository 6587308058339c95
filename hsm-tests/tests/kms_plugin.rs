//! `kms-plugin` as the kube-apiserver meets it: a real process, a real SoftHSM2 token, a
//! real Unix socket and a tonic client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use hsm_tests::process::{
    connect, eventually, grpc_health, http_get, kms_plugin_cli, metric, runtime, KmsPlugin,
    PluginOpts,
};
use keyhaven_hsm::{BlockingKeystore, KekId};
use keyhaven_proto::kms::v2::*;
use testkit::softhsm::{SoftHsm, USER_PIN};
use tonic::Code;

/// name, ciphertext, key_id, annotations, expected code
type Case = (String, Vec<u8>, String, HashMap<String, Vec<u8>>, Code);

const ANNOTATION: &str = "version.encryption.keyhaven.dev";

fn keys(hsm: &SoftHsm, args: &[&str]) -> (bool, String) {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    let out = kms_plugin_cli(hsm, &all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn init_keys(hsm: &SoftHsm) {
    let (ok, out) = keys(hsm, &["init"]);
    assert!(ok, "keys init failed: {out}");
}

fn plugin_keystore(hsm: &SoftHsm) -> BlockingKeystore {
    let mut cfg = hsm.config();
    cfg.kek_label_prefix = "keyhaven-kms-".into();
    BlockingKeystore::open(cfg).unwrap()
}

async fn status(listen: &str) -> StatusResponse {
    let mut c = connect(listen).await.unwrap();
    c.status(StatusRequest {}).await.unwrap().into_inner()
}

async fn encrypt(listen: &str, pt: &[u8]) -> Result<EncryptResponse, tonic::Status> {
    let mut c = connect(listen).await.unwrap();
    c.encrypt(EncryptRequest {
        plaintext: pt.to_vec(),
        uid: "uid-1".into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn decrypt(listen: &str, e: &EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
    decrypt_with(listen, &e.ciphertext, &e.key_id, e.annotations.clone()).await
}

async fn decrypt_with(
    listen: &str,
    ct: &[u8],
    key_id: &str,
    annotations: HashMap<String, Vec<u8>>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut c = connect(listen).await.unwrap();
    c.decrypt(DecryptRequest {
        ciphertext: ct.to_vec(),
        uid: "uid-2".into(),
        key_id: key_id.into(),
        annotations,
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

#[test]
fn round_trip_status_fields_and_limits() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let p = KmsPlugin::start(&hsm, PluginOpts::default());
    let rt = runtime();
    rt.block_on(async {
        let st = status(&p.listen).await;
        assert_eq!(st.version, "v2");
        assert_eq!(st.healthz, "ok");
        assert!(!st.key_id.is_empty() && st.key_id.len() <= 1024);
        assert!(st.key_id.starts_with("keyhaven-kek-v1-"), "{}", st.key_id);

        let seed = [0x5au8; 32];
        let e = encrypt(&p.listen, &seed).await.unwrap();
        assert_eq!(
            e.key_id, st.key_id,
            "Encrypt key_id must equal Status key_id"
        );
        assert!(!e.ciphertext.is_empty() && e.ciphertext.len() <= 1024);
        assert_eq!(e.ciphertext[0], 1, "format byte");
        assert_ne!(&e.ciphertext[13..45], &seed[..]);
        assert_eq!(
            e.annotations.get(ANNOTATION).map(Vec::as_slice),
            Some(&b"1"[..])
        );
        for k in e.annotations.keys() {
            assert!(k.contains('.'), "annotation keys are FQDNs: {k}");
        }
        assert_eq!(decrypt(&p.listen, &e).await.unwrap(), seed);

        // Largest plaintext that fits gives a ciphertext of exactly 1 KiB.
        let big = vec![7u8; 995];
        let e = encrypt(&p.listen, &big).await.unwrap();
        assert_eq!(e.ciphertext.len(), 1024);
        assert_eq!(decrypt(&p.listen, &e).await.unwrap(), big);
    });
    let sock = p.socket.clone().unwrap();
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    // Graceful shutdown: exit 0 and the socket file is gone.
    assert!(p.stop().success());
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[test]
fn no_kek_is_reported_then_adopted_on_sighup() {
    let hsm = SoftHsm::new().unwrap();
    let p = KmsPlugin::start(
        &hsm,
        PluginOpts {
            rescan_interval: "1h",
            ..Default::default()
        },
    );
    let rt = runtime();
    let st = rt.block_on(status(&p.listen));
    assert!(st.healthz.contains("keys init"), "{}", st.healthz);
    assert_eq!(st.key_id, "");
    let e = rt.block_on(encrypt(&p.listen, b"seed")).unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    init_keys(&hsm);
    p.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || {
        let st = rt.block_on(status(&p.listen));
        st.healthz == "ok" && !st.key_id.is_empty()
    }));
}

#[test]
fn key_id_is_stable_across_restarts_and_never_reused() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let rt = runtime();
    let p = KmsPlugin::start(&hsm, PluginOpts::default());
    let first = rt.block_on(status(&p.listen)).key_id;
    let e = rt.block_on(encrypt(&p.listen, b"seed-1")).unwrap();
    assert!(p.stop().success());
    let p = KmsPlugin::start(&hsm, PluginOpts::default());
    assert_eq!(
        rt.block_on(status(&p.listen)).key_id,
        first,
        "same KEK, same key_id"
    );
    assert_eq!(rt.block_on(decrypt(&p.listen, &e)).unwrap(), b"seed-1");
    drop(p);

    // A KEK destroyed and re-created under the very same label gets a new key_id.
    let ks = plugin_keystore(&hsm);
    let label = "keyhaven-kms-recreated";
    let a = ks.generate_kek_with_label(label).unwrap();
    let id_a = format!("keyhaven-kek-v1-{}", a.id);
    ks.destroy_kek(&a.id).unwrap();
    let b = ks.generate_kek_with_label(label).unwrap();
    let id_b = format!("keyhaven-kek-v1-{}", b.id);
    assert_eq!(a.label, b.label);
    assert_ne!(id_a, id_b);
}

#[test]
fn rotate_while_running_then_retire() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let rt = runtime();
    let p = KmsPlugin::start(&hsm, PluginOpts::default());
    let old_id = rt.block_on(status(&p.listen)).key_id;
    let old: Vec<_> = (0..5u8)
        .map(|i| rt.block_on(encrypt(&p.listen, &[i; 32])).unwrap())
        .collect();

    let (ok, out) = keys(&hsm, &["rotate"]);
    assert!(ok, "{out}");
    // Adopted within the rescan interval (500 ms here), without SIGHUP or restart.
    let mut new_id = String::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            new_id = rt.block_on(status(&p.listen)).key_id;
            new_id != old_id
        }),
        "new primary not adopted"
    );
    assert!(out.contains(&new_id), "rotate prints the new key_id: {out}");
    let fresh = rt.block_on(encrypt(&p.listen, b"after rotation")).unwrap();
    assert_eq!(fresh.key_id, new_id);
    for (i, e) in old.iter().enumerate() {
        assert_eq!(e.key_id, old_id);
        assert_eq!(rt.block_on(decrypt(&p.listen, e)).unwrap(), [i as u8; 32]);
    }

    // list shows both, with roles, and the running plugin's last-decrypt times.
    let (ok, out) = keys(&hsm, &["list", "--json", "--plugin-addr", &p.metrics_addr]);
    assert!(ok, "{out}");
    let rows: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let role = |id: &str| {
        rows.iter()
            .find(|r| r["key_id"] == id)
            .map(|r| r["role"].as_str().unwrap().to_owned())
    };
    assert_eq!(role(&old_id).as_deref(), Some("decrypt-only"));
    assert_eq!(role(&new_id).as_deref(), Some("primary"));
    let last = |id: &str| rows.iter().find(|r| r["key_id"] == id).unwrap()["last_decrypt"].clone();
    assert!(
        last(&old_id).is_string(),
        "old KEK decrypted just now: {out}"
    );
    assert!(last(&new_id).is_null(), "new KEK never decrypted: {out}");

    // Retire: the primary is refused, and so is anything without --yes. (The etcd usage
    // check is the subject of kms_rotation.rs; here it is skipped on purpose.)
    let (ok, out) = keys(&hsm, &["retire", &new_id, "--yes", "--skip-usage-check"]);
    assert!(!ok && out.contains("primary"), "{out}");
    let (ok, out) = keys(&hsm, &["retire", &old_id, "--skip-usage-check"]);
    assert!(!ok && out.contains("--yes"), "{out}");
    assert_eq!(rt.block_on(decrypt(&p.listen, &old[0])).unwrap(), [0u8; 32]);
    let (ok, out) = keys(&hsm, &["retire", &old_id, "--yes", "--skip-usage-check"]);
    assert!(ok, "{out}");
    // Its ciphertexts now fail with a clear NOT_FOUND naming the key_id.
    let e = rt.block_on(decrypt(&p.listen, &old[1])).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&old_id), "{}", e.message());
    // ...and the new ones still open.
    assert_eq!(
        rt.block_on(decrypt(&p.listen, &fresh)).unwrap(),
        b"after rotation"
    );
    assert_eq!(rt.block_on(status(&p.listen)).healthz, "ok");
}

#[test]
fn sixty_four_clients_five_hundred_decrypts_each() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let p = KmsPlugin::start(&hsm, PluginOpts::default());
    let rt = runtime();
    rt.block_on(async {
        let mut samples = Vec::new();
        for i in 0..16u8 {
            let pt = [i; 32];
            samples.push((pt, encrypt(&p.listen, &pt).await.unwrap()));
        }
        let samples = std::sync::Arc::new(samples);
        let mut tasks = Vec::new();
        for c in 0..64usize {
            let samples = samples.clone();
            let listen = p.listen.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = connect(&listen).await.unwrap();
                let mut ok = 0;
                for i in 0..500usize {
                    let (pt, e) = &samples[(c + i) % samples.len()];
                    let r = client
                        .decrypt(DecryptRequest {
                            ciphertext: e.ciphertext.clone(),
                            uid: format!("{c}-{i}"),
                            key_id: e.key_id.clone(),
                            annotations: e.annotations.clone(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(&r.plaintext, pt);
                    ok += 1;
                }
                ok
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        assert_eq!(total, 64 * 500);
    });
}

#[test]
fn hsm_fault_turns_unhealthy_fails_fast_and_recovers_without_restart() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let mut p = KmsPlugin::start(&hsm, PluginOpts::default());
    let rt = runtime();
    let e = rt
        .block_on(encrypt(&p.listen, b"before the fault"))
        .unwrap();
    let pid = p.pid();

    let away = hsm.remove_token().unwrap();
    // Unhealthy within the self-test interval (300 ms) plus slack.
    let mut reason = String::new();
    assert!(
        eventually(Duration::from_secs(3), || {
            reason = rt.block_on(status(&p.listen)).healthz;
            reason != "ok"
        }),
        "Status stayed ok with the token gone"
    );
    assert!(reason.contains("HSM"), "{reason}");
    // The gRPC health service of the socket and /readyz say the same.
    let health = |service: &'static str| {
        rt.block_on(async {
            let ch = kms_plugin::client::channel(&p.listen).await.unwrap();
            grpc_health(ch, service).await
        })
    };
    const KMS: &str = "v2.KeyManagementService";
    assert!(
        eventually(Duration::from_secs(5), || health("") == Ok(2)
            && health(KMS) == Ok(2)),
        "gRPC health stayed SERVING with the token gone"
    );
    assert_eq!(http_get(&p.metrics_addr, "/readyz").0, 503);
    for _ in 0..3 {
        let t0 = Instant::now();
        let err = rt.block_on(decrypt(&p.listen, &e)).unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        let err2 = rt.block_on(encrypt(&p.listen, b"during")).unwrap_err();
        assert_eq!(err2.code(), Code::Unavailable, "{err2:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "answers must come before the apiserver's 3 s deadline: {:?}",
            t0.elapsed()
        );
    }

    hsm.restore_token(away).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || rt
            .block_on(status(&p.listen))
            .healthz
            == "ok"),
        "did not turn healthy again; log:\n{}",
        p.log()
    );
    assert!(
        eventually(Duration::from_secs(5), || health("") == Ok(1)
            && health(KMS) == Ok(1)),
        "gRPC health did not return to SERVING"
    );
    assert_eq!(http_get(&p.metrics_addr, "/readyz").0, 200);
    assert_eq!(
        rt.block_on(decrypt(&p.listen, &e)).unwrap(),
        b"before the fault"
    );
    assert!(rt.block_on(encrypt(&p.listen, b"after")).is_ok());
    assert!(p.try_wait().is_none(), "plugin must not have restarted");
    assert_eq!(p.pid(), pid);
}

#[test]
fn bad_input_gets_its_documented_code() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let p = KmsPlugin::start(&hsm, PluginOpts::default());
    let rt = runtime();
    rt.block_on(async {
        let good = encrypt(&p.listen, &[1u8; 32]).await.unwrap();
        let ann = good.annotations.clone();
        let kid = good.key_id.clone();
        let ct = good.ciphertext.clone();

        assert_eq!(
            encrypt(&p.listen, b"").await.unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            encrypt(&p.listen, &[0u8; 996]).await.unwrap_err().code(),
            Code::InvalidArgument
        );

        let mut flipped = Vec::new();
        for i in [1usize, 6, 13, 30, ct.len() - 1] {
            let mut c = ct.clone();
            c[i] ^= 0x01;
            flipped.push((format!("bit flipped at {i}"), c));
        }
        let mut fmt = ct.clone();
        fmt[0] = 9;
        let mut cases: Vec<Case> = vec![
            (
                "empty ciphertext".into(),
                vec![],
                kid.clone(),
                ann.clone(),
                Code::InvalidArgument,
            ),
            (
                "garbage".into(),
                b"not a ciphertext at all, just junk".to_vec(),
                kid.clone(),
                ann.clone(),
                Code::InvalidArgument,
            ),
            (
                "truncated".into(),
                ct[..ct.len() - 5].to_vec(),
                kid.clone(),
                ann.clone(),
                Code::InvalidArgument,
            ),
            (
                "too short".into(),
                ct[..20].to_vec(),
                kid.clone(),
                ann.clone(),
                Code::InvalidArgument,
            ),
            (
                "unknown format".into(),
                fmt,
                kid.clone(),
                ann.clone(),
                Code::InvalidArgument,
            ),
            (
                "oversized".into(),
                vec![1u8; 2000],
                kid.clone(),
                ann.clone(),
                Code::InvalidArgument,
            ),
            (
                "empty key_id".into(),
                ct.clone(),
                String::new(),
                ann.clone(),
                Code::InvalidArgument,
            ),
            (
                "foreign key_id".into(),
                ct.clone(),
                "some-other-plugin-key".into(),
                ann.clone(),
                Code::NotFound,
            ),
            (
                "unknown key_id".into(),
                ct.clone(),
                format!("keyhaven-kek-v1-{}", KekId([3; 16])),
                ann.clone(),
                Code::NotFound,
            ),
            (
                "missing annotations".into(),
                ct.clone(),
                kid.clone(),
                HashMap::new(),
                Code::InvalidArgument,
            ),
            (
                "altered annotation".into(),
                ct.clone(),
                kid.clone(),
                HashMap::from([(ANNOTATION.to_string(), b"2".to_vec())]),
                Code::InvalidArgument,
            ),
            (
                "extra annotation".into(),
                ct.clone(),
                kid.clone(),
                {
                    let mut a = ann.clone();
                    a.insert("x.example.com".into(), b"y".to_vec());
                    a
                },
                Code::InvalidArgument,
            ),
        ];
        for (name, c) in flipped {
            cases.push((name, c, kid.clone(), ann.clone(), Code::InvalidArgument));
        }
        for (name, c, k, a, want) in cases {
            let err = decrypt_with(&p.listen, &c, &k, a).await.unwrap_err();
            assert_eq!(err.code(), want, "{name}: {err:?}");
            assert!(!err.message().is_empty(), "{name}: message");
        }
        // The unknown key_id message names it.
        let unknown = format!("keyhaven-kek-v1-{}", KekId([3; 16]));
        let err = decrypt_with(&p.listen, &ct, &unknown, ann.clone())
            .await
            .unwrap_err();
        assert!(err.message().contains(&unknown), "{}", err.message());
        // And nothing broke: the good one still decrypts, Status still ok.
        assert_eq!(decrypt(&p.listen, &good).await.unwrap(), [1u8; 32]);
        assert_eq!(status(&p.listen).await.healthz, "ok");
    });
}

#[test]
fn stale_socket_is_replaced_live_socket_is_not_stolen() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let sock = hsm.dir().join("kms.sock");
    // A stale socket: bound, then its owner went away.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let listen = format!("unix://{}", sock.display());
    let p = KmsPlugin::start(
        &hsm,
        PluginOpts {
            listen: Some(listen.clone()),
            ..Default::default()
        },
    );
    let rt = runtime();
    assert_eq!(rt.block_on(status(&listen)).healthz, "ok");

    // A second plugin on the same live socket refuses to start and leaves it alone.
    let out = kms_plugin_cli(&hsm, &["serve", "--listen", &listen]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process is serving"), "{err}");
    assert_eq!(
        rt.block_on(status(&listen)).healthz,
        "ok",
        "first plugin still serving"
    );

    // A regular file in the way is not deleted.
    let file = hsm.dir().join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    let out = kms_plugin_cli(
        &hsm,
        &["serve", "--listen", &format!("unix://{}", file.display())],
    );
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    drop(p);
}

#[test]
fn abstract_socket_and_peer_uid_allow_list() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let me = nix::unistd::getuid().as_raw();
    let name = format!("unix:///@keyhaven-test-{}", std::process::id());
    let p = KmsPlugin::start(
        &hsm,
        PluginOpts {
            listen: Some(name.clone()),
            extra: vec!["--allow-uid".into(), format!("{me}")],
            ..Default::default()
        },
    );
    let rt = runtime();
    assert_eq!(rt.block_on(status(&name)).healthz, "ok");
    drop(p);

    let p = KmsPlugin::start(
        &hsm,
        PluginOpts {
            extra: vec!["--allow-uid".into(), format!("{}", me + 4242)],
            ..Default::default()
        },
    );
    let err = rt
        .block_on(async {
            let mut c = connect(&p.listen).await.unwrap();
            c.status(StatusRequest {}).await
        })
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let (_, m) = http_get(&p.metrics_addr, "/metrics");
    let refused: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("keyhaven_kms_refused_peers_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{m}");
}

#[test]
fn metrics_health_and_logs_without_secrets() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let p = KmsPlugin::start(&hsm, PluginOpts::default());
    let rt = runtime();
    let secret = b"TOP-SECRET-DEK-SEED-0123456789ab";
    let e = rt.block_on(encrypt(&p.listen, secret)).unwrap();
    rt.block_on(decrypt(&p.listen, &e)).unwrap();
    let _ = rt.block_on(decrypt_with(
        &p.listen,
        b"junk",
        &e.key_id,
        e.annotations.clone(),
    ));

    assert_eq!(http_get(&p.metrics_addr, "/healthz").0, 200);
    assert_eq!(http_get(&p.metrics_addr, "/readyz").0, 200);
    let (code, m) = http_get(&p.metrics_addr, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "keyhaven_kms_requests_total{method=\"Encrypt\",code=\"Ok\"} 1",
        "keyhaven_kms_requests_total{method=\"Decrypt\",code=\"InvalidArgument\"} 1",
        "keyhaven_kms_request_duration_seconds_bucket",
        "keyhaven_kms_hsm_operation_duration_seconds_count{op=\"decrypt\"}",
        "keyhaven_kms_self_test_ok 1",
        "keyhaven_kms_key_id_hash",
    ] {
        assert!(m.contains(needle), "missing {needle} in:\n{m}");
    }
    let (code, k) = http_get(&p.metrics_addr, "/keys");
    assert_eq!(code, 200);
    let k: serde_json::Value = serde_json::from_str(&k).unwrap();
    assert_eq!(k["primary"], e.key_id.as_str());
    assert!(k["keys"][0]["last_decrypt_unix"].is_u64(), "{k}");

    let log = p.log();
    assert!(log.contains("kms-plugin serving"), "{log}");
    let hex_secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    for bad in [
        "TOP-SECRET".to_string(),
        hex_secret,
        format!("{:?}", &secret[..8]),
        USER_PIN.to_string(),
    ] {
        assert!(!log.contains(&bad), "log leaks {bad}:\n{log}");
    }
}

#[test]
fn random_requests_never_crash_or_hang_the_plugin() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    let mut p = KmsPlugin::start(&hsm, PluginOpts::default());
    let rt = runtime();
    rt.block_on(async {
        let good = encrypt(&p.listen, &[9u8; 32]).await.unwrap();
        let mut c = connect(&p.listen).await.unwrap();
        // A small xorshift generator: deterministic, no extra dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..300u64 {
            let len = (next() % 1100) as usize;
            let mut ct: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 3 == 0 && !ct.is_empty() {
                ct[0] = 1; // looks like our format
            }
            let key_id = match i % 4 {
                0 => good.key_id.clone(),
                1 => String::new(),
                2 => format!("keyhaven-kek-v1-{:032x}", next()),
                _ => (0..(next() % 40))
                    .map(|_| char::from(b'!' + (next() % 90) as u8))
                    .collect(),
            };
            let annotations = if i % 2 == 0 {
                good.annotations.clone()
            } else {
                HashMap::new()
            };
            let t0 = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                c.decrypt(DecryptRequest {
                    ciphertext: ct,
                    uid: format!("{i}"),
                    key_id,
                    annotations,
                }),
            )
            .await
            .expect("Decrypt hung");
            let code = r.unwrap_err().code();
            assert!(
                matches!(code, Code::InvalidArgument | Code::NotFound),
                "request {i}: unexpected {code:?}"
            );
            assert!(t0.elapsed() < Duration::from_secs(3));
        }
        assert_eq!(decrypt(&p.listen, &good).await.unwrap(), [9u8; 32]);
    });
    assert!(p.try_wait().is_none(), "plugin died");
}

#[test]
fn wrong_pin_at_start_waits_for_a_new_pin_instead_of_crash_looping() {
    let hsm = SoftHsm::new().unwrap();
    init_keys(&hsm);
    hsm.write_pin("0000-wrong-pin").unwrap();
    let mut p = KmsPlugin::spawn(&hsm, PluginOpts::default());
    let m = p.metrics_addr.clone();
    // The HTTP listener is up before the login, and the PIN source is read again and again
    // (once a second) without a second C_Login.
    assert!(
        eventually(Duration::from_secs(20), || {
            testkit::http::get(&m, "/metrics").is_ok()
                && metric(&m, "keyhaven_kms_hsm_pin_source_checks") >= 3.0
        }),
        "the PIN source was not polled; log:\n{}",
        p.log()
    );
    assert_eq!(metric(&m, "keyhaven_kms_hsm_login_attempts"), 1.0);
    assert_eq!(metric(&m, "keyhaven_kms_hsm_pin_refused"), 1.0);
    assert_eq!(http_get(&m, "/healthz").0, 200);
    let (code, why) = http_get(&m, "/readyz");
    assert_eq!(code, 503);
    assert!(why.contains("PIN incorrect"), "{why}");
    assert!(!why.contains("0000-wrong-pin"), "readyz leaks the PIN");
    assert!(
        p.try_wait().is_none(),
        "must stay up, not exit into a restart loop"
    );
    assert!(
        !p.socket.as_ref().unwrap().exists(),
        "no socket while it cannot log in"
    );

    // Writing the same refused PIN again (a re-applied Secret) is not a new PIN; SIGHUP
    // reads the source at once, and still offers nothing.
    hsm.write_pin("0000-wrong-pin").unwrap();
    p.signal(nix::sys::signal::Signal::SIGHUP);
    let checks = metric(&m, "keyhaven_kms_hsm_pin_source_checks");
    assert!(eventually(Duration::from_secs(20), || metric(
        &m,
        "keyhaven_kms_hsm_pin_source_checks"
    ) >= checks + 2.0));
    assert_eq!(metric(&m, "keyhaven_kms_hsm_login_attempts"), 1.0);

    let log = p.log();
    assert_eq!(
        log.matches("HSM refused the PIN; not retrying").count(),
        1,
        "one login attempt, not one per second:\n{log}"
    );
    assert!(!log.contains("0000-wrong-pin"), "log leaks the PIN");
    hsm.write_pin(USER_PIN).unwrap();
    p.wait_ready();
    let rt = runtime();
    assert_eq!(rt.block_on(status(&p.listen)).healthz, "ok");
    assert!(eventually(Duration::from_secs(10), || http_get(
        &m, "/readyz"
    )
    .0 == 200));
    assert_eq!(metric(&m, "keyhaven_kms_hsm_login_attempts"), 2.0);
    assert_eq!(metric(&m, "keyhaven_kms_hsm_pin_refused"), 0.0);
}
