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
