//! What the kube-apiserver keeps in etcd, read without any key: which encryption format each
//! value is stored under and, for KMS v2, the provider name and key_id.
//!
//! A KMS v2 value is `k8s:enc:kms:v2:<provider name>:` followed by a protobuf
//! `EncryptedObject` (`proto/kms/v2/storage.proto`), decoded with prost. Anything else is
//! named by its prefix; nothing here can fail on garbage, it is only counted as such.

use prost::Message;

use keyhaven_proto::kms::v2::EncryptedObject;

/// Prefix of every KMS v2 value.
pub const KMS_V2_PREFIX: &[u8] = b"k8s:enc:kms:v2:";

/// How one etcd value is stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stored {
    /// KMS v2: readable only with `key_id` through the provider `provider`.
    KmsV2 {
        /// Provider name in the EncryptionConfiguration.
        provider: String,
        /// The key_id the plugin returned from Encrypt.
        key_id: String,
    },
    /// Another format: `kms-v1`, `aescbc`, `aesgcm`, `secretbox`, `identity-protobuf`,
    /// `identity-json`, or `other-encrypted` (a `k8s:enc:` prefix we do not know).
    Other(&'static str),
    /// Starts like a KMS v2 value but does not decode: truncated or corrupt.
    Unparseable(&'static str),
    /// Not something the apiserver writes at all.
    Unknown,
}

impl Stored {
    /// A short name of the format (`kms-v2`, `aescbc`, ...), for tables and JSON.
    pub fn format(&self) -> &'static str {
        match self {
            Stored::KmsV2 { .. } => "kms-v2",
            Stored::Other(f) => f,
            Stored::Unparseable(_) => "kms-v2-unparseable",
            Stored::Unknown => "unknown",
        }
    }
}

/// Classifies one etcd value.
pub fn classify(value: &[u8]) -> Stored {
    if let Some(rest) = value.strip_prefix(KMS_V2_PREFIX) {
        return kms_v2(rest);
    }
    const OTHERS: [(&[u8], &str); 4] = [
        (b"k8s:enc:kms:v1:", "kms-v1"),
        (b"k8s:enc:aescbc:v1:", "aescbc"),
        (b"k8s:enc:aesgcm:v1:", "aesgcm"),
        (b"k8s:enc:secretbox:v1:", "secretbox"),
    ];
    for (prefix, name) in OTHERS {
        if value.starts_with(prefix) {
            return Stored::Other(name);
        }
    }
    if value.starts_with(b"k8s:enc:") {
        return Stored::Other("other-encrypted");
    }
    // The identity provider stores the object as the apiserver serialised it: protobuf
    // behind the `k8s\0` magic, or JSON (custom resources, and some built-ins).
    if value.starts_with(b"k8s\0") {
        return Stored::Other("identity-protobuf");
    }
    if value.first() == Some(&b'{') {
        return Stored::Other("identity-json");
    }
    Stored::Unknown
}

fn kms_v2(rest: &[u8]) -> Stored {
    let Some(colon) = rest.iter().position(|&b| b == b':') else {
        return Stored::Unparseable("no provider name");
    };
    let Ok(provider) = std::str::from_utf8(&rest[..colon]) else {
        return Stored::Unparseable("provider name is not UTF-8");
    };
    if provider.is_empty() {
        return Stored::Unparseable("empty provider name");
    }
    match EncryptedObject::decode(&rest[colon + 1..]) {
        Ok(o) if o.key_id.is_empty() => Stored::Unparseable("no keyID"),
        Ok(o) if o.encrypted_data.is_empty() || o.encrypted_dek_source.is_empty() => {
            Stored::Unparseable("no encrypted data or DEK source")
        }
        Ok(o) => Stored::KmsV2 {
            provider: provider.to_owned(),
            key_id: o.key_id,
        },
        Err(_) => Stored::Unparseable("EncryptedObject does not decode"),
    }
}

/// The resource an etcd key belongs to: the segment after the prefix (`secrets`,
/// `configmaps`, ...), or `<resource>.<group>` for keys stored under their API group
/// (`/registry/example.com/widgets/...` → `widgets.example.com`), which is also how
/// `keys migrate --resource` names it. `None` for a key outside the prefix.
pub fn resource_of<'a>(key: &'a [u8], prefix: &str) -> Option<std::borrow::Cow<'a, str>> {
    let rest = key.strip_prefix(prefix.trim_end_matches('/').as_bytes())?;
    let rest = std::str::from_utf8(rest.strip_prefix(b"/")?).ok()?;
    let mut parts = rest.split('/');
    let first = parts.next().filter(|s| !s.is_empty())?;
    if first.contains('.') {
        if let Some(second) = parts.next().filter(|s| !s.is_empty()) {
            return Some(format!("{second}.{first}").into());
        }
    }
    Some(first.into())
}

