//! Bodies of the fuzz targets over what a Decrypt request carries (`fuzz/` runs them under
//! libFuzzer; `hsm-tests/tests/fuzz_corpus.rs` replays the committed corpora through them on
//! stable). Arbitrary bytes in, never a panic; a broken invariant panics so the fuzzer reports
//! it.

use prost::Message as _;

use crate::api::DecryptRequest;
use crate::envelope;
use crate::plugin::check_decrypt_request;

/// A wire-format `DecryptRequest` through the plugin's checks before the HSM: what passes
/// has a key_id of 1 to 1024 bytes, exactly our annotations, and a ciphertext of the format's
/// size that re-encodes to itself; the key_id parser agrees with the key_id printer.
pub fn decrypt_request(data: &[u8]) {
    let Ok(req) = DecryptRequest::decode(data) else {
        return;
    };
    if let Some(kek) = envelope::parse_key_id(&req.key_id) {
        assert_eq!(envelope::key_id(&kek), req.key_id, "key_id round trip");
    }
    let Ok((iv, body)) = check_decrypt_request(&req) else {
        return;
    };
    assert!(!req.key_id.is_empty() && req.key_id.len() <= 1024);
    assert_eq!(req.annotations, envelope::annotations());
    assert!(req.ciphertext.len() <= envelope::MAX_CIPHERTEXT_LEN);
    assert_eq!(iv.len(), keyhaven_hsm::GCM_IV_LEN);
    assert!(body.len() > keyhaven_hsm::GCM_TAG_LEN);
    let iv: &[u8; keyhaven_hsm::GCM_IV_LEN] = match iv.try_into() {
        Ok(iv) => iv,
        Err(_) => panic!("IV of {} bytes", iv.len()),
    };
    assert_eq!(
        envelope::encode(iv, body),
        req.ciphertext,
        "envelope round trip"
    );
}
