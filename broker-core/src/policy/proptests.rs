//! Property tests of the path and name matchers against a small reference implementation of
//! the documented semantics: `/`-separated segments, `**` as a whole segment matching zero or
//! more segments, `*` matching any run of characters within one segment.

use proptest::prelude::*;

use super::*;

/// Does `pattern` (one segment, `*` wildcards) match `name` (one segment)?
fn segment_matches(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| segment_matches(rest, &name[i..])),
        Some((c, rest)) => name.first() == Some(c) && segment_matches(rest, &name[1..]),
    }
}

/// Does a path pattern match a concrete path, segment by segment?
fn path_matches(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| path_matches(rest, &path[i..])),
        Some((seg, rest)) => match path.split_first() {
            Some((p, prest)) => {
                segment_matches(seg.as_bytes(), p.as_bytes()) && path_matches(rest, prest)
            }
            None => false,
        },
    }
}

fn pattern_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("**".to_string()),
        4 => "[ab*.]{1,4}".prop_filter("`**` only as a whole segment", |s| !s.contains("**")),
    ]
}

fn path_pattern() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(pattern_segment(), 1..5).prop_filter("no `**/**`", |v| {
        !v.windows(2).any(|w| w[0] == "**" && w[1] == "**")
            && !v.iter().any(|s| s == "." || s == "..")
    })
}

fn path() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[ab.]{1,4}", 1..6).prop_filter("no dot segments", |v| {
        !v.iter().any(|s| s == "." || s == "..")
    })
}

fn one_policy(namespace: &str, paths: Vec<String>) -> PolicySet {
    let p = Policy {
        name: "p".into(),
        subjects: vec![SubjectPattern::new(namespace, "*")],
        paths,
        capabilities: vec![Capability::Read],
        ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(600),
    };
    match PolicySet::new(vec![p], DEFAULT_MAX_TTL_CAP) {
        Ok(s) => s,
        Err(e) => panic!("a generated policy was refused: {e}"),
    }
}

fn who(namespace: &str) -> Identity {
    Identity {
        namespace: namespace.into(),
        service_account: "sa".into(),
        pod_name: None,
        pod_uid: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn path_glob_agrees_with_the_reference(pattern in path_pattern(), path in path()) {
        let set = one_policy("ns", vec![pattern.join("/")]);
        let pat: Vec<&str> = pattern.iter().map(String::as_str).collect();
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        let allowed = set.evaluate(&who("ns"), &path.join("/"), Capability::Read).is_allowed();
        prop_assert_eq!(allowed, path_matches(&pat, &p), "{} vs {}", pattern.join("/"), path.join("/"));
    }

    #[test]
    fn namespace_glob_agrees_with_the_reference(
        pattern in "[ab*-]{1,6}",
        namespace in "[ab-]{1,6}",
    ) {
        let set = one_policy(&pattern, vec!["**".into()]);
        let allowed = set.evaluate(&who(&namespace), "x", Capability::Read).is_allowed();
        prop_assert_eq!(allowed, segment_matches(pattern.as_bytes(), namespace.as_bytes()));
    }
}

#[test]
fn the_reference_itself() {
    assert!(path_matches(&["a", "**"], &["a"]));
    assert!(path_matches(&["a", "**"], &["a", "b", "c"]));
    assert!(!path_matches(&["a", "*"], &["a"]));
    assert!(path_matches(&["**", "b"], &["b"]));
    assert!(!path_matches(&["a*"], &["b"]));
    assert!(segment_matches(b"a*b*", b"aXXbY"));
    assert!(!segment_matches(b"a*b", b"ab."));
}
