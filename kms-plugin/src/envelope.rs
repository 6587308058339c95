//! The plugin's ciphertext format, key ids and annotations: everything the kube-apiserver
//! stores in etcd for us, in clear, and hands back on Decrypt.
//!
//! Ciphertext (format 1): `0x01 ‖ IV (12 bytes) ‖ AES-256-GCM ciphertext ‖ tag (16 bytes)`,
//! encrypted inside the HSM with AAD = the key_id. A 32-byte DEK seed gives 61 bytes.

use std::collections::HashMap;

use keyhaven_hsm::{KekId, GCM_IV_LEN, GCM_TAG_LEN};

/// The format-version byte that opens every ciphertext we produce.
pub const FORMAT_V1: u8 = 1;
/// Annotation key (a fully qualified domain name, as the apiserver requires).
pub const VERSION_ANNOTATION: &str = "version.encryption.keyhaven.dev";
/// Upper bound the apiserver puts on Encrypt's ciphertext.
pub const MAX_CIPHERTEXT_LEN: usize = 1024;
/// Largest plaintext whose ciphertext still fits in [`MAX_CIPHERTEXT_LEN`].
pub const MAX_PLAINTEXT_LEN: usize = MAX_CIPHERTEXT_LEN - 1 - GCM_IV_LEN - GCM_TAG_LEN;
/// Prefix of our key ids.
pub const KEY_ID_PREFIX: &str = "keyhaven-kek-v1-";

/// The public key_id of a KEK: our prefix and the hex of its random 16-byte `CKA_ID`. It is
/// stable while the KEK exists and, since `CKA_ID`s are random, never names another key.
pub fn key_id(kek: &KekId) -> String {
    format!("{KEY_ID_PREFIX}{kek}")
}

/// The KEK a key_id names, if it is one of ours. Only the form [`key_id`] writes (lowercase
/// hex) is ours: `hex` also reads uppercase, which would give one KEK several key_ids.
pub fn parse_key_id(key_id: &str) -> Option<KekId> {
    let hex = key_id.strip_prefix(KEY_ID_PREFIX)?;
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    KekId::from_hex(hex)
}

/// The annotations Encrypt returns (and Decrypt expects back unchanged).
pub fn annotations() -> HashMap<String, Vec<u8>> {
    HashMap::from([(VERSION_ANNOTATION.to_owned(), vec![b'0' + FORMAT_V1])])
}

/// Why a Decrypt request's envelope is malformed. Messages are safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The annotation map is not exactly the one Encrypt returned.
    #[error("annotations missing or altered: expected exactly {{{VERSION_ANNOTATION}: \"1\"}}")]
    Annotations,
    /// Too short, too long, or an unknown format byte.
    #[error("ciphertext malformed: {0}")]
    Ciphertext(&'static str),
}

/// Checks the annotations are exactly ours.
pub fn check_annotations(a: &HashMap<String, Vec<u8>>) -> Result<(), EnvelopeError> {
    if a.len() == 1 && a.get(VERSION_ANNOTATION).map(Vec::as_slice) == Some(&[b'1'][..]) {
        Ok(())
    } else {
        Err(EnvelopeError::Annotations)
    }
}

/// Encodes format 1.
pub fn encode(iv: &[u8; GCM_IV_LEN], ciphertext_and_tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + GCM_IV_LEN + ciphertext_and_tag.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(iv);
    out.extend_from_slice(ciphertext_and_tag);
    out
}

/// Splits a format-1 ciphertext into IV and ciphertext‖tag.
pub fn decode(ct: &[u8]) -> Result<(&[u8], &[u8]), EnvelopeError> {
    if ct.len() > MAX_CIPHERTEXT_LEN {
        return Err(EnvelopeError::Ciphertext("longer than 1024 bytes"));
    }
    let (&format, rest) = ct.split_first().ok_or(EnvelopeError::Ciphertext("empty"))?;
    if format != FORMAT_V1 {
        return Err(EnvelopeError::Ciphertext("unknown format version"));
    }
    if rest.len() < GCM_IV_LEN + GCM_TAG_LEN + 1 {
        return Err(EnvelopeError::Ciphertext("too short"));
    }
    Ok(rest.split_at(GCM_IV_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trip_and_foreign_ids() {
        let k = KekId([0xab; 16]);
        let id = key_id(&k);
        assert!(id.len() <= 1024);
        assert_eq!(parse_key_id(&id), Some(k));
        assert_eq!(parse_key_id("abab"), None);
        assert_eq!(parse_key_id(""), None);
        assert_eq!(parse_key_id(&format!("{KEY_ID_PREFIX}zz")), None);
        assert_eq!(
            parse_key_id(&id.to_uppercase().replace("KEYHAVEN-KEK-V1-", KEY_ID_PREFIX)),
            None
        );
    }

    #[test]
    fn envelope_round_trip_and_limits() {
        let iv = [1u8; GCM_IV_LEN];
        let body = [2u8; 48];
        let ct = encode(&iv, &body);
        assert_eq!(ct.len(), 61);
        let (i, b) = decode(&ct).unwrap();
        assert_eq!((i, b), (&iv[..], &body[..]));
        assert!(decode(&[]).is_err());
        assert!(decode(&[2; 61]).is_err());
        assert!(decode(&ct[..1 + GCM_IV_LEN + GCM_TAG_LEN]).is_err());
        assert!(decode(&vec![1; 1025]).is_err());
        assert_eq!(
            1 + GCM_IV_LEN + MAX_PLAINTEXT_LEN + GCM_TAG_LEN,
            MAX_CIPHERTEXT_LEN
        );
    }

    #[test]
    fn annotations_must_be_exactly_ours() {
        assert!(check_annotations(&annotations()).is_ok());
        assert!(check_annotations(&HashMap::new()).is_err());
        let mut a = annotations();
        a.insert(VERSION_ANNOTATION.into(), b"2".to_vec());
        assert!(check_annotations(&a).is_err());
        let mut a = annotations();
        a.insert("extra.example.com".into(), vec![]);
        assert!(check_annotations(&a).is_err());
    }
}
