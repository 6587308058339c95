//! The `hsm` keystore against a real SoftHSM2 token: round trips, tampering, wrong keys,
//! missing keys, wrong PINs, concurrency, and recovery when sessions die under it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;

use keyhaven_hsm::{
    process_login_attempts, BlockingKeystore, ErrorKind, KekId, Keystore, PinSource, TokenSelector,
    GCM_IV_LEN, GCM_TAG_LEN,
};
use testkit::softhsm::{SoftHsm, USER_PIN};

fn open(hsm: &SoftHsm) -> BlockingKeystore {
    BlockingKeystore::open(hsm.config()).expect("open keystore")
}

#[test]
fn round_trip_inside_the_hsm() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let kek = ks.generate_kek().unwrap();
    for len in [0usize, 1, 16, 32, 1000, 64 * 1024] {
        let pt: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let sealed = ks.encrypt(&kek.id, b"aad:some/path", &pt).unwrap();
        assert_eq!(sealed.ciphertext.len(), len + GCM_TAG_LEN);
        if len >= 16 {
            assert_ne!(
                &sealed.ciphertext[..len],
                &pt[..],
                "ciphertext equals plaintext"
            );
        }
        let back = ks
            .decrypt(&kek.id, b"aad:some/path", &sealed.iv, &sealed.ciphertext)
            .unwrap();
        assert_eq!(back.as_slice(), pt.as_slice());
    }
    // Fresh IV every time: same input, different outputs.
    let a = ks.encrypt(&kek.id, b"", b"same").unwrap();
    let b = ks.encrypt(&kek.id, b"", b"same").unwrap();
    assert_ne!(a.iv, b.iv);
    assert_ne!(a.ciphertext, b.ciphertext);
    // Over the limit is refused before the HSM sees it.
    let err = ks
        .encrypt(&kek.id, b"", &vec![0u8; 64 * 1024 + 1])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn flipping_any_byte_of_iv_ciphertext_tag_or_aad_is_invalid_ciphertext() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let kek = ks.generate_kek().unwrap();
    let aad = b"team/app/db#3".to_vec();
    let pt = [0x42u8; 32];
    let sealed = ks.encrypt(&kek.id, &aad, &pt).unwrap();
    assert_eq!(sealed.iv.len(), GCM_IV_LEN);

    for i in 0..GCM_IV_LEN {
        let mut iv = sealed.iv;
        iv[i] ^= 0x01;
        let e = ks
            .decrypt(&kek.id, &aad, &iv, &sealed.ciphertext)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidCiphertext, "iv byte {i}");
    }
    // ciphertext bytes, then tag bytes
    for i in 0..sealed.ciphertext.len() {
        let mut ct = sealed.ciphertext.clone();
        ct[i] ^= 0x80;
        let e = ks.decrypt(&kek.id, &aad, &sealed.iv, &ct).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidCiphertext,
            "ciphertext/tag byte {i}"
        );
    }
    for i in 0..aad.len() {
        let mut bad = aad.clone();
        bad[i] ^= 0x20;
        let e = ks
            .decrypt(&kek.id, &bad, &sealed.iv, &sealed.ciphertext)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidCiphertext, "aad byte {i}");
    }
    // Truncated, empty, extended, and a wrong-length IV.
    for ct in [
        &sealed.ciphertext[..sealed.ciphertext.len() - 1],
        &sealed.ciphertext[..GCM_TAG_LEN - 1],
        &[][..],
    ] {
        let e = ks.decrypt(&kek.id, &aad, &sealed.iv, ct).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidCiphertext);
    }
    let mut longer = sealed.ciphertext.clone();
    longer.push(0);
    let e = ks.decrypt(&kek.id, &aad, &sealed.iv, &longer).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidCiphertext);
    let e = ks
        .decrypt(&kek.id, &aad, &sealed.iv[..11], &sealed.ciphertext)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidCiphertext);
    // After all that, the session pool is healthy and the original still opens.
    let back = ks
        .decrypt(&kek.id, &aad, &sealed.iv, &sealed.ciphertext)
        .unwrap();
    assert_eq!(back.as_slice(), &pt);
    assert_eq!(
        ks.stats().rebuilds,
        0,
        "tag failures must not look like HSM faults"
    );
}

