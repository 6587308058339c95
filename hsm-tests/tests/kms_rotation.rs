//! Finishing a rotation safely, with real parts: a real SoftHSM2 token, the real `kms-plugin`
//! process on its socket, a real etcd member, and the `keys usage | migrate | retire |
//! rotate --complete` commands as the operator runs them. The apiserver is the small server in
//! `hsm_tests::apiserver`, which stores objects in that etcd exactly as the kube-apiserver does
//! (a real apiserver is not available on these machines).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hsm_tests::apiserver::{FakeApiserver, Faults};
use hsm_tests::process::{
    free_port, http_get, kms_plugin_cli, kms_plugin_cmd, KmsPlugin, PluginOpts,
};
use keyhaven_hsm::BlockingKeystore;
use kms_plugin::storage::{classify, Stored};
use serde_json::{json, Value};
use testkit::etcd::EtcdMember;
use testkit::softhsm::SoftHsm;

struct Cluster {
    hsm: SoftHsm,
    plugin: KmsPlugin,
    etcd: EtcdMember,
    api: FakeApiserver,
}

fn cluster() -> Cluster {
    let hsm = SoftHsm::new().unwrap();
    let (ok, out) = keys(&hsm, &["init"]);
    assert!(ok, "{out}");
    let plugin = KmsPlugin::start(&hsm, PluginOpts::default());
    let etcd = EtcdMember::start().unwrap();
    let api = FakeApiserver::start(&etcd, &plugin.listen);
    Cluster {
        hsm,
        plugin,
        etcd,
        api,
    }
}

