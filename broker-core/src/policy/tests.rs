//! Tests of `policy`.

use super::*;

const CAP: Duration = DEFAULT_MAX_TTL_CAP;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity {
        namespace: ns.into(),
        service_account: sa.into(),
        pod_name: Some("pod-1".into()),
        pod_uid: None,
    }
}

fn policy(name: &str, subjects: &[(&str, &str)], paths: &[&str]) -> Policy {
    Policy {
        name: name.into(),
        subjects: subjects
            .iter()
            .map(|(ns, sa)| SubjectPattern::new(*ns, *sa))
            .collect(),
        paths: paths.iter().map(|p| p.to_string()).collect(),
        capabilities: vec![Capability::Read],
        ttl: secs(300),
        max_ttl: secs(3600),
    }
}

fn set(policies: Vec<Policy>) -> PolicySet {
    match PolicySet::new(policies, CAP) {
        Ok(s) => s,
        Err(e) => panic!("policy set refused: {e}"),
    }
}

fn err(policies: Vec<Policy>) -> PolicyError {
    match PolicySet::new(policies, CAP) {
        Ok(_) => panic!("policy set accepted"),
        Err(e) => e,
    }
}

fn yaml_err(yaml: &str) -> PolicyError {
    match PolicySet::from_yaml(yaml, CAP) {
        Ok(_) => panic!("policy document accepted"),
        Err(e) => e,
    }
}

fn reads(s: &PolicySet, ns: &str, sa: &str, path: &str) -> bool {
    s.evaluate(&id(ns, sa), path, Capability::Read).is_allowed()
}

const EXAMPLE: &str = r#"
policies:
- name: payments-db
  subjects: [{namespace: payments, serviceaccount: api}, {namespace: "team-*", serviceaccount: "*"}]
  paths: ["payments/db", "payments/app/*", "shared/**"]
  capabilities: [read]
  ttl: 5m        # humantime strings
  max_ttl: 1h
"#;

// --- decisions ----------------------------------------------------------------------------

#[test]
fn empty_set_denies_everything() {
    for s in [set(vec![]), PolicySet::default()] {
        for cap in Capability::ALL {
            assert_eq!(
                s.evaluate(&id("payments", "api"), "payments/db", cap),
                Decision::Deny
            );
            assert_eq!(
                s.evaluate_global(&id("payments", "api"), cap),
                Decision::Deny
            );
        }
    }
    let s = match PolicySet::from_yaml("policies: []", CAP) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    assert!(s.policies().is_empty());
    assert!(!reads(&s, "payments", "api", "payments/db"));
}

#[test]
fn exact_subject_and_path_allowed_with_policy_ttls() {
    let s = set(vec![policy("p", &[("payments", "api")], &["payments/db"])]);
    assert_eq!(
        s.evaluate(&id("payments", "api"), "payments/db", Capability::Read),
        Decision::Allow {
            ttl: secs(300),
            max_ttl: secs(3600),
            policies: vec!["p".into()],
        }
    );
    // Pod fields play no part.
    let mut who = id("payments", "api");
    who.pod_name = None;
    assert!(s
        .evaluate(&who, "payments/db", Capability::Read)
        .is_allowed());
}

#[test]
fn other_service_account_namespace_or_path_denied() {
    let s = set(vec![policy("p", &[("payments", "api")], &["payments/db"])]);
    assert!(!reads(&s, "payments", "worker", "payments/db"));
    assert!(!reads(&s, "billing", "api", "payments/db"));
    assert!(!reads(&s, "payments", "api", "payments/cache"));
    assert!(!reads(&s, "billing", "worker", "billing/db"));
}

#[test]
fn path_matching_is_anchored() {
    let s = set(vec![policy("p", &[("payments", "api")], &["payments/db"])]);
    assert!(reads(&s, "payments", "api", "payments/db"));
    for path in [
        "payments/db2",
        "payments/db/x",
        "payments",
        "xpayments/db",
        "a/payments/db",
    ] {
        assert!(!reads(&s, "payments", "api", path), "{path}");
    }
}

