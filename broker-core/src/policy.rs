//! Who may do what: the broker's policy engine.
//!
//! A [`Policy`] binds subjects (namespace + service account, exact or `*` glob) to secret path
//! patterns, with [`Capability`]s and a lease `ttl` / `max_ttl`. A [`PolicySet`] is a validated,
//! compiled, immutable collection of policies; [`PolicySet::evaluate`] answers one question —
//! may this identity do this to this path — with [`Decision::Deny`] unless some policy allows.
//!
//! Paths are hierarchical (`team/app/db`). In path patterns `*` matches within one segment and
//! a whole `**` segment matches any number of segments, including none. Matching is anchored
//! and case-sensitive.
//!
//! Not here: storing policies, the admin API that replaces them, the bootstrap admin
//! credential, and lease arithmetic (how a requested TTL is clamped to the decision's).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// Longest secret path or path pattern accepted, in bytes.
pub const MAX_PATH_LEN: usize = 512;

/// Longest policy name, namespace pattern or service account pattern accepted, in bytes.
pub const MAX_NAME_LEN: usize = 253;

/// A sensible global cap on any policy's `max_ttl` for callers without their own setting.
pub const DEFAULT_MAX_TTL_CAP: Duration = Duration::from_secs(24 * 60 * 60);

/// The segment that matches any number of path segments.
const DOUBLE_STAR: &str = "**";

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
struct RawPolicy {
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
    /// Converts to a [`Policy`], parsing durations; `label` names the policy in errors.
    fn into_policy(self, label: &str) -> Result<Policy, PolicyError> {
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

fn parse_duration_field(
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

/// A policy document: `policies:` followed by a list of policies.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    policies: Vec<RawPolicy>,
}

/// The document [`PolicySet::to_yaml`] writes.
#[derive(Serialize)]
struct FileOut<'a> {
    policies: &'a [Policy],
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a policy document or policy set was refused. Every variant about one policy names it
/// (by `name`, or `policies[i]` when the name is missing) and the offending field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The document is not YAML of the expected shape (or could not be written as YAML).
    #[error("policy document: {source}")]
    Yaml {
        /// The parser's or serializer's error, with its location.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A required field is missing or empty.
    #[error("policy `{policy}`: `{field}` is required and must not be empty")]
    Missing {
        /// The policy.
        policy: String,
        /// The missing field.
        field: &'static str,
    },
    /// Another policy in the same set has this name.
    #[error("policy `{policy}`: `name` is used by more than one policy")]
    DuplicateName {
        /// The duplicated name.
        policy: String,
    },
    /// A duration field does not parse.
    #[error(
        "policy `{policy}`: `{field}` is not a duration (`{value}`; write e.g. `5m` or `1h 30m`)"
    )]
    BadDuration {
        /// The policy.
        policy: String,
        /// `ttl` or `max_ttl`.
        field: &'static str,
        /// The text that did not parse.
        value: String,
        /// The parser's reason.
        #[source]
        source: humantime::DurationError,
    },
    /// A duration is zero or not a whole number of seconds (leases are counted in seconds).
    #[error("policy `{policy}`: `{field}` must be a positive whole number of seconds, not {}", humantime::format_duration(*.value))]
    BadTtl {
        /// The policy.
        policy: String,
        /// `ttl` or `max_ttl`.
        field: &'static str,
        /// The refused value.
        value: Duration,
    },
    /// `ttl` is longer than `max_ttl`.
    #[error("policy `{policy}`: `ttl` ({}) is longer than `max_ttl` ({})", humantime::format_duration(*.ttl), humantime::format_duration(*.max_ttl))]
    TtlAboveMaxTtl {
        /// The policy.
        policy: String,
        /// Its `ttl`.
        ttl: Duration,
        /// Its `max_ttl`.
        max_ttl: Duration,
    },
    /// `max_ttl` is longer than the broker's global cap.
    #[error("policy `{policy}`: `max_ttl` ({}) is longer than the broker's cap ({})", humantime::format_duration(*.max_ttl), humantime::format_duration(*.cap))]
    MaxTtlAboveCap {
        /// The policy.
        policy: String,
        /// Its `max_ttl`.
        max_ttl: Duration,
        /// The cap the set was built with.
        cap: Duration,
    },
    /// A name, subject pattern or path pattern is malformed.
    #[error("policy `{policy}`: `{field}` (`{value}`): {problem}")]
    Invalid {
        /// The policy.
        policy: String,
        /// The field, with its index: `name`, `subjects[0].namespace`, `paths[2]`.
        field: String,
        /// The refused text.
        value: String,
        /// What is wrong with it.
        problem: Malformed,
    },
    /// A pattern passed the syntax checks but the glob engine refused it.
    #[error("policy `{policy}`: `{field}` (`{value}`) does not compile")]
    Glob {
        /// The policy.
        policy: String,
        /// The field, with its index.
        field: String,
        /// The refused pattern.
        value: String,
        /// The glob engine's reason.
        #[source]
        source: globset::Error,
    },
}