/// The etcd key of one object: `<prefix>/<resource>[/<namespace>]/<name>`, with a grouped
/// resource (`widgets.example.com`) stored under `<group>/<resource>`. Built-ins with
/// unusual storage paths are simply not found, and then re-written.
pub fn object_key(prefix: &str, resource: &str, namespace: Option<&str>, name: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let path = match resource.split_once('.') {
        Some((plural, group)) => format!("{group}/{plural}"),
        None => resource.to_owned(),
    };
    match namespace {
        Some(ns) => format!("{prefix}/{path}/{ns}/{name}"),
        None => format!("{prefix}/{path}/{name}"),
    }
}

/// Encodes a KMS v2 value exactly as the apiserver writes it (tests, bench and the fixture).
pub fn encode_kms_v2(provider: &str, object: &EncryptedObject) -> Vec<u8> {
    let mut v = Vec::with_capacity(KMS_V2_PREFIX.len() + provider.len() + 1 + object.encoded_len());
    v.extend_from_slice(KMS_V2_PREFIX);
    v.extend_from_slice(provider.as_bytes());
    v.push(b':');
    object.encode(&mut v).unwrap_or_default();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key_id: &str) -> EncryptedObject {
        EncryptedObject {
            encrypted_data: vec![1; 40],
            key_id: key_id.into(),
            encrypted_dek_source: vec![2; 61],
            annotations: [("version.encryption.keyhaven.dev".into(), b"1".to_vec())].into(),
            encrypted_dek_source_type: 1,
        }
    }

    #[test]
    fn kms_v2_values_name_their_provider_and_key() {
        let v = encode_kms_v2("keyhaven", &obj("keyhaven-kek-v1-ab"));
        assert_eq!(
            classify(&v),
            Stored::KmsV2 {
                provider: "keyhaven".into(),
                key_id: "keyhaven-kek-v1-ab".into()
            }
        );
        // Truncated anywhere: never a panic, and never another key_id. (Protobuf cannot tell a
        // cut at a field boundary after the key and the DEK source from a shorter message.)
        for cut in KMS_V2_PREFIX.len()..v.len() {
            match classify(&v[..cut]) {
                Stored::Unparseable(_) => {}
                Stored::KmsV2 { key_id, .. } => assert_eq!(key_id, "keyhaven-kek-v1-ab"),
                other => panic!("cut at {cut} gave {other:?}"),
            }
        }
        // Cut before the key or the DEK source is complete: unparseable.
        assert!(matches!(
            classify(&v[..KMS_V2_PREFIX.len() + "keyhaven:".len() + 44]),
            Stored::Unparseable(_)
        ));
        assert!(matches!(
            classify(b"k8s:enc:kms:v2:keyhaven:\xff\xff\xff"),
            Stored::Unparseable(_)
        ));
        assert!(matches!(
            classify(&encode_kms_v2("keyhaven", &obj(""))),
            Stored::Unparseable("no keyID")
        ));
    }

    #[test]
    fn other_formats_by_prefix() {
        let cases: [(&[u8], &str); 8] = [
            (b"k8s:enc:kms:v1:old:abc", "kms-v1"),
            (b"k8s:enc:aescbc:v1:key1:xyz", "aescbc"),
            (b"k8s:enc:aesgcm:v1:key1:xyz", "aesgcm"),
            (b"k8s:enc:secretbox:v1:key1:xyz", "secretbox"),
            (b"k8s:enc:future:v9:x", "other-encrypted"),
            (b"k8s\0\x0a\x02v1", "identity-protobuf"),
            (b"{\"kind\":\"Widget\"}", "identity-json"),
            (b"\x00garbage", "unknown"),
        ];
        for (v, want) in cases {
            assert_eq!(classify(v).format(), want, "{v:?}");
        }
        assert_eq!(classify(b"").format(), "unknown");
    }

    #[test]
    fn resources_from_keys_and_back() {
        let r = |k: &str| resource_of(k.as_bytes(), "/registry").map(|c| c.into_owned());
        assert_eq!(r("/registry/secrets/ns/a").as_deref(), Some("secrets"));
        assert_eq!(
            r("/registry/example.com/widgets/ns/w").as_deref(),
            Some("widgets.example.com")
        );
        assert_eq!(r("/registryx/secrets/a"), None);
        assert_eq!(r("/other/secrets/a"), None);
        assert_eq!(
            resource_of(b"/registry/secrets/ns/a", "/registry/").as_deref(),
            Some("secrets")
        );
        assert_eq!(
            object_key("/registry", "secrets", Some("ns"), "a"),
            "/registry/secrets/ns/a"
        );
        assert_eq!(
            object_key("/registry/", "widgets.example.com", None, "w"),
            "/registry/example.com/widgets/w"
        );
    }
}