#[test]
fn subject_matching_is_anchored() {
    let s = set(vec![policy("p", &[("payments", "api")], &["payments/db"])]);
    for (ns, sa) in [
        ("payments2", "api"),
        ("xpayments", "api"),
        ("payments", "api2"),
        ("payments", "xapi"),
    ] {
        assert!(!reads(&s, ns, sa, "payments/db"), "{ns}/{sa}");
    }
}

#[test]
fn matching_is_case_sensitive() {
    let s = set(vec![
        policy("p", &[("payments", "api")], &["payments/db"]),
        policy("q", &[("team-*", "*")], &["shared/**"]),
    ]);
    assert!(!reads(&s, "payments", "api", "Payments/db"));
    assert!(!reads(&s, "payments", "api", "payments/DB"));
    assert!(!reads(&s, "Payments", "api", "payments/db"));
    assert!(!reads(&s, "payments", "API", "payments/db"));
    assert!(!reads(&s, "TEAM-a", "api", "shared/x"));
    assert!(!reads(&s, "team-a", "api", "Shared/x"));
}

#[test]
fn glob_subjects() {
    let s = set(vec![policy("p", &[("team-*", "*")], &["shared/db"])]);
    assert!(reads(&s, "team-a", "api", "shared/db"));
    assert!(reads(&s, "team-blue", "anything.at-all", "shared/db"));
    for ns in ["teams-a", "xteam-a", "team", "payments"] {
        assert!(!reads(&s, ns, "api", "shared/db"), "{ns}");
    }

    let s = set(vec![policy("p", &[("*", "*-reader")], &["shared/db"])]);
    assert!(reads(&s, "anything", "db-reader", "shared/db"));
    assert!(!reads(&s, "anything", "db-reader2", "shared/db"));
    assert!(!reads(&s, "anything", "db-writer", "shared/db"));
}

#[test]
fn any_subject_of_a_policy_suffices() {
    let s = set(vec![policy(
        "p",
        &[("payments", "api"), ("billing", "*")],
        &["shared/db"],
    )]);
    assert!(reads(&s, "payments", "api", "shared/db"));
    assert!(reads(&s, "billing", "worker", "shared/db"));
    // Namespace of one subject with service account of another does not combine.
    assert!(!reads(&s, "payments", "worker", "shared/db"));
}

#[test]
fn wildcards_do_not_match_across_slashes_in_identities() {
    let s = set(vec![policy("p", &[("team-*", "*")], &["shared/db"])]);
    assert!(!reads(&s, "team-a/x", "api", "shared/db"));
}

#[test]
fn empty_identity_fields_are_denied_even_by_wildcards() {
    let s = set(vec![policy("p", &[("*", "*")], &["**"])]);
    assert!(reads(&s, "a", "b", "x"));
    assert!(!reads(&s, "", "b", "x"));
    assert!(!reads(&s, "a", "", "x"));
    assert!(!s
        .evaluate_global(&id("", ""), Capability::Read)
        .is_allowed());
}

#[test]
fn single_star_stays_within_one_segment() {
    let s = set(vec![policy(
        "p",
        &[("payments", "api")],
        &["payments/app/*", "cfg/*-db/url"],
    )]);
    assert!(reads(&s, "payments", "api", "payments/app/config"));
    assert!(reads(&s, "payments", "api", "payments/app/x.y"));
    for path in [
        "payments/app",
        "payments/app/config/x",
        "payments/apps/config",
        "payments/x/config",
    ] {
        assert!(!reads(&s, "payments", "api", path), "{path}");
    }
    assert!(reads(&s, "payments", "api", "cfg/orders-db/url"));
    assert!(!reads(&s, "payments", "api", "cfg/orders/x-db/url"));
    assert!(!reads(&s, "payments", "api", "cfg/orders-db2/url"));
}

