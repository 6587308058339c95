#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Structural checks of the deployment files: `docker-compose.yml`, `deploy/Dockerfile`, the
//! Kubernetes manifests in `deploy/kubernetes/`, and the commands in `docs/operations.md` and
//! `docs/injector.md`.
//!
//! No container engine runs on our machines, so nothing here starts a container. What can be
//! checked without one is checked against the real thing:
//!
//! - every command line that runs one of our binaries (compose `command`/`entrypoint`,
//!   healthchecks, the `sh -c` scripts of the one-shot services, Kubernetes `command`/`args`) is
//!   walked subcommand by subcommand against the binaries' own `--help`: each `--flag` must be
//!   an option of the (sub)command it is given to, a flag that takes a value must have one, and
//!   a command that needs a subcommand must get one;
//! - every `KEYHAVEN_*` environment variable must be one our binaries read (clap shows them in
//!   `--help`): a misspelt variable is otherwise silently ignored;
//! - every absolute path given to a flag must lie under something mounted into that container;
//! - Compose keys, volumes, configs, `depends_on` targets, Dockerfile stages and binary names
//!   must exist, and a named volume is mounted at the same path in every service;
//! - the policy documents must be accepted by the broker's own policy parser, and allow each
//!   workload's identity every path its agent configuration asks for (the compose demo's
//!   refused path must stay refused);
//! - the Kubernetes specifics: the agent as a native sidecar, the projected token (audience
//!   `keyhaven`, short-lived) where `--token-file` reads it, an in-memory `emptyDir` at
//!   `--output-dir` mounted read-only by the app, `create` on `tokenreviews` (and `get,list,watch`
//!   on pods and serviceaccounts) bound to the broker's ServiceAccount, probes on the metrics port, the Service reaching `--listen`.
//! - the injector's webhook: `failurePolicy: Fail` scoped by an objectSelector on
//!   `keyhaven.io/inject`, kube-system and its own namespace excluded, `sideEffects: None`,
//!   `reinvocationPolicy: IfNeeded`, a Service reaching `--listen` on `/mutate`, two replicas and
//!   a PodDisruptionBudget; the commands in `docs/injector.md` as in `docs/operations.md`.
//!
//! `every_mutation_is_caught` breaks the files one way at a time (a misspelt flag, an undeclared
//! volume, a missing `restartPolicy: Always`, ...) and checks that each breakage is reported, so
//! that none of the checks passes vacuously.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use broker_agent::config::{Format, SecretSpec};
use keyhaven_broker::identity::Identity;
use keyhaven_broker::policy::{Capability, PolicySet, DEFAULT_MAX_TTL_CAP};
use serde_yaml_ng::Value;
use testkit::process::bin_path;

/// The binaries of this workspace that the deployment files run.
const OUR_BINARIES: &[&str] = &[
    "kms-plugin",
    "broker",
    "brokerctl",
    "broker-agent",
    "keyhaven-injector",
];

const COMPOSE: &str = "docker-compose.yml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const DOCKERIGNORE: &str = ".dockerignore";
const COMPOSE_TEST: &str = "scripts/compose-test.sh";
const SOFTHSM_CONF: &str = "deploy/softhsm2.conf";
const K8S_DIR: &str = "deploy/kubernetes";
const OPERATIONS_DOC: &str = "docs/operations.md";
const INJECTOR_DOC: &str = "docs/injector.md";
const DB_CREDENTIALS_DOC: &str = "docs/dynamic-credentials.md";

/// broker-agent defaults (its `--help`), used when a manifest leaves the flag out.
const AGENT_DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/keyhaven/token";
const AGENT_DEFAULT_OUTPUT_DIR: &str = "/keyhaven/secrets";

/// Where Kubernetes mounts the default ServiceAccount token unless automounting is off.
const K8S_SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

// =============================================================================================
// The tests
// =============================================================================================

#[test]
fn compose_file_runs_our_binaries_with_real_flags() {
    assert_no_problems(COMPOSE, &check_compose(&Repo::default()));
}

#[test]
fn kubernetes_manifests_run_our_binaries_with_real_flags() {
    assert_no_problems(K8S_DIR, &check_kubernetes(&Repo::default()));
}

#[test]
fn dockerfile_builds_and_ships_real_binaries() {
    assert_no_problems(DOCKERFILE, &check_dockerfile(&Repo::default()).problems);
}

#[test]
fn operations_guide_commands_use_real_flags() {
    assert_no_problems(OPERATIONS_DOC, &check_docs(&Repo::default()));
}

/// One way to break a file, and what the report must then say.
struct Mutation {
    file: &'static str,
    from: &'static str,
    to: &'static str,
    /// Every one of these must appear in one reported problem.
    expect: &'static [&'static str],
}

const MUTATIONS: &[Mutation] = &[
    // --- deploy/kubernetes/injector.yaml
    Mutation {
        file: "deploy/kubernetes/injector.yaml",
        from: "    failurePolicy: Fail\n",
        to: "    failurePolicy: Ignore\n",
        expect: &["injector.yaml", "`failurePolicy` must be Fail"],
    },
    Mutation {
        file: "deploy/kubernetes/injector.yaml",
        from: "    objectSelector:\n      matchLabels:\n        keyhaven.io/inject: \"true\"\n",
        to: "",
        expect: &["injector.yaml", "objectSelector"],
    },
    Mutation {
        file: "deploy/kubernetes/injector.yaml",
        from: "\"kube-node-lease\", \"keyhaven\"]",
        to: "\"kube-node-lease\"]",
        expect: &["injector.yaml", "does not exclude `keyhaven`"],
    },
    Mutation {
        file: "deploy/kubernetes/injector.yaml",
        from: "            - --tls-key-file=/etc/keyhaven/injector-tls/tls.key\n",
        to: "            - --tls-key=/etc/keyhaven/injector-tls/tls.key\n",
        expect: &["injector.yaml", "`--tls-key`"],
    },
    Mutation {
        file: "deploy/kubernetes/injector.yaml",
        from: "      targetPort: https\n",
        to: "      targetPort: 9443\n",
        expect: &["injector.yaml", "does not reach the injector's --listen port"],
    },
    Mutation {
        file: "deploy/kubernetes/injector.yaml",
        from: "            - --tls-cert-file=/etc/keyhaven/injector-tls/tls.crt\n",
        to: "            - --tls-cert-file=/etc/keyhaven/tls/tls.crt\n",
        expect: &["injector.yaml", "`/etc/keyhaven/tls/tls.crt`", "mounted"],
    },
    Mutation {
        file: "docs/injector.md",
        from: "--patched-pod pod.yaml",
        to: "--patched-pods pod.yaml",
        expect: &["docs/injector.md", "`--patched-pods`"],
    },
    // --- docker-compose.yml
    Mutation {
        file: COMPOSE,
        from: "      - --metrics-addr\n      - 0.0.0.0:9464\n",
        to: "      - --metrics-adress\n      - 0.0.0.0:9464\n",
        expect: &["service `kms-plugin`", "`kms-plugin serve`", "`--metrics-adress`"],
    },
    Mutation {
        file: COMPOSE,
        from: "policy apply --filename /etc",
        to: "policy apply --file-name /etc",
        expect: &["service `setup`", "`brokerctl policy apply`", "`--file-name`"],
    },
    Mutation {
        file: COMPOSE,
        from: "kms-plugin token init --token-label",
        to: "kms-plugin token inti --token-label",
        expect: &["service `hsm-init`", "`kms-plugin token`"],
    },
    Mutation {
        file: COMPOSE,
        from: "brokerctl dev-token --namespace demo",
        to: "brokerctl dev-token --namespace demo --dev",
        expect: &["service `setup`", "`brokerctl dev-token`", "`--dev`"],
    },
    Mutation {
        file: COMPOSE,
        from: "  hsm-pins: {}\n",
        to: "",
        expect: &["`hsm-pins`", "not declared"],
    },
    Mutation {
        file: COMPOSE,
        from: "      postgres:\n        condition: service_healthy\n",
        to: "      postgress:\n        condition: service_healthy\n",
        expect: &["service `broker`", "`postgress`"],
    },
    Mutation {
        file: COMPOSE,
        from: "      test: [\"CMD\", \"pg_isready\", \"-h\", \"127.0.0.1\", \"-U\", \"keyhaven\", \"-d\", \"keyhaven\"]\n",
        to: "",
        expect: &["service_healthy", "`postgres`", "healthcheck"],
    },
    Mutation {
        file: COMPOSE,
        from: "\"$$(cat /etc/keyhaven/db/password)\"",
        to: "\"$(cat /etc/keyhaven/db/password)\"",
        expect: &["`$$`"],
    },
    Mutation {
        file: COMPOSE,
        from: "      - softhsm-tokens:/var/lib/keyhaven/softhsm/tokens\n      - hsm-pins:/etc/keyhaven/pins:ro\n      - broker-tls",
        to: "      - softhsm-tokens:/var/lib/keyhaven/softhsm/token\n      - hsm-pins:/etc/keyhaven/pins:ro\n      - broker-tls",
        expect: &["`softhsm-tokens`", "service `broker`"],
    },
    Mutation {
        file: COMPOSE,
        from: "      - /etc/keyhaven/pins/user.pin\n      - --dev\n",
        to: "      - /etc/keyhaven/pin/user.pin\n      - --dev\n",
        expect: &["service `broker`", "`/etc/keyhaven/pin/user.pin`", "mounted"],
    },
    Mutation {
        file: COMPOSE,
        from: "      - keyhaven-demo\n      - --pin-file\n      - /etc/keyhaven/pins/user.pin\n      - --dev\n",
        to: "      - keyhaven-dmeo\n      - --pin-file\n      - /etc/keyhaven/pins/user.pin\n      - --dev\n",
        expect: &["--token-label", "keyhaven-dmeo"],
    },
    Mutation {
        file: COMPOSE,
        from: "      target: broker\n    pull_policy: build\n    restart: unless-stopped\n",
        to: "      target: broker\n    pull_policy: build\n    restart: unless-stopped\n    environment:\n      KEYHAVEN_LOG_FROMAT: json\n",
        expect: &["service `broker`", "`KEYHAVEN_LOG_FROMAT`"],
    },
    Mutation {
        file: COMPOSE,
        from: "--hosts broker,localhost,127.0.0.1",
        to: "--hosts localhost,127.0.0.1",
        expect: &["--hosts", "`broker`"],
    },
    Mutation {
        file: COMPOSE,
        from: "    command:\n      - kms-plugin\n      - serve\n      - --listen\n      - unix:///var/run/keyhaven/kms.sock\n",
        to: "    command: kms-plugin serve --listen unix:///var/run/keyhaven/kms.sock\n    x-rest:\n",
        expect: &["service `kms-plugin`", "list form"],
    },
    Mutation {
        file: COMPOSE,
        from: "      start_period: 10s\n",
        to: "      start_perod: 10s\n",
        expect: &["service `kms-plugin`", "`start_perod`"],
    },
    Mutation {
        file: COMPOSE,
        from: "  workload:\n    image: busybox:1.36\n",
        to: "  workload:\n    image: busybox:1.36\n    read-only: true\n",
        expect: &["service `workload`", "`read-only`"],
    },
    Mutation {
        file: COMPOSE,
        from: "    target: keyhaven\n",
        to: "    target: keyhavn\n",
        expect: &["`keyhavn`", "stage"],
    },
    Mutation {
        file: COMPOSE,
        from: "      - workload-secrets:/keyhaven/secrets:ro\n",
        to: "      - workload-secrets:/keyhaven/secrets\n",
        expect: &["service `workload`", "read-only"],
    },
    Mutation {
        file: COMPOSE,
        from: "      target: broker\n    pull_policy: build\n    restart: unless-stopped\n    read_only: true\n",
        to: "      target: broker\n    pull_policy: build\n    restart: unless-stopped\n",
        expect: &["service `broker`", "`read_only: true`"],
    },
    Mutation {
        file: COMPOSE,
        from: "      test: [\"CMD\", \"broker\", \"probe\", \"--metrics-addr\", \"127.0.0.1:9465\"]\n",
        to: "      test: [\"CMD-SHELL\", \"broker probe --metrics-addr 127.0.0.1:9465\"]\n",
        expect: &["service `broker`", "healthcheck runs `sh`", "no shell"],
    },
    Mutation {
        file: COMPOSE,
        from: "      test: [\"CMD\", \"broker-agent\", \"probe\", \"--metrics-addr\", \"127.0.0.1:9466\"]\n",
        to: "      test: [\"CMD\", \"test\", \"-e\", \"/tmp/broker-agent.ready\"]\n",
        expect: &["service `workload-agent`", "healthcheck runs `test`", "no shell"],
    },
    Mutation {
        file: COMPOSE,
        from: "    # The dev CA is made in /tmp and thrown away.\n    tmpfs:\n      - /tmp\n",
        to: "",
        expect: &["service `hsm-init`", "`/tmp/dev-ca`", "mounted"],
    },
    Mutation {
        file: COMPOSE,
        from: "    init: true\n    restart: unless-stopped\n",
        to: "    init: true\n",
        expect: &["service `workload`", "restart policy"],
    },
    Mutation {
        file: "deploy/compose/demo-policy.yaml",
        from: "      - shop/config/*\n",
        to: "      - \"**\"\n",
        expect: &["payments/db", "refused"],
    },
    Mutation {
        file: "deploy/compose/demo-policy.yaml",
        from: "    capabilities: [read]\n",
        to: "    capabilities: [reed]\n",
        expect: &["deploy/compose/demo-policy.yaml"],
    },
    Mutation {
        file: "deploy/compose/agent.yaml",
        from: "  - path: shop/db\n    file: db.json\n",
        to: "  - path: shop/cache\n    file: db.json\n",
        expect: &["shop/cache", "does not allow"],
    },
    Mutation {
        file: "deploy/compose/agent.yaml",
        from: "    mode: \"0400\"\n",
        to: "    mode: \"0200\"\n",
        expect: &["deploy/compose/agent.yaml", "mode"],
    },
    Mutation {
        file: "deploy/compose/agent.yaml",
        from: "    format: raw\n",
        to: "    format: yaml\n",
        expect: &["deploy/compose/agent.yaml", "format"],
    },
    // --- deploy/Dockerfile and .dockerignore
    Mutation {
        file: DOCKERFILE,
        from: "--bin broker-agent --bin",
        to: "--bin broker-agnet --bin",
        expect: &["`broker-agnet`"],
    },
    Mutation {
        file: DOCKERFILE,
        from: "ARG BASE_IMAGE=debian:bookworm-slim\n",
        to: "ARG BASE_IMAGE=debian:trixie-slim\n",
        expect: &["bookworm"],
    },
    Mutation {
        file: DOCKERFILE,
        from: "ARG BUILDER_IMAGE=rust:${RUST_VERSION}-bookworm\n",
        to: "ARG BUILDER_IMAGE=rust:${RUST_VERSION}-trixie\n",
        expect: &["rust:1.95-trixie", "bookworm"],
    },
    Mutation {
        file: DOCKERFILE,
        from: "USER 10001:10001\nCMD [\"broker\", \"--help\"]\n",
        to: "CMD [\"broker\", \"--help\"]\n",
        expect: &["stage `broker`", "USER"],
    },
    Mutation {
        file: DOCKERFILE,
        from: "COPY --from=binaries /out/sbom/keyhaven-injector.cdx.json /usr/share/doc/keyhaven/\n",
        to: "",
        expect: &["stage `injector`", "`keyhaven-injector` without its SBOM"],
    },
    Mutation {
        file: DOCKERFILE,
        from: "COPY deploy/softhsm2.conf /etc/keyhaven/softhsm2.conf\n",
        to: "COPY deploy/softhsm2.conf /etc/softhsm2.conf\n",
        expect: &["SOFTHSM2_CONF"],
    },
    Mutation {
        file: SOFTHSM_CONF,
        from: "directories.tokendir = /var/lib/keyhaven/softhsm/tokens\n",
        to: "directories.tokendir = /var/lib/softhsm/tokens\n",
        expect: &["tokendir", "/var/lib/softhsm/tokens"],
    },
    Mutation {
        file: DOCKERIGNORE,
        from: "target/\n",
        to: "",
        expect: &[".dockerignore", "target"],
    },
    // --- docs/operations.md
    Mutation {
        file: OPERATIONS_DOC,
        from: "--bootstrap-file /etc/keyhaven/bootstrap/credential leases list",
        to: "--bootstrap-file /etc/keyhaven/bootstrap/credential leases lst",
        expect: &["docs/operations.md", "`brokerctl leases`", "subcommand"],
    },
    Mutation {
        file: OPERATIONS_DOC,
        from: "policy apply --filename /etc/keyhaven/policy/policies.yaml",
        to: "policy apply --file /etc/keyhaven/policy/policies.yaml",
        expect: &["docs/operations.md", "`--file`"],
    },
    // --- deploy/kubernetes/
    Mutation {
        file: "deploy/kubernetes/example-workload.yaml",
        from: "          restartPolicy: Always\n",
        to: "",
        expect: &["example-workload.yaml", "restartPolicy: Always"],
    },
    Mutation {
        file: "deploy/kubernetes/example-workload.yaml",
        from: "                  audience: keyhaven\n",
        to: "                  audience: vault\n",
        expect: &["example-workload.yaml", "audience"],
    },
    Mutation {
        file: "deploy/kubernetes/example-workload.yaml",
        from: "            medium: Memory\n",
        to: "            medium: \"\"\n",
        expect: &["example-workload.yaml", "medium: Memory"],
    },
    Mutation {
        file: "deploy/kubernetes/example-workload.yaml",
        from: "            - --broker-addr=https://keyhaven-broker.keyhaven.svc:8443\n",
        to: "            - --broker-address=https://keyhaven-broker.keyhaven.svc:8443\n",
        expect: &["example-workload.yaml", "`keyhaven-agent`", "`--broker-address`"],
    },
    Mutation {
        file: "deploy/kubernetes/example-workload.yaml",
        from: "            - --broker-addr=https://keyhaven-broker.keyhaven.svc:8443\n",
        to: "            - --broker-addr=https://keyhaven-broker.default.svc:8443\n",
        expect: &["example-workload.yaml", "--broker-addr"],
    },
    Mutation {
        file: "deploy/kubernetes/example-workload.yaml",
        from: "              mountPath: /keyhaven/secrets\n              readOnly: true\n",
        to: "              mountPath: /keyhaven/secrets\n",
        expect: &["example-workload.yaml", "`app`", "read-only"],
    },
    Mutation {
        file: "deploy/kubernetes/example-workload.yaml",
        from: "            - --ca-file=/etc/keyhaven/ca/ca.crt\n",
        to: "            - --ca-file=/etc/keyhaven/broker-ca/ca.crt\n",
        expect: &["example-workload.yaml", "`/etc/keyhaven/broker-ca/ca.crt`", "mounted"],
    },
    Mutation {
        file: "deploy/kubernetes/broker.yaml",
        from: "            serviceaccount: shop-api\n",
        to: "            serviceaccount: shop-web\n",
        expect: &["shop/db", "does not allow"],
    },
    Mutation {
        file: "deploy/kubernetes/broker.yaml",
        from: "    resources: [\"tokenreviews\"]\n    verbs: [\"create\"]\n",
        to: "    resources: [\"tokenreviews\"]\n    verbs: [\"get\"]\n",
        expect: &["broker.yaml", "tokenreviews"],
    },
    Mutation {
        file: "deploy/kubernetes/broker.yaml",
        from: "    resources: [\"pods\", \"serviceaccounts\"]\n    verbs: [\"get\", \"list\", \"watch\"]\n",
        to: "    resources: [\"pods\", \"serviceaccounts\"]\n    verbs: [\"get\", \"list\"]\n",
        expect: &["broker.yaml", "`pods`", "pod / service-account watch"],
    },
    Mutation {
        file: "deploy/kubernetes/broker.yaml",
        from: "            - --token-review\n",
        to: "            - --tokenreview\n",
        expect: &["broker.yaml", "`--tokenreview`"],
    },
    Mutation {
        file: "deploy/kubernetes/broker.yaml",
        from: "            - --metrics-addr=0.0.0.0:9465\n",
        to: "            - --metrics-addr=0.0.0.0:9466\n",
        expect: &["broker.yaml", "Probe", "9466"],
    },
    Mutation {
        file: "deploy/kubernetes/broker.yaml",
        from: "            - name: hsm-pin\n              mountPath",
        to: "            - name: hsm-pins\n              mountPath",
        expect: &["broker.yaml", "`hsm-pins`"],
    },
    Mutation {
        file: "deploy/kubernetes/kms-plugin-static-pod.yaml",
        from: "    runAsNonRoot: true\n    runAsUser: 10001\n",
        to: "    runAsUser: 0\n",
        expect: &["kms-plugin-static-pod.yaml", "runAsNonRoot"],
    },
    Mutation {
        file: "deploy/kubernetes/kms-plugin-static-pod.yaml",
        from: "        readOnlyRootFilesystem: true\n",
        to: "        readOnlyRootFilesystem: false\n",
        expect: &["kms-plugin-static-pod.yaml", "readOnlyRootFilesystem: true"],
    },
    Mutation {
        file: "deploy/kubernetes/kms-plugin-static-pod.yaml",
        from: "      image: keyhaven/kms-plugin:0.1.0\n",
        to: "      image: keyhaven/kmsplugin:0.1.0\n",
        expect: &["kms-plugin-static-pod.yaml", "`kmsplugin` is not a stage"],
    },
    Mutation {
        file: "deploy/kubernetes/broker.yaml",
        from: "          image: keyhaven/broker:0.1.0\n",
        to: "          image: keyhaven/broker:latest\n",
        expect: &["broker.yaml", "workspace version"],
    },
    Mutation {
        file: COMPOSE_TEST,
        from: "K8S_TARGETS=(kms-plugin broker broker-agent injector)",
        to: "K8S_TARGETS=(kms-plugin broker broker-agent)",
        expect: &["injector.yaml", "does not build `injector`"],
    },
    Mutation {
        file: "deploy/kubernetes/kms-plugin-static-pod.yaml",
        from: "        - name: KEYHAVEN_ALLOW_UIDS\n",
        to: "        - name: KEYHAVEN_ALLOW_UID\n",
        expect: &["kms-plugin-static-pod.yaml", "`KEYHAVEN_ALLOW_UID`"],
    },
];

