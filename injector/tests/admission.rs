//! AdmissionReview v1 requests shaped as a kube-apiserver sends them (defaults applied, the
//! ServiceAccount plugin's `kube-api-access-*` volume in place), answered by the injector;
//! the returned JSON Patch is applied with `json-patch` and the patched pod checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use keyhaven_injector::config::InjectionConfig;
use keyhaven_injector::review::{self, Outcome};
use serde_json::{json, Value};

fn config(extra: &[&str]) -> InjectionConfig {
    let mut flags = vec![
        "--agent-image=keyhaven/broker-agent:0.1.0",
        "--broker-addr=https://keyhaven-broker.keyhaven.svc:8443",
        "--own-namespace=keyhaven",
    ];
    flags.extend_from_slice(extra);
    InjectionConfig::from_flags(&flags).unwrap()
}

/// The AdmissionReview the apiserver sends for `pod` (operation CREATE unless changed).
fn review_of(pod: &Value, namespace: &str) -> Value {
    review::create_request(pod, namespace, UID)
}

const UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

fn container(name: &str, image: &str) -> Value {
    json!({
        "name": name,
        "image": image,
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
        "volumeMounts": [{
            "name": "kube-api-access-7xk2p",
            "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"
        }]
    })
}

/// A pod from a Deployment in `payments`, with `annotations`.
fn pod(annotations: Value) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "payments-api-6d4cf56db6-",
            "namespace": "payments",
            "creationTimestamp": null,
            "labels": {"app": "payments-api", "pod-template-hash": "6d4cf56db6", "keyhaven.io/inject": "true"},
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "payments-api-6d4cf56db6",
                "uid": "8c1a3a4e-2f0e-4a63-9d55-0f6f2c1c2b11", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "volumes": [{
                "name": "kube-api-access-7xk2p",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                    ],
                    "defaultMode": 420
                }
            }],
            "containers": [container("app", "registry.example/payments-api:1.4.2")],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "payments-api",
            "serviceAccount": "payments-api",
            "securityContext": {"runAsUser": 10001, "runAsNonRoot": true},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

fn basic_annotations() -> Value {
    json!({"keyhaven.io/secret-db.json": "payments/db"})
}

/// Answers `pod`, applies the patch; returns the answer and the patched pod.
fn inject(pod: &Value, cfg: &InjectionConfig) -> (review::Answer, Value) {
    let body = serde_json::to_vec(&review_of(pod, "payments")).unwrap();
    let a = review::answer(&body, cfg);
    assert_eq!(a.outcome, Outcome::Injected, "{}", a.body);
    assert_eq!(a.body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(a.body["kind"], "AdmissionReview");
    assert_eq!(a.body["response"]["uid"], UID);
    assert_eq!(a.body["response"]["allowed"], true);
    assert_eq!(a.body["response"]["patchType"], "JSONPatch");
    let patch = review::patch_of(&a.body).expect("base64 JSON Patch");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    assert_eq!(Some(&patched), a.patched.as_ref());
    assert_valid(&patched);
    // A second pass (reinvocation) leaves the injected pod as it is.
    let again = review::answer(
        &serde_json::to_vec(&review_of(&patched, "payments")).unwrap(),
        cfg,
    );
    assert_eq!(again.outcome, Outcome::Untouched("injected already"));
    assert!(again.body["response"].get("patch").is_none());
    (a, patched)
}

/// What the apiserver's validation would check that a patch can break.
fn assert_valid(pod: &Value) {
    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod.clone()).unwrap();
    let spec = typed.spec.unwrap();
    let init = spec.init_containers.clone().unwrap_or_default();
    let all: Vec<_> = init.iter().chain(spec.containers.iter()).collect();
    let names: BTreeSet<_> = all.iter().map(|c| c.name.clone()).collect();
    assert_eq!(names.len(), all.len(), "container names are not unique");
    let volumes: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    let vset: BTreeSet<_> = volumes.iter().cloned().collect();
    assert_eq!(vset.len(), volumes.len(), "volume names are not unique");
    for c in &all {
        let mut paths = BTreeSet::new();
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                vset.contains(&m.name),
                "{}: mount of missing volume {}",
                c.name,
                m.name
            );
            assert!(
                paths.insert(m.mount_path.clone()),
                "{}: two mounts at {}",
                c.name,
                m.mount_path
            );
        }
    }
}

