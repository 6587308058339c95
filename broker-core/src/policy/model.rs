//! Capabilities, subject patterns and policies as written (the YAML document).

use super::*;

// ---------------------------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------------------------

/// Something a policy may allow. `Read` is the workload verb; the others are operator verbs.
///
/// No capability implies another: a policy that allows `write` does not allow `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// Lease a secret (workloads).
    Read,
    /// Put new secret versions.
    Write,
    /// Soft-delete a secret (its history is kept).
    Delete,
    /// Destroy a secret's history.
    Destroy,
    /// List paths and read metadata (never values).
    List,
    /// Revoke other identities' leases.
    Revoke,
    /// Manage policies.
    Policy,
    /// Read and verify the audit log (and read the KEK status).
    Audit,
    /// Rotate and retire the broker's KEKs.
    Keys,
}

impl Capability {
    /// Every capability, in declaration order.
    pub const ALL: [Capability; 9] = [
        Capability::Read,
        Capability::Write,
        Capability::Delete,
        Capability::Destroy,
        Capability::List,
        Capability::Revoke,
        Capability::Policy,
        Capability::Audit,
        Capability::Keys,
    ];

    /// The lowercase name used in policy files, logs and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::Write => "write",
            Capability::Delete => "delete",
            Capability::Destroy => "destroy",
            Capability::List => "list",
            Capability::Revoke => "revoke",
            Capability::Policy => "policy",
            Capability::Audit => "audit",
            Capability::Keys => "keys",
        }
    }

    /// True for the operator verbs, false for `read`.
    pub fn is_admin(self) -> bool {
        self != Capability::Read
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Policies as written
// ---------------------------------------------------------------------------------------------

/// Which identities a policy applies to. Each field is an exact name or a glob where `*`
/// matches any run of characters within the name (`*` alone matches any name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectPattern {
    /// Namespace, exact or glob (`payments`, `team-*`, `*`).
    pub namespace: String,
    /// Service account, exact or glob (`api`, `*`).
    pub serviceaccount: String,
}

impl SubjectPattern {
    /// A subject pattern from a namespace pattern and a service account pattern.
    pub fn new(namespace: impl Into<String>, serviceaccount: impl Into<String>) -> Self {
        SubjectPattern {
            namespace: namespace.into(),
            serviceaccount: serviceaccount.into(),
        }
    }
}

/// One policy: these subjects may use these capabilities on these paths, with leases of
/// `ttl` renewable up to `max_ttl`.
///
/// In YAML the durations are humantime strings (`5m`, `1h 30m`). A `Policy` value is not
/// checked until it is put into a [`PolicySet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPolicy", into = "RawPolicy")]
pub struct Policy {
    /// Unique name, used in decisions, logs and audit records.
    pub name: String,
    /// Who the policy applies to; any one matching subject is enough.
    pub subjects: Vec<SubjectPattern>,
    /// Path patterns the policy covers; any one matching pattern is enough.
    pub paths: Vec<String>,
    /// What the policy allows on those paths.
    pub capabilities: Vec<Capability>,
    /// Default lease duration.
    pub ttl: Duration,
    /// Longest a lease may live, renewals included.
    pub max_ttl: Duration,
}

/// The serialized form of a [`Policy`]: every field optional so that a missing field is
/// reported by [`PolicySet`] validation with the policy's name, not as a bare serde error.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawPolicy {
    name: String,
    subjects: Vec<SubjectPattern>,
    paths: Vec<String>,
    capabilities: Vec<Capability>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ttl: Option<String>,
}

impl RawPolicy {
    /// The name as written (may be empty; errors then name the list index).
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Converts to a [`Policy`], parsing durations; `label` names the policy in errors.
    pub(super) fn into_policy(self, label: &str) -> Result<Policy, PolicyError> {
        let ttl = parse_duration_field(label, "ttl", self.ttl)?;
        let max_ttl = parse_duration_field(label, "max_ttl", self.max_ttl)?;
        Ok(Policy {
            name: self.name,
            subjects: self.subjects,
            paths: self.paths,
            capabilities: self.capabilities,
            ttl,
            max_ttl,
        })
    }
}

impl TryFrom<RawPolicy> for Policy {
    type Error = PolicyError;

    fn try_from(raw: RawPolicy) -> Result<Self, Self::Error> {
        let label = if raw.name.is_empty() {
            "(unnamed)".to_owned()
        } else {
            raw.name.clone()
        };
        raw.into_policy(&label)
    }
}

impl From<Policy> for RawPolicy {
    fn from(p: Policy) -> Self {
        RawPolicy {
            name: p.name,
            subjects: p.subjects,
            paths: p.paths,
            capabilities: p.capabilities,
            ttl: Some(humantime::format_duration(p.ttl).to_string()),
            max_ttl: Some(humantime::format_duration(p.max_ttl).to_string()),
        }
    }
}

pub(super) fn parse_duration_field(
    policy: &str,
    field: &'static str,
    value: Option<String>,
) -> Result<Duration, PolicyError> {
    let value = value.ok_or_else(|| PolicyError::Missing {
        policy: policy.to_owned(),
        field,
    })?;
    humantime::parse_duration(value.trim()).map_err(|source| PolicyError::BadDuration {
        policy: policy.to_owned(),
        field,
        value,
        source,
    })
}
