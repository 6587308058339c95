//! [`PolicySet`]: the validated, compiled collection, and its [`Decision`]s; the compiled form
//! of one policy (globs ready to match); the document as read and written.

use super::*;

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
pub(super) struct Inner {
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
    /// Whether two sets share one compiled state (clones are cheap).
    #[cfg(test)]
    pub(super) fn shares_state_with(&self, other: &PolicySet) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

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
                let label = label(raw.name(), i);
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