#[test]
fn every_mutation_is_caught() {
    let baseline = check_all(&Repo::default());
    let mut missed = Vec::new();
    for m in MUTATIONS {
        let mut repo = Repo::default();
        let original = repo
            .read(m.file)
            .unwrap_or_else(|| panic!("{} is missing", m.file));
        assert_eq!(
            original.matches(m.from).count(),
            1,
            "mutation of {}: {:?} must occur exactly once",
            m.file,
            m.from
        );
        let matches = |p: &String| m.expect.iter().all(|e| p.contains(e));
        assert!(
            !baseline.iter().any(matches),
            "the unmutated files already report {:?}: fix them first",
            m.expect
        );
        repo.overrides
            .insert(m.file.to_owned(), original.replacen(m.from, m.to, 1));
        let problems = check_all(&repo);
        if !problems.iter().any(matches) {
            missed.push(format!(
                "{}: {:?} -> {:?} was not reported with {:?}; reported: {problems:#?}",
                m.file, m.from, m.to, m.expect
            ));
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n\n"));
}

#[test]
fn the_shell_reader_finds_every_command() {
    let cmds = shell_commands(
        "set -eu\nif kms-plugin keys --token-label 'a b' list >/dev/null 2>&1; then echo \"x\"; fi\n\
         f() { head -c \"$1\" /dev/urandom | od -An > \"$2\"; }\n\
         printf '%s' \"$(brokerctl dev-token --namespace n --serviceaccount s)\" > t # comment\n\
         X=1 broker \\\n  --dev && exec 3<>/dev/tcp/h/1\n",
    )
    .unwrap();
    let ours: Vec<Vec<String>> = cmds
        .iter()
        .filter_map(|c| command_start(c).map(|i| c[i..].to_vec()))
        .filter(|c| OUR_BINARIES.contains(&basename(&c[0])))
        .collect();
    assert_eq!(
        ours,
        vec![
            vec!["kms-plugin", "keys", "--token-label", "a b", "list"],
            vec![
                "brokerctl",
                "dev-token",
                "--namespace",
                "n",
                "--serviceaccount",
                "s"
            ],
            vec!["broker", "--dev"],
        ]
    );
    assert!(shell_commands("cat <<EOF\nx\nEOF\n").is_err());
    assert!(shell_commands("echo `date`").is_err());
}

fn check_all(repo: &Repo) -> Vec<String> {
    let mut all = check_compose(repo);
    all.extend(check_kubernetes(repo));
    all.extend(check_dockerfile(repo).problems);
    all.extend(check_docs(repo));
    all
}

fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
}

// =============================================================================================
// The repository, with in-memory replacements for the mutation test
// =============================================================================================

#[derive(Debug, Default)]
struct Repo {
    overrides: HashMap<String, String>,
}

impl Repo {
    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf()
    }

    fn read(&self, rel: &str) -> Option<String> {
        let rel = rel.trim_start_matches("./");
        if let Some(s) = self.overrides.get(rel) {
            return Some(s.clone());
        }
        std::fs::read_to_string(Self::root().join(rel)).ok()
    }

    fn exists(&self, rel: &str) -> bool {
        let rel = rel.trim_start_matches("./");
        self.overrides.contains_key(rel) || Self::root().join(rel).exists()
    }

    fn kubernetes_files(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(Self::root().join(K8S_DIR))
            .expect("deploy/kubernetes")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .map(|n| format!("{K8S_DIR}/{n}"))
            .collect();
        files.sort();
        files
    }
}

/// The bin targets of the workspace, from `cargo metadata`.
fn workspace_binaries() -> &'static BTreeSet<String> {
    static BINS: OnceLock<BTreeSet<String>> = OnceLock::new();
    BINS.get_or_init(|| {
        let out = Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--no-deps",
                "--offline",
                "--format-version",
                "1",
            ])
            .current_dir(Repo::root())
            .output()
            .expect("run cargo metadata");
        assert!(
            out.status.success(),
            "cargo metadata: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
        let bins: BTreeSet<String> = v["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .flat_map(|p| p["targets"].as_array().expect("targets").iter())
            .filter(|t| {
                t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"))
            })
            .map(|t| t["name"].as_str().expect("target name").to_owned())
            .collect();
        for b in OUR_BINARIES {
            assert!(
                bins.contains(*b),
                "{b} is not a bin target of the workspace"
            );
        }
        bins
    })
}

// =============================================================================================
// Our binaries' command lines, checked against their --help
// =============================================================================================

/// What one (sub)command's `--help` says.
#[derive(Debug, Clone, Default)]
struct Help {
    /// Option names (`--listen`, `-f`, aliases) → whether the option takes a value.
    flags: BTreeMap<String, bool>,
    subcommands: BTreeSet<String>,
    needs_subcommand: bool,
    /// The `[env: NAME=]` variables.
    envs: BTreeSet<String>,
}

fn help(bin: &str, path: &[String]) -> Help {
    static CACHE: OnceLock<Mutex<HashMap<Vec<String>, Help>>> = OnceLock::new();
    let key: Vec<String> = std::iter::once(bin.to_owned())
        .chain(path.iter().cloned())
        .collect();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(h) = cache.lock().unwrap().get(&key) {
        return h.clone();
    }
    let out = Command::new(bin_path(bin).expect("a workspace binary"))
        .args(path)
        .arg("--help")
        .env_clear()
        .output()
        .expect("run --help");
    assert!(
        out.status.success(),
        "`{} --help` failed: {}",
        key.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let h = parse_help(&String::from_utf8_lossy(&out.stdout));
    cache.lock().unwrap().insert(key, h.clone());
    h
}

/// Every environment variable that some (sub)command of `bin` reads.
fn all_envs(bin: &str) -> BTreeSet<String> {
    let mut envs = BTreeSet::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let h = help(bin, &path);
        envs.extend(h.envs.iter().cloned());
        for s in &h.subcommands {
            let mut p = path.clone();
            p.push(s.clone());
            todo.push(p);
        }
    }
    envs
}

