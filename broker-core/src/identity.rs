//! Who is asking: the workload identity proven by a verified ServiceAccount token.

use serde::{Deserialize, Serialize};

/// A verified Kubernetes workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Pod the token is bound to, if any.
    pub pod_name: Option<String>,
    /// UID of that pod, if any.
    pub pod_uid: Option<String>,
}

impl Identity {
    /// `namespace/serviceaccount`, the form used in lease ids, logs and audit records.
    pub fn subject(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)?;
        if let Some(p) = &self.pod_name {
            write!(f, " (pod {p})")?;
        }
        Ok(())
    }
}

/// RFC 1123 label, as Kubernetes requires of namespace names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain, as Kubernetes requires of service account and pod names.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}
