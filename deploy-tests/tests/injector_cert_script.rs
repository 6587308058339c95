#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `deploy/kubernetes/injector-cert.sh` run for real — with the real `brokerctl dev-ca` and a
//! `kubectl` on `PATH` that records what it is asked (no cluster here): the webhook must
//! trust the new CA, beside the current one, *before* the Secret gets the new pair, and the
//! pair must be a certificate for the injector's Service signed by that CA.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const FAKE_KUBECTL: &str = r#"#!/bin/sh
# Records each call (one line), answers `get` with the current caBundle, keeps stdin of apply.
echo "$*" >> "$LOG"
case "$1" in
  get) cat "$CURRENT_BUNDLE_B64" ;;
  patch) shift; while [ "$1" != "-p" ]; do shift; done; printf '%s' "$2" > "$DIR/patch.json" ;;
  create)
    while [ $# -gt 0 ]; do
      case "$1" in --cert) cp "$2" "$DIR/tls.crt" ;; --key) cp "$2" "$DIR/tls.key" ;; esac
      shift
    done
    printf 'kind: Secret\n' ;;
  apply) cat > "$DIR/applied.yaml" ;;
esac
"#;

/// Runs `cmd` with `input` on stdin; its stdout.
fn pipe(cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut c = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    o.stdout
}

fn base64(bytes: &[u8]) -> String {
    String::from_utf8(pipe(Command::new("base64").arg("-w0"), bytes)).unwrap()
}

fn pem_blocks(text: &str) -> Vec<String> {
    text.split("-----END CERTIFICATE-----")
        .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
        .map(|b| format!("{}-----END CERTIFICATE-----", b.trim_start()))
        .collect()
}

#[test]
fn the_webhook_trusts_the_new_ca_before_the_secret_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let kubectl = bin.join("kubectl");
    std::fs::write(&kubectl, FAKE_KUBECTL).unwrap();
    std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let brokerctl = testkit::process::bin_path("brokerctl").unwrap();
    std::os::unix::fs::symlink(&brokerctl, bin.join("brokerctl")).unwrap();

    // The CA the webhook trusts today (two certificates in its bundle).
    let old = testkit::pki::DevPki::write(&{
        let p = d.join("old");
        std::fs::create_dir(&p).unwrap();
        p
    })
    .unwrap();
    let old_ca = std::fs::read_to_string(&old.ca).unwrap();
    let current = format!(
        "{old_ca}{}",
        std::fs::read_to_string(&old.server_cert).unwrap()
    );
    std::fs::write(d.join("current.b64"), base64(current.as_bytes())).unwrap();

    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/injector-cert.sh");
    let out = Command::new("sh")
        .arg(&script)
        .arg("payments-system")
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("LOG", d.join("calls.log"))
        .env("DIR", d)
        .env("CURRENT_BUNDLE_B64", d.join("current.b64"))
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let calls = std::fs::read_to_string(d.join("calls.log")).unwrap();
    let verbs: Vec<&str> = calls
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    // `create --dry-run | apply` is one pipeline: those two run together, after the patch.
    assert_eq!(verbs[..2], ["get", "patch"], "{calls}");
    let mut last: Vec<&str> = verbs[2..].to_vec();
    last.sort_unstable();
    assert_eq!(last, ["apply", "create"], "{calls}");
    assert!(calls.contains("create secret tls keyhaven-injector-tls -n payments-system"));

    // The new bundle: the new CA first, then the CA trusted until now — only that one.
    let patch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("patch.json")).unwrap()).unwrap();
    assert_eq!(patch[0]["op"], "replace");
    assert_eq!(patch[0]["path"], "/webhooks/0/clientConfig/caBundle");
    let bundle = pipe(
        Command::new("base64").arg("-d"),
        patch[0]["value"].as_str().unwrap().as_bytes(),
    );
    let blocks = pem_blocks(&String::from_utf8(bundle).unwrap());
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_eq!(blocks[1].trim(), old_ca.trim());
    assert_ne!(blocks[0].trim(), old_ca.trim());

    // The Secret's certificate names the Service and is signed by the new CA; the CA's key
    // went away with the script's temporary directory.
    let pem = std::fs::read(d.join("tls.crt")).unwrap();
    let (_, cert) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = cert.parse_x509().unwrap();
    let (_, ca) = x509_parser::pem::parse_x509_pem(blocks[0].as_bytes()).unwrap();
    let ca = ca.parse_x509().unwrap();
    cert.verify_signature(Some(ca.public_key()))
        .expect("the serving certificate is not signed by the new CA");
    let (_, old) = x509_parser::pem::parse_x509_pem(old_ca.as_bytes()).unwrap();
    assert!(cert
        .verify_signature(Some(old.parse_x509().unwrap().public_key()))
        .is_err());
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.contains("keyhaven-injector.payments-system.svc")),
        "{names:?}"
    );
    assert!(std::fs::read_to_string(d.join("tls.key"))
        .unwrap()
        .contains("PRIVATE KEY"));
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        leftovers.is_empty(),
        "the script left files behind (a CA key?): {leftovers:?}"
    );
}