fn is_flag_token(t: &str) -> bool {
    let name = t.strip_prefix("--").or_else(|| t.strip_prefix('-'));
    name.is_some_and(|n| {
        n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

fn parse_help(text: &str) -> Help {
    let mut h = Help::default();
    let mut in_commands = false;
    let mut last_takes_value = false;
    for line in text.lines() {
        if let Some(usage) = line.strip_prefix("Usage:") {
            h.needs_subcommand = usage.contains("<COMMAND>");
        }
        if line.trim_end() == "Commands:" {
            in_commands = true;
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if in_commands {
            if line.trim().is_empty() || indent == 0 {
                in_commands = false;
            } else {
                if indent == 2 {
                    let name = line.split_whitespace().next().unwrap_or_default();
                    if name != "help" {
                        h.subcommands.insert(name.to_owned());
                    }
                }
                continue;
            }
        }
        // Option lines: `  -f, --filename <FILE>`, `      --dev`; descriptions are indented
        // further.
        let first = line.split_whitespace().next().unwrap_or_default();
        if indent <= 6 && is_flag_token(first.trim_end_matches(',')) {
            let mut names = Vec::new();
            let mut takes = false;
            for tok in line.split_whitespace() {
                let t = tok.trim_end_matches(',');
                if is_flag_token(t) {
                    names.push(t.to_owned());
                    continue;
                }
                takes = tok.starts_with('<') || tok.starts_with("[<");
                break;
            }
            for n in names {
                h.flags.insert(n, takes);
            }
            last_takes_value = takes;
        }
        for marker in ["[alias: ", "[aliases: "] {
            if let Some(p) = line.find(marker) {
                let rest = &line[p + marker.len()..];
                let end = rest.find(']').unwrap_or(rest.len());
                for a in rest[..end]
                    .split(',')
                    .map(str::trim)
                    .filter(|a| is_flag_token(a))
                {
                    h.flags.insert(a.to_owned(), last_takes_value);
                }
            }
        }
        let mut rest = line;
        while let Some(p) = rest.find("[env: ") {
            let after = &rest[p + "[env: ".len()..];
            let end = after.find(['=', ']']).unwrap_or(after.len());
            h.envs.insert(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    h
}

/// One run of one of our binaries, as a deployment file writes it.
#[derive(Debug, Clone)]
struct Call {
    /// Which file, service or container it comes from, for messages.
    origin: String,
    bin: String,
    /// Subcommands, e.g. `["keys", "init"]`.
    path: Vec<String>,
    /// Options in order, with their values.
    flags: Vec<(String, Option<String>)>,
    positionals: Vec<String>,
}

impl Call {
    /// `kms-plugin keys init`.
    fn name(&self) -> String {
        std::iter::once(self.bin.as_str())
            .chain(self.path.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn value(&self, flag: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(f, _)| f == flag)
            .and_then(|(_, v)| v.as_deref())
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|(f, _)| f == flag)
    }

    fn values(&self, flag: &str) -> Vec<&str> {
        self.flags
            .iter()
            .filter(|(f, _)| f == flag)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }
}

/// Walks `argv` (whose first word is one of our binaries) against the `--help` of each
/// (sub)command it reaches, reporting unknown options, missing values and missing subcommands.
fn parse_call(origin: &str, argv: &[String], problems: &mut Vec<String>) -> Call {
    let bin = basename(&argv[0]).to_owned();
    let mut call = Call {
        origin: origin.to_owned(),
        bin: bin.clone(),
        path: Vec::new(),
        flags: Vec::new(),
        positionals: Vec::new(),
    };
    let mut h = help(&bin, &[]);
    let mut i = 1;
    while i < argv.len() {
        let a = &argv[i];
        if a == "--" {
            call.positionals.extend(argv[i + 1..].iter().cloned());
            break;
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if is_flag_token(n) => (n, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        if is_flag_token(name) {
            match h.flags.get(name) {
                None => problems.push(format!(
                    "{origin}: `{}` has no option `{name}` (see `{} --help`)",
                    call.name(),
                    call.name()
                )),
                Some(true) => {
                    let v = inline.or_else(|| {
                        i += 1;
                        argv.get(i).cloned()
                    });
                    if v.is_none() {
                        problems.push(format!(
                            "{origin}: option `{name}` of `{}` needs a value",
                            call.name()
                        ));
                    }
                    call.flags.push((name.to_owned(), v));
                }
                Some(false) => {
                    if inline.is_some() {
                        problems.push(format!(
                            "{origin}: option `{name}` of `{}` takes no value",
                            call.name()
                        ));
                    }
                    call.flags.push((name.to_owned(), None));
                }
            }
        } else if call.positionals.is_empty() && h.subcommands.contains(a.as_str()) {
            call.path.push(a.clone());
            h = help(&bin, &call.path);
        } else {
            call.positionals.push(a.clone());
        }
        i += 1;
    }
    if h.needs_subcommand {
        problems.push(format!(
            "{origin}: `{}` needs a subcommand (one of: {})",
            call.name(),
            h.subcommands.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    call
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

/// The runs of our binaries in a container's argv: the argv itself, or the commands of a
/// `sh -c` script.
fn our_argvs(argv: &[String], origin: &str, problems: &mut Vec<String>) -> Vec<Vec<String>> {
    let Some(first) = argv.first() else {
        return Vec::new();
    };
    let b = basename(first);
    if OUR_BINARIES.contains(&b) {
        return vec![argv.to_vec()];
    }
    if !matches!(b, "sh" | "bash" | "ash" | "dash") {
        return Vec::new();
    }
    let mut script = None;
    for (i, a) in argv.iter().enumerate().skip(1) {
        if !a.starts_with('-') || a.starts_with("--") {
            break;
        }
        if a.contains('c') {
            script = argv.get(i + 1);
            break;
        }
    }
    let Some(script) = script else {
        return Vec::new();
    };
    match shell_commands(script) {
        Ok(cmds) => cmds
            .iter()
            .filter_map(|c| command_start(c).map(|i| c[i..].to_vec()))
            .filter(|c| OUR_BINARIES.contains(&basename(&c[0])))
            .collect(),
        Err(e) => {
            problems.push(format!("{origin}: cannot read its shell script: {e}"));
            Vec::new()
        }
    }
}

// =============================================================================================
// A small POSIX shell reader: enough to find the commands in our `sh -c` scripts
// =============================================================================================

/// Splits a shell script into simple commands (their words, quotes removed). Separators:
/// newlines, `;`, `&&`, `||`, `|`, `&`, `(`, `)`. Redirections are dropped with their target;
/// `$(...)` substitutions add their own commands. Backquotes and here-documents are refused, so
/// that no command is silently skipped.
fn shell_commands(script: &str) -> Result<Vec<Vec<String>>, String> {
    let chars: Vec<char> = script.chars().collect();
    let mut cmds = Vec::new();
    lex(&chars, &mut cmds)?;
    Ok(cmds)
}

/// Words of the command being read.
#[derive(Default)]
struct CommandWords {
    words: Vec<String>,
    word: Option<String>,
    /// The next word is a redirection target.
    drop_next: bool,
}

impl CommandWords {
    fn push(&mut self, c: char) {
        self.word.get_or_insert_with(String::new).push(c);
    }

    fn push_str(&mut self, s: &str) {
        self.word.get_or_insert_with(String::new).push_str(s);
    }

    fn end_word(&mut self) {
        if let Some(w) = self.word.take() {
            if self.drop_next {
                self.drop_next = false;
            } else {
                self.words.push(w);
            }
        }
    }

    fn end_command(&mut self, cmds: &mut Vec<Vec<String>>) {
        self.end_word();
        self.drop_next = false;
        if !self.words.is_empty() {
            cmds.push(std::mem::take(&mut self.words));
        }
    }
}

fn lex(chars: &[char], cmds: &mut Vec<Vec<String>>) -> Result<(), String> {
    let mut cw = CommandWords::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '\\' => {
                match next {
                    Some('\n') => {}
                    Some(n) => cw.push(n),
                    None => return Err("trailing backslash".into()),
                }
                i += 2;
                continue;
            }
            '\'' => {
                let end = (i + 1..chars.len())
                    .find(|&j| chars[j] == '\'')
                    .ok_or("unterminated single quote")?;
                cw.push_str(&chars[i + 1..end].iter().collect::<String>());
                i = end + 1;
                continue;
            }
            '"' => {
                cw.push_str("");
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated double quote".into()),
                        Some('"') => break,
                        Some('\\') => match chars.get(i + 1) {
                            Some(&n @ ('"' | '\\' | '$' | '`')) => {
                                cw.push(n);
                                i += 1;
                            }
                            Some('\n') => i += 1,
                            _ => cw.push('\\'),
                        },
                        Some('$') if chars.get(i + 1) == Some(&'(') => {
                            let end = substitution_end(chars, i + 2)?;
                            lex(&chars[i + 2..end], cmds)?;
                            cw.push_str("$(...)");
                            i = end;
                        }
                        Some('`') => return Err(BACKQUOTES.into()),
                        Some(&ch) => cw.push(ch),
                    }
                    i += 1;
                }
            }
            '$' if next == Some('(') => {
                let end = substitution_end(chars, i + 2)?;
                lex(&chars[i + 2..end], cmds)?;
                cw.push_str("$(...)");
                i = end;
            }
            '`' => return Err(BACKQUOTES.into()),
            '#' if cw.word.is_none() => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            ' ' | '\t' => cw.end_word(),
            '\n' | ';' | '(' | ')' | '&' | '|' => cw.end_command(cmds),
            '<' | '>' => {
                // A word made only of digits just before is the file descriptor (`2>&1`).
                if cw
                    .word
                    .as_deref()
                    .is_some_and(|w| !w.is_empty() && w.chars().all(|d| d.is_ascii_digit()))
                {
                    cw.word = None;
                } else {
                    cw.end_word();
                }
                if c == '<' && next == Some('<') {
                    return Err("here-documents are not supported by this test's shell reader: put the text in a file".into());
                }
                if matches!(next, Some('>' | '&' | '|')) {
                    i += 1;
                }
                cw.drop_next = true;
            }
            _ => cw.push(c),
        }
        i += 1;
    }
    cw.end_command(cmds);
    Ok(())
}

const BACKQUOTES: &str = "backquotes are not supported by this test's shell reader: use $(...)";

/// Index of the `)` that closes a `$(` whose content starts at `start`.
fn substitution_end(chars: &[char], start: usize) -> Result<usize, String> {
    let mut depth = 1;
    let mut quote: Option<char> = None;
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(q) => {
                if c == '\\' && q == '"' {
                    i += 1;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '\\' => i += 1,
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(i);
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    Err("unterminated $(".into())
}

const SHELL_KEYWORDS: &[&str] = &[
    "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}", "exec",
    "time", "command",
];

/// Index of the word that names the program (after keywords and `VAR=value` assignments).
fn command_start(words: &[String]) -> Option<usize> {
    words.iter().position(|w| {
        let assignment = w.split_once('=').is_some_and(|(n, _)| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        !assignment && !SHELL_KEYWORDS.contains(&w.as_str())
    })
}

// =============================================================================================
// Paths and environment, shared by compose and Kubernetes
// =============================================================================================

/// The absolute file path in a flag value (`/x`, `unix:///x`), if any.
fn abs_path(v: &str) -> Option<&str> {
    let p = v.strip_prefix("unix://").unwrap_or(v);
    (p.starts_with('/') && !p.starts_with("/@")).then_some(p)
}

fn under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || path.starts_with(&format!("{dir}/"))
}

/// Every absolute path in `call`'s options must be inside one of `mounts` (or the image's
/// `/usr`).
fn check_call_paths(call: &Call, mounts: &[String], problems: &mut Vec<String>) {
    for (flag, v) in &call.flags {
        let Some(p) = v.as_deref().and_then(abs_path) else {
            continue;
        };
        if !under(p, "/usr") && !mounts.iter().any(|m| under(p, m)) {
            problems.push(format!(
                "{}: `{}` {flag} `{p}`: nothing is mounted there (mounts: {})",
                call.origin,
                call.name(),
                mounts.join(", ")
            ));
        }
    }
}

/// `KEYHAVEN_*` variables must be read by one of the binaries the container runs, and paths in
/// their values must be mounted.
fn check_env(
    origin: &str,
    env: &BTreeMap<String, String>,
    calls: &[Call],
    mounts: &[String],
    problems: &mut Vec<String>,
) {
    let bins: BTreeSet<&str> = calls.iter().map(|c| c.bin.as_str()).collect();
    let known: BTreeSet<String> = bins.iter().flat_map(|b| all_envs(b)).collect();
    for (name, value) in env {
        if !name.starts_with("KEYHAVEN_") {
            continue;
        }
        // The log filter is read by tracing, not clap, so --help does not list it.
        if name != "KEYHAVEN_LOG" && !known.contains(name) {
            problems.push(format!(
                "{origin}: environment variable `{name}` is not read by {} (not in their --help)",
                if bins.is_empty() {
                    "anything: the container runs none of our binaries".to_owned()
                } else {
                    bins.iter().copied().collect::<Vec<_>>().join(", ")
                }
            ));
        }
        if let Some(p) = abs_path(value) {
            if !under(p, "/usr") && !mounts.iter().any(|m| under(p, m)) {
                problems.push(format!(
                    "{origin}: {name}=`{p}`: nothing is mounted there (mounts: {})",
                    mounts.join(", ")
                ));
            }
        }
    }
}

// =============================================================================================
// Policies and agent configurations
// =============================================================================================

fn parse_policy(text: &str, origin: &str, problems: &mut Vec<String>) -> Option<PolicySet> {
    match PolicySet::from_yaml(text, DEFAULT_MAX_TTL_CAP) {
        Ok(p) => Some(p),
        Err(e) => {
            problems.push(format!(
                "{origin}: the broker refuses this policy document: {e}"
            ));
            None
        }
    }
}

fn may_read(policy: &PolicySet, namespace: &str, serviceaccount: &str, path: &str) -> bool {
    let who = Identity {
        namespace: namespace.to_owned(),
        service_account: serviceaccount.to_owned(),
        pod_name: None,
        pod_uid: None,
    };
    policy.evaluate(&who, path, Capability::Read).is_allowed()
}

/// Parses a broker-agent configuration file with the agent's own parser and rules.
fn parse_agent_config(text: &str, origin: &str, problems: &mut Vec<String>) -> Vec<SecretSpec> {
    let parsed = broker_agent::config::parse_file(text, origin)
        .and_then(|specs| broker_agent::config::validate(&specs).map(|()| specs));
    match parsed {
        Ok(specs) => specs,
        Err(e) => {
            problems.push(format!(
                "{origin}: broker-agent refuses this configuration: {e}"
            ));
            Vec::new()
        }
    }
}

// =============================================================================================
// docker-compose.yml
// =============================================================================================

const EXPECTED_SERVICES: &[&str] = &[
    "hsm-init",
    "kms-plugin",
    "postgres",
    "broker",
    "setup",
    "workload-agent",
    "workload",
];

/// (service, command) pairs the compose file must contain; proves the test found them.
const EXPECTED_COMPOSE_CALLS: &[(&str, &str)] = &[
    ("hsm-init", "kms-plugin token init"),
    ("hsm-init", "kms-plugin keys init"),
    ("hsm-init", "brokerctl keys init"),
    ("hsm-init", "brokerctl dev-ca"),
    ("kms-plugin", "kms-plugin serve"),
    ("kms-plugin", "kms-plugin probe"),
    ("broker", "broker"),
    ("setup", "brokerctl policy apply"),
    ("setup", "brokerctl secrets put"),
    ("setup", "brokerctl dev-token"),
    ("workload-agent", "broker-agent"),
];

/// Keys of the Compose specification (top level, service, healthcheck, depends_on entry):
/// Compose refuses any other (except `x-` extensions), so a misspelt key would only show at
/// `docker compose up`.
const COMPOSE_TOP_KEYS: &[&str] = &[
    "version", "name", "include", "services", "networks", "volumes", "secrets", "configs", "models",
];
const COMPOSE_SERVICE_KEYS: &[&str] = &[
    "annotations",
    "attach",
    "build",
    "blkio_config",
    "cpu_count",
    "cpu_percent",
    "cpu_shares",
    "cpu_quota",
    "cpu_period",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpus",
    "cpuset",
    "cap_add",
    "cap_drop",
    "cgroup",
    "cgroup_parent",
    "command",
    "configs",
    "container_name",
    "credential_spec",
    "depends_on",
    "deploy",
    "develop",
    "device_cgroup_rules",
    "devices",
    "dns",
    "dns_opt",
    "dns_search",
    "domainname",
    "entrypoint",
    "env_file",
    "label_file",
    "environment",
    "expose",
    "extends",
    "external_links",
    "extra_hosts",
    "gpus",
    "group_add",
    "healthcheck",
    "hostname",
    "image",
    "init",
    "ipc",
    "isolation",
    "labels",
    "links",
    "logging",
    "mac_address",
    "mem_limit",
    "mem_reservation",
    "mem_swappiness",
    "memswap_limit",
    "models",
    "network_mode",
    "networks",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "pids_limit",
    "platform",
    "ports",
    "post_start",
    "pre_stop",
    "privileged",
    "profiles",
    "provider",
    "pull_policy",
    "pull_refresh_after",
    "read_only",
    "restart",
    "runtime",
    "scale",
    "secrets",
    "security_opt",
    "shm_size",
    "stdin_open",
    "stop_grace_period",
    "stop_signal",
    "storage_opt",
    "sysctls",
    "tmpfs",
    "tty",
    "ulimits",
    "use_api_socket",
    "user",
    "uts",
    "userns_mode",
    "volumes",
    "volumes_from",
    "working_dir",
];
const COMPOSE_HEALTHCHECK_KEYS: &[&str] = &[
    "disable",
    "interval",
    "retries",
    "test",
    "timeout",
    "start_period",
    "start_interval",
];
const COMPOSE_DEPENDS_ON_KEYS: &[&str] = &["condition", "restart", "required"];

/// Keys of `v` that are neither in `allowed` nor `x-` extensions.
fn unknown_keys(v: Option<&Value>, allowed: &[&str]) -> Vec<String> {
    v.and_then(Value::as_mapping)
        .into_iter()
        .flat_map(|m| m.keys())
        .filter_map(scalar)
        .filter(|k| !k.starts_with("x-") && !allowed.contains(&k.as_str()))
        .collect()
}

/// A mount of a compose service.
#[derive(Debug, Clone)]
struct ComposeMount {
    /// Named volume or config name (None for binds and tmpfs).
    volume: Option<String>,
    config: Option<String>,
    target: String,
    read_only: bool,
}

/// What the compose checks learn about one service.
#[derive(Debug, Default)]
struct ComposeService {
    mounts: Vec<ComposeMount>,
    calls: Vec<Call>,
}

impl ComposeService {
    fn calls_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Call> + 'a {
        self.calls.iter().filter(move |c| c.name() == name)
    }

    fn mount_at(&self, path: &str) -> Option<&ComposeMount> {
        self.mounts
            .iter()
            .filter(|m| under(path, &m.target))
            .max_by_key(|m| m.target.len())
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Every string in the document that holds a lone `$` (Compose would interpolate it).
fn lone_dollars(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            let b = s.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'$' {
                    if b.get(i + 1) == Some(&b'$') {
                        i += 2;
                        continue;
                    }
                    out.push(at.to_owned());
                    return;
                }
                i += 1;
            }
        }
        Value::Sequence(s) => {
            for (i, x) in s.iter().enumerate() {
                lone_dollars(x, &format!("{at}[{i}]"), out);
            }
        }
        Value::Mapping(m) => {
            for (k, x) in m {
                lone_dollars(x, &format!("{at}.{}", scalar(k).unwrap_or_default()), out);
            }
        }
        Value::Tagged(t) => lone_dollars(&t.value, at, out),
        _ => {}
    }
}

/// A compose string as the container sees it (`$$` is a literal `$`).
fn unescape(s: &str) -> String {
    s.replace("$$", "$")
}

/// `command`/`entrypoint`/`healthcheck.test` must be lists of strings.
fn compose_list(svc: &Value, key: &str, origin: &str, problems: &mut Vec<String>) -> Vec<String> {
    match svc.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|x| scalar(x).map(|s| unescape(&s)).unwrap_or_default())
            .collect(),
        Some(_) => {
            problems.push(format!(
                "{origin}: `{key}` must use the list form (a YAML list of arguments), so that no shell splits it"
            ));
            Vec::new()
        }
    }
}

fn check_compose(repo: &Repo) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(text) = repo.read(COMPOSE) else {
        return vec![format!("{COMPOSE} is missing")];
    };
    let mut doc: Value = match serde_yaml_ng::from_str(&text) {
        Ok(v) => v,
        Err(e) => return vec![format!("{COMPOSE}: not YAML: {e}")],
    };
    if let Err(e) = doc.apply_merge() {
        return vec![format!("{COMPOSE}: bad merge key: {e}")];
    }
    let mut dollars = Vec::new();
    lone_dollars(&doc, "", &mut dollars);
    for at in dollars {
        problems.push(format!(
            "{COMPOSE}: {at}: a lone `$` is interpolated by Compose from the host's environment; write `$$` for the shell"
        ));
    }

    for k in unknown_keys(Some(&doc), COMPOSE_TOP_KEYS) {
        problems.push(format!("{COMPOSE}: unknown top-level key `{k}`"));
    }
    let empty = serde_yaml_ng::Mapping::new();
    let services = doc
        .get("services")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let names = |key: &str| -> BTreeSet<String> {
        doc.get(key)
            .and_then(Value::as_mapping)
            .map(|m| m.keys().filter_map(scalar).collect())
            .unwrap_or_default()
    };
    let declared_volumes = names("volumes");
    let declared_configs = names("configs");
    let service_names: BTreeSet<String> = services.keys().filter_map(scalar).collect();
    for s in EXPECTED_SERVICES {
        if !service_names.contains(*s) {
            problems.push(format!("{COMPOSE}: service `{s}` is missing"));
        }
    }
    let dockerfile = check_dockerfile(repo);

    let mut seen: BTreeMap<String, ComposeService> = BTreeMap::new();
    let mut used_volumes = BTreeSet::new();
    let mut used_configs = BTreeSet::new();
    for (name, svc) in services {
        let name = scalar(name).unwrap_or_default();
        let origin = format!("{COMPOSE}: service `{name}`");
        let mut s = ComposeService::default();
        for k in unknown_keys(Some(svc), COMPOSE_SERVICE_KEYS) {
            problems.push(format!(
                "{origin}: unknown key `{k}` (not in the Compose specification)"
            ));
        }
        for k in unknown_keys(svc.get("healthcheck"), COMPOSE_HEALTHCHECK_KEYS) {
            problems.push(format!("{origin}: unknown healthcheck key `{k}`"));
        }
        for (d, entry) in svc
            .get("depends_on")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
        {
            for k in unknown_keys(Some(entry), COMPOSE_DEPENDS_ON_KEYS) {
                problems.push(format!(
                    "{origin}: depends_on `{}`: unknown key `{k}`",
                    scalar(d).unwrap_or_default()
                ));
            }
        }

        // Image or build; the binaries of a shell-less image (a stage FROM scratch).
        let mut shell_less: Option<(String, BTreeSet<String>)> = None;
        let ours = svc
            .get("image")
            .and_then(Value::as_str)
            .is_some_and(|i| i.starts_with("keyhaven/"))
            || svc.get("build").is_some();
        if svc.get("image").is_none() && svc.get("build").is_none() {
            problems.push(format!("{origin}: has neither `image` nor `build`"));
        }
        if let Some(build) = svc.get("build") {
            let context = build.get("context").and_then(Value::as_str).unwrap_or(".");
            let file = build
                .get("dockerfile")
                .and_then(Value::as_str)
                .unwrap_or("Dockerfile");
            let rel = Path::new(context).join(file);
            if !repo.exists(&rel.to_string_lossy()) {
                problems.push(format!(
                    "{origin}: build.dockerfile `{}` does not exist",
                    rel.display()
                ));
            }
            if let Some(t) = build.get("target").and_then(Value::as_str) {
                match dockerfile
                    .stages
                    .iter()
                    .find(|st| st.name.as_deref() == Some(t))
                {
                    None => problems.push(format!(
                        "{origin}: build.target `{t}` is not a stage of {DOCKERFILE}"
                    )),
                    Some(st) if st.image == "scratch" => {
                        shell_less = Some((t.to_owned(), st.copied("/out/")));
                    }
                    Some(_) => {}
                }
            }
        }

        // Mounts: volumes, configs, tmpfs.
        for v in svc
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let m = match v {
                Value::String(short) => {
                    let parts: Vec<&str> = short.split(':').collect();
                    let (src, target, mode) = match parts.as_slice() {
                        [t] => (None, *t, ""),
                        [s, t] => (Some(*s), *t, ""),
                        [s, t, m] => (Some(*s), *t, *m),
                        _ => {
                            problems.push(format!("{origin}: cannot read volume `{short}`"));
                            continue;
                        }
                    };
                    let named = src.filter(|s| !s.starts_with(['/', '.', '~', '$']));
                    ComposeMount {
                        volume: named.map(str::to_owned),
                        config: None,
                        target: target.to_owned(),
                        read_only: mode.split(',').any(|o| o == "ro"),
                    }
                }
                long => ComposeMount {
                    volume: (long.get("type").and_then(Value::as_str) == Some("volume"))
                        .then(|| long.get("source").and_then(scalar))
                        .flatten(),
                    config: None,
                    target: long.get("target").and_then(scalar).unwrap_or_default(),
                    read_only: long.get("read_only").and_then(Value::as_bool) == Some(true),
                },
            };
            if let Some(vol) = &m.volume {
                used_volumes.insert(vol.clone());
                if !declared_volumes.contains(vol) {
                    problems.push(format!(
                        "{origin}: volume `{vol}` is not declared under the top-level `volumes:`"
                    ));
                }
            }
            s.mounts.push(m);
        }
        for c in svc
            .get("configs")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let (source, target) = match c {
                Value::String(n) => (n.clone(), format!("/{n}")),
                long => (
                    long.get("source").and_then(scalar).unwrap_or_default(),
                    long.get("target").and_then(scalar).unwrap_or_else(|| {
                        format!(
                            "/{}",
                            long.get("source").and_then(scalar).unwrap_or_default()
                        )
                    }),
                ),
            };
            used_configs.insert(source.clone());
            if !declared_configs.contains(&source) {
                problems.push(format!(
                    "{origin}: config `{source}` is not declared under the top-level `configs:`"
                ));
            }
            s.mounts.push(ComposeMount {
                volume: None,
                config: Some(source),
                target,
                read_only: true,
            });
        }
        let tmpfs: Vec<String> = match svc.get("tmpfs") {
            Some(Value::String(t)) => vec![t.clone()],
            Some(Value::Sequence(ts)) => ts.iter().filter_map(scalar).collect(),
            _ => Vec::new(),
        };
        for t in tmpfs {
            s.mounts.push(ComposeMount {
                volume: None,
                config: None,
                target: t.split(':').next().unwrap_or_default().to_owned(),
                read_only: false,
            });
        }
        let read_only = svc.get("read_only").and_then(Value::as_bool) == Some(true);
        if !read_only {
            problems.push(format!(
                "{origin}: set `read_only: true` (a read-only root filesystem; a `tmpfs` where a step must write)"
            ));
        }
        let mut targets: Vec<String> = s.mounts.iter().map(|m| m.target.clone()).collect();
        if !read_only {
            // A writable container filesystem: /tmp is usable.
            targets.push("/tmp".to_owned());
        }

        // depends_on.
        match svc.get("depends_on") {
            Some(Value::Sequence(list)) => {
                for d in list.iter().filter_map(scalar) {
                    if !service_names.contains(&d) {
                        problems.push(format!(
                            "{origin}: depends_on `{d}`, which is not a service"
                        ));
                    }
                }
            }
            Some(Value::Mapping(m)) => {
                for (d, cond) in m {
                    let d = scalar(d).unwrap_or_default();
                    let Some(target) = services.get(d.as_str()) else {
                        problems.push(format!(
                            "{origin}: depends_on `{d}`, which is not a service"
                        ));
                        continue;
                    };
                    let c = cond
                        .get("condition")
                        .and_then(Value::as_str)
                        .unwrap_or("service_started");
                    match c {
                        "service_started" => {}
                        "service_healthy" => {
                            if target
                                .get("healthcheck")
                                .and_then(|h| h.get("test"))
                                .is_none()
                            {
                                problems.push(format!(
                                    "{origin}: depends_on `{d}` with service_healthy, but `{d}` has no healthcheck"
                                ));
                            }
                        }
                        "service_completed_successfully" => {
                            let restart = target.get("restart").and_then(Value::as_str);
                            if matches!(restart, Some("always" | "unless-stopped")) {
                                problems.push(format!(
                                    "{origin}: depends_on `{d}` with service_completed_successfully, but `{d}` restarts ({})",
                                    restart.unwrap_or_default()
                                ));
                            }
                        }
                        other => problems.push(format!(
                            "{origin}: depends_on `{d}` has an unknown condition `{other}`"
                        )),
                    }
                }
            }
            _ => {}
        }

        // Commands.
        let entrypoint = compose_list(svc, "entrypoint", &origin, &mut problems);
        let command = compose_list(svc, "command", &origin, &mut problems);
        let argv: Vec<String> = entrypoint.into_iter().chain(command).collect();
        if ours && argv.is_empty() {
            problems.push(format!(
                "{origin}: give a `command`: the Keyhaven images have no ENTRYPOINT"
            ));
        }
        let mut argvs = our_argvs(&argv, &origin, &mut problems);
        if let Some(test) = svc.get("healthcheck").and_then(|h| h.get("test")) {
            let test = match test {
                Value::Sequence(_) => compose_list(
                    svc.get("healthcheck").unwrap_or(&Value::Null),
                    "test",
                    &origin,
                    &mut problems,
                ),
                _ => {
                    problems.push(format!("{origin}: healthcheck.test must use the list form"));
                    Vec::new()
                }
            };
            let hc_argv: Vec<String> = match test.first().map(String::as_str) {
                Some("CMD") => test[1..].to_vec(),
                Some("CMD-SHELL") => ["sh", "-c"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(test[1..].iter().cloned())
                    .collect(),
                _ => Vec::new(),
            };
            argvs.extend(our_argvs(&hc_argv, &origin, &mut problems));
            check_runs_in_image(&origin, "healthcheck", &hc_argv, &shell_less, &mut problems);
        }
        check_runs_in_image(&origin, "command", &argv, &shell_less, &mut problems);
        for a in &argvs {
            let call = parse_call(&origin, a, &mut problems);
            check_call_paths(&call, &targets, &mut problems);
            s.calls.push(call);
        }
        let env: BTreeMap<String, String> = match svc.get("environment") {
            Some(Value::Mapping(m)) => m
                .iter()
                .map(|(k, v)| (scalar(k).unwrap_or_default(), scalar(v).unwrap_or_default()))
                .collect(),
            Some(Value::Sequence(l)) => l
                .iter()
                .filter_map(scalar)
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (kv, String::new()),
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        check_env(&origin, &env, &s.calls, &targets, &mut problems);
        seen.insert(name, s);
    }

    for v in declared_volumes.difference(&used_volumes) {
        problems.push(format!(
            "{COMPOSE}: volume `{v}` is declared but no service uses it"
        ));
    }
    for c in declared_configs.difference(&used_configs) {
        problems.push(format!(
            "{COMPOSE}: config `{c}` is declared but no service uses it"
        ));
    }
    for c in &declared_configs {
        let file = doc
            .get("configs")
            .and_then(|cs| cs.get(c.as_str()))
            .and_then(|c| c.get("file"))
            .and_then(Value::as_str);
        match file {
            Some(f) if repo.exists(f) => {}
            _ => problems.push(format!(
                "{COMPOSE}: config `{c}` needs a `file:` that exists in the repository"
            )),
        }
    }
    // A volume is mounted at the same place everywhere: the files one service writes are where
    // the next one reads them, and the volume's owner comes from the image's directory there.
    let mut volume_targets: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for (svc, s) in &seen {
        for m in &s.mounts {
            if let Some(v) = &m.volume {
                volume_targets
                    .entry(v)
                    .or_default()
                    .entry(&m.target)
                    .or_default()
                    .push(svc);
            }
        }
    }
    for (v, targets) in &volume_targets {
        if targets.len() > 1 {
            let list: Vec<String> = targets
                .iter()
                .map(|(t, svcs)| format!("{t} in service `{}`", svcs.join("`, service `")))
                .collect();
            problems.push(format!(
                "{COMPOSE}: volume `{v}` is mounted at different paths: {}",
                list.join("; ")
            ));
        }
    }

    // A service that runs until `down` comes back by itself when it dies (the one-shots, which
    // others wait on with service_completed_successfully, must not).
    let one_shots: BTreeSet<String> = services
        .values()
        .filter_map(|s| s.get("depends_on").and_then(Value::as_mapping))
        .flatten()
        .filter(|(_, c)| {
            c.get("condition").and_then(Value::as_str) == Some("service_completed_successfully")
        })
        .filter_map(|(d, _)| scalar(d))
        .collect();
    for (name, svc) in services {
        let name = scalar(name).unwrap_or_default();
        let restart = svc.get("restart").and_then(Value::as_str);
        if !one_shots.contains(&name)
            && !matches!(restart, Some("always" | "unless-stopped" | "on-failure"))
        {
            problems.push(format!(
                "{COMPOSE}: service `{name}` runs until `down`: give it a restart policy (`restart: unless-stopped`)"
            ));
        }
    }

    for (svc, call) in EXPECTED_COMPOSE_CALLS {
        if seen
            .get(*svc)
            .is_none_or(|s| s.calls_named(call).next().is_none())
        {
            problems.push(format!(
                "{COMPOSE}: service `{svc}` should run `{call}` (not found in its command)"
            ));
        }
    }
    compose_semantics(repo, &doc, &seen, &dockerfile, &mut problems);
    problems
}

/// A service whose image is shell-less runs only the binaries that image ships: no `sh -c`, no
/// `CMD-SHELL` or `test` healthcheck.
fn check_runs_in_image(
    origin: &str,
    what: &str,
    argv: &[String],
    shell_less: &Option<(String, BTreeSet<String>)>,
    problems: &mut Vec<String>,
) {
    let (Some((target, bins)), Some(first)) = (shell_less, argv.first()) else {
        return;
    };
    if !bins.contains(basename(first)) {
        problems.push(format!(
            "{origin}: its {what} runs `{first}`, but its image (stage `{target}`, FROM scratch) has no shell and holds only {bins:?}"
        ));
    }
}

/// What makes the demo work end to end, beyond each command line being valid.
fn compose_semantics(
    repo: &Repo,
    doc: &Value,
    seen: &BTreeMap<String, ComposeService>,
    dockerfile: &DockerfileFacts,
    problems: &mut Vec<String>,
) {
    let all_calls = || seen.values().flat_map(|s| s.calls.iter());
    let svc = |n: &str| seen.get(n);

    // One token, one PIN file.
    for flag in ["--token-label", "--pin-file"] {
        let values: BTreeMap<&str, Vec<String>> =
            all_calls().fold(BTreeMap::new(), |mut acc, c| {
                for v in c.values(flag) {
                    acc.entry(v)
                        .or_default()
                        .push(format!("{} ({})", c.name(), c.origin));
                }
                acc
            });
        if values.len() > 1 {
            problems.push(format!(
                "{COMPOSE}: every {flag} must be the same, but: {values:?}"
            ));
        }
    }

    // The SoftHSM2 token directory is in a volume wherever the token is used.
    if let Some(tokendir) = &dockerfile.softhsm_tokendir {
        for (name, s) in seen {
            let uses_hsm = s.calls.iter().any(|c| {
                matches!(
                    c.name().as_str(),
                    "kms-plugin serve" | "kms-plugin token init" | "broker" | "brokerctl keys init"
                ) || c.path.first().is_some_and(|p| p == "keys") && c.bin == "kms-plugin"
            });
            let mounted = s
                .mounts
                .iter()
                .any(|m| m.volume.is_some() && m.target == *tokendir);
            if uses_hsm && !mounted {
                problems.push(format!(
                    "{COMPOSE}: service `{name}` uses the SoftHSM2 token, but no volume is mounted at its tokendir `{tokendir}` ({SOFTHSM_CONF})"
                ));
            }
        }
    }

    // The plugin serves the metrics on all interfaces, on 9464.
    if let Some(c) = svc("kms-plugin").and_then(|s| s.calls_named("kms-plugin serve").next()) {
        if c.value("--metrics-addr") != Some("0.0.0.0:9464") {
            problems.push(format!(
                "{}: `kms-plugin serve` should have --metrics-addr 0.0.0.0:9464",
                c.origin
            ));
        }
    }
    // The broker: TLS, a database URL from a file, dev mode.
    if let Some(c) = svc("broker").and_then(|s| s.calls_named("broker").next()) {
        for f in [
            "--tls-cert",
            "--tls-key",
            "--database-url-file",
            "--dev",
            "--dev-key",
        ] {
            if !c.has(f) {
                problems.push(format!("{}: `broker` should have {f}", c.origin));
            }
        }
    }

    // The broker's certificate covers the names clients dial.
    let hosts: BTreeSet<String> = all_calls()
        .filter(|c| c.name() == "brokerctl dev-ca")
        .flat_map(|c| c.values("--hosts"))
        .flat_map(|h| h.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    for c in all_calls() {
        for flag in ["--addr", "--broker-addr"] {
            for url in c.values(flag) {
                let host = url_host_port(url).0;
                if !hosts.contains(&host) {
                    problems.push(format!(
                        "{}: {flag} {url}: the dev certificate (brokerctl dev-ca --hosts {}) does not name `{host}`",
                        c.origin,
                        hosts.iter().cloned().collect::<Vec<_>>().join(",")
                    ));
                }
            }
        }
    }

    // The dev token is signed with the key the broker trusts.
    let broker_key = svc("broker")
        .and_then(|s| s.calls_named("broker").next())
        .and_then(|c| c.value("--dev-key"));
    for c in all_calls().filter(|c| c.name() == "brokerctl dev-token") {
        if c.value("--dev-key") != broker_key {
            problems.push(format!(
                "{}: dev-token --dev-key {:?} is not the broker's --dev-key {broker_key:?}",
                c.origin,
                c.value("--dev-key")
            ));
        }
    }

    // The policy allows the demo workload what its agent asks for, and refuses the rest.
    let config_file = |s: &ComposeService, path: &str| -> Option<(String, String)> {
        let m = s
            .mounts
            .iter()
            .find(|m| m.target == path && m.config.is_some())?;
        let f = doc
            .get("configs")?
            .get(m.config.as_deref()?)?
            .get("file")?
            .as_str()?
            .trim_start_matches("./")
            .to_owned();
        Some((f.clone(), repo.read(&f)?))
    };
    let setup = svc("setup");
    let policy = setup
        .and_then(|s| {
            let apply = s.calls_named("brokerctl policy apply").next()?;
            let file = apply.value("--filename").or(apply.value("-f"))?;
            let found = config_file(s, file);
            if found.is_none() {
                problems.push(format!(
                    "{}: policy apply --filename {file}: no compose config is mounted there",
                    apply.origin
                ));
            }
            found
        })
        .and_then(|(f, text)| parse_policy(&text, &f, problems));
    let identity = setup
        .and_then(|s| s.calls_named("brokerctl dev-token").next())
        .map(|c| {
            (
                c.value("--namespace").unwrap_or_default().to_owned(),
                c.value("--serviceaccount")
                    .or(c.value("--service-account"))
                    .unwrap_or_default()
                    .to_owned(),
            )
        });
    let agent = svc("workload-agent");
    let agent_call = agent.and_then(|s| s.calls_named("broker-agent").next());
    let agent_secrets = agent.zip(agent_call).and_then(|(s, c)| {
        let file = c.value("--config")?;
        let found = config_file(s, file);
        if found.is_none() {
            problems.push(format!(
                "{}: broker-agent --config {file}: no compose config is mounted there",
                c.origin
            ));
        }
        found
    });
    let agent_secrets = agent_secrets
        .map(|(f, text)| parse_agent_config(&text, &f, problems))
        .unwrap_or_default();
    if let (Some(policy), Some((ns, sa))) = (&policy, &identity) {
        for a in &agent_secrets {
            if !may_read(policy, ns, sa, &a.path) {
                problems.push(format!(
                    "deploy/compose/agent.yaml: the demo policy does not allow {ns}/{sa} (the dev token) to read `{}`",
                    a.path
                ));
            }
        }
        for c in setup
            .into_iter()
            .flat_map(|s| s.calls_named("brokerctl lease"))
        {
            for p in &c.positionals {
                if may_read(policy, ns, sa, p) {
                    problems.push(format!(
                        "{}: setup expects `brokerctl lease {p}` to be refused, but the demo policy allows it to {ns}/{sa}",
                        c.origin
                    ));
                }
            }
        }
    }
    // The secret setup puts is one the agent reads; raw entries name one of its keys.
    for c in setup
        .into_iter()
        .flat_map(|s| s.calls_named("brokerctl secrets put"))
    {
        let Some(path) = c.positionals.first() else {
            continue;
        };
        let keys: BTreeSet<&str> = ["--from-literal", "--from-file"]
            .iter()
            .flat_map(|f| c.values(f))
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
            .collect();
        let mut read = false;
        for a in agent_secrets.iter().filter(|a| &a.path == path) {
            read = true;
            if a.format == Format::Raw {
                match &a.key {
                    Some(k) if keys.contains(k.as_str()) => {}
                    Some(k) => problems.push(format!(
                        "deploy/compose/agent.yaml: raw entry for {path} names key `{k}`, but setup puts only {keys:?}"
                    )),
                    None if keys.len() > 1 => problems.push(format!(
                        "deploy/compose/agent.yaml: raw entry for {path} needs `key:` (the secret has {keys:?})"
                    )),
                    None => {}
                }
            }
        }
        if !read {
            problems.push(format!(
                "{}: setup puts `{path}`, which the agent does not read",
                c.origin
            ));
        }
    }

    // The agent writes into an in-memory volume that the app mounts read-only.
    if let (Some(a), Some(c)) = (agent, agent_call) {
        let dir = c.value("--output-dir").unwrap_or(AGENT_DEFAULT_OUTPUT_DIR);
        let vol = a
            .mount_at(dir)
            .filter(|m| !m.read_only)
            .and_then(|m| m.volume.clone());
        match vol {
            None => problems.push(format!(
                "{}: broker-agent --output-dir {dir} is not a writable named volume",
                c.origin
            )),
            Some(v) => {
                let tmpfs = doc
                    .get("volumes")
                    .and_then(|vs| vs.get(v.as_str()))
                    .and_then(|d| d.get("driver_opts"))
                    .and_then(|o| o.get("type"))
                    .and_then(Value::as_str)
                    == Some("tmpfs");
                if !tmpfs {
                    problems.push(format!(
                        "{COMPOSE}: volume `{v}` (the agent's --output-dir) must be a tmpfs (driver_opts type: tmpfs)"
                    ));
                }
                match svc("workload").and_then(|w| {
                    w.mounts
                        .iter()
                        .find(|m| m.volume.as_deref() == Some(v.as_str()))
                }) {
                    Some(m) if m.read_only => {}
                    Some(_) => problems.push(format!(
                        "{COMPOSE}: service `workload` must mount `{v}` read-only (`:ro`)"
                    )),
                    None => problems.push(format!(
                        "{COMPOSE}: service `workload` does not mount `{v}`, the agent's files"
                    )),
                }
            }
        }
    }
}

/// `https://host:port/x` → (host, port).
fn url_host_port(url: &str) -> (String, Option<u16>) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().ok()),
        None => (authority.to_owned(), None),
    }
}

// =============================================================================================
// deploy/Dockerfile
// =============================================================================================

#[derive(Debug)]
struct Stage {
    name: Option<String>,
    image: String,
    /// (INSTRUCTION, arguments), continuation lines joined.
    instructions: Vec<(String, String)>,
}

impl Stage {
    /// The files this stage COPYs from `binaries` whose path is `prefix` + a file name: with
    /// `/out/`, the binaries it ships; with `/out/sbom/`, their SBOMs.
    fn copied(&self, prefix: &str) -> BTreeSet<String> {
        self.instructions
            .iter()
            .filter(|(i, a)| i == "COPY" && a.contains("--from=binaries"))
            .flat_map(|(_, a)| a.split_whitespace())
            .filter_map(|w| w.strip_prefix(prefix))
            .filter(|w| !w.contains('/'))
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Debug, Default)]
struct DockerfileFacts {
    stages: Vec<Stage>,
    /// `directories.tokendir` of the SoftHSM2 configuration the image uses.
    softhsm_tokendir: Option<String>,
    problems: Vec<String>,
}

fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = line.trim_end().strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(line);
            logical.push(std::mem::take(&mut cur));
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    // `ARG NAME=default` before the first FROM: FROM lines see them, with their defaults (what
    // `docker compose up --build` uses).
    let mut global_args: Vec<(String, String)> = Vec::new();
    for l in logical {
        let l = l.trim();
        let (instr, args) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        let instr = instr.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if instr == "ARG" && stages.is_empty() {
            if let Some((k, v)) = args.split_once('=') {
                let v = expand_args(v.trim(), &global_args);
                global_args.push((k.trim().to_owned(), v));
            }
        } else if instr == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            stages.push(Stage {
                image: expand_args(words.first().copied().unwrap_or_default(), &global_args),
                name: match words.as_slice() {
                    [_, as_, n] if as_.eq_ignore_ascii_case("as") => Some((*n).to_owned()),
                    _ => None,
                },
                instructions: Vec::new(),
            });
        } else if let Some(s) = stages.last_mut() {
            s.instructions.push((instr, args));
        }
    }
    stages
}

/// `${NAME}` and `$NAME` in `s`, replaced by the ARG defaults seen so far (the last one wins).
fn expand_args(s: &str, args: &[(String, String)]) -> String {
    let mut out = s.to_owned();
    for (k, v) in args.iter().rev() {
        out = out.replace(&format!("${{{k}}}"), v);
    }
    for (k, v) in args.iter().rev() {
        out = out.replace(&format!("${k}"), v);
    }
    out
}

fn check_dockerfile(repo: &Repo) -> DockerfileFacts {
    let mut facts = DockerfileFacts::default();
    let p = &mut facts.problems;
    let Some(text) = repo.read(DOCKERFILE) else {
        p.push(format!("{DOCKERFILE} is missing"));
        return facts;
    };
    let stages = parse_dockerfile(&text);
    let bins = workspace_binaries();
    let stage_name = |s: &Stage| s.name.clone().unwrap_or_else(|| s.image.clone());

    // Builder and runtime on the same Debian release (glibc).
    let builders: Vec<&Stage> = stages
        .iter()
        .filter(|s| {
            s.instructions
                .iter()
                .any(|(i, a)| i == "RUN" && a.contains("cargo build"))
        })
        .collect();
    if builders.is_empty() {
        p.push(format!("{DOCKERFILE}: no stage runs `cargo build`"));
    }
    for b in &builders {
        if !(b.image.starts_with("rust:") && b.image.ends_with("-bookworm")) {
            p.push(format!(
                "{DOCKERFILE}: the build stage must be rust:*-bookworm (the runtime is bookworm), not {}",
                b.image
            ));
        }
    }
    if !stages.iter().any(|s| s.image == "debian:bookworm-slim") {
        p.push(format!(
            "{DOCKERFILE}: the runtime stage must be FROM debian:bookworm-slim (the build stage is bookworm)"
        ));
    }

    // The binaries it builds and ships are real.
    let mut built = BTreeSet::new();
    for s in &stages {
        for (instr, args) in &s.instructions {
            let words: Vec<&str> = args.split_whitespace().collect();
            if instr == "RUN" && args.contains("cargo build") {
                for f in ["--release", "--locked"] {
                    if !words.contains(&f) {
                        p.push(format!("{DOCKERFILE}: `cargo build` must use {f}"));
                    }
                }
                for w in words.windows(2).filter(|w| w[0] == "--bin") {
                    built.insert(w[1].to_owned());
                }
            }
            let mentioned = words.iter().filter_map(|w| {
                w.trim_matches(|c| c == '"' || c == ',' || c == '[' || c == ']')
                    .rsplit_once("target/release/")
                    .map(|(_, b)| b)
                    .or_else(|| {
                        w.strip_prefix("/out/")
                            .filter(|b| *b != "sbom" && !b.starts_with("sbom/"))
                    })
                    .or_else(|| w.strip_prefix("/usr/local/bin/"))
            });
            for b in mentioned.filter(|b| !b.is_empty()) {
                if !bins.contains(b) {
                    p.push(format!(
                        "{DOCKERFILE}: stage `{}` names binary `{b}`, which is not a bin target of the workspace",
                        stage_name(s)
                    ));
                }
            }
            if instr == "CMD" || instr == "ENTRYPOINT" {
                let first = serde_json::from_str::<Vec<String>>(args)
                    .ok()
                    .and_then(|v| v.first().cloned());
                match first {
                    Some(b) if bins.contains(&b) => {}
                    other => p.push(format!(
                        "{DOCKERFILE}: stage `{}`: {instr} must be a JSON list starting with one of our binaries, not {other:?}",
                        stage_name(s)
                    )),
                }
            }
        }
    }
    // Each binary an image ships comes with its SBOM (scripts/sbom.sh), which the build stage
    // makes.
    if !stages.iter().any(|s| {
        s.instructions
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("scripts/sbom.sh /out/sbom"))
    }) {
        p.push(format!(
            "{DOCKERFILE}: no stage runs `scripts/sbom.sh /out/sbom` (the SBOM of each binary)"
        ));
    }
    for s in &stages {
        let sboms = s.copied("/out/sbom/");
        let docs_dir = s.instructions.iter().any(|(i, a)| {
            i == "COPY" && a.contains("/out/sbom/") && a.ends_with(" /usr/share/doc/keyhaven/")
        });
        for b in s.copied("/out/") {
            if !sboms.contains(&format!("{b}.cdx.json")) || !docs_dir {
                p.push(format!(
                    "{DOCKERFILE}: stage `{}` ships `{b}` without its SBOM: COPY --from=binaries /out/sbom/{b}.cdx.json /usr/share/doc/keyhaven/",
                    stage_name(s)
                ));
            }
        }
    }
    for b in &built {
        if !bins.contains(b) {
            p.push(format!(
                "{DOCKERFILE}: `cargo build --bin {b}`: `{b}` is not a bin target of the workspace"
            ));
        }
    }
    for b in OUR_BINARIES {
        if !built.contains(*b) {
            p.push(format!(
                "{DOCKERFILE}: `cargo build` does not build `{b}` (--bin {b})"
            ));
        }
    }

    // Every stage that ships our binaries runs them as a non-root user.
    for s in &stages {
        let ships = s
            .instructions
            .iter()
            .any(|(i, a)| i == "COPY" && a.contains("--from="));
        let user = s
            .instructions
            .iter()
            .rev()
            .find(|(i, _)| i == "USER")
            .map(|(_, a)| a.split(':').next().unwrap_or_default().to_owned());
        if ships && matches!(user.as_deref(), None | Some("0" | "root")) {
            p.push(format!(
                "{DOCKERFILE}: stage `{}` ships our binaries but has no non-root USER",
                stage_name(s)
            ));
        }
    }

    // Packages, files copied from the context, the SoftHSM2 configuration.
    let installs: String = stages
        .iter()
        .flat_map(|s| s.instructions.iter())
        .filter(|(i, a)| i == "RUN" && a.contains("apt-get install"))
        .map(|(_, a)| a.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    for pkg in ["softhsm2", "ca-certificates"] {
        if !installs.split_whitespace().any(|w| w == pkg) {
            p.push(format!(
                "{DOCKERFILE}: the runtime must apt-get install {pkg}"
            ));
        }
    }
    let mut conf_dest = None;
    let mut conf_env = None;
    for (instr, args) in stages.iter().flat_map(|s| s.instructions.iter()) {
        if instr == "COPY" && !args.contains("--from=") {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            if let Some((dest, srcs)) = words.split_last() {
                for src in srcs {
                    if !repo.exists(src) {
                        p.push(format!(
                            "{DOCKERFILE}: COPY {src}: not in the build context"
                        ));
                    }
                    if *src == SOFTHSM_CONF {
                        conf_dest = Some((*dest).to_owned());
                    }
                }
            }
        }
        if instr == "ENV" {
            if let Some(v) = args.strip_prefix("SOFTHSM2_CONF=") {
                conf_env = Some(v.trim().to_owned());
            }
        }
    }
    if conf_dest.is_none() || conf_dest != conf_env {
        p.push(format!(
            "{DOCKERFILE}: ENV SOFTHSM2_CONF ({conf_env:?}) must be where {SOFTHSM_CONF} is copied ({conf_dest:?})"
        ));
    }
    match repo.read(SOFTHSM_CONF) {
        None => p.push(format!("{SOFTHSM_CONF} is missing")),
        Some(conf) => {
            let dir = conf.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "directories.tokendir").then(|| v.trim().to_owned())
            });
            match dir {
                None => p.push(format!("{SOFTHSM_CONF}: no directories.tokendir")),
                Some(d) => {
                    if !text.contains(&d) {
                        p.push(format!(
                            "{DOCKERFILE}: the SoftHSM2 tokendir {d} ({SOFTHSM_CONF}) is not created in the image"
                        ));
                    }
                    facts.softhsm_tokendir = Some(d);
                }
            }
        }
    }
    let p = &mut facts.problems;

    // .dockerignore keeps build output, dev state and .git out of the context.
    let ignore = repo.read(DOCKERIGNORE).unwrap_or_default();
    let entries: BTreeSet<&str> = ignore
        .lines()
        .map(|l| l.trim().trim_start_matches('/').trim_end_matches('/'))
        .collect();
    for e in ["target", ".keyhaven-dev", ".git"] {
        if !entries.contains(e) {
            p.push(format!("{DOCKERIGNORE} must exclude `{e}/`"));
        }
    }
    facts.stages = stages;
    facts
}