#[test]
fn double_star_matches_any_number_of_segments() {
    let s = set(vec![policy("trailing", &[("a", "b")], &["shared/**"])]);
    for path in ["shared", "shared/x", "shared/x/y/z"] {
        assert!(reads(&s, "a", "b", path), "{path}");
    }
    for path in ["sharedx", "shared2/x", "x/shared", "x/shared/y"] {
        assert!(!reads(&s, "a", "b", path), "{path}");
    }

    let s = set(vec![policy("middle", &[("a", "b")], &["a/**/z"])]);
    for path in ["a/z", "a/b/z", "a/b/c/z"] {
        assert!(reads(&s, "a", "b", path), "{path}");
    }
    for path in ["a/z/b", "a/zz", "a", "z", "b/a/z"] {
        assert!(!reads(&s, "a", "b", path), "{path}");
    }

    let s = set(vec![policy("leading", &[("a", "b")], &["**/db"])]);
    for path in ["db", "x/db", "x/y/db"] {
        assert!(reads(&s, "a", "b", path), "{path}");
    }
    for path in ["db/x", "xdb", "x/db2"] {
        assert!(!reads(&s, "a", "b", path), "{path}");
    }

    let s = set(vec![policy("all", &[("a", "b")], &["**"])]);
    for path in ["x", "x/y", "x/y/z/w"] {
        assert!(reads(&s, "a", "b", path), "{path}");
    }
}

#[test]
fn invalid_paths_are_denied_even_by_double_star() {
    let s = set(vec![policy("all", &[("*", "*")], &["**"])]);
    let long = "a/".repeat(MAX_PATH_LEN / 2) + "a";
    for path in [
        "",
        "/a",
        "a/",
        "a//b",
        "a/../b",
        "..",
        "a/./b",
        "a/*",
        "a b",
        "a\\b",
        "a/\u{e9}",
        "a\nb",
        long.as_str(),
    ] {
        assert!(!reads(&s, "x", "y", path), "{path:?}");
    }
}

#[test]
fn capability_mismatch_denied() {
    let mut p = policy("p", &[("payments", "api")], &["payments/**"]);
    p.capabilities = vec![Capability::Write, Capability::List];
    let s = set(vec![p]);
    let who = id("payments", "api");
    assert!(s
        .evaluate(&who, "payments/db", Capability::Write)
        .is_allowed());
    assert!(s
        .evaluate(&who, "payments/db", Capability::List)
        .is_allowed());
    for cap in [
        Capability::Read,
        Capability::Delete,
        Capability::Destroy,
        Capability::Revoke,
        Capability::Policy,
        Capability::Audit,
    ] {
        assert_eq!(
            s.evaluate(&who, "payments/db", cap),
            Decision::Deny,
            "{cap}"
        );
    }
}

#[test]
fn several_policies_combine_to_the_most_generous() {
    let mut short = policy("short", &[("payments", "api")], &["payments/db"]);
    short.ttl = secs(60);
    short.max_ttl = secs(7200);
    let mut long = policy("long", &[("payments", "*")], &["payments/**"]);
    long.ttl = secs(600);
    long.max_ttl = secs(1800);
    let other = policy("other", &[("billing", "*")], &["payments/**"]);
    let mut writes = policy("writes", &[("payments", "api")], &["payments/db"]);
    writes.capabilities = vec![Capability::Write];
    writes.ttl = secs(3600);
    writes.max_ttl = secs(3600);
    let s = set(vec![short, other, long, writes]);

    assert_eq!(
        s.evaluate(&id("payments", "api"), "payments/db", Capability::Read),
        Decision::Allow {
            ttl: secs(600),
            max_ttl: secs(7200),
            policies: vec!["short".into(), "long".into()],
        }
    );
    assert_eq!(
        s.evaluate(&id("payments", "worker"), "payments/db", Capability::Read),
        Decision::Allow {
            ttl: secs(600),
            max_ttl: secs(1800),
            policies: vec!["long".into()],
        }
    );
}

