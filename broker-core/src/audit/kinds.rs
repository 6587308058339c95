//! Kinds of audited call and their outcomes, with their stable text forms.

use super::*;

/// What kind of call an event records. Stored as text: see [`EventKind::as_text`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A token was presented (`authenticate`).
    Authenticate,
    /// A lease was asked for (`lease`).
    Lease,
    /// A lease renewal was asked for (`renew`).
    Renew,
    /// A lease revocation (`revoke`), by its holder or by an operator.
    Revoke,
    /// The reaper expired a lease (`expire`).
    Expire,
    /// An admin call, with its verb as a short code (`admin:<verb>`, e.g. `admin:policy_apply`).
    Admin(String),
    /// This many failed authentications with no identity (a bad or missing token), from the
    /// peer in `identity` (`peer:<address>`) for the `reason`, over one interval
    /// (`auth_failures:<count>`): one record instead of one per attempt.
    AuthFailures(u64),
}

impl EventKind {
    /// The stable text form stored in the `kind` column and hashed: `authenticate`, `lease`,
    /// `renew`, `revoke`, `expire`, `admin:<verb>` or `auth_failures:<count>`.
    pub fn as_text(&self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow;
        match self {
            EventKind::Authenticate => Cow::Borrowed("authenticate"),
            EventKind::Lease => Cow::Borrowed("lease"),
            EventKind::Renew => Cow::Borrowed("renew"),
            EventKind::Revoke => Cow::Borrowed("revoke"),
            EventKind::Expire => Cow::Borrowed("expire"),
            EventKind::Admin(verb) => Cow::Owned(format!("admin:{verb}")),
            EventKind::AuthFailures(n) => Cow::Owned(format!("auth_failures:{n}")),
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_text())
    }
}

impl FromStr for EventKind {
    type Err = ParseError;

    /// Parses the text form; the inverse of [`EventKind::as_text`] for every value.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "authenticate" => EventKind::Authenticate,
            "lease" => EventKind::Lease,
            "renew" => EventKind::Renew,
            "revoke" => EventKind::Revoke,
            "expire" => EventKind::Expire,
            _ => match (s.strip_prefix("admin:"), s.strip_prefix("auth_failures:")) {
                (Some(verb), _) => EventKind::Admin(verb.to_owned()),
                // Only the canonical decimal form, so text and kind map one to one.
                (_, Some(n)) => match n.parse::<u64>() {
                    Ok(count) if count.to_string() == n => EventKind::AuthFailures(count),
                    _ => return Err(ParseError::Kind),
                },
                _ => return Err(ParseError::Kind),
            },
        })
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_text())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a call ended. Stored as text: see [`Outcome::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Done as asked (`ok`).
    Ok,
    /// Refused: authentication failed or policy said no (`denied`); `reason` says why.
    Denied,
    /// The broker could not do it (`error`): HSM or database unavailable, internal failure.
    Error,
}

impl Outcome {
    /// The stable text form stored in the `outcome` column and hashed.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ok" => Ok(Outcome::Ok),
            "denied" => Ok(Outcome::Denied),
            "error" => Ok(Outcome::Error),
            _ => Err(ParseError::Outcome),
        }
    }
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A `kind`, `outcome` or checkpoint text is not one we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Unknown `kind` text.
    #[error("unknown audit event kind")]
    Kind,
    /// Unknown `outcome` text.
    #[error("unknown audit outcome")]
    Outcome,
    /// Not a `seq:hash` checkpoint.
    #[error("not an audit checkpoint (expected <seq>:<64 lowercase hex digits>)")]
    Checkpoint,
}