// =============================================================================================
// docs/operations.md
// =============================================================================================

/// The commands in the guide's `sh` blocks that run our binaries, directly or through
/// `kubectl exec ... --` / `docker compose exec SERVICE`, use real subcommands and flags.
fn check_docs(repo: &Repo) -> Vec<String> {
    [OPERATIONS_DOC, INJECTOR_DOC, DB_CREDENTIALS_DOC]
        .iter()
        .flat_map(|d| check_doc(repo, d))
        .collect()
}

/// Every command of ours in `doc`'s `sh` blocks is a real command line.
fn check_doc(repo: &Repo, doc: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(text) = repo.read(doc) else {
        return vec![format!("{doc} is missing")];
    };
    let mut block: Option<(usize, String)> = None;
    let mut found = 0;
    for (n, line) in text.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut block, fence) {
            (None, Some(lang)) if lang.trim() == "sh" => block = Some((n + 2, String::new())),
            (Some((start, script)), Some(_)) => {
                let origin = format!("{doc}: the sh block at line {start}");
                match shell_commands(script) {
                    Ok(cmds) => {
                        for c in cmds {
                            if let Some(i) = doc_command_start(&c) {
                                parse_call(&origin, &c[i..], &mut problems);
                                found += 1;
                            }
                        }
                    }
                    Err(e) => problems.push(format!("{origin}: cannot read it: {e}")),
                }
                block = None;
            }
            (Some((_, script)), None) => {
                script.push_str(line);
                script.push('\n');
            }
            _ => {}
        }
    }
    if found == 0 {
        problems.push(format!("{doc}: no command of ours found in its sh blocks"));
    }
    problems
}

