//! `brokerctl dev-ca`: a throwaway CA, a server certificate and a client certificate for
//! demos and tests (rcgen, ECDSA P-256). Not a PKI: no revocation, one-year validity, keys
//! written unencrypted (mode 0600).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use zeroize::Zeroizing;

use super::cli::DevCaArgs;
use super::{CtlError, Usage};

/// CA certificate file name.
pub const CA_CERT: &str = "ca.pem";
/// CA key file name.
pub const CA_KEY: &str = "ca-key.pem";
/// Server certificate file name.
pub const SERVER_CERT: &str = "server.pem";
/// Server key file name.
pub const SERVER_KEY: &str = "server-key.pem";
/// Client certificate file name.
pub const CLIENT_CERT: &str = "client.pem";
/// Client key file name.
pub const CLIENT_KEY: &str = "client-key.pem";

/// Common name of the dev client certificate.
pub const CLIENT_NAME: &str = "keyhaven-dev-operator";

/// How long the certificates are valid.
const VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// One file to write.
struct Out {
    name: &'static str,
    contents: Zeroizing<String>,
    mode: u32,
}

/// Generates and writes the six files; returns their paths.
pub fn dev_ca(args: &DevCaArgs) -> Result<Vec<PathBuf>, CtlError> {
    let hosts: Vec<String> = args
        .hosts
        .iter()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(Usage("--hosts needs at least one name or IP address".into()).into());
    }
    let files = generate(&hosts)?;

    let existing: Vec<String> = files
        .iter()
        .map(|f| args.out.join(f.name))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() && !args.force {
        return Err(CtlError::WouldOverwrite {
            files: existing.join(", "),
        });
    }
    if !args.out.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(&args.out).map_err(|source| CtlError::Io {
            what: format!("cannot create {}", args.out.display()),
            source,
        })?;
    }
    let mut written = Vec::with_capacity(files.len());
    for f in &files {
        let path = args.out.join(f.name);
        write_file(&path, f.contents.as_bytes(), f.mode, args.force).map_err(|source| {
            CtlError::Io {
                what: format!("cannot write {}", path.display()),
                source,
            }
        })?;
        written.push(path);
    }
    Ok(written)
}

