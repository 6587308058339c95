//! `keyhaven-injector` end to end without a cluster: the injector process answers an
//! AdmissionReview over HTTPS; the returned JSON Patch is applied to the pod; the injected
//! agent container's command line — with its volume mounts made into directories, as the
//! kubelet would — runs as a process against a real broker (TLS, SoftHSM2 KEK, SQLite) with a
//! dev token, and writes the files the annotations ask for, a template among them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hsm_tests::broker::{authed, broker_token, BrokerProc, BOOTSTRAP};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::process::{bin_path, eventually, free_port, runtime};
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::*;
use serde_json::{json, Value};

const POLICY: &str = r#"
policies:
- name: payments-api
  subjects: [{namespace: payments, serviceaccount: payments-api}]
  paths: ["payments/*"]
  capabilities: [read]
  ttl: 1m
  max_ttl: 1h
"#;

const PASSWORD: &str = "pw-{{ not a template }}-9c1e";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_injected_agent_command_line_writes_the_files_from_a_real_broker() {
    let (hsm, pki) = broker_token();
    let broker = BrokerProc::start(&hsm, &pki, &[]);
    let rt = runtime();
    let dir = hsm.dir().to_path_buf();
    let mut client = rt.block_on(BrokerClient::connect(&broker, &pki));
    rt.block_on(async {
        client.apply(POLICY, false).await;
        client
            .put_data(
                "payments/db",
                &[("username", "payments"), ("password", PASSWORD)],
            )
            .await;
    });

    // The injector, serving the dev PKI's certificate.
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let injector_log = dir.join("injector.log");
    let _injector = Proc(
        Command::new(bin_path("keyhaven-injector"))
            .args(["serve", "--listen", &addr.to_string()])
            .arg("--tls-cert-file")
            .arg(&pki.server_cert)
            .arg("--tls-key-file")
            .arg(&pki.server_key)
            .args(["--agent-image", "keyhaven/broker-agent:0.1.0"])
            .args(["--broker-addr", &broker.addr])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&injector_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let up = eventually(Duration::from_secs(20), || {
        rt.block_on(testkit::https::request(
            addr, &pki.ca, "GET", "/readyz", b"",
        ))
        .is_ok_and(|(s, _)| s == 200)
    });
    assert!(
        up,
        "injector not ready: {}",
        std::fs::read_to_string(&injector_log).unwrap_or_default()
    );

    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "payments-api-0",
            "namespace": "payments",
            "labels": {"keyhaven.io/inject": "true"},
            "annotations": {
                "keyhaven.io/secret-db.json": "payments/db",
                "keyhaven.io/secret-password": "payments/db",
                "keyhaven.io/key-password": "password",
                "keyhaven.io/secret-db.conf": "payments/db",
                "keyhaven.io/template-db.conf": "host=db user={{ username }} password={{ password }}\n"
            }
        },
        "spec": {
            "serviceAccountName": "payments-api",
            "securityContext": {"runAsUser": 10001},
            "containers": [{"name": "app", "image": "registry.example/payments-api:1"}]
        }
    });
    let body = serde_json::to_vec(&keyhaven_injector::review::create_request(
        &pod, "payments", "e2e-0001",
    ))
    .unwrap();
    let (status, resp) = rt
        .block_on(testkit::https::request(
            addr, &pki.ca, "POST", "/mutate", &body,
        ))
        .unwrap();
    assert_eq!(status, 200, "{resp}");
    let resp: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(resp["response"]["allowed"], true, "{resp}");
    let patch = keyhaven_injector::review::patch_of(&resp).expect("a JSON Patch");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();

    // The kubelet's part: each of the agent's volume mounts becomes a directory holding what
    // the volume would (the projected token, the CA ConfigMap's key, an empty memory volume).
    let agent = patched["spec"]["initContainers"][0].clone();
    assert_eq!(agent["restartPolicy"], "Always");
    let volumes: BTreeMap<String, Value> = patched["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
        .collect();
    let dev = DevIssuer::load_or_generate(&dir.join("dev.pem")).unwrap();
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    let mut out = None;
    let mut token = String::new();
    for m in agent["volumeMounts"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let host = dir.join("volumes").join(name);
        std::fs::create_dir_all(&host).unwrap();
        let v = &volumes[name];
        if let Some(src) = v.pointer("/projected/sources/0/serviceAccountToken") {
            assert_eq!(src["audience"], "keyhaven");
            token = dev
                .mint(
                    "payments",
                    "payments-api",
                    Some("payments-api-0"),
                    Duration::from_secs(src["expirationSeconds"].as_u64().unwrap()),
                )
                .unwrap();
            std::fs::write(host.join(src["path"].as_str().unwrap()), &token).unwrap();
        } else if let Some(cm) = v.get("configMap") {
            assert_eq!(cm["name"], "keyhaven-broker-ca");
            std::fs::copy(&pki.ca, host.join(cm["items"][0]["path"].as_str().unwrap())).unwrap();
        } else {
            assert_eq!(v["emptyDir"]["medium"], "Memory");
            out = Some(host.clone());
        }
        mounts.push((m["mountPath"].as_str().unwrap().to_owned(), host));
    }
    let out = out.expect("a secrets volume");
    let probe_port = agent["startupProbe"]["httpGet"]["port"].as_u64().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let command: Vec<String> = agent["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            // The pod's network namespace: here, a free loopback port.
            if a == format!("--metrics-addr=0.0.0.0:{probe_port}") {
                return format!("--metrics-addr={metrics}");
            }
            translate(a, &mounts)
        })
        .collect();
    assert_eq!(command[0], "broker-agent");
    let agent_log = dir.join("agent.log");
    let mut agent_proc = Proc(
        Command::new(bin_path("broker-agent"))
            .args(&command[1..])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    let path = agent["startupProbe"]["httpGet"]["path"].as_str().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            testkit::http::get(&metrics, path).is_ok_and(|(s, _)| s == 200)
        }),
        "the agent never became ready: {}",
        log()
    );

    let json: Value = serde_json::from_slice(&std::fs::read(out.join("db.json")).unwrap()).unwrap();
    assert_eq!(json["password"], PASSWORD);
    assert_eq!(
        std::fs::read(out.join("password")).unwrap(),
        PASSWORD.as_bytes()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("db.conf")).unwrap(),
        format!("host=db user=payments password={PASSWORD}\n")
    );
    for secret in [PASSWORD, token.as_str()] {
        assert!(
            !log().contains(secret),
            "the agent logged a secret or token"
        );
    }

    // SIGTERM: the agent revokes its leases.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_proc.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(20), || agent_proc
        .0
        .try_wait()
        .unwrap()
        .is_some()));
    let live = rt.block_on(async {
        client
            .admin
            .list_leases(authed(
                ListLeasesRequest {
                    selector: Some(LeaseSelector {
                        namespace: "payments".into(),
                        ..Default::default()
                    }),
                    include_ended: false,
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap()
            .into_inner()
            .leases
    });
    assert!(live.is_empty(), "leases left after SIGTERM: {live:?}");
}

/// A flag whose value lies under a mount path, pointed at that mount's directory.
fn translate(arg: &str, mounts: &[(String, PathBuf)]) -> String {
    let Some((flag, value)) = arg.split_once('=') else {
        return arg.to_owned();
    };
    for (mount, host) in mounts {
        if let Some(rest) = value.strip_prefix(mount.as_str()) {
            let rest = rest.trim_start_matches('/');
            let p: &Path = host;
            return format!("{flag}={}", p.join(rest).display());
        }
    }
    arg.to_owned()
}