/// Where one of our binaries is run in a documented command: at the command position, after
/// `--` (`kubectl exec POD -- brokerctl`), or after `exec SERVICE` (`docker compose exec`).
fn doc_command_start(words: &[String]) -> Option<usize> {
    let start = command_start(words)?;
    (start..words.len()).find(|&i| {
        OUR_BINARIES.contains(&basename(&words[i]))
            && (i == start
                || words[i - 1] == "--"
                || (i >= 2 && words[i - 2] == "exec" && !words[i - 1].starts_with('-')))
    })
}

// =============================================================================================
// deploy/kubernetes/
// =============================================================================================

#[derive(Debug)]
struct Doc {
    file: String,
    v: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.v
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.v
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
    fn namespace(&self) -> &str {
        self.v
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default")
    }
    fn label(&self) -> String {
        format!("{}: {} `{}`", self.file, self.kind(), self.name())
    }
    fn pod_spec(&self) -> Option<&Value> {
        let spec = self.v.get("spec")?;
        match self.kind() {
            "Pod" => Some(spec),
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                spec.get("template")?.get("spec")
            }
            "CronJob" => spec
                .get("jobTemplate")?
                .get("spec")?
                .get("template")?
                .get("spec"),
            _ => None,
        }
    }
}

/// One container of a pod, as the checks see it.
#[derive(Debug)]
struct K8sContainer<'a> {
    doc: &'a Doc,
    init: bool,
    name: String,
    v: &'a Value,
    calls: Vec<Call>,
    /// mountPath → (volume name, readOnly).
    mounts: BTreeMap<String, (String, bool)>,
    env: BTreeMap<String, String>,
}

