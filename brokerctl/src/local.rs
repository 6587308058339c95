//! Commands that never call the broker: `keys init` (on the HSM directly) and `dev-token`
//! (with the dev issuer's key file).

use std::path::Path;

use keyhaven_hsm::BlockingKeystore;
use serde_json::json;

use super::cli::{DevTokenArgs, HsmArgs, Output};
use super::{output, CtlError, Io};
use keyhaven_broker_core::dev_token::DevIssuer;

/// What `keys init` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysInit {
    /// The primary KEK's id (hex).
    pub kek_id: String,
    /// Its label.
    pub label: String,
    /// True if this run created it.
    pub created: bool,
}

/// Creates the first broker KEK unless the token already has one with the prefix.
/// Blocking (PKCS#11): run it off the async runtime.
pub fn keys_init(hsm: &HsmArgs) -> Result<KeysInit, CtlError> {
    let hsm_err =
        |what: &'static str| move |source: keyhaven_hsm::Error| CtlError::Hsm { what, source };
    let cfg = hsm.config();
    let ks = BlockingKeystore::open(cfg).map_err(hsm_err("cannot open the HSM token"))?;
    if let Some(k) = ks
        .newest_kek()
        .map_err(hsm_err("cannot list KEKs on the token"))?
    {
        return Ok(KeysInit {
            kek_id: k.id.to_string(),
            label: k.label,
            created: false,
        });
    }
    let k = ks
        .generate_kek()
        .map_err(hsm_err("cannot create the broker KEK"))?;
    Ok(KeysInit {
        kek_id: k.id.to_string(),
        label: k.label,
        created: true,
    })
}

/// Prints the result of [`keys_init`].
pub fn print_keys_init(r: &KeysInit, io: &mut Io<'_>) -> Result<(), CtlError> {
    match io.output {
        Output::Json => output::json(
            io.out,
            &json!({"kek_id": r.kek_id, "label": r.label, "created": r.created}),
        )?,
        Output::Text => {
            if r.created {
                writeln!(io.err, "created broker KEK {}", r.label)?;
            } else {
                writeln!(
                    io.err,
                    "already initialised: primary broker KEK {} (nothing created)",
                    r.label
                )?;
            }
            writeln!(io.out, "{}", r.kek_id)?;
        }
    }
    Ok(())
}

/// Mints a dev token; the token goes to stdout (the dev-mode exception), a warning to stderr.
pub fn dev_token(args: &DevTokenArgs, io: &mut Io<'_>) -> Result<(), CtlError> {
    io.warn(
        "dev tokens are for demos and tests only: a broker trusts them only when started with \
         --dev, which must never be used in production",
    )?;
    ensure_key_dir(&args.dev_key)?;
    let issuer = DevIssuer::load_or_generate(&args.dev_key).map_err(|source| CtlError::DevKey {
        path: args.dev_key.clone(),
        source,
    })?;
    let token = secrecy::SecretString::from(
        issuer
            .mint(
                &args.namespace,
                &args.serviceaccount,
                args.pod.as_deref(),
                args.ttl,
            )
            .map_err(|e| super::Usage(e.to_string()))?,
    );
    use secrecy::ExposeSecret as _;
    match io.output {
        Output::Json => output::json(
            io.out,
            &json!({
                "token": token.expose_secret(),
                "namespace": args.namespace,
                "serviceaccount": args.serviceaccount,
                "pod": args.pod,
                "ttl_seconds": args.ttl.as_secs(),
            }),
        )?,
        Output::Text => writeln!(io.out, "{}", token.expose_secret())?,
    }
    Ok(())
}

/// Creates the key file's directory (mode 0700) if it is missing.
fn ensure_key_dir(key: &Path) -> Result<(), CtlError> {
    let Some(dir) = key.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(|source| CtlError::Io {
        what: format!("cannot create {}", dir.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Output;

    #[test]
    fn dev_token_prints_a_token_and_warns() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("sub/dev-issuer.pem");
        let args = DevTokenArgs {
            namespace: "team".into(),
            serviceaccount: "app".into(),
            pod: Some("app-1".into()),
            ttl: std::time::Duration::from_secs(600),
            dev_key: key.clone(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut stdin = std::io::empty();
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            stdin: &mut stdin,
            output: Output::Text,
            terminal: false,
        };
        dev_token(&args, &mut io).unwrap();
        let token = String::from_utf8(out).unwrap();
        assert_eq!(token.trim_end().split('.').count(), 3, "{token}");
        let err = String::from_utf8(err).unwrap();
        assert!(err.contains("demos and tests only"), "{err}");
        assert!(!err.contains(token.trim_end()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let bad = DevTokenArgs {
            namespace: "Not_A_Label".into(),
            ..args
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            stdin: &mut stdin,
            output: Output::Text,
            terminal: false,
        };
        let e = dev_token(&bad, &mut io).unwrap_err();
        assert!(matches!(e, CtlError::Usage(_)), "{e:?}");
        assert!(out.is_empty());
    }
}