#[test]
fn global_evaluation_needs_the_all_paths_pattern() {
    let mut admin = policy("admin", &[("ops", "admin")], &["**"]);
    admin.capabilities = vec![Capability::Audit, Capability::Policy];
    let mut scoped = policy("scoped", &[("ops", "auditor")], &["payments/**"]);
    scoped.capabilities = vec![Capability::Audit];
    let s = set(vec![admin, scoped]);

    assert!(s
        .evaluate_global(&id("ops", "admin"), Capability::Audit)
        .is_allowed());
    assert!(s
        .evaluate_global(&id("ops", "admin"), Capability::Policy)
        .is_allowed());
    assert!(!s
        .evaluate_global(&id("ops", "admin"), Capability::Revoke)
        .is_allowed());
    assert!(!s
        .evaluate_global(&id("ops", "auditor"), Capability::Audit)
        .is_allowed());
    assert!(!s
        .evaluate_global(&id("ops", "other"), Capability::Audit)
        .is_allowed());
    // The scoped policy still works per path.
    assert!(s
        .evaluate(&id("ops", "auditor"), "payments/db", Capability::Audit)
        .is_allowed());
}

#[test]
fn example_document_from_the_design() {
    let s = match PolicySet::from_yaml(EXAMPLE, CAP) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let p = &s.policies()[0];
    assert_eq!(p.name, "payments-db");
    assert_eq!(p.ttl, secs(300));
    assert_eq!(p.max_ttl, secs(3600));
    assert_eq!(p.capabilities, vec![Capability::Read]);
    assert_eq!(p.subjects[1], SubjectPattern::new("team-*", "*"));
    assert!(reads(&s, "payments", "api", "payments/db"));
    assert!(reads(&s, "payments", "api", "payments/app/config"));
    assert!(reads(&s, "team-x", "worker", "shared/certs/ca"));
    assert!(!reads(&s, "payments", "worker", "payments/db"));
    assert!(!reads(&s, "payments", "api", "payments/app/config/x"));
    assert!(!s
        .evaluate(&id("payments", "api"), "payments/db", Capability::Write)
        .is_allowed());
}

#[test]
fn clones_share_the_compiled_set() {
    let s = set(vec![policy("p", &[("a", "b")], &["x"])]);
    let t = s.clone();
    assert!(s.shares_state_with(&t));
    assert!(reads(&t, "a", "b", "x"));
    assert_eq!(t.max_ttl_cap(), CAP);
}

// --- validation ---------------------------------------------------------------------------

#[test]
fn missing_fields_are_refused_by_name() {
    let mut p = policy("", &[("a", "b")], &["x"]);
    assert!(matches!(
        err(vec![policy("first", &[("a", "b")], &["x"]), p.clone()]),
        PolicyError::Missing { ref policy, field: "name" } if policy == "policies[1]"
    ));
    p.name = "p".into();

    let mut q = p.clone();
    q.subjects.clear();
    assert!(
        matches!(err(vec![q]), PolicyError::Missing { ref policy, field: "subjects" } if policy == "p")
    );
    let mut q = p.clone();
    q.paths.clear();
    assert!(matches!(
        err(vec![q]),
        PolicyError::Missing { field: "paths", .. }
    ));
    let mut q = p.clone();
    q.capabilities.clear();
    assert!(matches!(
        err(vec![q]),
        PolicyError::Missing {
            field: "capabilities",
            ..
        }
    ));
}

#[test]
fn duplicate_names_are_refused() {
    let e = err(vec![
        policy("p", &[("a", "b")], &["x"]),
        policy("q", &[("a", "b")], &["y"]),
        policy("p", &[("c", "d")], &["z"]),
    ]);
    assert!(
        matches!(e, PolicyError::DuplicateName { ref policy } if policy == "p"),
        "{e}"
    );
    assert_eq!(e.policy(), Some("p"));
}