impl K8sContainer<'_> {
    fn origin(&self) -> String {
        format!(
            "{}, {} `{}`",
            self.doc.label(),
            if self.init {
                "initContainer"
            } else {
                "container"
            },
            self.name
        )
    }
    fn call(&self, name: &str) -> Option<&Call> {
        self.calls.iter().find(|c| c.name() == name)
    }
    /// The volume mounted at (or above) `path`, with its readOnly flag.
    fn mount_at(&self, path: &str) -> Option<(&str, &(String, bool))> {
        self.mounts
            .iter()
            .filter(|(t, _)| under(path, t))
            .max_by_key(|(t, _)| t.len())
            .map(|(t, m)| (t.as_str(), m))
    }
}

fn seq_of<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key)
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
}

fn str_at<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for k in keys {
        cur = cur.get(*k)?;
    }
    cur.as_str()
}

fn load_kubernetes(repo: &Repo, problems: &mut Vec<String>) -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in repo.kubernetes_files() {
        let Some(text) = repo.read(&file) else {
            continue;
        };
        for d in serde_yaml_ng::Deserializer::from_str(&text) {
            // `singleton_map::deserialize` is `Value::deserialize(d)` for a non-enum type; it
            // spares this crate a direct `serde` dependency for the trait.
            match serde_yaml_ng::with::singleton_map::deserialize::<Value, _>(d) {
                Ok(Value::Null) => {}
                Ok(v) => docs.push(Doc {
                    file: file.clone(),
                    v,
                }),
                Err(e) => problems.push(format!("{file}: not YAML: {e}")),
            }
        }
    }
    docs
}

