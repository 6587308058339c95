//! `keyhaven-bench injector`: admission latency of a real `keyhaven-injector serve` process
//! over HTTPS, beside a bare HTTPS echo on the same stack, in the same run.
//!
//! Every client holds one keep-alive TLS connection (as the kube-apiserver's webhook client
//! does) and sends the same AdmissionReview — a Deployment's pod with five annotations, the
//! ServiceAccount plugin's volume and a template — back to back. The echo answers with the
//! request's own body, so both answers are of similar size. Target: p99 < 5 ms at 64
//! concurrent requests.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use testkit::https::{self, TlsStream};
use testkit::pki::DevPki;
use testkit::process::ChildProcess;

use crate::cli::InjectorArgs;
use crate::https_echo::HttpsEchoProcess;
use crate::load::{drive_async, Summary, Window, Worker};
use crate::report::{closed_loop_bound, mark, ms};

/// The target: p99 below this…
const P99_TARGET: Duration = Duration::from_millis(5);
/// …at this many concurrent requests.
const P99_CLIENTS: usize = 64;

/// Runs the benchmark and prints the table and the verdict.
pub fn run(args: &InjectorArgs) -> anyhow::Result<()> {
    args.validate()?;
    let bin = match &args.injector {
        Some(p) => p.clone(),
        None => testkit::process::bin_dir()?.join("keyhaven-injector"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build it (`cargo build --release -p keyhaven-injector -p keyhaven-bench`) \
         or pass --injector",
        bin.display()
    );
    let dir = tempfile::tempdir().context("temporary directory")?;
    let pki = DevPki::write(dir.path())?;
    let injector_addr = loopback()?;
    let echo_addr = loopback()?;
    let _injector = start_injector(&bin, injector_addr, &pki, &dir.path().join("injector.log"))?;
    let _echo = HttpsEchoProcess::start(
        echo_addr,
        &pki.server_cert,
        &pki.server_key,
        &dir.path().join("echo.log"),
    )?;
    let rt = testkit::process::runtime()?;
    let body = admission_review().into_bytes();
    let window = Window {
        warmup: args.warmup,
        measure: args.duration,
    };
    let mut rows: Vec<(usize, Summary, Summary)> = Vec::new();
    rt.block_on(async {
        for addr in [injector_addr, echo_addr] {
            wait_up(addr, &pki.ca).await?;
        }
        for &clients in &args.clients {
            // Echo first, then the injector, per concurrency: both see the same machine state.
            let echo = measure(echo_addr, &pki.ca, clients, &body, false, window).await?;
            let inj = measure(injector_addr, &pki.ca, clients, &body, true, window).await?;
            rows.push((clients, inj, echo));
        }
        anyhow::Ok(())
    })?;
    println!("{}", table(&rows));
    println!("{}", verdict(&rows));
    Ok(())
}

fn loopback() -> anyhow::Result<SocketAddr> {
    Ok(format!("127.0.0.1:{}", testkit::process::free_port()?).parse()?)
}

fn start_injector(
    bin: &Path,
    addr: SocketAddr,
    pki: &DevPki,
    log: &Path,
) -> anyhow::Result<ChildProcess> {
    Ok(ChildProcess::spawn_logged(
        testkit::process::clean_command(bin)
            .args(["serve", "--listen", &addr.to_string()])
            .arg("--tls-cert-file")
            .arg(&pki.server_cert)
            .arg("--tls-key-file")
            .arg(&pki.server_key)
            .args(["--agent-image", "keyhaven/broker-agent:0.1.0"])
            .args(["--broker-addr", "https://keyhaven-broker.keyhaven.svc:8443"])
            .env("KEYHAVEN_LOG", "warn"),
        "keyhaven-injector",
        log,
    )?)
}

async fn wait_up(addr: SocketAddr, ca: &Path) -> anyhow::Result<()> {
    for _ in 0..200 {
        if https::request(addr, ca, "GET", "/healthz", b"")
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{addr} did not come up")
}

struct Client {
    conn: TlsStream,
    body: Vec<u8>,
    injector: bool,
}

impl Worker for Client {
    async fn call(&mut self) -> Result<(), String> {
        https::send(&mut self.conn, "POST", "/mutate", &self.body)
            .await
            .map_err(|e| e.to_string())?;
        let (status, resp) = https::read_response(&mut self.conn)
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("HTTP {status}"));
        }
        if self.injector && !resp.contains("\"patchType\":\"JSONPatch\"") {
            return Err("no patch in the answer".to_owned());
        }
        Ok(())
    }
}

