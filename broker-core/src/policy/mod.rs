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
pub(crate) const DOUBLE_STAR: &str = "**";

mod error;
mod model;
mod set;
mod syntax;

#[allow(unused_imports)]
use self::syntax::*;
pub use error::*;
pub use model::*;
pub use set::*;
pub use syntax::validate_secret_path;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