#[test]
fn a_different_kek_cannot_decrypt() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let k1 = ks.generate_kek().unwrap();
    let k2 = ks.generate_kek().unwrap();
    assert_ne!(k1.id, k2.id);
    let sealed = ks.encrypt(&k1.id, b"a", b"secret seed").unwrap();
    let e = ks
        .decrypt(&k2.id, b"a", &sealed.iv, &sealed.ciphertext)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidCiphertext);
}

#[test]
fn unknown_label_or_id_and_destroyed_keks_are_not_found() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let e = ks.find_kek_by_label("keyhaven-kek-nope").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyNotFound);
    assert!(e.to_string().contains("keyhaven-kek-nope"), "{e}");
    let ghost = KekId([9; 16]);
    let e = ks.find_kek_by_id(&ghost).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyNotFound);
    let e = ks.encrypt(&ghost, b"", b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyNotFound);
    assert!(e.to_string().contains(&ghost.to_string()));

    let kek = ks.generate_kek().unwrap();
    let sealed = ks.encrypt(&kek.id, b"", b"x").unwrap();
    assert_eq!(ks.find_kek_by_label(&kek.label).unwrap().id, kek.id);
    ks.destroy_kek(&kek.id).unwrap();
    for e in [
        ks.decrypt(&kek.id, b"", &sealed.iv, &sealed.ciphertext)
            .unwrap_err(),
        ks.find_kek_by_id(&kek.id).unwrap_err(),
        ks.find_kek_by_label(&kek.label).unwrap_err(),
        ks.destroy_kek(&kek.id).unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::KeyNotFound, "{e}");
    }
    assert!(ks.list_keks().unwrap().is_empty());
}

#[test]
fn keks_are_sensitive_unextractable_and_listed_in_creation_order() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    assert!(ks.list_keks().unwrap().is_empty());
    assert!(ks.newest_kek().unwrap().is_none());
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(ks.generate_kek().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    let listed = ks.list_keks().unwrap();
    assert_eq!(
        listed, made,
        "list is oldest first and matches what was made"
    );
    for k in &listed {
        assert!(k.label.starts_with("keyhaven-kek-"), "{}", k.label);
        assert!(k.sensitive, "KEK must be CKA_SENSITIVE");
        assert!(!k.extractable, "KEK must not be CKA_EXTRACTABLE");
        assert!(k.created.is_some());
    }
    let ids: HashSet<_> = listed.iter().map(|k| k.id).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ks.newest_kek().unwrap().unwrap().id, made[2].id);
    // By id and by label find the same key.
    assert_eq!(ks.find_kek_by_id(&made[1].id).unwrap(), made[1]);
    assert_eq!(ks.find_kek_by_label(&made[1].label).unwrap(), made[1]);
    // A keystore with another prefix does not see them.
    let mut cfg = hsm.config();
    cfg.kek_label_prefix = "other-".into();
    let other = BlockingKeystore::open(cfg).unwrap();
    assert!(other.list_keks().unwrap().is_empty());
}

#[test]
fn wrong_pin_fails_once_with_pin_error_and_is_never_retried() {
    let hsm = SoftHsm::new().unwrap();
    hsm.write_pin("0000-wrong").unwrap();
    let before = process_login_attempts();
    let e = BlockingKeystore::open(hsm.config()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PinIncorrect);
    assert!(!e.is_retryable());
    assert!(
        !e.to_string().contains("0000-wrong"),
        "error leaks the PIN: {e}"
    );
    assert_eq!(process_login_attempts() - before, 1, "exactly one C_Login");
}