#[test]
fn bad_policy_names_are_refused() {
    for (name, problem) in [
        ("has space", Malformed::Char(' ')),
        ("line\nbreak", Malformed::Char('\n')),
        ("a/b", Malformed::Char('/')),
    ] {
        let e = err(vec![policy(name, &[("a", "b")], &["x"])]);
        assert!(
            matches!(e, PolicyError::Invalid { ref field, problem: p, .. } if field == "name" && p == problem),
            "{name:?}: {e}"
        );
    }
    let long = "n".repeat(MAX_NAME_LEN + 1);
    assert!(matches!(
        err(vec![policy(&long, &[("a", "b")], &["x"])]),
        PolicyError::Invalid {
            problem: Malformed::TooLong { .. },
            ..
        }
    ));
}

#[test]
fn ttl_rules() {
    let base = policy("p", &[("a", "b")], &["x"]);

    let mut p = base.clone();
    p.ttl = Duration::ZERO;
    assert!(matches!(
        err(vec![p]),
        PolicyError::BadTtl { field: "ttl", .. }
    ));

    let mut p = base.clone();
    p.ttl = Duration::from_millis(1500);
    assert!(matches!(
        err(vec![p]),
        PolicyError::BadTtl { field: "ttl", .. }
    ));

    let mut p = base.clone();
    p.max_ttl = Duration::from_millis(3_600_500);
    assert!(matches!(
        err(vec![p]),
        PolicyError::BadTtl {
            field: "max_ttl",
            ..
        }
    ));

    let mut p = base.clone();
    p.ttl = secs(7200);
    let e = err(vec![p]);
    assert!(
        matches!(e, PolicyError::TtlAboveMaxTtl { ref policy, ttl, max_ttl } if policy == "p" && ttl == secs(7200) && max_ttl == secs(3600)),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "policy `p`: `ttl` (2h) is longer than `max_ttl` (1h)"
    );

    let mut p = base.clone();
    p.ttl = secs(3600);
    assert!(
        PolicySet::new(vec![p], CAP).is_ok(),
        "ttl == max_ttl is fine"
    );

    let mut p = base.clone();
    p.max_ttl = CAP + secs(1);
    let e = err(vec![p.clone()]);
    assert!(
        matches!(e, PolicyError::MaxTtlAboveCap { cap, .. } if cap == CAP),
        "{e}"
    );
    assert!(e.to_string().contains("`max_ttl`"), "{e}");
    assert!(
        PolicySet::new(vec![p.clone()], CAP * 2).is_ok(),
        "the cap is a parameter"
    );
    p.max_ttl = CAP;
    assert!(
        PolicySet::new(vec![p], CAP).is_ok(),
        "max_ttl == cap is fine"
    );
}

#[test]
fn bad_path_patterns_are_refused() {
    for (pattern, problem) in [
        ("", Malformed::Empty),
        ("/payments/db", Malformed::LeadingSlash),
        ("payments/db/", Malformed::TrailingSlash),
        ("payments//db", Malformed::EmptySegment),
        ("payments/../db", Malformed::DotSegment),
        ("..", Malformed::DotSegment),
        ("payments/./db", Malformed::DotSegment),
        ("payments/d?", Malformed::Char('?')),
        ("payments/[ab]", Malformed::Char('[')),
        ("payments/{a,b}", Malformed::Char('{')),
        ("payments/a\\*", Malformed::Char('\\')),
        ("pay ments", Malformed::Char(' ')),
        ("payments/db**", Malformed::DoubleStar),
        ("payments/***", Malformed::DoubleStar),
        ("payments/**/**", Malformed::DoubleStar),
    ] {
        let e = err(vec![policy("p", &[("a", "b")], &["ok/path", pattern])]);
        assert!(
            matches!(e, PolicyError::Invalid { ref policy, ref field, ref value, problem: p }
                if policy == "p" && field == "paths[1]" && value == pattern && p == problem),
            "{pattern:?}: {e}"
        );
    }
    let long = "a/".repeat(MAX_PATH_LEN / 2) + "a";
    assert!(matches!(
        err(vec![policy("p", &[("a", "b")], &[&long])]),
        PolicyError::Invalid {
            problem: Malformed::TooLong { max: MAX_PATH_LEN },
            ..
        }
    ));
}