fn check_kubernetes(repo: &Repo) -> Vec<String> {
    let mut problems = Vec::new();
    let docs = load_kubernetes(repo, &mut problems);
    let mut containers: Vec<K8sContainer> = Vec::new();

    for doc in &docs {
        let Some(pod) = doc.pod_spec() else {
            continue;
        };
        let volumes: BTreeMap<String, &Value> = seq_of(pod, "volumes")
            .filter_map(|v| Some((v.get("name")?.as_str()?.to_owned(), v)))
            .collect();
        let host_network = pod.get("hostNetwork").and_then(Value::as_bool) == Some(true);
        let automount = pod
            .get("automountServiceAccountToken")
            .and_then(Value::as_bool)
            .or_else(|| {
                let sa = str_at(pod, &["serviceAccountName"]).unwrap_or("default");
                docs.iter()
                    .find(|d| {
                        d.kind() == "ServiceAccount"
                            && d.name() == sa
                            && d.namespace() == doc.namespace()
                    })
                    .and_then(|d| d.v.get("automountServiceAccountToken"))
                    .and_then(Value::as_bool)
            })
            .unwrap_or(true);
        let mut used_volumes = BTreeSet::new();
        for (init, key) in [(true, "initContainers"), (false, "containers")] {
            for c in seq_of(pod, key) {
                let mut kc = K8sContainer {
                    doc,
                    init,
                    name: str_at(c, &["name"]).unwrap_or_default().to_owned(),
                    v: c,
                    calls: Vec::new(),
                    mounts: BTreeMap::new(),
                    env: BTreeMap::new(),
                };
                let origin = kc.origin();
                for m in seq_of(c, "volumeMounts") {
                    let name = str_at(m, &["name"]).unwrap_or_default().to_owned();
                    if !volumes.contains_key(&name) {
                        problems.push(format!(
                            "{origin}: volumeMount `{name}` names no volume of the pod"
                        ));
                    }
                    used_volumes.insert(name.clone());
                    let ro = m.get("readOnly").and_then(Value::as_bool) == Some(true);
                    kc.mounts.insert(
                        str_at(m, &["mountPath"]).unwrap_or_default().to_owned(),
                        (name, ro),
                    );
                }
                let mut targets: Vec<String> = kc.mounts.keys().cloned().collect();
                if automount {
                    targets.push(K8S_SA_DIR.to_owned());
                }
                let mut argv = Vec::new();
                for key in ["command", "args"] {
                    match c.get(key) {
                        None => {}
                        Some(Value::Sequence(items)) => {
                            argv.extend(items.iter().map(|x| scalar(x).unwrap_or_default()));
                        }
                        Some(_) => problems.push(format!("{origin}: `{key}` must be a list")),
                    }
                }
                let ours = str_at(c, &["image"]).is_some_and(|i| i.starts_with("keyhaven/"));
                if ours && c.get("command").is_none() {
                    problems.push(format!(
                        "{origin}: give a `command`: the Keyhaven images have no ENTRYPOINT"
                    ));
                }
                for a in our_argvs(&argv, &origin, &mut problems) {
                    let call = parse_call(&origin, &a, &mut problems);
                    check_call_paths(&call, &targets, &mut problems);
                    kc.calls.push(call);
                }
                if ours && kc.calls.is_empty() {
                    problems.push(format!(
                        "{origin}: runs a Keyhaven image but none of our binaries"
                    ));
                }
                for e in seq_of(c, "env") {
                    kc.env.insert(
                        str_at(e, &["name"]).unwrap_or_default().to_owned(),
                        e.get("value").and_then(scalar).unwrap_or_default(),
                    );
                }
                check_env(&origin, &kc.env, &kc.calls, &targets, &mut problems);
                check_probes(&kc, host_network, &mut problems);
                check_hardening(&kc, pod, &mut problems);
                containers.push(kc);
            }
        }
        for v in volumes.keys() {
            if !used_volumes.contains(v) {
                problems.push(format!(
                    "{}: volume `{v}` is not mounted by any container",
                    doc.label()
                ));
            }
        }
    }

    for (file, call) in [
        ("kms-plugin-static-pod.yaml", "kms-plugin serve"),
        ("broker.yaml", "broker"),
        ("example-workload.yaml", "broker-agent"),
        ("injector.yaml", "keyhaven-injector serve"),
    ] {
        if !containers
            .iter()
            .any(|c| c.doc.file.ends_with(file) && c.call(call).is_some())
        {
            problems.push(format!("{K8S_DIR}/{file}: no container runs `{call}`"));
        }
    }
    check_images(repo, &containers, &mut problems);
    check_broker_manifest(&docs, &containers, &mut problems);
    check_workload_manifest(&docs, &containers, &mut problems);
    check_injector_manifest(&docs, &containers, &mut problems);
    problems
}

/// The port of `--metrics-addr` (or `KEYHAVEN_METRICS_ADDR`), and whether it is loopback.
fn metrics_addr(c: &K8sContainer) -> Option<(u16, bool)> {
    let addr = c
        .calls
        .iter()
        .find_map(|call| call.value("--metrics-addr").map(str::to_owned))
        .or_else(|| c.env.get("KEYHAVEN_METRICS_ADDR").cloned())?;
    let (host, port) = addr.rsplit_once(':')?;
    Some((
        port.parse().ok()?,
        host == "127.0.0.1" || host == "localhost",
    ))
}

/// HTTP probes hit a declared port; on our containers, the metrics listener.
fn check_probes(c: &K8sContainer, host_network: bool, problems: &mut Vec<String>) {
    let ports: BTreeMap<String, u64> = seq_of(c.v, "ports")
        .filter_map(|p| {
            Some((
                str_at(p, &["name"]).unwrap_or_default().to_owned(),
                p.get("containerPort")?.as_u64()?,
            ))
        })
        .collect();
    let metrics = metrics_addr(c);
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let Some(get) = c.v.get(probe).and_then(|p| p.get("httpGet")) else {
            continue;
        };
        let port = match get.get("port") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(name)) => {
                let p = ports.get(name).copied();
                if p.is_none() {
                    problems.push(format!(
                        "{}: {probe} uses port `{name}`, which the container does not declare",
                        c.origin()
                    ));
                }
                p
            }
            _ => None,
        };
        let path = str_at(get, &["path"]).unwrap_or_default();
        if let (Some((mport, loopback)), Some(port)) = (metrics, port) {
            if port != u64::from(mport) {
                problems.push(format!(
                    "{}: {probe} {path} goes to port {port}, but the metrics listener (--metrics-addr) is on {mport}",
                    c.origin()
                ));
            }
            if loopback && !host_network {
                problems.push(format!(
                    "{}: {probe}: the metrics listener is on loopback, which the kubelet cannot reach without hostNetwork",
                    c.origin()
                ));
            }
            if !["/healthz", "/readyz"].contains(&path) {
                problems.push(format!(
                    "{}: {probe} path `{path}`: our binaries serve /healthz and /readyz",
                    c.origin()
                ));
            }
        }
    }
}

fn policy_documents(docs: &[Doc], problems: &mut Vec<String>) -> Vec<(String, PolicySet)> {
    let mut out = Vec::new();
    for d in docs.iter().filter(|d| d.kind() == "ConfigMap") {
        for (k, v) in
            d.v.get("data")
                .and_then(Value::as_mapping)
                .into_iter()
                .flatten()
        {
            let Some(text) = v.as_str() else { continue };
            let is_policy = serde_yaml_ng::from_str::<Value>(text)
                .ok()
                .is_some_and(|v| v.get("policies").is_some());
            if is_policy {
                let origin = format!("{}, key `{}`", d.label(), scalar(k).unwrap_or_default());
                if let Some(p) = parse_policy(text, &origin, problems) {
                    out.push((origin, p));
                }
            }
        }
    }
    out
}

fn check_broker_manifest(docs: &[Doc], containers: &[K8sContainer], problems: &mut Vec<String>) {
    let file = format!("{K8S_DIR}/broker.yaml");
    let Some(broker) = containers
        .iter()
        .find(|c| c.doc.file == file && c.call("broker").is_some())
    else {
        return;
    };
    let origin = broker.origin();
    let call = broker.call("broker").expect("checked above");
    let pod = broker.doc.pod_spec().expect("a container has a pod");
    let ns = broker.doc.namespace();

    // Namespace and identity.
    if !docs
        .iter()
        .any(|d| d.kind() == "Namespace" && d.name() == ns)
    {
        problems.push(format!("{file}: no Namespace `{ns}`"));
    }
    let sa = str_at(pod, &["serviceAccountName"]).unwrap_or("default");
    if !docs
        .iter()
        .any(|d| d.kind() == "ServiceAccount" && d.name() == sa && d.namespace() == ns)
    {
        problems.push(format!("{origin}: ServiceAccount `{sa}` is not defined"));
    }

    // TokenReview needs `create` on tokenreviews, bound to the broker's service account.
    let grants_tokenreview = |d: &Doc| {
        seq_of(&d.v, "rules").any(|r| {
            let has = |k: &str, x: &str| seq_of(r, k).any(|v| v.as_str() == Some(x));
            has("apiGroups", "authentication.k8s.io")
                && has("resources", "tokenreviews")
                && has("verbs", "create")
        })
    };
    let roles: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.file == file && d.kind() == "ClusterRole" && grants_tokenreview(d))
        .collect();
    if roles.is_empty() {
        problems.push(format!(
            "{file}: no ClusterRole grants `create` on `tokenreviews` (authentication.k8s.io), which --token-review needs"
        ));
    }
    // The pod / service-account watch needs get, list, watch on pods and serviceaccounts
    // (core group), in the same ClusterRole.
    for res in ["pods", "serviceaccounts"] {
        let grants_watch = |d: &Doc| {
            seq_of(&d.v, "rules").any(|r| {
                let has = |k: &str, x: &str| seq_of(r, k).any(|v| v.as_str() == Some(x));
                has("apiGroups", "")
                    && has("resources", res)
                    && ["get", "list", "watch"].iter().all(|v| has("verbs", v))
            })
        };
        if !roles.is_empty() && !roles.iter().any(|d| grants_watch(d)) {
            problems.push(format!(
                "{file}: the broker's ClusterRole does not grant get, list, watch on `{res}`, which the pod / service-account watch needs"
            ));
        }
    }
    let bound = docs.iter().any(|d| {
        d.kind() == "ClusterRoleBinding"
            && roles
                .iter()
                .any(|r| str_at(&d.v, &["roleRef", "name"]) == Some(r.name()))
            && seq_of(&d.v, "subjects").any(|s| {
                str_at(s, &["kind"]) == Some("ServiceAccount")
                    && str_at(s, &["name"]) == Some(sa)
                    && str_at(s, &["namespace"]) == Some(ns)
            })
    });
    if !roles.is_empty() && !bound {
        problems.push(format!(
            "{file}: no ClusterRoleBinding binds the tokenreviews ClusterRole to ServiceAccount {ns}/{sa}"
        ));
    }

    // Flags the cluster deployment relies on.
    if !call.has("--token-review") {
        problems.push(format!("{origin}: `broker` should run with --token-review"));
    }
    if call.value("--jwks-url") != Some("https://kubernetes.default.svc/openid/v1/jwks") {
        problems.push(format!(
            "{origin}: `broker` should fetch --jwks-url https://kubernetes.default.svc/openid/v1/jwks"
        ));
    }
    let db_from_secret = call.has("--database-url-file")
        || seq_of(broker.v, "env").any(|e| {
            str_at(e, &["name"]) == Some("KEYHAVEN_DATABASE_URL")
                && e.get("valueFrom")
                    .and_then(|v| v.get("secretKeyRef"))
                    .is_some()
        });
    if !db_from_secret || call.has("--database-url") {
        problems.push(format!(
            "{origin}: the database URL must come from a Secret (--database-url-file, or KEYHAVEN_DATABASE_URL from a secretKeyRef)"
        ));
    }
    for f in ["--tls-cert", "--tls-key", "--pin-file", "--metrics-addr"] {
        if !call.has(f) {
            problems.push(format!("{origin}: `broker` should have {f}"));
        }
    }
    if call.has("--dev") || call.has("--insecure-plaintext") {
        problems.push(format!(
            "{origin}: --dev and --insecure-plaintext are for demos only"
        ));
    }
    let probes: BTreeSet<&str> = ["startupProbe", "livenessProbe", "readinessProbe"]
        .iter()
        .filter_map(|p| str_at(broker.v, &[p, "httpGet", "path"]))
        .collect();
    for path in ["/healthz", "/readyz"] {
        if !probes.contains(path) {
            problems.push(format!("{origin}: no probe on {path}"));
        }
    }

    // The Service reaches the gRPC port.
    let listen_port = call
        .value("--listen")
        .and_then(|l| l.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u64>().ok());
    let ports: BTreeMap<String, u64> = seq_of(broker.v, "ports")
        .filter_map(|p| {
            Some((
                str_at(p, &["name"])?.to_owned(),
                p.get("containerPort")?.as_u64()?,
            ))
        })
        .collect();
    let labels = broker
        .doc
        .v
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("metadata"))
        .and_then(|m| m.get("labels"));
    let services: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == "Service" && d.namespace() == ns)
        .filter(|d| {
            d.v.get("spec")
                .and_then(|s| s.get("selector"))
                .and_then(Value::as_mapping)
                .is_some_and(|sel| {
                    sel.iter()
                        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                })
        })
        .collect();
    if services.is_empty() {
        problems.push(format!("{file}: no Service selects the broker's pods"));
    }
    for s in services {
        for p in seq_of(s.v.get("spec").unwrap_or(&Value::Null), "ports") {
            let target = match p.get("targetPort").or(p.get("port")) {
                Some(Value::Number(n)) => n.as_u64(),
                Some(Value::String(n)) => ports.get(n).copied(),
                _ => None,
            };
            if target.is_none() || target != listen_port {
                problems.push(format!(
                    "{}: port {:?} targets {target:?}, but the broker listens on {listen_port:?} (--listen)",
                    s.label(),
                    p.get("name").and_then(scalar)
                ));
            }
        }
    }
}

/// `version` of `[workspace.package]` in the root `Cargo.toml`: the tag of the images.
fn workspace_version(repo: &Repo) -> Option<String> {
    let text = repo.read("Cargo.toml")?;
    let section = text.split("[workspace.package]").nth(1)?;
    section
        .lines()
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| l.strip_prefix("version"))
        .and_then(|v| v.split('"').nth(1))
        .map(str::to_owned)
}