#[test]
fn pin_from_environment_and_token_by_serial() {
    let hsm = SoftHsm::new().unwrap();
    std::env::set_var("KEYHAVEN_TEST_PIN", USER_PIN);
    let mut cfg = hsm.config();
    cfg.pin = PinSource::Env("KEYHAVEN_TEST_PIN".into());
    cfg.token = TokenSelector::Serial(hsm.serial.clone());
    let ks = BlockingKeystore::open(cfg).unwrap();
    assert_eq!(ks.random(32).unwrap().len(), 32);

    let mut cfg = hsm.config();
    cfg.token = TokenSelector::Label("no-such-token".into());
    let e = BlockingKeystore::open(cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    // The message says what; the cause under it names the token as configured.
    assert!(e.chain().contains("no-such-token"), "{}", e.chain());

    let mut cfg = hsm.config();
    cfg.pin = PinSource::File(hsm.dir().join("missing.pin"));
    assert_eq!(
        BlockingKeystore::open(cfg).unwrap_err().kind(),
        ErrorKind::Config
    );

    let mut cfg = hsm.config();
    cfg.module = hsm.dir().join("nope.so");
    assert_eq!(
        BlockingKeystore::open(cfg).unwrap_err().kind(),
        ErrorKind::Config
    );
}

#[test]
fn no_secret_in_debug_or_errors() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let kek = ks.generate_kek().unwrap();
    let sealed = ks.encrypt(&kek.id, b"", b"TOP-SECRET-PLAINTEXT").unwrap();
    let dbg = format!("{:?} {:?} {:?} {:?}", ks, hsm.config(), sealed, kek);
    assert!(!dbg.contains(USER_PIN), "{dbg}");
    assert!(!dbg.contains("TOP-SECRET"), "{dbg}");
    let e = ks
        .decrypt(&kek.id, b"x", &sealed.iv, &sealed.ciphertext)
        .unwrap_err();
    assert!(!format!("{e} {e:?}").contains(USER_PIN));
}

#[test]
fn sixteen_threads_two_thousand_mixed_operations_each() {
    let hsm = SoftHsm::new().unwrap();
    let mut cfg = hsm.config();
    cfg.pool_size = 8;
    let ks = Arc::new(BlockingKeystore::open(cfg).unwrap());
    let keks = [ks.generate_kek().unwrap().id, ks.generate_kek().unwrap().id];
    let threads: Vec<_> = (0..16u32)
        .map(|t| {
            let ks = ks.clone();
            std::thread::spawn(move || {
                let mut ok = 0u32;
                for i in 0..2000u32 {
                    let kek = &keks[((t + i) % 2) as usize];
                    match i % 4 {
                        0 | 1 => {
                            let pt = [t.to_le_bytes(), i.to_le_bytes()].concat();
                            let aad = format!("t{t}/i{i}");
                            let s = ks.encrypt(kek, aad.as_bytes(), &pt).unwrap();
                            let back = ks
                                .decrypt(kek, aad.as_bytes(), &s.iv, &s.ciphertext)
                                .unwrap();
                            assert_eq!(back.as_slice(), pt.as_slice());
                        }
                        2 => assert_eq!(ks.random(16).unwrap().len(), 16),
                        _ => assert_eq!(&ks.find_kek_by_id(kek).unwrap().id, kek),
                    }
                    ok += 1;
                }
                ok
            })
        })
        .collect();
    let total: u32 = threads.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, 32_000);
    let st = ks.stats();
    assert!(st.open_sessions <= 8, "pool grew past its size: {st:?}");
    assert_eq!(st.rebuilds, 0);
}

/// Every way a live keystore's sessions can die; the next call must succeed, no restart.
#[test]
fn module_finalized_under_a_live_keystore_recovers() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let kek = ks.generate_kek().unwrap();
    let sealed = ks.encrypt(&kek.id, b"a", b"before").unwrap();
    keyhaven_hsm::testing::finalize_module(&hsm.module).unwrap();
    let back = ks
        .decrypt(&kek.id, b"a", &sealed.iv, &sealed.ciphertext)
        .unwrap();
    assert_eq!(back.as_slice(), b"before");
    assert_eq!(ks.stats().rebuilds, 1);
    assert!(ks.stats().connected);
}

#[test]
fn module_reinitialized_under_a_live_keystore_recovers() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let kek = ks.generate_kek().unwrap();
    // Warm the pool so several sessions go stale at once.
    for _ in 0..4 {
        ks.random(8).unwrap();
    }
    keyhaven_hsm::testing::reinitialize_module(&hsm.module).unwrap();
    let sealed = ks.encrypt(&kek.id, b"a", b"after").unwrap();
    let back = ks
        .decrypt(&kek.id, b"a", &sealed.iv, &sealed.ciphertext)
        .unwrap();
    assert_eq!(back.as_slice(), b"after");
    assert!(ks.stats().rebuilds >= 1);
}