#[test]
fn bad_subject_patterns_are_refused() {
    for ((ns, sa), field, problem) in [
        (("", "api"), "subjects[0].namespace", Malformed::Empty),
        (
            ("payments", ""),
            "subjects[0].serviceaccount",
            Malformed::Empty,
        ),
        (
            ("Payments", "api"),
            "subjects[0].namespace",
            Malformed::Char('P'),
        ),
        (
            ("payments", "a?i"),
            "subjects[0].serviceaccount",
            Malformed::Char('?'),
        ),
        (
            ("team-[ab]", "api"),
            "subjects[0].namespace",
            Malformed::Char('['),
        ),
        (
            ("pay.ments", "api"),
            "subjects[0].namespace",
            Malformed::Char('.'),
        ),
        (
            ("payments", "a/b"),
            "subjects[0].serviceaccount",
            Malformed::Char('/'),
        ),
    ] {
        let e = err(vec![policy("p", &[(ns, sa)], &["x"])]);
        assert!(
            matches!(e, PolicyError::Invalid { field: ref f, problem: p, .. } if f == field && p == problem),
            "{ns:?}/{sa:?}: {e}"
        );
    }
    // Dots are fine in service account names.
    assert!(PolicySet::new(vec![policy("p", &[("a", "my.sa")], &["x"])], CAP).is_ok());
    let e = err(vec![policy("p", &[("a", "b"), ("ok", "Bad")], &["x"])]);
    assert!(
        matches!(e, PolicyError::Invalid { ref field, .. } if field == "subjects[1].serviceaccount")
    );
}

#[test]
fn errors_name_the_policy_and_the_field() {
    let e = err(vec![policy("payments-db", &[("a", "b")], &["x", "/abs"])]);
    assert_eq!(
        e.to_string(),
        "policy `payments-db`: `paths[1]` (`/abs`): starts with `/`"
    );
    assert_eq!(e.policy(), Some("payments-db"));
}

#[test]
fn yaml_shape_errors() {
    // Misspelt keys are refused, at both levels.
    let e = yaml_err(&EXAMPLE.replace("capabilities", "capabilites"));
    assert!(matches!(e, PolicyError::Yaml { .. }), "{e}");
    assert!(e.to_string().contains("capabilites"), "{e}");
    assert!(matches!(yaml_err("policy: []"), PolicyError::Yaml { .. }));
    assert!(matches!(yaml_err(""), PolicyError::Yaml { .. }));
    assert!(matches!(
        yaml_err("policies: [unclosed"),
        PolicyError::Yaml { .. }
    ));
    assert!(matches!(
        yaml_err(&EXAMPLE.replace("[read]", "[read, sudo]")),
        PolicyError::Yaml { .. }
    ));
    assert!(matches!(
        yaml_err(&EXAMPLE.replace("serviceaccount: api", "serviceaccount: api, pod: x")),
        PolicyError::Yaml { .. }
    ));
    assert_eq!(yaml_err("policies: []\nextra: 1").policy(), None);
}

#[test]
fn yaml_field_errors_name_the_policy() {
    let e = yaml_err(&EXAMPLE.replace("ttl: 5m", "ttl: 5 parsecs"));
    assert!(
        matches!(e, PolicyError::BadDuration { ref policy, field: "ttl", ref value, .. } if policy == "payments-db" && value == "5 parsecs"),
        "{e}"
    );
    let e = yaml_err(&EXAMPLE.replace("  max_ttl: 1h\n", ""));
    assert!(
        matches!(e, PolicyError::Missing { ref policy, field: "max_ttl" } if policy == "payments-db"),
        "{e}"
    );
    let e = yaml_err(&EXAMPLE.replace(
        "  paths: [\"payments/db\", \"payments/app/*\", \"shared/**\"]\n",
        "",
    ));
    assert!(
        matches!(e, PolicyError::Missing { field: "paths", .. }),
        "{e}"
    );
    let e = yaml_err(&EXAMPLE.replace("- name: payments-db\n  subjects", "- subjects"));
    assert!(
        matches!(e, PolicyError::Missing { ref policy, field: "name" } if policy == "policies[0]"),
        "{e}"
    );
    let e = yaml_err(&EXAMPLE.replace("max_ttl: 1h", "max_ttl: 2d"));
    assert!(matches!(e, PolicyError::MaxTtlAboveCap { .. }), "{e}");
    // A bare number has no unit: refused rather than guessed.
    let e = yaml_err(&EXAMPLE.replace("ttl: 5m", "ttl: 300"));
    assert!(
        matches!(e, PolicyError::BadDuration { field: "ttl", ref value, .. } if value == "300"),
        "{e}"
    );
}