/// Every `keyhaven/...` image a manifest names (and the injector's --agent-image) is one this
/// build makes: `keyhaven/<stage of deploy/Dockerfile>:<workspace version>`, a stage that
/// `scripts/compose-test.sh` builds under that name.
fn check_images(repo: &Repo, containers: &[K8sContainer], problems: &mut Vec<String>) {
    let version = workspace_version(repo).unwrap_or_default();
    let stages: BTreeSet<String> = repo
        .read(DOCKERFILE)
        .map(|t| parse_dockerfile(&t))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| s.name)
        .collect();
    // `K8S_TARGETS=(a b c)` in the compose test: the stages it builds as keyhaven/<stage>:<version>.
    let built: BTreeSet<String> = repo
        .read(COMPOSE_TEST)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.trim().strip_prefix("K8S_TARGETS=("))
        .and_then(|l| l.split(')').next())
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut images: Vec<(String, String)> = containers
        .iter()
        .filter_map(|c| Some((c.origin(), str_at(c.v, &["image"])?.to_owned())))
        .collect();
    images.extend(containers.iter().flat_map(|c| {
        c.calls
            .iter()
            .filter_map(|call| call.value("--agent-image"))
            .map(|i| (format!("{} (--agent-image)", c.origin()), i.to_owned()))
            .collect::<Vec<_>>()
    }));
    for (origin, image) in images {
        let Some(rest) = image.strip_prefix("keyhaven/") else {
            continue;
        };
        let (name, tag) = rest.split_once(':').unwrap_or((rest, ""));
        if !stages.contains(name) {
            problems.push(format!(
                "{origin}: image `{image}`: `{name}` is not a stage of {DOCKERFILE}, so this build makes no such image"
            ));
        } else if !built.contains(name) {
            problems.push(format!(
                "{origin}: image `{image}`: {COMPOSE_TEST} does not build `{name}` (K8S_TARGETS)"
            ));
        }
        if tag != version {
            problems.push(format!(
                "{origin}: image `{image}`: the tag must be the workspace version `{version}` (what the build tags)"
            ));
        }
    }
}

/// Non-root, read-only root filesystem, no privilege escalation, resources.
fn check_hardening(c: &K8sContainer, pod: &Value, problems: &mut Vec<String>) {
    let origin = c.origin();
    let sc = |k: &str| {
        c.v.get("securityContext")
            .and_then(|s| s.get(k))
            .or_else(|| pod.get("securityContext").and_then(|s| s.get(k)))
    };
    if sc("runAsNonRoot").and_then(Value::as_bool) != Some(true) {
        problems.push(format!("{origin}: set securityContext.runAsNonRoot: true"));
    }
    if sc("runAsUser").and_then(Value::as_u64) == Some(0) {
        problems.push(format!(
            "{origin}: securityContext.runAsUser is 0 (root): run as a non-root uid"
        ));
    }
    for (k, want) in [
        ("readOnlyRootFilesystem", true),
        ("allowPrivilegeEscalation", false),
    ] {
        if c.v
            .get("securityContext")
            .and_then(|s| s.get(k))
            .and_then(Value::as_bool)
            != Some(want)
        {
            problems.push(format!("{origin}: set securityContext.{k}: {want}"));
        }
    }
    if str_at(c.v, &["resources", "requests", "memory"]).is_none()
        || str_at(c.v, &["resources", "limits", "memory"]).is_none()
    {
        problems.push(format!("{origin}: set memory requests and limits"));
    }
}

fn check_workload_manifest(docs: &[Doc], containers: &[K8sContainer], problems: &mut Vec<String>) {
    let file = format!("{K8S_DIR}/example-workload.yaml");
    let agents: Vec<&K8sContainer> = containers
        .iter()
        .filter(|c| c.doc.file == file && c.call("broker-agent").is_some())
        .collect();
    if agents.is_empty() {
        return;
    }
    if !agents.iter().any(|a| {
        a.init
            && str_at(a.v, &["restartPolicy"]) == Some("Always")
            && !a.call("broker-agent").expect("filtered").has("--once")
    }) {
        problems.push(format!(
            "{file}: the agent must run as a native sidecar: an initContainer with `restartPolicy: Always` (and without --once)"
        ));
    }
    let policies = policy_documents(docs, problems);
    if policies.len() != 1 {
        problems.push(format!(
            "{K8S_DIR}: expected one ConfigMap holding the broker's `policies:` document, found {}",
            policies.len()
        ));
    }
    let broker_services: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == "Service" && d.file.ends_with("broker.yaml"))
        .collect();

    for a in agents {
        let origin = a.origin();
        let call = a.call("broker-agent").expect("filtered");
        let pod = a.doc.pod_spec().expect("a container has a pod");
        let volume =
            |name: &str| seq_of(pod, "volumes").find(|v| str_at(v, &["name"]) == Some(name));

        // The projected token: audience keyhaven, short-lived, where --token-file reads it.
        let token_file = call
            .value("--token-file")
            .unwrap_or(AGENT_DEFAULT_TOKEN_FILE);
        let token_source = a.mount_at(token_file).and_then(|(dir, (vol, _))| {
            let rel = token_file.strip_prefix(dir)?.trim_start_matches('/');
            seq_of(volume(vol)?.get("projected")?, "sources")
                .filter_map(|s| s.get("serviceAccountToken"))
                .find(|t| str_at(t, &["path"]) == Some(rel))
        });
        match token_source {
            None => problems.push(format!(
                "{origin}: --token-file {token_file} is not a projected serviceAccountToken"
            )),
            Some(t) => {
                if str_at(t, &["audience"]) != Some("keyhaven") {
                    problems.push(format!(
                        "{origin}: the projected token must have audience keyhaven (the broker's --audience), not {:?}",
                        str_at(t, &["audience"])
                    ));
                }
                let exp = t.get("expirationSeconds").and_then(Value::as_u64);
                if !exp.is_some_and(|e| (600..=3600).contains(&e)) {
                    problems.push(format!(
                        "{origin}: the projected token should be short-lived: expirationSeconds between 600 and 3600, not {exp:?}"
                    ));
                }
            }
        }

        // The files: an in-memory emptyDir, written by the agent, read-only in the app.
        let out_dir = call
            .value("--output-dir")
            .unwrap_or(AGENT_DEFAULT_OUTPUT_DIR);
        match a.mount_at(out_dir) {
            None => problems.push(format!(
                "{origin}: nothing is mounted at --output-dir {out_dir}"
            )),
            Some((_, (vol, ro))) => {
                if *ro {
                    problems.push(format!(
                        "{origin}: --output-dir {out_dir} is mounted read-only"
                    ));
                }
                if volume(vol).and_then(|v| str_at(v, &["emptyDir", "medium"])) != Some("Memory") {
                    problems.push(format!(
                        "{origin}: volume `{vol}` (--output-dir) must be an emptyDir with medium: Memory"
                    ));
                }
                let apps: Vec<&K8sContainer> = containers
                    .iter()
                    .filter(|c| std::ptr::eq(c.doc, a.doc) && !c.init)
                    .filter(|c| c.mounts.values().any(|(v, _)| v == vol))
                    .collect();
                if apps.is_empty() {
                    problems.push(format!(
                        "{}: no app container mounts `{vol}`",
                        a.doc.label()
                    ));
                }
                for app in apps {
                    if app.mounts.values().any(|(v, ro)| v == vol && !ro) {
                        problems.push(format!(
                            "{}: must mount `{vol}` read-only (readOnly: true)",
                            app.origin()
                        ));
                    }
                }
            }
        }

        // The agent configuration: a ConfigMap in this file, allowed by the broker's policy.
        let config = call.value("--config");
        let cm = config.and_then(|cfg| {
            let (dir, (vol, _)) = a.mount_at(cfg)?;
            let key = cfg.strip_prefix(dir)?.trim_start_matches('/');
            let cm_name = str_at(volume(vol)?, &["configMap", "name"])?;
            let cm = docs.iter().find(|d| {
                d.kind() == "ConfigMap" && d.name() == cm_name && d.namespace() == a.doc.namespace()
            })?;
            Some((cm.label(), cm.v.get("data")?.get(key)?.as_str()?.to_owned()))
        });
        match cm {
            None => problems.push(format!(
                "{origin}: --config {config:?} must be a key of a ConfigMap defined in {file} and mounted there"
            )),
            Some((label, text)) => {
                let ns = a.doc.namespace();
                let sa = str_at(pod, &["serviceAccountName"]).unwrap_or("default");
                for s in parse_agent_config(&text, &label, problems) {
                    for (porigin, p) in &policies {
                        if !may_read(p, ns, sa, &s.path) {
                            problems.push(format!(
                                "{porigin}: the policy does not allow {ns}/{sa} to read `{}`, which {label} asks for",
                                s.path
                            ));
                        }
                    }
                }
            }
        }

        // --broker-addr is the broker's Service.
        match call.value("--broker-addr") {
            None => problems.push(format!("{origin}: give --broker-addr")),
            Some(url) => {
                let (host, port) = url_host_port(url);
                let ok = broker_services.iter().any(|s| {
                    let (n, ns) = (s.name(), s.namespace());
                    [
                        format!("{n}.{ns}.svc"),
                        format!("{n}.{ns}.svc.cluster.local"),
                        format!("{n}.{ns}"),
                    ]
                    .contains(&host)
                        && seq_of(s.v.get("spec").unwrap_or(&Value::Null), "ports")
                            .any(|p| p.get("port").and_then(Value::as_u64) == port.map(u64::from))
                });
                if !url.starts_with("https://") || !ok {
                    problems.push(format!(
                        "{origin}: --broker-addr {url} is not https://<Service>.<namespace>.svc:<port> of the broker's Service"
                    ));
                }
            }
        }
        if !call.has("--ca-file") {
            problems.push(format!("{origin}: give --ca-file (the broker's CA)"));
        }
    }
}

/// The webhook: a failure policy that never lets an opted-in pod start without its secrets, a
/// scope that never blocks anything else, the Service and path the injector serves, and the
/// images and flags it injects.
fn check_injector_manifest(docs: &[Doc], containers: &[K8sContainer], problems: &mut Vec<String>) {
    let file = format!("{K8S_DIR}/injector.yaml");
    let Some(inj) = containers
        .iter()
        .find(|c| c.doc.file == file && c.call("keyhaven-injector serve").is_some())
    else {
        return;
    };
    let origin = inj.origin();
    let call = inj.call("keyhaven-injector serve").expect("checked above");
    let listen_port = call
        .value("--listen")
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u64>().ok());
    match call.value("--agent-image") {
        Some(img) if img.starts_with("keyhaven/broker-agent:") => {}
        other => problems.push(format!(
            "{origin}: --agent-image {other:?} is not the broker-agent image this build makes"
        )),
    }
    if inj.v.get("readinessProbe").is_none() {
        problems.push(format!("{origin}: no readinessProbe"));
    }
    let deploy = inj.doc;
    if deploy
        .v
        .get("spec")
        .and_then(|s| s.get("replicas"))
        .and_then(Value::as_u64)
        < Some(2)
    {
        problems.push(format!("{}: fewer than 2 replicas", deploy.label()));
    }
    if !docs
        .iter()
        .any(|d| d.file == file && d.kind() == "PodDisruptionBudget")
    {
        problems.push(format!("{file}: no PodDisruptionBudget"));
    }
    let ns = deploy.namespace();
    let Some(webhook_cfg) = docs
        .iter()
        .find(|d| d.file == file && d.kind() == "MutatingWebhookConfiguration")
    else {
        problems.push(format!("{file}: no MutatingWebhookConfiguration"));
        return;
    };
    for w in seq_of(&webhook_cfg.v, "webhooks") {
        let at = format!(
            "{}: webhook `{}`",
            webhook_cfg.label(),
            str_at(w, &["name"]).unwrap_or("?")
        );
        for (key, want) in [
            ("failurePolicy", "Fail"),
            ("sideEffects", "None"),
            ("reinvocationPolicy", "IfNeeded"),
        ] {
            if str_at(w, &[key]) != Some(want) {
                problems.push(format!("{at}: `{key}` must be {want}"));
            }
        }
        if !seq_of(w, "admissionReviewVersions").any(|v| v.as_str() == Some("v1")) {
            problems.push(format!("{at}: admissionReviewVersions must include v1"));
        }
        if w.get("timeoutSeconds")
            .and_then(Value::as_u64)
            .is_none_or(|t| t > 10)
        {
            problems.push(format!("{at}: give a timeoutSeconds of at most 10"));
        }
        let excluded: Vec<&str> = seq_of(
            w.get("namespaceSelector").unwrap_or(&Value::Null),
            "matchExpressions",
        )
        .filter(|e| {
            str_at(e, &["key"]) == Some("kubernetes.io/metadata.name")
                && str_at(e, &["operator"]) == Some("NotIn")
        })
        .flat_map(|e| seq_of(e, "values").filter_map(Value::as_str))
        .collect();
        for n in ["kube-system", ns] {
            if !excluded.contains(&n) {
                problems.push(format!(
                    "{at}: the namespaceSelector does not exclude `{n}`"
                ));
            }
        }
        if str_at(w, &["objectSelector", "matchLabels", "keyhaven.io/inject"]) != Some("true") {
            problems.push(format!(
                "{at}: no objectSelector on keyhaven.io/inject: \"true\" (every pod would wait on the injector)"
            ));
        }
        let pods_create = seq_of(w, "rules").any(|r| {
            seq_of(r, "resources").any(|x| x.as_str() == Some("pods"))
                && seq_of(r, "operations").any(|x| x.as_str() == Some("CREATE"))
        });
        if !pods_create {
            problems.push(format!("{at}: no rule for CREATE of pods"));
        }
        let svc = w.get("clientConfig").and_then(|c| c.get("service"));
        let Some(svc) = svc else {
            problems.push(format!("{at}: clientConfig has no service"));
            continue;
        };
        if str_at(svc, &["path"]) != Some("/mutate") {
            problems.push(format!("{at}: clientConfig path must be /mutate"));
        }
        let name = str_at(svc, &["name"]).unwrap_or_default();
        let port = svc.get("port").and_then(Value::as_u64).unwrap_or(443);
        let Some(service) = docs.iter().find(|d| {
            d.kind() == "Service"
                && d.name() == name
                && Some(d.namespace()) == str_at(svc, &["namespace"])
        }) else {
            problems.push(format!("{at}: clientConfig names no Service of {file}"));
            continue;
        };
        let target = seq_of(service.v.get("spec").unwrap_or(&Value::Null), "ports")
            .find(|p| p.get("port").and_then(Value::as_u64) == Some(port))
            .and_then(|p| p.get("targetPort"));
        let named: BTreeMap<&str, u64> = seq_of(inj.v, "ports")
            .filter_map(|p| Some((str_at(p, &["name"])?, p.get("containerPort")?.as_u64()?)))
            .collect();
        let target = match target {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(n)) => named.get(n.as_str()).copied(),
            _ => None,
        };
        if target.is_none() || target != listen_port {
            problems.push(format!(
                "{at}: Service `{name}` port {port} does not reach the injector's --listen port {listen_port:?}"
            ));
        }
    }
}