/// The certificates and keys, in memory.
fn generate(hosts: &[String]) -> Result<Vec<Out>, CtlError> {
    let ca_key = KeyPair::generate().map_err(cert_err("cannot generate the CA key"))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA parameters"))?;
    // A random suffix keeps two dev CAs apart (same name would look like one issuer).
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).map_err(CtlError::Random)?;
    ca.distinguished_name = name(&format!("Keyhaven dev CA {}", hex::encode(tag)));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca)?;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(cert_err("cannot sign the CA certificate"))?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let leaf = |cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(cert_err("cannot generate a key"))?;
        let mut p = CertificateParams::new(sans)
            .map_err(|e| Usage(format!("--hosts: not a DNS name or IP address ({e})")))?;
        p.distinguished_name = name(cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        set_validity(&mut p)?;
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(cert_err(format!("cannot sign the certificate of {cn}")))?;
        Ok::<_, CtlError>((cert, key))
    };
    let (server_cert, server_key) = leaf(
        &hosts[0],
        hosts.to_vec(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) =
        leaf(CLIENT_NAME, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;

    let cert = |name, pem: String| Out {
        name,
        contents: Zeroizing::new(pem),
        mode: 0o644,
    };
    let key = |name, k: &KeyPair| Out {
        name,
        contents: Zeroizing::new(k.serialize_pem()),
        mode: 0o600,
    };
    Ok(vec![
        cert(CA_CERT, ca_cert.pem()),
        key(CA_KEY, &ca_key),
        cert(SERVER_CERT, server_cert.pem()),
        key(SERVER_KEY, &server_key),
        cert(CLIENT_CERT, client_cert.pem()),
        key(CLIENT_KEY, &client_key),
    ])
}

/// Maps rcgen's error to [`CtlError::Certificate`] with the step that failed.
fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CtlError {
    move |source| CtlError::Certificate {
        what: what.into(),
        source,
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Valid from the start of yesterday (UTC), to tolerate clock skew, for [`VALIDITY`].
fn set_validity(p: &mut CertificateParams) -> Result<(), CtlError> {
    // `format_rfc3339` always starts with `YYYY-MM-DD`.
    let today = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let (y, m, d) = (
        date_field::<i32>(&today, 0..4)?,
        date_field::<u8>(&today, 5..7)?,
        date_field::<u8>(&today, 8..10)?,
    );
    let midnight = rcgen::date_time_ymd(y, m, d);
    p.not_before = midnight - Duration::from_secs(24 * 60 * 60);
    p.not_after = p.not_before + VALIDITY;
    Ok(())
}

/// One number of an RFC 3339 date (`0..4` the year, `5..7` the month, `8..10` the day).
fn date_field<T: std::str::FromStr>(
    today: &str,
    range: std::ops::Range<usize>,
) -> Result<T, CtlError> {
    today
        .get(range)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CtlError::Clock {
            today: today.to_owned(),
        })
}

/// Writes `bytes` to `path` with `mode`. Without `overwrite` it never replaces a file
/// (`O_EXCL`); with it, it writes a temporary file beside and renames it over, so the mode is
/// right even if the old file's was not.
fn write_file(path: &Path, bytes: &[u8], mode: u32, overwrite: bool) -> std::io::Result<()> {
    let open = |p: &Path| {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, mode);
        #[cfg(not(unix))]
        let _ = mode;
        o.open(p)
    };
    if !overwrite {
        let mut f = open(path)?;
        f.write_all(bytes)?;
        return f.sync_all();
    }
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let result = open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, force: bool) -> DevCaArgs {
        DevCaArgs {
            out: dir.join("pki"),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            force,
        }
    }

    #[test]
    fn writes_six_files_keys_0600_and_they_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        let written = dev_ca(&args(dir.path(), false)).unwrap();
        assert_eq!(written.len(), 6);
        let out = dir.path().join("pki");
        for key in [CA_KEY, SERVER_KEY, CLIENT_KEY] {
            let pem = std::fs::read_to_string(out.join(key)).unwrap();
            KeyPair::from_pem(&pem).unwrap_or_else(|e| panic!("{key}: {e}"));
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(out.join(key))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{key}");
            }
        }
        for cert in [CA_CERT, SERVER_CERT, CLIENT_CERT] {
            let pem = std::fs::read(out.join(cert)).unwrap();
            assert!(String::from_utf8_lossy(&pem).starts_with("-----BEGIN CERTIFICATE-----"));
            // tonic accepts it (the handshake test in ctl::tests uses them for real).
            let _ = tonic::transport::Certificate::from_pem(&pem);
        }
        // The CA can be loaded again as an issuer (needs the cert's key to match).
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(out.join(CA_KEY)).unwrap()).unwrap();
        let ca_pem = std::fs::read_to_string(out.join(CA_CERT)).unwrap();
        assert!(ca_pem.contains("-----END CERTIFICATE-----"));
        drop(ca_key);
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        dev_ca(&args(dir.path(), false)).unwrap();
        let before = std::fs::read(dir.path().join("pki").join(CA_KEY)).unwrap();
        let e = dev_ca(&args(dir.path(), false)).unwrap_err();
        assert!(matches!(e, CtlError::WouldOverwrite { .. }), "{e:?}");
        let e = e.describe();
        assert!(
            e.contains("refusing to overwrite") && e.contains("--force"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("pki").join(CA_KEY)).unwrap(),
            before
        );

        // Even a loosened mode is put right by --force.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.path().join("pki").join(SERVER_KEY);
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
            dev_ca(&args(dir.path(), true)).unwrap();
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_ne!(
            std::fs::read(dir.path().join("pki").join(CA_KEY)).unwrap(),
            before
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("pki"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn bad_hosts_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path(), false);
        a.hosts = vec![" ".into()];
        let e = dev_ca(&a).unwrap_err();
        assert!(matches!(e, CtlError::Usage(_)), "{e:?}");
        assert!(!dir.path().join("pki").exists());
    }
}
