//! TEST-ONLY KEYS. Generated once with `openssl genpkey` for these unit tests; they protect
//! nothing and must never be trusted outside `cargo test`. Also the helpers that build tokens.

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// TEST-ONLY 2048-bit RSA private key (`openssl genpkey -algorithm RSA`), PKCS#8.
pub(crate) const RSA_PKCS8_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIIEugIBADANBgkqhkiG9w0BAQEFAASCBKQwggSgAgEAAoIBAQC32pR4QdTkc/AG
n7xDnuk+0Hea7Zdc1bLeoKvOmUbqTgWSPBxEjjMQOE60xuuqDqSFpIJEDYbjcAju
xitQJAdFk6zLbpXbi38ktiBhcXhigw3tgiOlBcsq27eilcktUkMiPZXv7uJp9hpb
NJyeZciA9uwftaHWZDU8VNVuVSpytA7fEDT16aO0uO8DYaQySWdV1tiS0aHIjnNQ
0Yugyj2tuAP8tGcwetLTNS6GteybNkbG/PaQj85/RTkMP13ODsjKTuJezitHu6pn
ekSKP0qkmopQibH3FVOj7z+WwLnuN4PpNXSN+bsBSf8cIFGAwIf6JmagoSdBkiZP
RY+lhyslAgMBAAECgf93GKC/ReXNbKI6UunMOU8z4YGZBU+HqOa1pbRQS096Irsj
1Mx68aJ3tKycw5Q6v5bTpj1m2AcI+F97oo4W2+qEp6THeFtFsezVWyVJT2KBw2Ns
92B1BcvAzOj9Pl+TfDZWIo7TXhZM4vSFIGT+4UWA78hawiM+k1Xo6bYC7X28eXi8
6VwUA/0RC2X22U4JMryQzBz8J+fK0cbgvekFwMq+pQuDTxKLv9cukCUNpoBmlbmr
vu1Ut1spRNuc6zIKIbnXfwubceMvpFTAA0krIE5hX+zBAat5yPpXbmYWxk4qF2ng
6Gq3MgERf5toTq44IhkvtWfmeLzQcOzFYJSnpmcCgYEA2zlGWcm/dhUoilTGr+f9
RZZ/zOQDU/0ylHtNzXZJAYpsJihZKrRqbHKOiJxH7j8uygZsybjoF1e4nZ4E69UB
4mX2yqQH6e5w4a64yMUf9Ls18aVweh1ulP5vp6Dm+DZJom7mWF8eUAqvniVs2mH/
++SIZmXRTVtQV6k67TDSNb8CgYEA1rJRjXzjUknWLBDDtGdduJ/mE/6p8Djffo/C
2QfGuz2jJ21o/3mCS7nSI85xxKX+i4mMbAQzpdkkHpJWA2dvi5xYyBF+vObBG/3z
FZrOVFubLz1X20Embi18ZHjMin74kP5Qtl1AtOl6NFdQyezeaqiRgj+h12Zd/zSg
WNKEgBsCgYAJ0wpFEdaDuzUC5gO1dGcUTEdT7k/73pf6sX/uGkPxTrvEBgDg+g7e
509d7esHUUuOgDU14RR9n0/FuIQt8XDRLZKeyDUWlbn3UzYywSrKc+1Z8/kTb+g5
wyFL2Nkg/IXWQrQN981K9v+hzbmQG9418qruM9fqaJI0K4BZituQzwKBgH/KujIu
kRxs6Ldn7yVVlXqMaqWiIsLjB1zM81y9fTP8Vz3jqOjQCZdLbuJzQlKbv2yNHfE5
ewiPvCkaT2pNSh7enBXSHA8ShwVDXkqQz5l0wWUX7VCLcfWIy47+PDl/pDKhvace
0KIeiufWxTa78BOqbJoLiCivPOnoCD12aPnbAoGAGWUb7GGo/lwysddF8R0bIjAw
UJO/pjIRVDg2mDQ4ycJzByvbSyt5BeHefwhK3ZJ7hIiMXKcTpqqc0m+aantdepnn
qdWtUYWjX7iQ6rvU6YNFLg/TsZ2p8t1AcFtGDpZxB0g05l7RCRCXzPsMSip/prGO
H1e5gGSrmYSUZwTt0Vs=
-----END PRIVATE KEY-----
";