#[test]
fn token_logged_out_under_a_live_keystore_recovers() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let kek = ks.generate_kek().unwrap();
    let logins = ks.stats().login_attempts;
    keyhaven_hsm::testing::logout_token(&hsm.config()).unwrap();
    // The key is private: logged out, it is invisible. That must not read as "not found".
    let info = ks.find_kek_by_id(&kek.id).unwrap();
    assert_eq!(info.id, kek.id);
    assert_eq!(
        ks.stats().login_attempts,
        logins + 1,
        "logged in again once"
    );
    let sealed = ks.encrypt(&kek.id, b"", b"x").unwrap();
    assert_eq!(
        ks.decrypt(&kek.id, b"", &sealed.iv, &sealed.ciphertext)
            .unwrap()
            .as_slice(),
        b"x"
    );
}

#[test]
fn wrong_pin_during_recovery_is_not_retried_until_the_pin_changes() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let kek = ks.generate_kek().unwrap();
    hsm.write_pin("9999-wrong").unwrap();
    keyhaven_hsm::testing::finalize_module(&hsm.module).unwrap();
    let before = ks.stats().login_attempts;
    let mut kinds = Vec::new();
    for _ in 0..20 {
        kinds.push(ks.random(8).unwrap_err().kind());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        kinds.iter().all(|k| *k == ErrorKind::PinIncorrect),
        "{kinds:?}"
    );
    assert_eq!(
        ks.stats().login_attempts - before,
        1,
        "a refused PIN is offered to the token once, not in a loop"
    );
    // The operator fixes the PIN file: the keystore recovers without a restart.
    hsm.write_pin(USER_PIN).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match ks.encrypt(&kek.id, b"", b"x") {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), ErrorKind::PinIncorrect);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("did not recover after the PIN was fixed: {e}"),
        }
    }
    assert_eq!(ks.stats().login_attempts - before, 2);
}

#[test]
fn async_keystore_round_trip_and_self_test() {
    let hsm = SoftHsm::new().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ks = Keystore::open(hsm.config()).await.unwrap();
        let r = ks.self_test(None).await.unwrap();
        assert!(r.kek.is_none(), "no KEK yet: probe is random-only");
        let kek = ks.generate_kek().await.unwrap();
        let r = ks.self_test(None).await.unwrap();
        assert_eq!(r.kek, Some(kek.id));
        let tasks: Vec<_> = (0..64u32)
            .map(|i| {
                let ks = ks.clone();
                tokio::spawn(async move {
                    let pt = i.to_be_bytes();
                    let s = ks.encrypt(kek.id, b"async", &pt).await.unwrap();
                    let back = ks
                        .decrypt(kek.id, b"async", &s.iv, &s.ciphertext)
                        .await
                        .unwrap();
                    assert_eq!(back.as_slice(), &pt);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(ks.list_keks().await.unwrap().len(), 1);
        let e = ks.find_kek_by_label("missing").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::KeyNotFound);
    });
}

#[test]
fn token_removed_and_put_back_under_a_live_keystore_recovers() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    let kek = ks.generate_kek().unwrap();
    let sealed = ks.encrypt(&kek.id, b"", b"kept").unwrap();
    let away = hsm.remove_token().unwrap();
    // While the token is gone its keys are unavailable, not "not found": callers must not
    // conclude a KEK was destroyed.
    for _ in 0..3 {
        let e = ks
            .decrypt(&kek.id, b"", &sealed.iv, &sealed.ciphertext)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_eq!(ks.list_keks().unwrap_err().kind(), ErrorKind::Unavailable);
    }
    hsm.restore_token(away).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let back = loop {
        match ks.decrypt(&kek.id, b"", &sealed.iv, &sealed.ciphertext) {
            Ok(v) => break v,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("no recovery after the token came back: {e}"),
        }
    };
    assert_eq!(back.as_slice(), b"kept");
    assert!(ks.stats().rebuilds >= 1);
}

#[test]
fn a_new_kek_is_the_newest_even_when_this_clock_is_behind() {
    let hsm = SoftHsm::new().unwrap();
    let ks = open(&hsm);
    // A KEK made by a host whose clock is an hour ahead of ours.
    let ahead = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let label = format!(
        "keyhaven-kek-{}-beef",
        humantime::format_rfc3339_millis(ahead)
    );
    let first = ks.generate_kek_with_label(&label).unwrap();
    let second = ks.generate_kek().unwrap();
    assert_eq!(ks.newest_kek().unwrap().unwrap().id, second.id);
    assert!(second.created > first.created);
    // And labels without the prefix are refused.
    let e = ks.generate_kek_with_label("other-label").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}