impl PolicyError {
    /// The policy the error is about, if it is about one policy.
    pub fn policy(&self) -> Option<&str> {
        match self {
            PolicyError::Yaml { .. } => None,
            PolicyError::Missing { policy, .. }
            | PolicyError::DuplicateName { policy }
            | PolicyError::BadDuration { policy, .. }
            | PolicyError::BadTtl { policy, .. }
            | PolicyError::TtlAboveMaxTtl { policy, .. }
            | PolicyError::MaxTtlAboveCap { policy, .. }
            | PolicyError::Invalid { policy, .. }
            | PolicyError::Glob { policy, .. } => Some(policy),
        }
    }
}

/// What is wrong with a name, secret path or pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// It is empty.
    #[error("is empty")]
    Empty,
    /// It is longer than allowed.
    #[error("is longer than {max} bytes")]
    TooLong {
        /// The limit, in bytes.
        max: usize,
    },
    /// A path starts with `/`.
    #[error("starts with `/`")]
    LeadingSlash,
    /// A path ends with `/`.
    #[error("ends with `/`")]
    TrailingSlash,
    /// A path has an empty segment (`a//b`).
    #[error("has an empty segment")]
    EmptySegment,
    /// A path has a `.` or `..` segment.
    #[error("has a `.` or `..` segment")]
    DotSegment,
    /// A character that is not allowed here.
    #[error("contains {0:?}, which is not allowed here")]
    Char(char),
    /// `**` inside a segment, or `**/**`: `**` must be a whole segment, once in a row.
    #[error("`**` must be a whole segment and not repeated")]
    DoubleStar,
}

// ---------------------------------------------------------------------------------------------
// Syntax
// ---------------------------------------------------------------------------------------------

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks a concrete secret path: non-empty, at most [`MAX_PATH_LEN`] bytes, `/`-separated
/// segments of ASCII letters, digits, `-`, `_` and `.`; no empty, `.` or `..` segment, no
/// leading or trailing `/`. [`PolicySet::evaluate`] denies any path this refuses.
pub fn validate_secret_path(path: &str) -> Result<(), Malformed> {
    check_path(path, false)
}

