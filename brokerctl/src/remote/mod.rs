//! The commands that call the broker: `secrets`, `policy`, `leases`, `lease` / `renew` /
//! `revoke`, `audit`, `keys status` / `rotate` / `retire`, `replicas`, `db`.

use std::collections::VecDeque;
use std::time::Duration;

use keyhaven_proto::broker::v1 as pb;
use serde_json::json;
use zeroize::Zeroizing;

use super::cli::{
    AuditCommand, ConnArgs, KeyStatusArgs, LeaseArgs, LeasesCommand, Output, PolicyCommand,
    RenewArgs, RetireArgs, RevokeArgs, SecretsCommand,
};
use super::conn::Session;
use super::input::{lease_selector, policy_document, secret_path, secret_values};
use super::output::{self, lease_state, now_ms, relative, secs, table, time_ms, time_s};
use super::{CtlError, Io, Usage};
use keyhaven_broker_core::audit::AuditRecord;

mod audit;
mod db;
pub(crate) mod keys;
mod leases;
mod policy;
mod replicas;
mod secrets;

#[allow(unused_imports)]
use self::{audit::*, keys::*};
pub use audit::audit;
pub use db::db;
pub use keys::{key_retire, key_rotate, key_status};
pub use leases::{lease, leases, renew, revoke};
pub use policy::policy;
pub use replicas::replicas;
pub use secrets::secrets;

pub(super) fn lease_id(id: &str) -> Result<&str, Usage> {
    if id.is_empty() || id.chars().any(char::is_control) {
        return Err(Usage(
            "the lease id is empty or has control characters".into(),
        ));
    }
    Ok(id)
}

/// A flag's duration in whole seconds (at least 1).
pub(super) fn whole_seconds(flag: &'static str) -> impl Fn(Duration) -> Result<u64, Usage> {
    move |d| {
        if d.subsec_nanos() != 0 || d.as_secs() == 0 {
            return Err(Usage(format!(
                "{flag} must be a whole number of seconds, at least 1s (e.g. 90s, 5m)"
            )));
        }
        Ok(d.as_secs())
    }
}

pub(super) fn base64_encode(v: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(v)
}

pub(super) fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

pub(super) fn nonzero(v: i64) -> serde_json::Value {
    if v == 0 {
        serde_json::Value::Null
    } else {
        json!(v)
    }
}

pub(super) fn nonempty(s: &str) -> serde_json::Value {
    if s.is_empty() {
        serde_json::Value::Null
    } else {
        json!(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_must_be_whole_seconds() {
        assert_eq!(
            whole_seconds("--ttl")(Duration::from_secs(300)).unwrap(),
            300
        );
        assert!(whole_seconds("--ttl")(Duration::from_millis(1500)).is_err());
        assert!(whole_seconds("--ttl")(Duration::ZERO).is_err());
    }

    #[test]
    fn record_seq_reads_the_json_line() {
        assert_eq!(record_seq(r#"{"seq": 42, "hash": "x"}"#), Some(42));
        assert_eq!(record_seq("garbage"), None);
        assert_eq!(crate::error::code_name(tonic::Code::NotFound), "NOT_FOUND");
    }
}
