//! `broker-agent` end to end: a real broker process (TLS, SoftHSM2 KEK, SQLite), real agent
//! processes with dev tokens in files, files on disk, signals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hsm_tests::broker::{authed, broker_token, BrokerProc, BOOTSTRAP};
use hsm_tests::process::{bin_path, free_port, http_get, runtime};
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit::pki::DevPki;
use testkit::softhsm::SoftHsm;

/// Leases of 6 s renewable for an hour: the agent renews about every 4 s (2 s of slack on a
/// loaded machine).
const POLICY: &str = r#"
policies:
- name: shop-web
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 6s
  max_ttl: 1h
"#;

const DB_PASSWORD: &str = "db-pass-7f3a9c";
const API_TOKEN: &str = "api-token-51be02";

/// A broker with the policy and three secrets, and what a test needs around it.
struct World {
    hsm: SoftHsm,
    pki: DevPki,
    broker: BrokerProc,
    rt: tokio::runtime::Runtime,
    dev: DevIssuer,
}

impl World {
    fn new() -> World {
        let (hsm, pki) = broker_token();
        let broker = BrokerProc::start(&hsm, &pki, &["--reap-interval", "1s"]);
        let rt = runtime();
        let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
        let w = World {
            hsm,
            pki,
            broker,
            rt,
            dev,
        };
        w.apply(POLICY);
        w.put("shop/db", &[("user", "shop"), ("password", DB_PASSWORD)]);
        w.put("shop/api", &[("token", API_TOKEN)]);
        w.put(
            "shop/env",
            &[("db-url", "postgres://db/shop"), ("quote", "a\"b")],
        );
        w
    }

