//! KEK identity: a random 16-byte `CKA_ID` set at generation (so a re-created label never
//! yields a reused id) and a label carrying the creation time, which orders KEKs.

use std::time::SystemTime;

/// Length of a KEK's `CKA_ID`.
pub const KEK_ID_LEN: usize = 16;

/// A KEK's `CKA_ID`: 16 random bytes, public, shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KekId(pub [u8; KEK_ID_LEN]);

impl KekId {
    /// Parses the 32-hex-digit form.
    pub fn from_hex(s: &str) -> Option<KekId> {
        let bytes = hex::decode(s).ok()?;
        Some(KekId(bytes.try_into().ok()?))
    }

    /// The raw id bytes.
    pub fn as_bytes(&self) -> &[u8; KEK_ID_LEN] {
        &self.0
    }
}

impl std::fmt::Display for KekId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for KekId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KekId({self})")
    }
}

/// What we know about a KEK on the token. No key material: the key never leaves the HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekInfo {
    /// `CKA_LABEL`: the configured prefix, then the UTC creation time and a random suffix.
    pub label: String,
    /// `CKA_ID`.
    pub id: KekId,
    /// Creation time parsed from the label; `None` if the label does not carry one.
    pub created: Option<SystemTime>,
    /// `CKA_SENSITIVE` as the token reports it.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE` as the token reports it.
    pub extractable: bool,
}

/// Builds a new KEK label: `<prefix><rfc3339 millis UTC>-<4 hex>`.
pub(crate) fn new_label(prefix: &str, now: SystemTime, suffix: u16) -> String {
    format!(
        "{prefix}{}-{suffix:04x}",
        humantime::format_rfc3339_millis(now)
    )
}

/// Parses the creation time back out of a label made by [`new_label`].
pub(crate) fn created_from_label(prefix: &str, label: &str) -> Option<SystemTime> {
    let rest = label.strip_prefix(prefix)?;
    let (ts, _suffix) = rest.rsplit_once('-')?;
    humantime::parse_rfc3339(ts).ok()
}

/// Sorts KEKs oldest first (creation time, then label, then id).
pub(crate) fn sort_by_creation(keks: &mut [KekInfo]) {
    keks.sort_by(|a, b| (a.created, &a.label, a.id).cmp(&(b.created, &b.label, b.id)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn label_round_trips_creation_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let l = new_label("kh-", t, 0xab);
        assert!(l.starts_with("kh-20"), "{l}");
        assert!(l.ends_with("-00ab"));
        assert_eq!(created_from_label("kh-", &l), Some(t));
        assert_eq!(created_from_label("other-", &l), None);
    }

    #[test]
    fn kek_id_hex_round_trip() {
        let id = KekId([7; 16]);
        assert_eq!(KekId::from_hex(&id.to_string()), Some(id));
        assert_eq!(KekId::from_hex("abc"), None);
        assert_eq!(KekId::from_hex(&"0".repeat(34)), None);
    }
}
