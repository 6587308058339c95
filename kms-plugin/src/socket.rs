//! The Unix socket: address forms, replacing a stale socket (never a live one), mode and
//! owner, and the peer-UID allow-list.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;

use crate::error::PluginError;

/// Where the plugin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (`unix:///@name`): no file, no stale state.
    Abstract(String),
}

impl ListenAddr {
    /// Parses `unix:///path` or `unix:///@name` (the forms the kube-apiserver dials).
    pub fn parse(s: &str) -> Result<ListenAddr, PluginError> {
        let bad = || PluginError::ListenAddr(s.to_owned());
        let rest = s.strip_prefix("unix://").ok_or_else(bad)?;
        if let Some(name) = rest.strip_prefix("/@") {
            if name.is_empty() {
                return Err(bad());
            }
            return Ok(ListenAddr::Abstract(name.to_owned()));
        }
        if rest.starts_with('/') && rest.len() > 1 {
            return Ok(ListenAddr::Path(PathBuf::from(rest)));
        }
        Err(bad())
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Path(p) => write!(f, "unix://{}", p.display()),
            ListenAddr::Abstract(n) => write!(f, "unix:///@{n}"),
        }
    }
}

/// Refuses an abstract socket without a peer-UID allow-list. A socket file is guarded by its
/// mode and owner; an abstract socket has neither, so the allow-list is its only guard.
pub fn check_guarded(addr: &ListenAddr, allow_uid: &[u32]) -> Result<(), PluginError> {
    match addr {
        ListenAddr::Abstract(_) if allow_uid.is_empty() => Err(
            PluginError::AbstractSocketWithoutAllowList(addr.to_string()),
        ),
        _ => Ok(()),
    }
}

/// Parses `UID` or `UID:GID`.
pub fn parse_owner(s: &str) -> Result<(u32, Option<u32>), PluginError> {
    let bad = |_| PluginError::Io {
        context: format!("bad --socket-owner '{s}' (want UID or UID:GID)"),
        source: std::io::Error::from(ErrorKind::InvalidInput),
    };
    match s.split_once(':') {
        Some((u, g)) => Ok((u.parse().map_err(bad)?, Some(g.parse().map_err(bad)?))),
        None => Ok((s.parse().map_err(bad)?, None)),
    }
}

/// Binds the listener. A socket file that nothing answers on is stale and replaced; one that
/// answers belongs to a live plugin and is left alone.
pub fn bind(
    addr: &ListenAddr,
    mode: u32,
    owner: Option<(u32, Option<u32>)>,
) -> Result<tokio::net::UnixListener, PluginError> {
    let std_listener = match addr {
        ListenAddr::Path(path) => {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if !meta.file_type().is_socket() => {
                    return Err(PluginError::Io {
                        context: format!("{} exists and is not a socket", path.display()),
                        source: std::io::Error::from(ErrorKind::AlreadyExists),
                    })
                }
                Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(PluginError::SocketInUse(addr.to_string())),
                    Err(_) => {
                        tracing::info!(socket = %path.display(), "removing stale socket");
                        std::fs::remove_file(path)
                            .map_err(PluginError::io(format!("remove stale {}", path.display())))?;
                    }
                },
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(PluginError::Io {
                        context: format!("inspect {}", path.display()),
                        source: e,
                    })
                }
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(PluginError::io(format!("create {}", dir.display())))?;
            }
            // Bind under a restrictive umask so the socket is never briefly open to all.
            let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            let bound = std::os::unix::net::UnixListener::bind(path);
            nix::sys::stat::umask(old);
            let l = bound.map_err(PluginError::io(format!("bind {}", path.display())))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(PluginError::io(format!("chmod {}", path.display())))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(path, Some(uid), gid)
                    .map_err(PluginError::io(format!("chown {}", path.display())))?;
            }
            l
        }
        ListenAddr::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(PluginError::io("abstract socket name"))?;
            match std::os::unix::net::UnixListener::bind_addr(&sa) {
                Ok(l) => l,
                Err(e) if e.kind() == ErrorKind::AddrInUse => {
                    return Err(PluginError::SocketInUse(addr.to_string()))
                }
                Err(e) => {
                    return Err(PluginError::Io {
                        context: format!("bind {addr}"),
                        source: e,
                    })
                }
            }
        }
    };
    std_listener
        .set_nonblocking(true)
        .map_err(PluginError::io("set non-blocking"))?;
    tokio::net::UnixListener::from_std(std_listener).map_err(PluginError::io("register listener"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(
            ListenAddr::parse("unix:///var/run/k.sock").unwrap(),
            ListenAddr::Path("/var/run/k.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("unix:///@kms").unwrap(),
            ListenAddr::Abstract("kms".into())
        );
        for bad in [
            "/var/run/k.sock",
            "unix://",
            "unix:///",
            "unix:///@",
            "tcp://x",
        ] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_owner("0:5").unwrap(), (0, Some(5)));
        assert_eq!(parse_owner("1000").unwrap(), (1000, None));
        assert!(parse_owner("root").is_err());
    }

    #[test]
    fn abstract_socket_needs_an_allow_list() {
        let abs = ListenAddr::Abstract("kms".into());
        let err = check_guarded(&abs, &[]).unwrap_err();
        assert!(
            matches!(err, PluginError::AbstractSocketWithoutAllowList(ref a) if a == "unix:///@kms"),
            "{err:?}"
        );
        assert!(err.to_string().contains("--allow-uid"), "{err}");
        check_guarded(&abs, &[0]).unwrap();
        check_guarded(&ListenAddr::Path("/run/k.sock".into()), &[]).unwrap();
    }
}
