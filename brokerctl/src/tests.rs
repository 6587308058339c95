//! Tests of `src`.

//! Real TLS (and client-certificate) handshakes with `dev-ca` files, against a fake Admin
//! service that records what it is sent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser as _;
use keyhaven_proto::broker::v1 as pb;
use pb::admin_server::{Admin, AdminServer};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::*;

/// A `PutSecret` as received: path and sorted data.
type Put = (String, Vec<(String, Vec<u8>)>);

#[derive(Debug, Default)]
struct Seen {
    authorization: Vec<String>,
    put: Vec<Put>,
    selectors: Vec<Option<pb::LeaseSelector>>,
    retired: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct FakeAdmin(Arc<Mutex<Seen>>);

impl FakeAdmin {
    fn saw<T>(&self, req: &Request<T>) {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        self.0.lock().unwrap().authorization.push(auth);
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Admin for FakeAdmin {
    async fn put_db_connection(
        &self,
        r: Request<pb::PutDbConnectionRequest>,
    ) -> R<pb::PutDbConnectionResponse> {
        self.saw(&r);
        Err(Status::unimplemented("fake"))
    }
    async fn put_db_role(&self, r: Request<pb::PutDbRoleRequest>) -> R<pb::PutDbRoleResponse> {
        self.saw(&r);
        Err(Status::unimplemented("fake"))
    }
    async fn list_db_roles(
        &self,
        r: Request<pb::ListDbRolesRequest>,
    ) -> R<pb::ListDbRolesResponse> {
        self.saw(&r);
        Err(Status::unimplemented("fake"))
    }
    async fn db_status(&self, r: Request<pb::DbStatusRequest>) -> R<pb::DbStatusResponse> {
        self.saw(&r);
        Err(Status::unimplemented("fake"))
    }
    async fn db_reconcile(&self, r: Request<pb::DbReconcileRequest>) -> R<pb::DbReconcileResponse> {
        self.saw(&r);
        Err(Status::unimplemented("fake"))
    }
    async fn rotate_db_root(
        &self,
        r: Request<pb::RotateDbRootRequest>,
    ) -> R<pb::RotateDbRootResponse> {
        self.saw(&r);
        Err(Status::unimplemented("fake"))
    }
    async fn delete_db_role(
        &self,
        r: Request<pb::DeleteDbRoleRequest>,
    ) -> R<pb::DeleteDbRoleResponse> {
        self.saw(&r);
        Err(Status::unimplemented("fake"))
    }
    async fn delete_db_connection(
        &self,
        r: Request<pb::DeleteDbConnectionRequest>,
    ) -> R<pb::DeleteDbConnectionResponse> {
        self.saw(&r);
        Err(Status::unimplemented("fake"))
    }
    async fn put_secret(&self, r: Request<pb::PutSecretRequest>) -> R<pb::PutSecretResponse> {
        self.saw(&r);
        let r = r.into_inner();
        let mut data: Vec<_> = r.data.into_iter().collect();
        data.sort();
        self.0.lock().unwrap().put.push((r.path, data));
        Ok(Response::new(pb::PutSecretResponse { version: 3 }))
    }
    async fn list_secrets(&self, r: Request<pb::ListSecretsRequest>) -> R<pb::ListSecretsResponse> {
        self.saw(&r);
        Ok(Response::new(pb::ListSecretsResponse {
            paths: vec!["team/app/db".into(), "team/app/api".into()],
        }))
    }
    async fn secret_metadata(
        &self,
        _: Request<pb::SecretMetadataRequest>,
    ) -> R<pb::SecretMetadataResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_secret(
        &self,
        _: Request<pb::DeleteSecretRequest>,
    ) -> R<pb::DeleteSecretResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn apply_policies(
        &self,
        _: Request<pb::ApplyPoliciesRequest>,
    ) -> R<pb::ApplyPoliciesResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_policies(
        &self,
        _: Request<pb::ListPoliciesRequest>,
    ) -> R<pb::ListPoliciesResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_replicas(
        &self,
        _: Request<pb::ListReplicasRequest>,
    ) -> R<pb::ListReplicasResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_leases(&self, r: Request<pb::ListLeasesRequest>) -> R<pb::ListLeasesResponse> {
        self.saw(&r);
        self.0
            .lock()
            .unwrap()
            .selectors
            .push(r.into_inner().selector);
        Ok(Response::new(pb::ListLeasesResponse { leases: vec![] }))
    }
    async fn revoke_leases(
        &self,
        r: Request<pb::RevokeLeasesRequest>,
    ) -> R<pb::RevokeLeasesResponse> {
        self.saw(&r);
        self.0
            .lock()
            .unwrap()
            .selectors
            .push(r.into_inner().selector);
        Ok(Response::new(pb::RevokeLeasesResponse {
            lease_ids: vec!["team/app/abc".into()],
        }))
    }
    async fn audit_verify(&self, r: Request<pb::AuditVerifyRequest>) -> R<pb::AuditVerifyResponse> {
        self.saw(&r);
        Ok(Response::new(pb::AuditVerifyResponse {
            ok: false,
            records: 41,
            checkpoint: String::new(),
            error: "record 42: hash mismatch".into(),
        }))
    }
    async fn audit_tail(&self, _: Request<pb::AuditTailRequest>) -> R<pb::AuditTailResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn key_status(&self, r: Request<pb::KeyStatusRequest>) -> R<pb::KeyStatusResponse> {
        self.saw(&r);
        Err(Status::permission_denied(
            "system:serviceaccount:team:app may not use `audit`",
        ))
    }
    async fn rotate_key(&self, r: Request<pb::RotateKeyRequest>) -> R<pb::RotateKeyResponse> {
        self.saw(&r);
        Ok(Response::new(pb::RotateKeyResponse {
            kek_id: "b".repeat(32),
            label: "keyhaven-broker-2026-01-02T03:04:05.678Z-abcd".into(),
            previous_kek_id: "a".repeat(32),
            deks_to_rewrap: 7,
        }))
    }
    async fn retire_key(&self, r: Request<pb::RetireKeyRequest>) -> R<pb::RetireKeyResponse> {
        self.saw(&r);
        let id = r.into_inner().kek_id;
        self.0.lock().unwrap().retired.push(id.clone());
        Err(Status::failed_precondition(format!(
            "KEK {id} still wraps 3 DEK(s)"
        )))
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Fixture {
    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// brokerctl arguments reaching this server with the dev-ca files and a token file.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let p = |n: &str| self.pki().join(n).display().to_string();
        let mut a: Vec<String> = vec![
            "brokerctl".into(),
            "--addr".into(),
            format!("https://127.0.0.1:{}", self.addr.port()),
            "--ca-file".into(),
            p(devca::CA_CERT),
            "--client-cert".into(),
            p(devca::CLIENT_CERT),
            "--client-key".into(),
            p(devca::CLIENT_KEY),
            "--token-file".into(),
            self.dir.path().join("token").display().to_string(),
            "--timeout".into(),
            "5s".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }
}

const TOKEN: &str = "eyJ0eXAi.tok-s3cr3t.sig";

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    dev_ca(&DevCaArgs {
        out: dir.path().join("pki"),
        hosts: vec!["localhost".into(), "127.0.0.1".into()],
        force: false,
    })
    .unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let read = |n: &str| std::fs::read(dir.path().join("pki").join(n)).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(devca::SERVER_CERT),
            read(devca::SERVER_KEY),
        ))
        .client_ca_root(Certificate::from_pem(read(devca::CA_CERT)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = FakeAdmin::default();
    let seen = fake.0.clone();
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(AdminServer::new(fake));
    let server = tokio::spawn(async move {
        let _ = router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Fixture {
        dir,
        addr,
        seen,
        server,
    }
}

struct Ran {
    result: Result<(), CtlError>,
    out: String,
    err: String,
}

async fn ctl(args: Vec<String>) -> Ran {
    ctl_stdin(args, b"").await
}

async fn ctl_stdin(args: Vec<String>, stdin: &[u8]) -> Ran {
    let cli = Cli::try_parse_from(args).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut input = stdin;
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        stdin: &mut input,
        output: cli.output,
        terminal: false,
    };
    let result = run_with(&cli, &mut io).await;
    Ran {
        result,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

fn no_token_in(texts: &[&str]) {
    for t in texts {
        assert!(!t.contains("tok-s3cr3t"), "token leaked: {t}");
    }
}

#[tokio::test]
async fn mtls_call_sends_the_bearer_token_and_prints_results() {
    let f = fixture().await;
    let r = ctl(f.args(&["secrets", "list"])).await;
    r.result.unwrap();
    assert_eq!(r.out, "team/app/db\nteam/app/api\n");
    assert_eq!(
        f.seen.lock().unwrap().authorization,
        vec![format!("Bearer {TOKEN}")]
    );

    let r = ctl(f.args(&["--output", "json", "secrets", "list"])).await;
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v, serde_json::json!(["team/app/db", "team/app/api"]));
    no_token_in(&[&r.out, &r.err]);
}

#[tokio::test]
async fn put_sends_files_and_literals_and_warns_about_literals() {
    let f = fixture().await;
    let pw = f.dir.path().join("pw");
    std::fs::write(&pw, b"p4ss\n").unwrap();
    let r = ctl(f.args(&[
        "secrets",
        "put",
        "team/app/db",
        "--from-file",
        &format!("password={}", pw.display()),
        "--from-literal",
        "user=demo",
    ]))
    .await;
    r.result.unwrap();
    assert!(r.err.contains("warning: --from-literal"), "{}", r.err);
    assert!(r.out.contains("version 3"), "{}", r.out);
    assert!(!r.out.contains("p4ss") && !r.err.contains("p4ss"));
    let put = f.seen.lock().unwrap().put.clone();
    assert_eq!(
        put,
        vec![(
            "team/app/db".to_owned(),
            vec![
                ("password".to_owned(), b"p4ss\n".to_vec()),
                ("user".to_owned(), b"demo".to_vec())
            ]
        )]
    );

    let r = ctl_stdin(
        f.args(&["secrets", "put", "team/app/db", "--from-json", "-"]),
        br#"{"k": "from-stdin"}"#,
    )
    .await;
    r.result.unwrap();
    assert!(r.err.is_empty(), "{}", r.err);
}

#[tokio::test]
async fn refusals_are_one_line_with_code_and_exit_1() {
    let f = fixture().await;
    let r = ctl(f.args(&["keys", "status"])).await;
    let e = r.result.unwrap_err();
    assert_eq!(e.exit_code(), 1);
    assert_eq!(e.grpc_code(), Some(tonic::Code::PermissionDenied));
    let line = e.describe();
    assert_eq!(
        line,
        "KeyStatus failed: PERMISSION_DENIED: system:serviceaccount:team:app may not use `audit`"
    );
    no_token_in(&[&line, &r.out, &r.err]);

    let r = ctl(f.args(&["audit", "verify"])).await;
    let e = r.result.unwrap_err();
    assert_eq!(e.exit_code(), 1);
    assert_eq!(
        e.describe(),
        "audit log verification FAILED: record 42: hash mismatch"
    );
}

#[tokio::test]
async fn rotate_prints_the_new_kek_and_retire_needs_yes_and_a_kek_id() {
    let f = fixture().await;
    let r = ctl(f.args(&["keys", "rotate"])).await;
    r.result.unwrap();
    assert_eq!(r.out, format!("{}\n", "b".repeat(32)));
    assert!(r.err.contains("7 DEK(s)"), "{}", r.err);
    let r = ctl(f.args(&["-o", "json", "keys", "rotate"])).await;
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["previous_kek_id"], "a".repeat(32));
    assert_eq!(v["deks_to_rewrap"], 7);

    // Refused locally, nothing sent: no --yes, or not a KEK id.
    let id = "c".repeat(32);
    let r = ctl(f.args(&["keys", "retire", &id])).await;
    let e = r.result.unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.describe().contains("--yes"), "{}", e.describe());
    let r = ctl(f.args(&["keys", "retire", "not-a-kek", "--yes"])).await;
    assert_eq!(r.result.unwrap_err().exit_code(), 2);
    assert!(f.seen.lock().unwrap().retired.is_empty());

    // Sent with --yes; the broker's refusal comes back as one line.
    let r = ctl(f.args(&["keys", "retire", &id, "--yes"])).await;
    let e = r.result.unwrap_err();
    assert_eq!(e.exit_code(), 1);
    assert_eq!(e.grpc_code(), Some(tonic::Code::FailedPrecondition));
    assert_eq!(f.seen.lock().unwrap().retired, vec![id]);
}

/// A terminal for indicatif that keeps what is written to it.
#[derive(Debug, Clone, Default)]
struct Screen(Arc<Mutex<String>>);

impl indicatif::TermLike for Screen {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(&format!("{s}\n"))
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.0.lock().unwrap().push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.0.lock().unwrap().clear();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn rewrap_progress_lines() {
    let mut w = pb::RewrapProgress {
        remaining: 750,
        moved: 250,
        rate_per_second: 125.0,
        eta_seconds: 6,
        replicas: 2,
        last_batch_unix_ms: 1,
        unknown_kek_deks: 0,
    };
    assert_eq!(
        remote::keys::rewrap_line(&w),
        "re-wrap: 250 moved, 750 to go (25.0% done), 125 DEKs/s from 2 replicas, ETA 6s"
    );

    // The terminal form, drawn by indicatif.
    let screen = Screen::default();
    let bar = remote::keys::RewrapBar::new(indicatif::ProgressDrawTarget::term_like(Box::new(
        screen.clone(),
    )));
    bar.show(&w);
    assert_eq!((bar.0.position(), bar.0.length()), (250, Some(1000)));
    let drawn = screen.0.lock().unwrap().trim_end().to_owned();
    assert_eq!(
        drawn,
        "re-wrap: [#######-----------------------]  25.0%  250 moved, 750 to go, \
         125 DEKs/s from 2 replicas, ETA 6s"
    );
    w.moved = 999;
    w.remaining = 1;
    bar.show(&w);
    let drawn = screen.0.lock().unwrap().clone();
    assert!(
        drawn.starts_with("re-wrap: [#############################-]  99.9%  999 moved, 1 to go"),
        "{drawn}"
    );
    // The summary's bar stays as it is (indicatif's `finish` would fill it).
    bar.leave();
    assert!(bar.0.is_finished());
    assert_eq!(*screen.0.lock().unwrap(), drawn);
    // Off a terminal indicatif draws nothing, whatever the state.
    let hidden = remote::keys::RewrapBar::new(indicatif::ProgressDrawTarget::hidden());
    hidden.show(&w);
    assert!(hidden.0.is_hidden());

    w.rate_per_second = 0.0;
    w.eta_seconds = -1;
    assert!(remote::keys::rewrap_line(&w).ends_with("no batch in the last minute, ETA unknown"));
    w.remaining = 0;
    assert!(remote::keys::rewrap_line(&w).starts_with("re-wrap: done"));
}

#[tokio::test]
async fn selectors_reach_the_server_and_bad_ones_never_leave() {
    let f = fixture().await;
    ctl(f.args(&["leases", "list", "--namespace", "team", "--pod", "p-1"]))
        .await
        .result
        .unwrap();
    let r = ctl(f.args(&["leases", "revoke", "--prefix", "team/app/"])).await;
    r.result.unwrap();
    assert_eq!(r.out, "team/app/abc\n");
    let r = ctl(f.args(&["leases", "revoke"])).await;
    assert_eq!(r.result.unwrap_err().exit_code(), 2);
    let r = ctl(f.args(&["leases", "revoke", "--everything"])).await;
    assert_eq!(r.result.unwrap_err().exit_code(), 2);
    let r = ctl(f.args(&["leases", "list", "--namespace", ""])).await;
    assert_eq!(r.result.unwrap_err().exit_code(), 2);
    ctl(f.args(&["leases", "list", "--namespace", "team"]))
        .await
        .result
        .unwrap();
    ctl(f.args(&["leases", "revoke", "--everything", "--yes"]))
        .await
        .result
        .unwrap();
    let seen = f.seen.lock().unwrap();
    assert_eq!(
        seen.selectors,
        vec![
            Some(pb::LeaseSelector {
                namespace: "team".into(),
                pod: "p-1".into(),
                ..Default::default()
            }),
            Some(pb::LeaseSelector {
                path_prefix: "team/app".into(),
                ..Default::default()
            }),
            Some(pb::LeaseSelector {
                namespace: "team".into(),
                ..Default::default()
            }),
            None,
        ]
    );
}

#[tokio::test]
async fn tls_failures_are_clear() {
    let f = fixture().await;
    let strip = |args: Vec<String>, flags: &[&str]| -> Vec<String> {
        let mut out = Vec::new();
        let mut skip = false;
        for a in args {
            if skip {
                skip = false;
                continue;
            }
            if flags.contains(&a.as_str()) {
                skip = true;
                continue;
            }
            out.push(a);
        }
        out
    };

    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    dev_ca(&DevCaArgs {
        out: other.path().to_path_buf(),
        hosts: vec!["localhost".into()],
        force: true,
    })
    .unwrap();
    let mut args = strip(f.args(&[]), &["--ca-file"]);
    args.extend([
        "--ca-file".into(),
        other.path().join(devca::CA_CERT).display().to_string(),
        "secrets".into(),
        "list".into(),
    ]);
    let r = ctl(args).await;
    let line = r.result.unwrap_err().describe();
    assert!(line.contains("certificate"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");

    // The certificate is not for this name.
    let r = ctl(f.args(&["--tls-server-name", "broker.example", "secrets", "list"])).await;
    let line = r.result.unwrap_err().describe();
    assert!(
        line.contains("not valid for name \"broker.example\""),
        "{line}"
    );

    // "localhost" is in the certificate too.
    ctl(f.args(&["--tls-server-name", "localhost", "secrets", "list"]))
        .await
        .result
        .unwrap();

    // No client certificate: the server requires one.
    let args = strip(f.args(&[]), &["--client-cert", "--client-key"]);
    let args = [args, vec!["secrets".into(), "list".into()]].concat();
    let r = ctl(args).await;
    let e = r.result.unwrap_err();
    assert_eq!(e.exit_code(), 1);
    let line = e.describe();
    assert!(
        line.starts_with("the connection broke; if the broker requires client certificates, give --client-cert and --client-key: ListSecrets failed: UNKNOWN: transport error"),
        "{line}"
    );
    no_token_in(&[&e.describe()]);

    assert!(f.seen.lock().unwrap().authorization.len() == 1);
}

#[tokio::test]
async fn local_commands_need_no_server_or_credential() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let r = ctl(vec![
        "brokerctl".into(),
        "dev-ca".into(),
        "--out".into(),
        out.display().to_string(),
    ])
    .await;
    r.result.unwrap();
    assert_eq!(r.out.lines().count(), 6);
    assert!(r.err.contains("demos and tests only"));

    let policy = dir.path().join("p.yaml");
    std::fs::write(&policy, "policies: []\n").unwrap();
    let r = ctl(vec![
        "brokerctl".into(),
        "policy".into(),
        "apply".into(),
        "-f".into(),
        policy.display().to_string(),
        "--validate-only".into(),
    ])
    .await;
    r.result.unwrap();
    assert!(
        r.out.contains("valid: 0 policies (nothing sent)"),
        "{}",
        r.out
    );

    std::fs::write(&policy, "policies:\n  - name: x\n").unwrap();
    let r = ctl(vec![
        "brokerctl".into(),
        "policy".into(),
        "apply".into(),
        "-f".into(),
        policy.display().to_string(),
    ])
    .await;
    let line = r.result.unwrap_err().describe();
    assert!(line.contains("not a valid policy document"), "{line}");

    // A remote command without a credential is a usage error, before any connection.
    let r = ctl(vec![
        "brokerctl".into(),
        "--addr".into(),
        "http://127.0.0.1:9".into(),
        "secrets".into(),
        "list".into(),
    ])
    .await;
    let e = r.result.unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
}