fn keys(hsm: &SoftHsm, args: &[&str]) -> (bool, String) {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    let out = kms_plugin_cli(hsm, &all);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `kms-plugin keys <args> <more>`.
fn keys_with<S: AsRef<str>>(hsm: &SoftHsm, args: &[&str], more: &[S]) -> (bool, String) {
    let mut all = args.to_vec();
    all.extend(more.iter().map(AsRef::as_ref));
    keys(hsm, &all)
}

/// etcd flags naming a loopback port where nothing listens, with a short timeout.
fn unreachable_etcd() -> Vec<String> {
    vec![
        "--etcd-endpoints".into(),
        format!("http://127.0.0.1:{}", free_port()),
        "--etcd-timeout".into(),
        "1s".into(),
    ]
}

impl Cluster {
    /// `kms-plugin keys <args>` with this cluster's etcd and kubeconfig where asked.
    fn keys(&self, args: &[&str], etcd: bool, kube: bool) -> (bool, String) {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if etcd {
            all.extend(self.etcd.args());
        }
        if kube {
            all.extend([
                "--kubeconfig".to_string(),
                self.api.kubeconfig.display().to_string(),
            ]);
        }
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        keys(&self.hsm, &refs)
    }

    fn key_ids(&self) -> Vec<String> {
        let mut cfg = self.hsm.config();
        cfg.kek_label_prefix = "keyhaven-kms-".into();
        let ks = BlockingKeystore::open(cfg).unwrap();
        ks.list_keks()
            .unwrap()
            .iter()
            .map(|k| kms_plugin::envelope::key_id(&k.id))
            .collect()
    }

    fn primary(&self) -> String {
        self.key_ids().pop().expect("a KEK")
    }

    /// `keys rotate`, then waits until the running plugin serves the new primary.
    fn rotate(&self) -> String {
        let (ok, out) = keys(&self.hsm, &["rotate"]);
        assert!(ok, "{out}");
        let new = self.primary();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = http_get(&self.plugin.metrics_addr, "/keys");
            let r: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if r["primary"] == json!(new) {
                return new;
            }
            assert!(Instant::now() < deadline, "plugin did not adopt {new}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// key_id → count of the values stored under `/registry/<dir>/`.
    fn stored(&self, dir: &str) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (_, v) in self.etcd.range(&format!("/registry/{dir}/")).unwrap() {
            let k = match classify(&v) {
                Stored::KmsV2 { key_id, .. } => key_id,
                other => other.format().to_string(),
            };
            *m.entry(k).or_default() += 1;
        }
        m
    }

    fn make_secrets(&self, ns: &str, n: usize) {
        for i in 0..n {
            self.api.create(
                "secrets",
                ns,
                &format!("s{i:03}"),
                json!({"value": format!("{ns}-{i}")}),
            );
        }
    }

    fn assert_secrets_intact(&self, ns: &str, n: usize) {
        for i in 0..n {
            let v = self
                .api
                .read("secrets", ns, &format!("s{i:03}"))
                .unwrap_or_else(|| panic!("{ns}/s{i:03} unreadable"));
            assert_eq!(
                v["data"]["value"],
                json!(format!("{ns}-{i}")),
                "{ns}/s{i:03}"
            );
        }
    }
}

fn usage_json(c: &Cluster) -> Value {
    let (ok, out) = c.keys(&["usage", "-o", "json"], true, false);
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn kms_count(u: &Value, resource: &str, key_id: &str) -> u64 {
    u["kms_v2"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resource"] == json!(resource) && r["key_id"] == json!(key_id))
        .map(|r| r["objects"].as_u64().unwrap())
        .sum()
}

fn other_count(u: &Value, field: &str, resource: &str, format: &str) -> u64 {
    u[field]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resource"] == json!(resource) && r["format"] == json!(format))
        .map(|r| r["objects"].as_u64().unwrap())
        .sum()
}

#[test]
fn usage_counts_every_object_by_key_resource_and_format() {
    let c = cluster();
    let k1 = c.primary();
    c.make_secrets("a", 7);
    let k2 = c.rotate();
    c.make_secrets("b", 5);
    for i in 0..3 {
        c.api
            .create("widgets", "a", &format!("w{i}"), json!({"size": i}));
    }
    // Other formats, and values that only look like KMS v2.
    c.etcd
        .put(
            "/registry/configmaps/a/c1",
            b"k8s\0\x0a\x02v1\x12\x09ConfigMap",
        )
        .unwrap();
    c.etcd
        .put(
            "/registry/configmaps/a/c2",
            b"k8s\0\x0a\x02v1\x12\x09ConfigMap",
        )
        .unwrap();
    c.etcd
        .put(
            "/registry/secrets/old/aescbc",
            b"k8s:enc:aescbc:v1:key1:\x01\x02",
        )
        .unwrap();
    c.etcd
        .put(
            "/registry/example.com/widgets/a/plain",
            br#"{"kind":"Widget"}"#,
        )
        .unwrap();
    c.etcd
        .put(
            "/registry/secrets/bad/truncated",
            b"k8s:enc:kms:v2:keyhaven:\x0a\x05ab",
        )
        .unwrap();
    c.etcd
        .put("/registry/secrets/bad/nokey", b"k8s:enc:kms:v2:keyhaven:")
        .unwrap();
    c.etcd
        .put(
            "/registry/secrets/bad/garbage",
            b"\xff\xfe\x00 not an object",
        )
        .unwrap();
    // An object under another provider's key.
    let foreign = kms_plugin::storage::encode_kms_v2(
        "other",
        &keyhaven_proto::kms::v2::EncryptedObject {
            encrypted_data: vec![1; 20],
            key_id: "arn:aws:kms:eu-west-1:1:key/x".into(),
            encrypted_dek_source: vec![2; 40],
            ..Default::default()
        },
    );
    c.etcd.put("/registry/secrets/x/foreign", &foreign).unwrap();

    let u = usage_json(&c);
    assert_eq!(kms_count(&u, "secrets", &k1), 7, "{u:#}");
    assert_eq!(kms_count(&u, "secrets", &k2), 5, "{u:#}");
    assert_eq!(kms_count(&u, "widgets.example.com", &k2), 3, "{u:#}");
    assert_eq!(kms_count(&u, "secrets", "arn:aws:kms:eu-west-1:1:key/x"), 1);
    assert_eq!(
        other_count(&u, "other_formats", "configmaps", "identity-protobuf"),
        2
    );
    assert_eq!(other_count(&u, "other_formats", "secrets", "aescbc"), 1);
    assert_eq!(
        other_count(&u, "other_formats", "widgets.example.com", "identity-json"),
        1
    );
    assert_eq!(other_count(&u, "other_formats", "secrets", "unknown"), 1);
    let unparseable: u64 = u["unparseable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["objects"].as_u64().unwrap())
        .sum();
    assert_eq!(unparseable, 2, "{u:#}");
    assert_eq!(u["keys_scanned"], json!(7 + 5 + 3 + 8));
    let roles: HashMap<String, (String, u64)> = u["token_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_string(),
                (
                    k["role"].as_str().unwrap().to_string(),
                    k["objects"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(roles[&k1], ("decrypt-only".to_string(), 7));
    assert_eq!(roles[&k2], ("primary".to_string(), 8));
    assert_eq!(
        u["foreign_key_ids"],
        json!(["arn:aws:kms:eu-west-1:1:key/x"])
    );

    // A third key no object uses is marked so in the table.
    let k3 = c.rotate();
    let (ok, table) = c.keys(&["usage"], true, false);
    assert!(ok, "{table}");
    let line = table.lines().find(|l| l.contains(&k3)).expect("k3 row");
    assert!(line.contains("primary"), "{table}");
    let line = table
        .lines()
        .find(|l| l.contains(&k1) && l.contains("still needed"))
        .expect("k1 row");
    assert!(line.contains('7'), "{table}");
    assert!(table.contains("not-on-token"), "{table}");

    // A small page size reads the same counts in many pages.
    let (ok, out) = c.keys(
        &["usage", "-o", "json", "--etcd-page-size", "2"],
        true,
        false,
    );
    assert!(ok, "{out}");
    let paged: Value = serde_json::from_str(&out).unwrap();
    let counts = |u: &Value| -> Vec<(Value, Value, Value)> {
        u["kms_v2"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["resource"].clone(),
                    r["key_id"].clone(),
                    r["objects"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(counts(&paged), counts(&u));
}

#[test]
fn retire_refuses_while_anything_needs_the_key_and_destroys_at_zero() {
    let c = cluster();
    let k1 = c.primary();
    c.make_secrets("a", 6);
    let k2 = c.rotate();

    // Objects under k1: refused, even with --yes, and the KEK stays.
    let (ok, out) = c.keys(&["retire", &k1, "--yes"], true, false);
    assert!(!ok, "{out}");
    assert!(
        out.contains("6 objects") && out.contains("6 secrets"),
        "{out}"
    );
    assert!(
        out.contains("kms-plugin keys migrate --resource secrets"),
        "{out}"
    );
    assert!(c.key_ids().contains(&k1));

    // Without etcd access: refused unless --skip-usage-check.
    let (ok, out) = c.keys(&["retire", &k1, "--yes"], false, false);
    assert!(!ok && out.contains("no etcd access configured"), "{out}");
    assert!(out.contains("--skip-usage-check"), "{out}");
    assert!(c.key_ids().contains(&k1));

    // etcd unreachable: refused with the reason.
    let (ok, out) = keys_with(&c.hsm, &["retire", &k1, "--yes"], &unreachable_etcd());
    assert!(!ok && out.contains("cannot read etcd"), "{out}");
    assert!(c.key_ids().contains(&k1));

    // The primary is never retired.
    let (ok, out) = c.keys(&["retire", &k2, "--yes"], true, false);
    assert!(!ok && out.contains("primary"), "{out}");

    // Migrate, then the plugin has decrypted under k1 just now (the migration read the old
    // objects): refused within --recent.
    let (ok, out) = c.keys(&["migrate"], true, true);
    assert!(ok, "{out}");
    assert_eq!(
        c.stored("secrets").get(&k1),
        None,
        "{:?}",
        c.stored("secrets")
    );
    let plugin_addr = c.plugin.metrics_addr.clone();
    let (ok, out) = c.keys(
        &["retire", &k1, "--yes", "--plugin-addr", &plugin_addr],
        true,
        false,
    );
    assert!(!ok && out.contains("decrypted under"), "{out}");
    assert!(c.key_ids().contains(&k1));
    // A plugin that cannot be asked: refused.
    let gone = format!("127.0.0.1:{}", free_port());
    let (ok, out) = c.keys(
        &["retire", &k1, "--yes", "--plugin-addr", &gone],
        true,
        false,
    );
    assert!(!ok && out.contains("cannot ask the plugin"), "{out}");
    assert!(c.key_ids().contains(&k1));

    // Checks pass but no --yes: nothing destroyed, and it says so.
    let (ok, out) = c.keys(
        &[
            "retire",
            &k1,
            "--plugin-addr",
            &plugin_addr,
            "--recent",
            "0s",
        ],
        true,
        false,
    );
    assert!(!ok && out.contains("Re-run with --yes"), "{out}");
    assert!(out.contains("0 of"), "{out}");
    assert!(c.key_ids().contains(&k1));
    // At zero usage, outside the window: destroyed.
    let (ok, out) = c.keys(
        &[
            "retire",
            &k1,
            "--yes",
            "--plugin-addr",
            &plugin_addr,
            "--recent",
            "0s",
        ],
        true,
        false,
    );
    assert!(ok, "{out}");
    assert!(out.contains("etcd backups"), "{out}");
    assert!(!c.key_ids().contains(&k1));
    c.assert_secrets_intact("a", 6);

    // --skip-usage-check destroys without reading etcd (here a key nothing uses).
    let k3 = c.rotate();
    assert_ne!(k3, k2);
    let (ok, out) = c.keys(
        &["retire", &k2, "--yes", "--skip-usage-check"],
        false,
        false,
    );
    assert!(ok, "{out}");
    assert!(out.contains("WARNING"), "{out}");
    assert!(!c.key_ids().contains(&k2));
}

#[test]
fn retire_refuses_while_kms_values_do_not_decode() {
    let c = cluster();
    let k1 = c.primary();
    c.rotate();
    c.etcd
        .put(
            "/registry/secrets/bad/truncated",
            b"k8s:enc:kms:v2:keyhaven:\x0a\x05ab",
        )
        .unwrap();
    let (ok, out) = c.keys(&["retire", &k1, "--yes"], true, false);
    assert!(!ok && out.contains("do not decode"), "{out}");
    assert!(c.key_ids().contains(&k1));
}

#[test]
fn migrate_rewrites_every_object_through_the_apiserver_despite_faults() {
    let c = cluster();
    let k1 = c.primary();
    c.make_secrets("a", 25);
    c.make_secrets("b", 15);
    for i in 0..4 {
        c.api
            .create("widgets", "a", &format!("w{i}"), json!({"size": i}));
    }
    let k2 = c.rotate();
    c.api.set_faults(Faults {
        conflict_once: ["a/s003".to_string(), "b/s010".to_string()].into(),
        vanish: ["a/s007".to_string()].into(),
        fail: ["b/s001".to_string()].into(),
        ..Faults::default()
    });
    // Small pages: the list is paginated (limit/continue).
    let (ok, out) = c.keys(
        &[
            "migrate",
            "--page-size",
            "7",
            "--resource",
            "secrets",
            "--resource",
            "widgets.example.com",
        ],
        false,
        true,
    );
    assert!(!ok, "a failed object must fail the run: {out}");
    assert!(out.contains("failed b/s001"), "{out}");
    // 40 secrets and the canary (kube-system/keyhaven-kms-canary) the pre-check wrote.
    assert!(out.contains("secrets: 41 listed, 39 re-written"), "{out}");
    assert!(out.contains("1 gone meanwhile, 1 failed"), "{out}");
    assert!(
        out.contains("widgets.example.com: 4 listed, 4 re-written"),
        "{out}"
    );
    let stored = c.stored("secrets");
    assert_eq!(stored.get(&k2), Some(&39), "{stored:?}");
    assert_eq!(
        stored.get(&k1),
        Some(&1),
        "only the failing object stays: {stored:?}"
    );
    assert_eq!(c.stored("example.com/widgets").get(&k2), Some(&4));
    assert!(c.api.read("secrets", "a", "s007").is_none());
    // The conflicting writes were kept, and re-written under the new key.
    assert_eq!(
        c.api.read("secrets", "a", "s003").unwrap()["metadata"]["labels"]["touched"],
        json!("by-someone-else")
    );

    // Fixed: a second run with etcd access redoes only what still needs it.
    c.api.set_faults(Faults::default());
    let (ok, out) = c.keys(&["migrate"], true, true);
    assert!(ok, "{out}");
    assert!(
        out.contains("1 re-written, 39 already under the primary"),
        "{out}"
    );
    assert_eq!(c.stored("secrets").get(&k2), Some(&40));
    assert_eq!(c.stored("secrets").get(&k1), None);
    for (ns, n) in [("a", 25), ("b", 15)] {
        for i in 0..n {
            if (ns, i) == ("a", 7) {
                continue;
            }
            let v = c.api.read("secrets", ns, &format!("s{i:03}")).unwrap();
            assert_eq!(v["data"]["value"], json!(format!("{ns}-{i}")));
        }
    }
}

#[test]
fn migrate_refuses_until_the_apiserver_writes_under_the_primary() {
    let c = cluster();
    let k1 = c.primary();
    c.make_secrets("a", 5);
    // The apiserver has not polled Status since the rotation.
    c.api.freeze_key(true);
    let k2 = c.rotate();
    let before = c.etcd.range("/registry/secrets/a/").unwrap();
    let (ok, out) = c.keys(&["migrate"], true, true);
    assert!(!ok, "{out}");
    assert!(
        out.contains("does not write under the current primary"),
        "{out}"
    );
    assert!(
        out.contains(&format!("canary stored under key_id {k1}")),
        "{out}"
    );
    assert_eq!(
        c.etcd.range("/registry/secrets/a/").unwrap(),
        before,
        "nothing re-written"
    );
    // The same refusal from the apiserver's metrics when etcd is not given.
    let (ok, out) = c.keys(&["migrate"], false, true);
    assert!(!ok && out.contains("metrics show no write"), "{out}");
    assert_eq!(c.etcd.range("/registry/secrets/a/").unwrap(), before);

    c.api.freeze_key(false);
    let (ok, out) = c.keys(&["migrate"], false, true);
    assert!(ok, "{out}");
    assert!(out.contains("metrics show a write under the key"), "{out}");
    // The five and the canary.
    assert_eq!(c.stored("secrets").get(&k2), Some(&6));
    c.assert_secrets_intact("a", 5);
}

#[test]
fn migrate_and_usage_fail_clearly_on_bad_endpoints_and_resources() {
    let c = cluster();
    c.make_secrets("a", 3);
    c.rotate();
    let before = c.etcd.range("/registry/").unwrap();
    for (resource, want) in [
        ("nosuch", "resource nosuch does not exist"),
        ("widgets.nosuch.io", "serves no API group"),
        (
            "gadgets.example.com",
            "resource gadgets.example.com does not exist",
        ),
    ] {
        let (ok, out) = c.keys(
            &["migrate", "--resource", "secrets", "--resource", resource],
            true,
            true,
        );
        assert!(!ok && out.contains(want), "{resource}: {out}");
    }
    assert_eq!(
        c.etcd.range("/registry/").unwrap(),
        before,
        "nothing written before the resources resolved"
    );

    // The apiserver answers errors to the list.
    c.api.set_faults(Faults {
        fail_list: true,
        ..Faults::default()
    });
    let (ok, out) = c.keys(&["migrate"], true, true);
    assert!(!ok && out.contains("listing secrets"), "{out}");
    c.api.set_faults(Faults::default());

    // No apiserver at all.
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        std::fs::read_to_string(&c.api.kubeconfig).unwrap().replace(
            &c.api.addr.to_string(),
            &format!("127.0.0.1:{}", free_port()),
        ),
    )
    .unwrap();
    let (ok, out) = keys(&c.hsm, &["migrate", "--kubeconfig", kc.to_str().unwrap()]);
    assert!(!ok && out.contains("discovering API group"), "{out}");

    // etcd unreachable.
    let (ok, out) = keys_with(&c.hsm, &["usage"], &unreachable_etcd());
    assert!(!ok && out.contains("etcd at http://127.0.0.1"), "{out}");
    // https without a CA.
    let (ok, out) = keys(
        &c.hsm,
        &["usage", "--etcd-endpoints", "https://127.0.0.1:1"],
    );
    assert!(!ok && out.contains("--etcd-cacert"), "{out}");
}

#[test]
fn usage_over_tls_with_client_certificates_and_refusal_with_wrong_ones() {
    let hsm = SoftHsm::new().unwrap();
    let (ok, out) = keys(&hsm, &["init"]);
    assert!(ok, "{out}");
    let etcd = EtcdMember::start_tls().unwrap();
    let mut args: Vec<String> = vec!["usage".into(), "-o".into(), "json".into()];
    args.extend(etcd.args());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = keys(&hsm, &refs);
    assert!(ok, "{out}");
    let u: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(u["keys_scanned"], json!(0));

    // Certificates from another CA: a clear error, and retire refuses.
    let other = tempfile::tempdir().unwrap();
    let wrong = testkit::pki::DevPki::write(other.path()).unwrap();
    let k = {
        let (_, out) = keys(&hsm, &["list", "--json"]);
        let v: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        v[0]["key_id"].as_str().unwrap().to_string()
    };
    let (ok, _) = keys(&hsm, &["rotate"]);
    assert!(ok);
    for (ca, cert, key) in [
        (
            &wrong.ca,
            &etcd.pki.as_ref().unwrap().client_cert,
            &etcd.pki.as_ref().unwrap().client_key,
        ),
        (
            &etcd.pki.as_ref().unwrap().ca,
            &wrong.client_cert,
            &wrong.client_key,
        ),
    ] {
        let base = [
            "--etcd-endpoints",
            &etcd.endpoint,
            "--etcd-cacert",
            ca.to_str().unwrap(),
            "--etcd-cert",
            cert.to_str().unwrap(),
            "--etcd-key",
            key.to_str().unwrap(),
            "--etcd-timeout",
            "2s",
        ];
        let (ok, out) = keys_with(&hsm, &["usage"], &base);
        assert!(!ok && out.contains("etcd at https://127.0.0.1"), "{out}");
        let (ok, out) = keys_with(&hsm, &["retire", k.as_str(), "--yes"], &base);
        assert!(!ok && out.contains("cannot read etcd"), "{out}");
    }
    let (_, out) = keys(&hsm, &["list", "--json"]);
    assert!(out.contains(&k), "the KEK is still on the token: {out}");
}

fn spawn_rotate_complete(c: &Cluster, extra: &[&str]) -> Child {
    let mut cmd = kms_plugin_cmd(&c.hsm);
    cmd.args([
        "keys",
        "rotate",
        "--complete",
        "--retire-old",
        "--recent",
        "0s",
    ])
    .args(c.etcd.args())
    .args(["--kubeconfig", c.api.kubeconfig.to_str().unwrap()])
    .args(["--plugin-addr", &c.plugin.metrics_addr])
    .args(["--canary-interval", "200ms", "--apiserver-wait", "30s"])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

#[test]
fn rotate_complete_killed_mid_migration_continues_and_retires_only_at_zero() {
    let c = cluster();
    let k1 = c.primary();
    c.make_secrets("a", 100);
    // Slow updates, so the kill lands mid-migration.
    c.api.set_faults(Faults {
        update_delay: Duration::from_millis(60),
        ..Faults::default()
    });
    let mut child = spawn_rotate_complete(&c, &["--concurrency", "2"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let k2 = loop {
        let ids = c.key_ids();
        if ids.len() == 2 {
            let k2 = ids[1].clone();
            if c.stored("secrets").get(&k2).copied().unwrap_or(0) >= 10 {
                break k2;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        assert!(
            Instant::now() < deadline,
            "no progress: {:?}",
            c.stored("secrets")
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mid = c.stored("secrets");
    assert!(
        mid.get(&k1).copied().unwrap_or(0) > 0,
        "killed too late: {mid:?}"
    );
    assert!(c.key_ids().contains(&k1), "nothing retired mid-way");
    c.assert_secrets_intact("a", 100);

    // The re-run continues the same rotation: no third key, everything moved, k1 retired.
    c.api.set_faults(Faults::default());
    let out = spawn_rotate_complete(&c, &[]).wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("continuing the rotation to {k2}")),
        "{text}"
    );
    assert!(
        text.contains("timeline:") && text.contains("migrate"),
        "{text}"
    );
    assert_eq!(c.key_ids(), vec![k2.clone()], "{text}");
    let stored = c.stored("secrets");
    // 100 secrets plus the canary in kube-system.
    assert_eq!(stored.get(&k2), Some(&101), "{stored:?}");
    assert_eq!(stored.len(), 1, "{stored:?}");
    c.api.forget_seeds();
    c.assert_secrets_intact("a", 100);

    // Run again: a fresh rotation (a new key), completed, the old one retired.
    let out = spawn_rotate_complete(&c, &[]).wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let ids = c.key_ids();
    assert_eq!(ids.len(), 1, "{text}");
    assert_ne!(ids[0], k2);
    assert!(text.contains("created KEK"), "{text}");
    c.api.forget_seeds();
    c.assert_secrets_intact("a", 100);
}

#[test]
fn rotate_complete_leaves_keys_that_are_still_needed() {
    let c = cluster();
    let k1 = c.primary();
    c.make_secrets("a", 8);
    // One object cannot be re-written: the run fails and retires nothing.
    c.api.set_faults(Faults {
        fail: ["a/s002".to_string()].into(),
        ..Faults::default()
    });
    let out = spawn_rotate_complete(&c, &[]).wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("failed a/s002"), "{text}");
    assert!(c.key_ids().contains(&k1), "{text}");
    assert_eq!(c.key_ids().len(), 2);
    c.assert_secrets_intact("a", 8);
}