#[test]
fn yaml_round_trip() {
    let mut admin = policy(
        "ops-admin",
        &[("ops", "admin"), ("team-*", "*")],
        &["**", "a/*/b"],
    );
    admin.capabilities = Capability::ALL.to_vec();
    admin.ttl = secs(90);
    admin.max_ttl = secs(86_400);
    let s = PolicySet::from_yaml(EXAMPLE, CAP)
        .and_then(|s| {
            let mut policies = s.policies().to_vec();
            policies.push(admin);
            PolicySet::new(policies, CAP)
        })
        .and_then(|s| Ok((s.to_yaml()?, s)));
    let (yaml, s) = match s {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    assert!(yaml.contains("ttl: 1m 30s"), "{yaml}");
    assert!(yaml.contains("- audit"), "{yaml}");
    let back = match PolicySet::from_yaml(&yaml, CAP) {
        Ok(b) => b,
        Err(e) => panic!("{e}\n{yaml}"),
    };
    assert_eq!(back.policies(), s.policies());
    assert_eq!(back.to_yaml().ok(), Some(yaml));
}

#[test]
fn policy_serde_on_its_own() {
    let p = policy("p", &[("a", "b")], &["x/**"]);
    let json = match serde_json::to_string(&p) {
        Ok(j) => j,
        Err(e) => panic!("{e}"),
    };
    assert!(json.contains(r#""ttl":"5m""#), "{json}");
    let back: Policy = match serde_json::from_str(&json) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(back, p);
    let bad = json.replace(r#""ttl":"5m""#, r#""ttl":"soon""#);
    assert!(serde_json::from_str::<Policy>(&bad).is_err());
}

#[test]
fn capability_names() {
    let names: Vec<&str> = Capability::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        ["read", "write", "delete", "destroy", "list", "revoke", "policy", "audit", "keys"]
    );
    for cap in Capability::ALL {
        let yaml = match serde_yaml_ng::to_string(&cap) {
            Ok(y) => y,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(yaml.trim(), cap.as_str());
        assert_eq!(cap.to_string(), cap.as_str());
        assert_eq!(cap.is_admin(), cap != Capability::Read);
    }
    assert!(serde_yaml_ng::from_str::<Capability>("Read").is_err());
}

#[test]
fn secret_path_validation() {
    for ok in ["a", "team/app/db", "a.b/c-d/e_f/0", "x/.hidden"] {
        assert_eq!(validate_secret_path(ok), Ok(()), "{ok}");
    }
    assert_eq!(validate_secret_path(""), Err(Malformed::Empty));
    assert_eq!(validate_secret_path("/a"), Err(Malformed::LeadingSlash));
    assert_eq!(validate_secret_path("a/"), Err(Malformed::TrailingSlash));
    assert_eq!(validate_secret_path("a//b"), Err(Malformed::EmptySegment));
    assert_eq!(validate_secret_path("a/.."), Err(Malformed::DotSegment));
    assert_eq!(validate_secret_path("a/*"), Err(Malformed::Char('*')));
    assert_eq!(validate_secret_path("a/**"), Err(Malformed::Char('*')));
    assert_eq!(
        validate_secret_path(&"a".repeat(MAX_PATH_LEN + 1)),
        Err(Malformed::TooLong { max: MAX_PATH_LEN })
    );
    assert_eq!(validate_secret_path(&"a".repeat(MAX_PATH_LEN)), Ok(()));
}