/// Checks a concrete path (`wildcards == false`) or a path pattern (`true`).
fn check_path(path: &str, wildcards: bool) -> Result<(), Malformed> {
    if path.is_empty() {
        return Err(Malformed::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(Malformed::TooLong { max: MAX_PATH_LEN });
    }
    if path.starts_with('/') {
        return Err(Malformed::LeadingSlash);
    }
    if path.ends_with('/') {
        return Err(Malformed::TrailingSlash);
    }
    let mut previous_double_star = false;
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err(Malformed::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(Malformed::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|&c| !(is_path_char(c) || (wildcards && c == '*')))
        {
            return Err(Malformed::Char(c));
        }
        let double_star = segment == DOUBLE_STAR;
        if (double_star && previous_double_star) || (!double_star && segment.contains("**")) {
            return Err(Malformed::DoubleStar);
        }
        previous_double_star = double_star;
    }
    Ok(())
}

/// Checks a namespace or service account pattern: lowercase letters, digits, `-`, `*`, and
/// `.` when `dots` (service accounts are DNS subdomains, namespaces DNS labels).
fn check_name_pattern(pattern: &str, dots: bool) -> Result<(), Malformed> {
    if pattern.is_empty() {
        return Err(Malformed::Empty);
    }
    if pattern.len() > MAX_NAME_LEN {
        return Err(Malformed::TooLong { max: MAX_NAME_LEN });
    }
    match pattern.chars().find(|&c| {
        !(c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || c == '-'
            || c == '*'
            || (dots && c == '.'))
    }) {
        Some(c) => Err(Malformed::Char(c)),
        None => Ok(()),
    }
}

/// Checks a policy name: ASCII letters, digits, `-`, `_`, `.`; it goes into logs and audit.
fn check_policy_name(name: &str) -> Result<(), Malformed> {
    if name.len() > MAX_NAME_LEN {
        return Err(Malformed::TooLong { max: MAX_NAME_LEN });
    }
    match name.chars().find(|&c| !is_path_char(c)) {
        Some(c) => Err(Malformed::Char(c)),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum NameMatcher {
    Any,
    Exact(String),
    Glob(GlobMatcher),
}

impl NameMatcher {
    fn is_match(&self, name: &str) -> bool {
        match self {
            NameMatcher::Any => true,
            NameMatcher::Exact(exact) => exact == name,
            NameMatcher::Glob(glob) => glob.is_match(name),
        }
    }
}

#[derive(Debug)]
struct CompiledSubject {
    namespace: NameMatcher,
    serviceaccount: NameMatcher,
}

#[derive(Debug)]
struct Compiled {
    subjects: Vec<CompiledSubject>,
    paths: GlobSet,
    /// The policy has the `**` pattern, so it covers every path.
    all_paths: bool,
}

impl Compiled {
    fn covers_subject(&self, who: &Identity) -> bool {
        self.subjects.iter().any(|s| {
            s.namespace.is_match(&who.namespace) && s.serviceaccount.is_match(&who.service_account)
        })
    }
}

/// Builds a glob where `*` stays within one segment (names have no `/`, so this is harmless
/// for subject patterns, and it keeps `*` from matching a `/` smuggled into an identity).
fn glob(pattern: &str) -> Result<globset::Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
}

fn compile_name(
    policy: &str,
    field: String,
    pattern: &str,
    dots: bool,
) -> Result<NameMatcher, PolicyError> {
    check_name_pattern(pattern, dots).map_err(|problem| PolicyError::Invalid {
        policy: policy.to_owned(),
        field: field.clone(),
        value: pattern.to_owned(),
        problem,
    })?;
    if pattern == "*" {
        return Ok(NameMatcher::Any);
    }
    if !pattern.contains('*') {
        return Ok(NameMatcher::Exact(pattern.to_owned()));
    }
    glob(pattern)
        .map(|g| NameMatcher::Glob(g.compile_matcher()))
        .map_err(|source| PolicyError::Glob {
            policy: policy.to_owned(),
            field,
            value: pattern.to_owned(),
            source,
        })
}

fn compile_policy(p: &Policy, label: &str, cap: Duration) -> Result<Compiled, PolicyError> {
    let invalid = |field: String, value: &str, problem| PolicyError::Invalid {
        policy: label.to_owned(),
        field,
        value: value.to_owned(),
        problem,
    };
    let missing = |field| PolicyError::Missing {
        policy: label.to_owned(),
        field,
    };

    if p.name.is_empty() {
        return Err(missing("name"));
    }
    check_policy_name(&p.name).map_err(|problem| invalid("name".into(), &p.name, problem))?;

    if p.subjects.is_empty() {
        return Err(missing("subjects"));
    }
    let subjects = p
        .subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(CompiledSubject {
                namespace: compile_name(
                    label,
                    format!("subjects[{i}].namespace"),
                    &s.namespace,
                    false,
                )?,
                serviceaccount: compile_name(
                    label,
                    format!("subjects[{i}].serviceaccount"),
                    &s.serviceaccount,
                    true,
                )?,
            })
        })
        .collect::<Result<Vec<_>, PolicyError>>()?;

    if p.paths.is_empty() {
        return Err(missing("paths"));
    }
    let mut paths = GlobSetBuilder::new();
    for (i, pattern) in p.paths.iter().enumerate() {
        let field = format!("paths[{i}]");
        check_path(pattern, true).map_err(|problem| invalid(field.clone(), pattern, problem))?;
        // globset's `a/**` needs at least one more segment; ours also matches `a` itself.
        let zero_segments = pattern.strip_suffix("/**");
        for pat in std::iter::once(pattern.as_str()).chain(zero_segments) {
            let g = glob(pat).map_err(|source| PolicyError::Glob {
                policy: label.to_owned(),
                field: field.clone(),
                value: pattern.clone(),
                source,
            })?;
            paths.add(g);
        }
    }
    let paths = paths.build().map_err(|source| PolicyError::Glob {
        policy: label.to_owned(),
        field: "paths".into(),
        value: p.paths.join(", "),
        source,
    })?;

    if p.capabilities.is_empty() {
        return Err(missing("capabilities"));
    }

    for (field, value) in [("ttl", p.ttl), ("max_ttl", p.max_ttl)] {
        if value.is_zero() || value.subsec_nanos() != 0 {
            return Err(PolicyError::BadTtl {
                policy: label.to_owned(),
                field,
                value,
            });
        }
    }
    if p.ttl > p.max_ttl {
        return Err(PolicyError::TtlAboveMaxTtl {
            policy: label.to_owned(),
            ttl: p.ttl,
            max_ttl: p.max_ttl,
        });
    }
    if p.max_ttl > cap {
        return Err(PolicyError::MaxTtlAboveCap {
            policy: label.to_owned(),
            max_ttl: p.max_ttl,
            cap,
        });
    }

    Ok(Compiled {
        subjects,
        paths,
        all_paths: p.paths.iter().any(|pat| pat == DOUBLE_STAR),
    })
}