fn init_containers(pod: &Value) -> Vec<Value> {
    pod["spec"]["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn command(c: &Value) -> Vec<String> {
    c["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn mount_of<'a>(c: &'a Value, path: &str) -> Option<&'a Value> {
    c["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"] == path)
}

#[test]
fn a_deployment_pod_gets_the_agent_as_a_native_sidecar() {
    let cfg = config(&[]);
    let p = pod(basic_annotations());
    let (a, patched) = inject(&p, &cfg);
    assert!(a.body["response"].get("warnings").is_none(), "{}", a.body);
    let init = init_containers(&patched);
    assert_eq!(init.len(), 1);
    let agent = &init[0];
    assert_eq!(agent["name"], "keyhaven-agent");
    assert_eq!(agent["image"], "keyhaven/broker-agent:0.1.0");
    assert_eq!(agent["restartPolicy"], "Always");
    assert_eq!(agent["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["startupProbe"]["httpGet"]["port"], 9466);
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    let sc = &agent["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(agent["resources"]["requests"]["memory"], "16Mi");
    assert_eq!(agent["resources"]["limits"]["memory"], "32Mi");
    assert_eq!(
        command(agent),
        [
            "broker-agent",
            "--broker-addr=https://keyhaven-broker.keyhaven.svc:8443",
            "--ca-file=/etc/keyhaven/ca/ca.crt",
            "--token-file=/var/run/secrets/keyhaven/token",
            "--output-dir=/keyhaven/secrets",
            "--log-format=json",
            "--metrics-addr=0.0.0.0:9466",
            "--secret=payments/db=db.json",
        ]
    );
    // Token: audience keyhaven, short-lived; secrets in memory; the CA from the ConfigMap.
    let vols = patched["spec"]["volumes"].as_array().unwrap();
    let by_name = |n: &str| vols.iter().find(|v| v["name"] == n).unwrap().clone();
    let tok = &by_name("keyhaven-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(tok["audience"], "keyhaven");
    assert_eq!(tok["expirationSeconds"], 600);
    assert_eq!(by_name("keyhaven-secrets")["emptyDir"]["medium"], "Memory");
    assert_eq!(
        by_name("keyhaven-broker-ca")["configMap"]["name"],
        "keyhaven-broker-ca"
    );
    // The app reads the secrets read-only; its own mounts are kept.
    let app = &patched["spec"]["containers"][0];
    let m = mount_of(app, "/keyhaven/secrets").unwrap();
    assert_eq!(m["readOnly"], true);
    assert_eq!(m["name"], "keyhaven-secrets");
    assert!(mount_of(app, "/var/run/secrets/kubernetes.io/serviceaccount").is_some());
    assert_eq!(
        patched["metadata"]["annotations"]["keyhaven.io/status"],
        "injected"
    );
    // Nothing else changed.
    let mut back = patched.clone();
    back["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("keyhaven.io/status");
    back["spec"]
        .as_object_mut()
        .unwrap()
        .remove("initContainers");
    back["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .retain(|v| !v["name"].as_str().unwrap().starts_with("keyhaven-"));
    back["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["mountPath"] != "/keyhaven/secrets");
    assert_eq!(back, p);
}

#[test]
fn existing_init_containers_sidecars_and_clashing_names_are_kept() {
    let cfg = config(&[]);
    let mut p = pod(json!({
        "keyhaven.io/secret-db.json": "payments/db",
        "keyhaven.io/secret-api-key": "payments/api",
        "keyhaven.io/key-api-key": "token",
        "keyhaven.io/mount-init-containers": "migrate",
    }));
    p["spec"]["initContainers"] = json!([
        container("migrate", "registry.example/migrate:1"),
        {"name": "mesh-proxy", "image": "mesh/proxy:1", "restartPolicy": "Always"},
        container("keyhaven-agent", "someone-else/agent:1")
    ]);
    p["spec"]["volumes"].as_array_mut().unwrap().extend([
        json!({"name": "keyhaven-secrets", "emptyDir": {}}),
        json!({"name": "keyhaven-token", "emptyDir": {}}),
    ]);
    p["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "keyhaven-secrets", "mountPath": "/cache"}));
    let (_, patched) = inject(&p, &cfg);
    let init = init_containers(&patched);
    let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    // Ours first, so the pod's own init containers can read the files.
    assert_eq!(
        names,
        [
            "keyhaven-agent-2",
            "migrate",
            "mesh-proxy",
            "keyhaven-agent"
        ]
    );
    let cmd = command(&init[0]);
    assert!(cmd.contains(&"--secret=payments/api=api-key".to_owned()));
    assert!(cmd.contains(&"--key=api-key=token".to_owned()));
    let m = mount_of(&init[1], "/keyhaven/secrets").expect("migrate asked for the files");
    assert_eq!(m["name"], "keyhaven-secrets-2");
    assert!(mount_of(&init[2], "/keyhaven/secrets").is_none());
    assert_eq!(init[2], p["spec"]["initContainers"][1]);
    let app = &patched["spec"]["containers"][0];
    assert_eq!(mount_of(app, "/cache").unwrap()["name"], "keyhaven-secrets");
    assert_eq!(
        mount_of(app, "/keyhaven/secrets").unwrap()["name"],
        "keyhaven-secrets-2"
    );
    assert_eq!(
        mount_of(&init[0], "/var/run/secrets/keyhaven").unwrap()["name"],
        "keyhaven-token-2"
    );
}

#[test]
fn a_template_reaches_the_agent_verbatim() {
    let cfg = config(&[]);
    let template = "host=db user={{ username }} password={{ password }}\n";
    let p = pod(json!({
        "keyhaven.io/secret-db.conf": "payments/db",
        "keyhaven.io/template-db.conf": template,
    }));
    let (_, patched) = inject(&p, &cfg);
    let cmd = command(&init_containers(&patched)[0]);
    assert!(
        cmd.contains(&"--secret=payments/db=db.conf".to_owned()),
        "{cmd:?}"
    );
    assert!(
        cmd.contains(&format!("--template=db.conf={template}")),
        "{cmd:?}"
    );
}

#[test]
fn every_app_container_gets_the_files() {
    let cfg = config(&[]);
    let mut p = pod(basic_annotations());
    p["spec"]["containers"] = json!([
        container("app", "a:1"),
        container("worker", "w:1"),
        {"name": "bare", "image": "b:1"}
    ]);
    let (_, patched) = inject(&p, &cfg);
    for c in patched["spec"]["containers"].as_array().unwrap() {
        let m = mount_of(c, "/keyhaven/secrets").unwrap_or_else(|| panic!("{}", c["name"]));
        assert_eq!(m["readOnly"], true);
    }
}

#[test]
fn no_api_token_host_network_and_a_custom_service_account() {
    let cfg = config(&[]);
    let mut p = pod(basic_annotations());
    p["spec"]["automountServiceAccountToken"] = json!(false);
    p["spec"]["volumes"] = json!(null);
    p["spec"].as_object_mut().unwrap().remove("volumes");
    p["spec"]["containers"] =
        json!([{"name": "app", "image": "a:1", "ports": [{"containerPort": 8080}]}]);
    p["spec"]["hostNetwork"] = json!(true);
    p["spec"]["serviceAccountName"] = json!("ledger-writer");
    let (a, patched) = inject(&p, &cfg);
    // The projected token does not depend on automountServiceAccountToken.
    let vols = patched["spec"]["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 3);
    assert_eq!(patched["spec"]["automountServiceAccountToken"], false);
    assert_eq!(patched["spec"]["serviceAccountName"], "ledger-writer");
    let warnings = a.body["response"]["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("hostNetwork")),
        "{warnings:?}"
    );
}

#[test]
fn init_only_both_and_pod_wide_settings() {
    let cfg = config(&["--allow-broker-addr-override"]);
    let p = pod(json!({
        "keyhaven.io/secret-app.env": "payments/config",
        "keyhaven.io/mode": "both",
        "keyhaven.io/ttl": "15m",
        "keyhaven.io/on-expiry": "delete",
        "keyhaven.io/on-revoked": "delete",
        "keyhaven.io/file-mode": "0440",
        "keyhaven.io/memory-limit": "64Mi",
        "keyhaven.io/cpu-limit": "100m",
        "keyhaven.io/agent-port": "9500",
        "keyhaven.io/broker-addr": "https://broker.eu.example:8443",
    }));
    let (_, patched) = inject(&p, &cfg);
    let init = init_containers(&patched);
    assert_eq!(init.len(), 2);
    assert_eq!(init[0]["name"], "keyhaven-agent-init");
    assert!(init[0].get("restartPolicy").is_none());
    assert!(init[0].get("startupProbe").is_none());
    let once = command(&init[0]);
    assert!(once.contains(&"--once".to_owned()));
    assert!(!once.iter().any(|a| a.starts_with("--metrics-addr")));
    let side = command(&init[1]);
    for want in [
        "--broker-addr=https://broker.eu.example:8443",
        "--metrics-addr=0.0.0.0:9500",
        "--on-expiry=delete",
        "--on-revoked=delete",
        "--ttl=900s",
        "--file-mode=0440",
        "--secret=payments/config=app.env",
    ] {
        assert!(
            side.contains(&want.to_owned()),
            "{want} missing from {side:?}"
        );
    }
    assert_eq!(init[1]["restartPolicy"], "Always");
    assert_eq!(init[1]["readinessProbe"]["httpGet"]["port"], 9500);
    assert_eq!(init[1]["resources"]["limits"]["memory"], "64Mi");
    assert_eq!(init[1]["resources"]["limits"]["cpu"], "100m");

    let only =
        pod(json!({"keyhaven.io/secret-db.json": "payments/db", "keyhaven.io/mode": "init-only"}));
    let (_, patched) = inject(&only, &cfg);
    let init = init_containers(&patched);
    assert_eq!(init.len(), 1);
    assert!(command(&init[0]).contains(&"--once".to_owned()));
}

#[test]
fn an_opted_in_pod_without_a_label_but_with_the_annotation_is_injected() {
    let cfg = config(&[]);
    let mut p =
        pod(json!({"keyhaven.io/inject": "true", "keyhaven.io/secret-db.json": "payments/db"}));
    p["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("keyhaven.io/inject");
    inject(&p, &cfg);
    // The annotation "false" opts out even with the label.
    let mut out =
        pod(json!({"keyhaven.io/inject": "false", "keyhaven.io/secret-db.json": "payments/db"}));
    out["metadata"]["labels"]["keyhaven.io/inject"] = json!("true");
    let a = review::answer(
        &serde_json::to_vec(&review_of(&out, "payments")).unwrap(),
        &cfg,
    );
    assert_eq!(a.outcome, Outcome::Untouched("not opted in"));
}

fn refused(annotations: Value, cfg: &InjectionConfig, edit: impl Fn(&mut Value)) -> String {
    let mut p = pod(annotations);
    edit(&mut p);
    let a = review::answer(
        &serde_json::to_vec(&review_of(&p, "payments")).unwrap(),
        cfg,
    );
    assert_eq!(a.outcome, Outcome::Denied, "{}", a.body);
    assert_eq!(a.body["response"]["allowed"], false);
    assert!(a.body["response"].get("patch").is_none());
    assert_eq!(a.body["response"]["uid"], UID);
    a.body["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn every_malformed_annotation_is_refused_with_a_message_naming_it() {
    let cfg = config(&[]);
    let db = |extra: Value| {
        let mut m = json!({"keyhaven.io/secret-db.json": "payments/db"});
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        m
    };
    let none = |_: &mut Value| {};
    let cases: Vec<(Value, &str)> = vec![
        (db(json!({"keyhaven.io/colour": "red"})), "keyhaven.io/colour: unknown annotation; the valid ones are keyhaven.io/inject"),
        (db(json!({"keyhaven.io/secrets-db.json": "payments/db"})), "keyhaven.io/secrets-db.json: unknown annotation (did you mean keyhaven.io/secret-db.json?)"),
        (db(json!({"keyhaven.io/formt-db.json": "json"})), "keyhaven.io/formt-db.json: unknown annotation (did you mean keyhaven.io/format-db.json?)"),
        (db(json!({"keyhaven.io/on-expire": "keep"})), "keyhaven.io/on-expire: unknown annotation (did you mean keyhaven.io/on-expiry?)"),
        (json!({"keyhaven.io/secret-db.json": "/payments/db"}), "keyhaven.io/secret-db.json: \"/payments/db\" is not a broker path"),
        (json!({"keyhaven.io/secret-db.json": "payments/../db"}), "is not a broker path"),
        (json!({"keyhaven.io/secret-.hidden": "payments/db"}), "keyhaven.io/secret-.hidden: file name \".hidden\" must start with a letter or digit"),
        (db(json!({"keyhaven.io/format-db.json": "xml"})), "keyhaven.io/format-db.json: \"xml\" is not raw, json, dotenv or template"),
        (db(json!({"keyhaven.io/format-other.json": "json"})), "keyhaven.io/format-other.json: no keyhaven.io/secret-other.json annotation"),
        (db(json!({"keyhaven.io/format-db.json": "template"})), "format template needs keyhaven.io/template-db.json"),
        (db(json!({"keyhaven.io/template-db.json": "x", "keyhaven.io/format-db.json": "json"})), "keyhaven.io/template-db.json: the file's keyhaven.io/format-db.json is not template"),
        (db(json!({"keyhaven.io/key-db.json": "password", "keyhaven.io/format-db.json": "json"})), "keyhaven.io/key-db.json: a key applies to format raw only"),
        (db(json!({"keyhaven.io/mode": "daemon"})), "keyhaven.io/mode: \"daemon\" is not sidecar, init-only or both"),
        (db(json!({"keyhaven.io/ttl": "forever"})), "keyhaven.io/ttl: \"forever\" is not a duration"),
        (db(json!({"keyhaven.io/on-expiry": "panic"})), "keyhaven.io/on-expiry: \"panic\" is not keep or delete"),
        (db(json!({"keyhaven.io/file-mode": "0200"})), "keyhaven.io/file-mode: mode \"0200\": the owner must be able to read"),
        (db(json!({"keyhaven.io/cpu-limit": "2"})), "keyhaven.io/cpu-limit: 2 is over this injector's bound 500m"),
        (db(json!({"keyhaven.io/memory-request": "1Gi"})), "keyhaven.io/memory-request: 1Gi is over this injector's bound 256Mi"),
        (db(json!({"keyhaven.io/memory-request": "100Mi"})), "keyhaven.io/memory-request: 100Mi is over the agent's memory limit 32Mi"),
        (db(json!({"keyhaven.io/memory-limit": "lots"})), "keyhaven.io/memory-limit: \"lots\" is not a Kubernetes quantity"),
        (db(json!({"keyhaven.io/broker-addr": "https://evil.example"})), "keyhaven.io/broker-addr: this injector does not allow choosing the broker"),
        (db(json!({"keyhaven.io/agent-port": "80"})), "keyhaven.io/agent-port: \"80\" is not a port from 1024 to 65535"),
        (db(json!({"keyhaven.io/inject": "yes"})), "keyhaven.io/inject: \"yes\" is not \"true\" or \"false\""),
        (db(json!({"keyhaven.io/status": "done"})), "keyhaven.io/status: is set by the injector only"),
        (db(json!({"keyhaven.io/mount-init-containers": "seed"})), "keyhaven.io/mount-init-containers: the pod has no init container \"seed\"; it has: none"),
        (json!({}), "no keyhaven.io/secret-<file> annotation names a secret"),
        (
            db(json!({"keyhaven.io/secret-db.conf": "payments/db", "keyhaven.io/template-db.conf": "user={{ username }\npassword={{ password"})),
            "keyhaven.io/template-db.conf: template syntax error at line 1",
        ),
        (
            db(json!({"keyhaven.io/secret-db.conf": "payments/db", "keyhaven.io/template-db.conf": "{% include \"/etc/passwd\" %}"})),
            "keyhaven.io/template-db.conf: template syntax error",
        ),
    ];
    for (annotations, want) in cases {
        let msg = refused(annotations.clone(), &cfg, none);
        assert!(msg.starts_with("keyhaven: "), "{msg}");
        assert!(
            msg.contains(want),
            "{annotations}\n  gave: {msg}\n  want: {want}"
        );
    }
    // Several problems are all listed.
    let msg = refused(
        db(json!({"keyhaven.io/mode": "x", "keyhaven.io/ttl": "y"})),
        &cfg,
        none,
    );
    assert!(
        msg.contains("keyhaven.io/mode") && msg.contains("keyhaven.io/ttl"),
        "{msg}"
    );
    // Clashes with the pod itself.
    let msg = refused(basic_annotations(), &cfg, |p| {
        p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 9466}]);
    });
    assert!(
        msg.contains("the agent's port 9466 is already a container port"),
        "{msg}"
    );
    let msg = refused(basic_annotations(), &cfg, |p| {
        p["spec"]["containers"][0]["volumeMounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "x", "mountPath": "/keyhaven/secrets/"}));
    });
    assert!(
        msg.contains("container \"app\": already mounts a volume at /keyhaven/secrets"),
        "{msg}"
    );
    // An over-long value is echoed as a short prefix only.
    let long = "a/".repeat(5000) + "/";
    let msg = refused(json!({"keyhaven.io/secret-db.json": long}), &cfg, none);
    assert!(msg.len() < 400, "{} bytes", msg.len());
}

#[test]
fn unrelated_requests_are_allowed_untouched() {
    let cfg = config(&[]);
    let untouched = |body: &Value, why: &'static str| {
        let a = review::answer(&serde_json::to_vec(body).unwrap(), &cfg);
        assert_eq!(a.outcome, Outcome::Untouched(why), "{}", a.body);
        assert_eq!(a.body["response"]["allowed"], true);
        assert!(a.body["response"].get("patch").is_none());
        assert_eq!(a.body["response"]["uid"], UID);
    };
    // Not opted in (no label, no annotation), even with other keyhaven annotations.
    let mut p = pod(json!({"keyhaven.io/colour": "red"}));
    p["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("keyhaven.io/inject");
    untouched(&review_of(&p, "payments"), "not opted in");
    // Not a pod.
    let mut r = review_of(&pod(basic_annotations()), "payments");
    r["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    r["request"]["resource"] = json!({"group": "apps", "version": "v1", "resource": "deployments"});
    untouched(&r, "not a pod");
    // A subresource of a pod (e.g. ephemeral containers, binding).
    let mut r = review_of(&pod(basic_annotations()), "payments");
    r["request"]["subResource"] = json!("ephemeralcontainers");
    untouched(&r, "not a pod");
    // Not CREATE.
    let mut r = review_of(&pod(basic_annotations()), "payments");
    r["request"]["operation"] = json!("UPDATE");
    r["request"]["oldObject"] = pod(basic_annotations());
    untouched(&r, "not a create");
    // Excluded namespaces, and the injector's own.
    untouched(
        &review_of(&pod(basic_annotations()), "kube-system"),
        "excluded namespace",
    );
    untouched(
        &review_of(&pod(basic_annotations()), "keyhaven"),
        "excluded namespace",
    );
}

#[test]
fn a_body_that_is_not_an_admission_review_is_invalid() {
    let cfg = config(&[]);
    for body in [
        b"not json".to_vec(),
        br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1beta1","request":{}}"#
            .to_vec(),
        br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.to_vec(),
        br#"[1,2]"#.to_vec(),
    ] {
        let a = review::answer(&body, &cfg);
        assert_eq!(a.outcome, Outcome::Invalid);
        assert_eq!(a.body["response"]["allowed"], false);
    }
}

#[test]
fn mutate_pod_reads_a_yaml_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels: {keyhaven.io/inject: \"true\"}\n  annotations:\n    keyhaven.io/secret-db.json: shop/db\nspec:\n  securityContext: {runAsUser: 1000}\n  containers:\n  - {name: app, image: a:1}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyhaven-injector"))
        .args([
            "mutate",
            "--agent-image=a:1",
            "--broker-addr=https://b:8443",
            "--pod",
            "--patched-pod",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "keyhaven-agent");
    assert_eq!(
        pod["metadata"]["annotations"]["keyhaven.io/status"],
        "injected"
    );
    std::fs::write(&file, "kind: [").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyhaven-injector"))
        .args([
            "mutate",
            "--agent-image=a:1",
            "--broker-addr=https://b:8443",
            "--pod",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Pod manifest"));
}