/// TEST-ONLY public half of [`RSA_PKCS8_PEM`] (`openssl pkey -pubout`).
pub(crate) const RSA_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAt9qUeEHU5HPwBp+8Q57p
PtB3mu2XXNWy3qCrzplG6k4FkjwcRI4zEDhOtMbrqg6khaSCRA2G43AI7sYrUCQH
RZOsy26V24t/JLYgYXF4YoMN7YIjpQXLKtu3opXJLVJDIj2V7+7iafYaWzScnmXI
gPbsH7Wh1mQ1PFTVblUqcrQO3xA09emjtLjvA2GkMklnVdbYktGhyI5zUNGLoMo9
rbgD/LRnMHrS0zUuhrXsmzZGxvz2kI/Of0U5DD9dzg7Iyk7iXs4rR7uqZ3pEij9K
pJqKUImx9xVTo+8/lsC57jeD6TV0jfm7AUn/HCBRgMCH+iZmoKEnQZImT0WPpYcr
JQIDAQAB
-----END PUBLIC KEY-----
";

/// TEST-ONLY P-256 private key (`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`),
/// PKCS#8.
pub(crate) const EC_P256_PKCS8_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgcpPpfM/E1kfeTWR7
waqFicKzaTvCOpMHo4rp+4y3nFqhRANCAAQpZwixew6Fp9lK65zBX6b7aIWS9gyn
GKh8MLetBWCWc1Z/0aUth1AuDfLeWefUn6/XNC6oR+RofpA7pI87Hc7b
-----END PRIVATE KEY-----
";

pub(crate) fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PKCS8_PEM.as_bytes()).unwrap()
}

pub(crate) fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_P256_PKCS8_PEM.as_bytes()).unwrap()
}

fn public_jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    serde_json::to_value(jwk).unwrap()
}

/// The JWK (as the apiserver publishes it: `use`, `alg`, `kid`) of the test RSA key.
pub(crate) fn rsa_jwk(kid: &str) -> Value {
    let mut jwk = public_jwk(&rsa_key(), Algorithm::RS256, kid);
    jwk["use"] = json!("sig");
    jwk
}

/// The JWK of the test P-256 key.
pub(crate) fn ec_jwk(kid: &str) -> Value {
    let mut jwk = public_jwk(&ec_key(), Algorithm::ES256, kid);
    jwk["use"] = json!("sig");
    jwk
}

/// A JWKS document holding these JWKs.
pub(crate) fn jwks_json(keys: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "keys": keys })).unwrap()
}

/// Signs `claims` with `key` under header `{alg, kid}`.
pub(crate) fn sign(alg: Algorithm, kid: &str, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.typ = None;
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims shaped like a projected token for `team-a/app` bound to pod `app-0`, issued now,
/// valid 10 minutes.
pub(crate) fn claims(issuer: &str) -> Value {
    let now = now();
    json!({
        "aud": ["keyhaven"],
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "iss": issuer,
        "jti": "8c0a6c7a-4b1e-4f5e-9d3c-2f3b7f1f0a11",
        "kubernetes.io": {
            "namespace": "team-a",
            "node": {"name": "node-1", "uid": "0f5b7b1e-5d1c-4c0e-8e0e-3f2b7a9c1d22"},
            "pod": {"name": "app-0", "uid": "5a3c2f0e-1b7d-4e6a-9c8b-7d6e5f4a3b21"},
            "serviceaccount": {"name": "app", "uid": "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c63"},
        },
        "sub": "system:serviceaccount:team-a:app",
    })
}