/// How errors name the policy at `index`: its name, or `policies[index]` when it has none.
fn label(name: &str, index: usize) -> String {
    if name.is_empty() {
        format!("policies[{index}]")
    } else {
        name.to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Policy sets and decisions
// ---------------------------------------------------------------------------------------------

/// The answer to "may this identity do this to this path".
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Decision {
    /// No policy allows it (the default).
    Deny,
    /// At least one policy allows it.
    Allow {
        /// Default lease duration: the longest `ttl` among the allowing policies.
        ttl: Duration,
        /// Lease lifetime limit: the longest `max_ttl` among the allowing policies.
        max_ttl: Duration,
        /// Names of the allowing policies, in set order.
        policies: Vec<String>,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

#[derive(Debug)]
struct Inner {
    policies: Vec<Policy>,
    compiled: Vec<Compiled>,
    max_ttl_cap: Duration,
}

/// A validated, compiled, immutable set of policies. Cloning is cheap (shared `Arc`); to
/// change policies build a new set and swap it in.
#[derive(Debug, Clone)]
pub struct PolicySet {
    inner: Arc<Inner>,
}

impl Default for PolicySet {
    /// An empty set, which denies everything, capped at [`DEFAULT_MAX_TTL_CAP`].
    fn default() -> Self {
        PolicySet {
            inner: Arc::new(Inner {
                policies: Vec::new(),
                compiled: Vec::new(),
                max_ttl_cap: DEFAULT_MAX_TTL_CAP,
            }),
        }
    }
}

impl PolicySet {
    /// Validates and compiles `policies`; no policy's `max_ttl` may exceed `max_ttl_cap`.
    ///
    /// Each policy needs a unique name, at least one subject, path and capability, well-formed
    /// patterns, and `0 < ttl <= max_ttl <= max_ttl_cap` in whole seconds. The first problem
    /// found is returned.
    pub fn new(policies: Vec<Policy>, max_ttl_cap: Duration) -> Result<PolicySet, PolicyError> {
        let mut names = HashSet::with_capacity(policies.len());
        let mut compiled = Vec::with_capacity(policies.len());
        for (i, p) in policies.iter().enumerate() {
            let label = label(&p.name, i);
            compiled.push(compile_policy(p, &label, max_ttl_cap)?);
            if !names.insert(p.name.as_str()) {
                return Err(PolicyError::DuplicateName { policy: label });
            }
        }
        Ok(PolicySet {
            inner: Arc::new(Inner {
                policies,
                compiled,
                max_ttl_cap,
            }),
        })
    }

    /// Parses a `policies:` YAML document (as `brokerctl policy apply -f` sends) and builds a
    /// set from it, as [`PolicySet::new`]. Unknown fields are refused, so a misspelt key
    /// cannot silently drop a restriction.
    pub fn from_yaml(yaml: &str, max_ttl_cap: Duration) -> Result<PolicySet, PolicyError> {
        let file: RawFile =
            serde_yaml_ng::from_str(yaml).map_err(|source| PolicyError::Yaml { source })?;
        let policies = file
            .policies
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let label = label(&raw.name, i);
                raw.into_policy(&label)
            })
            .collect::<Result<Vec<_>, _>>()?;
        PolicySet::new(policies, max_ttl_cap)
    }

    /// Writes the set as a `policies:` YAML document that [`PolicySet::from_yaml`] reads back.
    pub fn to_yaml(&self) -> Result<String, PolicyError> {
        serde_yaml_ng::to_string(&FileOut {
            policies: &self.inner.policies,
        })
        .map_err(|source| PolicyError::Yaml { source })
    }

    /// The policies, in the order given.
    pub fn policies(&self) -> &[Policy] {
        &self.inner.policies
    }

    /// The cap on `max_ttl` the set was validated against.
    pub fn max_ttl_cap(&self) -> Duration {
        self.inner.max_ttl_cap
    }

    /// May `who` use `cap` on the secret at `path`?
    ///
    /// Default deny: [`Decision::Deny`] unless a policy matches the identity (namespace and
    /// service account), the path (anchored, case-sensitive) and the capability. A path that
    /// [`validate_secret_path`] refuses, or an identity with an empty namespace or service
    /// account, is always denied.
    ///
    /// When several policies allow, the decision is the most generous of them: the longest
    /// `ttl` and the longest `max_ttl` (each at most the cap), and it lists every one.
    pub fn evaluate(&self, who: &Identity, path: &str, cap: Capability) -> Decision {
        if validate_secret_path(path).is_err() {
            return Decision::Deny;
        }
        self.decide(who, cap, |c| c.paths.is_match(path))
    }

    /// May `who` use `cap` on everything? For operations not bound to one path (`policy`,
    /// `audit`, revoking by identity or pod). Only policies with the `**` path pattern count;
    /// otherwise as [`PolicySet::evaluate`].
    pub fn evaluate_global(&self, who: &Identity, cap: Capability) -> Decision {
        self.decide(who, cap, |c| c.all_paths)
    }

    fn decide(
        &self,
        who: &Identity,
        cap: Capability,
        covers_path: impl Fn(&Compiled) -> bool,
    ) -> Decision {
        if who.namespace.is_empty() || who.service_account.is_empty() {
            return Decision::Deny;
        }
        let mut decision = Decision::Deny;
        for (policy, compiled) in self.inner.policies.iter().zip(&self.inner.compiled) {
            if !policy.capabilities.contains(&cap)
                || !compiled.covers_subject(who)
                || !covers_path(compiled)
            {
                continue;
            }
            match &mut decision {
                Decision::Deny => {
                    decision = Decision::Allow {
                        ttl: policy.ttl,
                        max_ttl: policy.max_ttl,
                        policies: vec![policy.name.clone()],
                    }
                }
                Decision::Allow {
                    ttl,
                    max_ttl,
                    policies,
                } => {
                    *ttl = (*ttl).max(policy.ttl);
                    *max_ttl = (*max_ttl).max(policy.max_ttl);
                    policies.push(policy.name.clone());
                }
            }
        }
        decision
    }
}

#[cfg(test)]
mod tests;
