//! Every committed fuzz corpus file (`fuzz/corpus/<target>/`) through the same target body
//! `cargo fuzz` runs, on stable and without sanitizers: none may panic. A corpus directory
//! without a target here, or a target without a corpus, fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("kms_decrypt", kms_plugin::fuzz_targets::decrypt_request),
    ("jwks", keyhaven_broker::fuzz_targets::jwks),
    ("jwt", keyhaven_broker::fuzz_targets::jwt),
    (
        "broker_request",
        keyhaven_broker::fuzz_targets::broker_request,
    ),
    (
        "policy_document",
        keyhaven_broker_core::fuzz_targets::policy_document,
    ),
    ("audit_log", keyhaven_broker_core::fuzz_targets::audit_log),
    ("agent_config", broker_agent::fuzz_targets::agent_config),
    ("agent_render", broker_agent::fuzz_targets::agent_render),
];

#[test]
fn every_corpus_file_replays_without_a_panic() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut dirs: Vec<String> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(dirs, names, "corpus directories and targets differ");

    let mut failed = Vec::new();
    for (name, target) in TARGETS {
        let mut files = 0;
        for entry in std::fs::read_dir(corpus.join(name)).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            files += 1;
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failed.push(path.display().to_string());
            }
        }
        assert!(files > 0, "{name}: empty corpus");
    }
    assert!(failed.is_empty(), "panicked on: {failed:#?}");
}