async fn measure(
    addr: SocketAddr,
    ca: &Path,
    clients: usize,
    body: &[u8],
    injector: bool,
    window: Window,
) -> anyhow::Result<Summary> {
    let mut workers = Vec::with_capacity(clients);
    for _ in 0..clients {
        workers.push(Client {
            conn: https::connect(addr, ca).await?,
            body: body.to_vec(),
            injector,
        });
    }
    drive_async(workers, window).await
}

fn table(rows: &[(usize, Summary, Summary)]) -> String {
    let mut out = String::from(
        "clients | injector ops/s | p50 ms | p99 ms | echo ops/s | p50 ms | p99 ms | p99 injector/echo\n",
    );
    for (clients, inj, echo) in rows {
        let ratio = if echo.p99.is_zero() {
            "n/a".to_owned()
        } else {
            format!("{:.2}", inj.p99.as_secs_f64() / echo.p99.as_secs_f64())
        };
        out.push_str(&format!(
            "{clients:>7} | {:>14.0} | {:>6.2} | {:>6.2} | {:>10.0} | {:>6.2} | {:>6.2} | {ratio}\n",
            inj.throughput,
            ms(inj.p50),
            ms(inj.p99),
            echo.throughput,
            ms(echo.p50),
            ms(echo.p99),
        ));
        for (name, s) in [("injector", inj), ("echo", echo)] {
            if s.errors > 0 {
                out.push_str(&format!(
                    "        {name}: {} failed, first: {}\n",
                    s.errors,
                    s.first_error.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    out
}

fn verdict(rows: &[(usize, Summary, Summary)]) -> String {
    let name = format!(
        "injector admission p99 < {} ms at {P99_CLIENTS} concurrent requests",
        P99_TARGET.as_millis()
    );
    let Some((_, inj, echo)) = rows.iter().find(|(c, _, _)| *c == P99_CLIENTS) else {
        return format!("{name}: n/a (run with --clients including {P99_CLIENTS})");
    };
    format!(
        "{name}: {} (p99 {:.2} ms; the bare HTTPS echo's p99 {:.2} ms in the same run{}{}{})",
        mark(inj.p99 < P99_TARGET && inj.errors == 0),
        ms(inj.p99),
        ms(echo.p99),
        if inj.errors > 0 {
            format!("; {} requests failed", inj.errors)
        } else {
            String::new()
        },
        closed_loop_bound(P99_CLIENTS, inj.throughput, P99_TARGET)
            .replace("; closed-loop bound", "; the injector's closed-loop bound"),
        closed_loop_bound(P99_CLIENTS, echo.throughput, P99_TARGET)
            .replace("; closed-loop bound", "; the echo's own closed-loop bound"),
    )
}

/// The AdmissionReview every client sends: a Deployment's pod as the apiserver hands it to
/// mutating webhooks.
fn admission_review() -> String {
    let pod = json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "generateName": "payments-api-6d4cf56db6-", "namespace": "payments",
            "labels": {"app": "payments-api", "pod-template-hash": "6d4cf56db6",
                "keyhaven.io/inject": "true"},
            "annotations": {
                "keyhaven.io/secret-db.json": "payments/db",
                "keyhaven.io/secret-api-key": "payments/api",
                "keyhaven.io/key-api-key": "token",
                "keyhaven.io/secret-db.conf": "payments/db",
                "keyhaven.io/template-db.conf": "host=db user={{ username }} password={{ password }}\n"
            }
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-7xk2p", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ], "defaultMode": 420}}],
            "containers": [{
                "name": "app", "image": "registry.example/payments-api:1.4.2",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "kube-api-access-7xk2p", "readOnly": true,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "payments-api",
            "securityContext": {"runAsUser": 10001, "runAsNonRoot": true},
            "schedulerName": "default-scheduler", "enableServiceLinks": true
        },
        "status": {}
    });
    keyhaven_injector::review::create_request(&pod, "payments", "bench-0001").to_string()
}
