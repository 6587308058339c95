//! Why a policy document is refused.

use super::*;

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