    fn apply(&self, yaml: &str) {
        let yaml = yaml.to_string();
        self.admin(|mut a| async move {
            a.apply_policies(authed(
                ApplyPoliciesRequest {
                    yaml,
                    ..Default::default()
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
        });
    }

    fn admin<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        self.rt.block_on(async {
            let ch = self.broker.channel(&self.pki.ca).await;
            f(AdminClient::new(ch)).await
        })
    }

    fn put(&self, path: &str, kv: &[(&str, &str)]) -> u64 {
        let data = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        let path = path.to_string();
        self.admin(|mut a| async move {
            a.put_secret(authed(PutSecretRequest { path, data }, BOOTSTRAP))
                .await
                .unwrap()
                .into_inner()
                .version
        })
    }

    fn leases(&self, pod: &str, include_ended: bool) -> Vec<LeaseInfo> {
        let pod = pod.to_string();
        self.admin(|mut a| async move {
            a.list_leases(authed(
                ListLeasesRequest {
                    selector: Some(LeaseSelector {
                        namespace: "shop".into(),
                        pod,
                        ..Default::default()
                    }),
                    include_ended,
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap()
            .into_inner()
            .leases
        })
    }

    fn revoke(&self, lease_id: &str) {
        let lease_id = lease_id.to_string();
        self.admin(|mut a| async move {
            a.revoke_leases(authed(
                RevokeLeasesRequest {
                    selector: Some(LeaseSelector {
                        lease_id,
                        ..Default::default()
                    }),
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap()
        });
    }

    /// A token file for `shop/web` in pod `pod`.
    fn token_file(&self, pod: &str) -> PathBuf {
        let t = self
            .dev
            .mint("shop", "web", Some(pod), Duration::from_secs(600))
            .unwrap();
        let p = self.hsm.dir().join(format!("token-{pod}"));
        std::fs::write(&p, t).unwrap();
        p
    }

    /// Agent flags to reach this broker as `pod`, writing into `out`.
    fn agent_args(&self, pod: &str, out: &Path) -> Vec<String> {
        vec![
            "--broker-addr".into(),
            self.broker.addr.clone(),
            "--ca-file".into(),
            self.pki.ca.display().to_string(),
            "--token-file".into(),
            self.token_file(pod).display().to_string(),
            "--output-dir".into(),
            out.display().to_string(),
            "--backoff-max".into(),
            "1s".into(),
            "--timeout".into(),
            "3s".into(),
        ]
    }
}

impl World {
    /// Two agents leasing `secret` (`PATH=FILE`): one with the defaults (pod `pod-a`, into
    /// `out-a`), one with `flag` added (pod `pod-b`, into `out-b`). Returns once both have
    /// written `file`.
    fn two_agents(
        &self,
        secret: &str,
        file: &str,
        flag: [&str; 2],
    ) -> (Agent, PathBuf, Agent, PathBuf) {
        let dir = self.hsm.dir();
        let (out_a, out_b) = (dir.join("out-a"), dir.join("out-b"));
        let mut a_args = self.agent_args("pod-a", &out_a);
        a_args.extend(["--secret".into(), secret.into()]);
        let mut b_args = self.agent_args("pod-b", &out_b);
        b_args.extend([
            "--secret".into(),
            secret.into(),
            flag[0].into(),
            flag[1].into(),
        ]);
        let a = Agent::start(&a_args, dir.join("a.log"));
        let b = Agent::start(&b_args, dir.join("b.log"));
        let logs = || format!("{}\n--- b ---\n{}", a.log_text(), b.log_text());
        wait_for("both files", Duration::from_secs(30), &logs, || {
            out_a.join(file).exists() && out_b.join(file).exists()
        });
        (a, out_a, b, out_b)
    }
}

struct Agent {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl Agent {
    fn start(args: &[String], log: PathBuf) -> Agent {
        let mport = free_port();
        let metrics = format!("127.0.0.1:{mport}");
        let child = Command::new(bin_path("broker-agent"))
            .env("KEYHAVEN_LOG", "debug")
            .args(args)
            .args(["--metrics-addr", &metrics])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Agent {
            child,
            log,
            metrics,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Value of a counter/gauge sample on `/metrics` (0 when absent).
    fn metric(&self, sample: &str) -> f64 {
        hsm_tests::process::metric(&self.metrics, sample)
    }

    fn readyz(&self) -> u16 {
        http_get(&self.metrics, "/readyz").0
    }

    /// SIGTERM and the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "agent did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 100 ms until it holds; fails with `what` and `log` after `limit` (a
/// generous bound, not a performance claim).
fn wait_for(what: &str, limit: Duration, log: &dyn Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n--- log ---\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

const CONFIG: &str = r#"
secrets:
  - path: shop/db
    file: db.json
  - path: shop/api
    file: api-token
    mode: "0440"
  - path: shop/env
    file: app.env
    format: dotenv
"#;

#[test]
fn agent_writes_renews_follows_updates_and_revokes_on_sigterm() {
    let w = World::new();
    let dir = w.hsm.dir().to_path_buf();
    let out = dir.join("out");
    let cfg = dir.join("agent.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let ready = dir.join("ready");
    let mut args = w.agent_args("web-0", &out);
    args.extend([
        "--config".into(),
        cfg.display().to_string(),
        "--ready-file".into(),
        ready.display().to_string(),
    ]);
    let agent = Agent::start(&args, dir.join("agent.log"));
    let log = || agent.log_text();
    wait_for("the ready file", Duration::from_secs(30), &log, || {
        ready.exists()
    });
    assert_eq!(agent.readyz(), 200);

    // Content and modes.
    let db: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("db.json")).unwrap()).unwrap();
    assert_eq!(db["password"], DB_PASSWORD);
    assert_eq!(db["user"], "shop");
    assert_eq!(mode(&out.join("db.json")), 0o400);
    assert_eq!(
        std::fs::read(out.join("api-token")).unwrap(),
        API_TOKEN.as_bytes()
    );
    assert_eq!(mode(&out.join("api-token")), 0o440);
    assert_eq!(
        std::fs::read_to_string(out.join("app.env")).unwrap(),
        "DB_URL=\"postgres://db/shop\"\nQUOTE=\"a\\\"b\"\n"
    );
    let held = w.leases("web-0", false);
    assert_eq!(held.len(), 3, "{held:?}");

    // Renewals happen (TTL 6 s) and keep the same leases.
    wait_for("two renewals", Duration::from_secs(30), &log, || {
        agent.metric("keyhaven_agent_renewals_total{outcome=\"ok\"}") >= 2.0
    });
    let after = w.leases("web-0", false);
    let ids = |v: &[LeaseInfo]| {
        let mut x: Vec<String> = v.iter().map(|l| l.lease_id.clone()).collect();
        x.sort();
        x
    };
    assert_eq!(ids(&after), ids(&held), "renewal must not churn leases");
    assert!(after.iter().any(|l| l.renewals >= 1));
    assert!(agent.metric("keyhaven_agent_leases_held ") >= 3.0);

    // A new version, put with brokerctl, reaches the file within a renewal period or two.
    let newpass = dir.join("newpass");
    std::fs::write(&newpass, "rotated-pass-2").unwrap();
    let put = w.broker.ctl_admin(
        &w.hsm,
        &w.pki.ca,
        &[
            "secrets",
            "put",
            "shop/db",
            "--from-literal",
            "user=shop",
            "--from-file",
            &format!("password={}", newpass.display()),
        ],
    );
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    assert!(String::from_utf8_lossy(&put.stdout).contains("version 2"));
    wait_for("the updated file", Duration::from_secs(30), &log, || {
        std::fs::read_to_string(out.join("db.json"))
            .map(|s| s.contains("rotated-pass-2"))
            .unwrap_or(false)
    });
    assert_eq!(mode(&out.join("db.json")), 0o400);
    // The old lease of shop/db was let go, the new one holds version 2.
    let now = w.leases("web-0", false);
    let db_leases: Vec<_> = now.iter().filter(|l| l.path == "shop/db").collect();
    assert_eq!(db_leases.len(), 1, "{now:?}");
    assert_eq!(db_leases[0].version, 2);

    // SIGTERM: exits 0 and revokes every lease it held — as `brokerctl leases list` and
    // `brokerctl audit tail` show.
    let log_path = agent.log.clone();
    let status = agent.terminate();
    assert!(status.success(), "{status:?}");
    let ctl = |args: &[&str]| {
        let out = w.broker.ctl_admin(&w.hsm, &w.pki.ca, args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let active = ctl(&[
        "--output",
        "json",
        "leases",
        "list",
        "--namespace",
        "shop",
        "--pod",
        "web-0",
    ]);
    let active: serde_json::Value = serde_json::from_str(&active).unwrap();
    assert_eq!(active.as_array().map(Vec::len), Some(0), "{active}");
    let all = ctl(&[
        "--output",
        "json",
        "leases",
        "list",
        "--namespace",
        "shop",
        "--pod",
        "web-0",
        "--all",
    ]);
    let all: serde_json::Value = serde_json::from_str(&all).unwrap();
    let revoked = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l.to_string().contains("revoked"))
        .count();
    assert_eq!(
        revoked, 4,
        "3 revoked on exit + the replaced shop/db lease: {all}"
    );
    let tail = ctl(&["--output", "json", "audit", "tail", "--limit", "200"]);
    let by_agent = tail
        .lines()
        .filter(|l| l.contains("\"revoke\"") && l.contains("web-0"))
        .count();
    assert!(
        by_agent >= 4,
        "revocations by the agent missing from the audit:\n{tail}"
    );
    // Nothing secret in the agent's log (debug level), including the token.
    let text = std::fs::read_to_string(log_path).unwrap();
    let token = std::fs::read_to_string(dir.join("token-web-0")).unwrap();
    for s in [DB_PASSWORD, API_TOKEN, "rotated-pass-2", token.trim()] {
        assert!(!text.contains(s), "a secret is in the agent log");
    }
    assert!(text.contains("wrote secret file"));
}

#[test]
fn operator_revocation_leases_again_or_deletes_per_config() {
    let w = World::new();
    let (a, out_a, b, out_b) = w.two_agents("shop/api=token", "token", ["--on-revoked", "delete"]);
    let logs = || format!("{}\n--- b ---\n{}", a.log_text(), b.log_text());
    let la = w.leases("pod-a", false);
    let lb = w.leases("pod-b", false);
    assert_eq!((la.len(), lb.len()), (1, 1));

    w.revoke(&la[0].lease_id);
    w.revoke(&lb[0].lease_id);

    // Agent A notices at its next renewal and leases again; its file stays.
    wait_for(
        "a new lease for pod-a",
        Duration::from_secs(30),
        &logs,
        || {
            let now = w.leases("pod-a", false);
            now.len() == 1 && now[0].lease_id != la[0].lease_id
        },
    );
    assert_eq!(
        std::fs::read(out_a.join("token")).unwrap(),
        API_TOKEN.as_bytes()
    );
    assert_eq!(a.readyz(), 200);
    // Agent B removes its file and says it is not ready.
    wait_for(
        "pod-b's file removed",
        Duration::from_secs(30),
        &logs,
        || !out_b.join("token").exists(),
    );
    assert_eq!(b.readyz(), 503);
    assert!(w.leases("pod-b", false).is_empty());
    assert!(b.metric("keyhaven_agent_renewals_total{outcome=\"refused\"}") >= 1.0);
}

/// The policy without `shop/web`'s grant.
const NO_GRANT: &str = r#"
policies:
- name: shop-batch
  subjects: [{namespace: shop, serviceaccount: batch}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 6s
  max_ttl: 1h
"#;

#[test]
fn a_revoked_lease_nothing_replaces_applies_on_expiry_until_the_grant_returns() {
    let w = World::new();
    // A keeps its file when the lease ends (the default), B deletes it.
    let (a, out_a, b, out_b) = w.two_agents("shop/api=token", "token", ["--on-expiry", "delete"]);
    let logs = || format!("{}\n--- b ---\n{}", a.log_text(), b.log_text());
    wait_for("both ready", Duration::from_secs(30), &logs, || {
        a.readyz() == 200 && b.readyz() == 200
    });

    // The grant is removed: the apply ends both leases; at its next renewal each agent is
    // refused, leases again and is refused again.
    w.apply(NO_GRANT);
    wait_for(
        "pod-b's file removed",
        Duration::from_secs(30),
        &logs,
        || !out_b.join("token").exists(),
    );
    wait_for("pod-a not ready", Duration::from_secs(30), &logs, || {
        a.readyz() == 503
    });
    let (status, why) = http_get(&a.metrics, "/readyz");
    assert_eq!(status, 503);
    assert!(why.contains("token: lease ended (revoked"), "{why}");
    assert_eq!(b.readyz(), 503);
    assert_eq!(
        std::fs::read(out_a.join("token")).unwrap(),
        API_TOKEN.as_bytes(),
        "--on-expiry keep keeps the last file"
    );
    for agent in [&a, &b] {
        assert_eq!(
            agent.metric("keyhaven_agent_lease_ends_total{reason=\"revoked\"}"),
            1.0
        );
        assert_eq!(agent.metric("keyhaven_agent_ready "), 0.0);
    }

    // The grant returns: both lease again (still backing off) and are ready.
    w.apply(POLICY);
    wait_for("both ready again", Duration::from_secs(30), &logs, || {
        a.readyz() == 200 && b.readyz() == 200
    });
    assert_eq!(
        std::fs::read(out_b.join("token")).unwrap(),
        API_TOKEN.as_bytes()
    );
    assert_eq!(w.leases("pod-a", false).len(), 1);
    assert_eq!(w.leases("pod-b", false).len(), 1);
}

#[test]
fn broker_down_keeps_files_and_the_agent_recovers_after_restart() {
    let mut w = World::new();
    let (k, keep, d, del) = w.two_agents("shop/db=db.json", "db.json", ["--on-expiry", "delete"]);
    let logs = || format!("{}\n--- d ---\n{}", k.log_text(), d.log_text());
    let before = std::fs::read(keep.join("db.json")).unwrap();

    w.broker.kill();
    // The 6 s leases end while the broker is away: --on-expiry delete removes its file...
    wait_for(
        "the delete agent's file removed",
        Duration::from_secs(30),
        &logs,
        || !del.join("db.json").exists(),
    );
    // ...and the default (keep) still has the last good file, intact.
    assert_eq!(std::fs::read(keep.join("db.json")).unwrap(), before);
    assert!(k.metric("keyhaven_agent_failures_total{reason=\"renew_unavailable\"}") >= 1.0);

    w.broker.restart();
    wait_for(
        "both agents leasing again",
        Duration::from_secs(60),
        &logs,
        || w.leases("pod-a", false).len() == 1 && w.leases("pod-b", false).len() == 1,
    );
    wait_for(
        "the delete agent's file back",
        Duration::from_secs(30),
        &logs,
        || del.join("db.json").exists(),
    );
    assert_eq!(std::fs::read(keep.join("db.json")).unwrap(), before);
    assert_eq!(k.readyz(), 200);
    assert_eq!(d.readyz(), 200);
}

#[test]
fn once_mode_for_init_containers() {
    let w = World::new();
    let dir = w.hsm.dir().to_path_buf();
    let run = |extra: &[&str], out: &Path| {
        let mut args = w.agent_args("init-0", out);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--once".into());
        Command::new(bin_path("broker-agent"))
            .args(&args)
            .output()
            .unwrap()
    };

    let out = dir.join("once");
    let ok = run(
        &["--secret", "shop/api=api", "--secret", "shop/db=db.json"],
        &out,
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        std::fs::read(out.join("api")).unwrap(),
        API_TOKEN.as_bytes()
    );
    assert!(out.join("db.json").exists());

    // A path outside the policy: non-zero, and the message names it.
    let out = dir.join("denied");
    let denied = run(
        &["--secret", "shop/api=api", "--secret", "bank/vault=v"],
        &out,
    );
    assert_eq!(denied.status.code(), Some(1));
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        err.contains("bank/vault") && err.contains("PermissionDenied"),
        "{err}"
    );
    assert!(!out.join("v").exists());

    // Raw format with several keys and no `key:`: a clear configuration message.
    let out = dir.join("ambiguous");
    let amb = run(&["--secret", "shop/db=db"], &out);
    assert_eq!(amb.status.code(), Some(1));
    let err = String::from_utf8_lossy(&amb.stderr);
    assert!(err.contains("needs `key:`"), "{err}");
    assert!(!err.contains(DB_PASSWORD));

    // Broker unreachable: gives up after a few attempts with a clear message.
    let mut args = w.agent_args("init-0", &dir.join("unreachable"));
    let port = free_port();
    args[1] = format!("https://localhost:{port}");
    args.extend(["--secret".into(), "shop/api=api".into(), "--once".into()]);
    let down = Command::new(bin_path("broker-agent"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(err.contains("after 5 attempts"), "{err}");

    // Configuration errors exit 2 before any call.
    let bad = Command::new(bin_path("broker-agent"))
        .args([
            "--broker-addr",
            "http://broker.example:1",
            "--secret",
            "a=b",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("loopback"));
    let none = Command::new(bin_path("broker-agent"))
        .args(["--broker-addr", "https://localhost:1"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("no secrets"));
}

#[test]
fn client_certificates_when_the_broker_asks_for_them() {
    let (hsm, pki) = broker_token();
    let ca = pki.ca.display().to_string();
    let broker = BrokerProc::start(&hsm, &pki, &["--tls-client-ca", &ca]);
    let put = broker.ctl_admin_mtls(&hsm, &pki, &["policy", "apply", "-f", "-"], POLICY);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let put = broker.ctl_admin_mtls(
        &hsm,
        &pki,
        &["secrets", "put", "shop/api", "--from-json", "-"],
        &format!("{{\"token\": \"{API_TOKEN}\"}}"),
    );
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
    let token = hsm.dir().join("token");
    std::fs::write(
        &token,
        dev.mint("shop", "web", Some("m-0"), Duration::from_secs(600))
            .unwrap(),
    )
    .unwrap();
    let run = |client: bool, out: &str| {
        let mut c = Command::new(bin_path("broker-agent"));
        c.args(["--broker-addr", &broker.addr, "--ca-file", &ca])
            .arg("--token-file")
            .arg(&token)
            .arg("--output-dir")
            .arg(hsm.dir().join(out))
            .args([
                "--secret",
                "shop/api=api",
                "--once",
                "--backoff-max",
                "200ms",
            ]);
        if client {
            c.arg("--client-cert")
                .arg(&pki.client_cert)
                .arg("--client-key")
                .arg(&pki.client_key);
        }
        c.output().unwrap()
    };
    let without = run(false, "without");
    assert_eq!(without.status.code(), Some(1));
    assert!(!hsm.dir().join("without/api").exists());
    let with = run(true, "with");
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    assert_eq!(
        std::fs::read(hsm.dir().join("with/api")).unwrap(),
        API_TOKEN.as_bytes()
    );
}

#[test]
fn template_files_follow_new_versions_and_a_template_error_fails_readiness() {
    let w = World::new();
    let dir = w.hsm.dir().to_path_buf();
    let out = dir.join("tmpl");
    let tmpl = dir.join("url.tmpl");
    std::fs::write(&tmpl, "url=postgres://{{ user }}@db/{{ path }}\n").unwrap();
    let mut args = w.agent_args("tmpl-0", &out);
    args.extend(
        [
            "--secret",
            "shop/db=db.conf",
            "--template",
            "db.conf=host=db user={{ user }} password={{ password }}\n",
            "--secret",
            "shop/db=db.url",
            &format!("--template-file=db.url={}", tmpl.display()),
            "--file-mode",
            "0440",
        ]
        .map(String::from),
    );
    let agent = Agent::start(&args, dir.join("tmpl.log"));
    let log = || agent.log_text();
    wait_for("both files", Duration::from_secs(30), &log, || {
        out.join("db.conf").exists() && out.join("db.url").exists()
    });
    wait_for("ready", Duration::from_secs(30), &log, || {
        agent.readyz() == 200
    });
    let conf = || std::fs::read_to_string(out.join("db.conf")).unwrap();
    assert_eq!(
        conf(),
        format!("host=db user=shop password={DB_PASSWORD}\n")
    );
    assert_eq!(mode(&out.join("db.conf")), 0o440);
    assert_eq!(
        std::fs::read_to_string(out.join("db.url")).unwrap(),
        "url=postgres://shop@db/shop/db\n"
    );

    // A new version is rendered again; a value holding template syntax is written as it is.
    w.put(
        "shop/db",
        &[("user", "{{ password }}"), ("password", "tmpl-pass-2")],
    );
    wait_for("the new version", Duration::from_secs(30), &log, || {
        conf().contains("tmpl-pass-2")
    });
    assert_eq!(conf(), "host=db user={{ password }} password=tmpl-pass-2\n");

    // A version the template cannot render: not ready with the reason, the previous file
    // untouched, nothing half-written.
    let before = conf();
    w.put("shop/db", &[("user", "shop"), ("passwd", "tmpl-pass-3")]);
    wait_for("not ready", Duration::from_secs(30), &log, || {
        agent.readyz() == 503
    });
    let (_, why) = http_get(&agent.metrics, "/readyz");
    assert!(
        why.contains("db.conf: the newest version could not be written (template error at line 1: undefined value: the template uses password, which the secret does not have (it has keys: passwd, user))"),
        "{why}"
    );
    assert_eq!(conf(), before);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".keyhaven-tmp")),
        "{names:?}"
    );
    assert!(agent.metric("keyhaven_agent_failures_total{reason=\"render\"}") >= 1.0);
    // Past the 6 s TTL: db.conf still holds (renews) the lease of the version in its file,
    // and let the refused one go; db.url, whose template fits version 3, moved on.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(agent.readyz(), 503);
    let held = w.leases("tmpl-0", false);
    assert_eq!(
        held.iter().filter(|l| l.version == 2).count(),
        1,
        "{held:?}"
    );
    assert!(held.iter().any(|l| l.version == 3), "{held:?}");

    // A version that fits: ready again.
    w.put("shop/db", &[("user", "shop"), ("password", "tmpl-pass-4")]);
    wait_for("ready again", Duration::from_secs(30), &log, || {
        agent.readyz() == 200
    });
    assert_eq!(conf(), "host=db user=shop password=tmpl-pass-4\n");
    let log_path = agent.log.clone();
    assert!(agent.terminate().success());
    let text = std::fs::read_to_string(log_path).unwrap();
    for s in [DB_PASSWORD, "tmpl-pass-2", "tmpl-pass-3", "tmpl-pass-4"] {
        assert!(!text.contains(s), "a secret is in the agent log");
    }

    // --once: a template missing a key writes nothing and says why, without values.
    let mut once = w.agent_args("tmpl-1", &dir.join("tmpl-once"));
    once.extend(
        [
            "--secret",
            "shop/api=api.conf",
            "--template",
            "api.conf={{ token }}{{ nope }}",
            "--once",
        ]
        .map(String::from),
    );
    let r = Command::new(bin_path("broker-agent"))
        .args(&once)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains(
            "api.conf: template error at line 1: undefined value: the template uses nope,"
        ),
        "{err}"
    );
    assert!(!err.contains(API_TOKEN));
    assert!(!dir.join("tmpl-once/api.conf").exists());

    // A template syntax error is a configuration error (exit 2) naming its line.
    let bad = Command::new(bin_path("broker-agent"))
        .args(["--broker-addr", &w.broker.addr, "--secret", "shop/db=x"])
        .args(["--template", "x=line 1\n{{ user "])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--template x=…: template syntax error at line 2"),
        "{err}"
    );
}
