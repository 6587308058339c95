//! The JSON Patch that adds the agent to a pod: the agent container(s) at the front of
//! `initContainers`, the token, CA and secrets volumes, a read-only mount of the secrets into
//! every app container, and the `keyhaven.io/status` annotation.
//!
//! The patch is built from typed Kubernetes objects (`k8s-openapi`) and `json-patch`
//! operations against the pod exactly as the apiserver sent it, so fields this build does
//! not know are never touched.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, HTTPGetAction, KeyToPath,
    Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::annotations::{Mode, Request, INJECTED, STATUS};
use crate::config::InjectionConfig;
use crate::quantity::Quantity;

/// Where the agent writes, and where every app container reads, the secret files.
pub const SECRETS_DIR: &str = "/keyhaven/secrets";
/// Where the projected ServiceAccount token is mounted in the agent.
pub const TOKEN_DIR: &str = "/var/run/secrets/keyhaven";
/// Where the broker's CA certificate is mounted in the agent.
pub const CA_DIR: &str = "/etc/keyhaven/ca";
/// Audience of the projected token (the broker accepts only this one).
pub const AUDIENCE: &str = "keyhaven";

/// The patch for one pod, and warnings for the user who created it.
#[derive(Debug, Clone)]
pub struct Mutation {
    /// JSON Patch operations, in order.
    pub ops: Vec<PatchOperation>,
    /// Warnings returned to the client (kubectl prints them).
    pub warnings: Vec<String>,
}

/// Builds the patch for `pod` (parsed from `raw`) as `req` asks; `Err` lists every problem.
pub fn mutation(
    raw: &Value,
    pod: &Pod,
    req: &Request,
    cfg: &InjectionConfig,
) -> Result<Mutation, Vec<String>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let spec = pod.spec.clone().unwrap_or_default();
    let init = spec.init_containers.clone().unwrap_or_default();

    let broker_addr = match &req.broker_addr {
        Some(a) if cfg.allow_broker_addr_override => a.clone(),
        Some(_) => {
            errors.push(
                "keyhaven.io/broker-addr: this injector does not allow choosing the broker \
                 (its --allow-broker-addr-override is off)"
                    .to_owned(),
            );
            cfg.broker_addr.clone()
        }
        None => cfg.broker_addr.clone(),
    };
    let resources = match resources(req, cfg) {
        Ok(r) => Some(r),
        Err(mut e) => {
            errors.append(&mut e);
            None
        }
    };
    let port = req.agent_port.unwrap_or(cfg.agent_port);
    let declared: BTreeSet<i32> = spec
        .containers
        .iter()
        .chain(init.iter())
        .flat_map(|c| c.ports.iter().flatten().map(|p| p.container_port))
        .collect();
    if req.mode != Mode::InitOnly && declared.contains(&i32::from(port)) {
        errors.push(format!(
            "the agent's port {port} is already a container port of this pod; choose another \
             with keyhaven.io/agent-port"
        ));
    }
    if req.mode != Mode::InitOnly && spec.host_network == Some(true) {
        warnings.push(format!(
            "keyhaven: hostNetwork pod: the agent's health port {port} is opened on the node \
             (keyhaven.io/agent-port chooses another)"
        ));
    }
    let pod_user = spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .is_some();
    if !pod_user && req.file_mode.is_none() {
        warnings.push(
            "keyhaven: the secret files are mode 0400, owned by the agent's user; give the pod \
             a runAsUser shared by the app, or keyhaven.io/file-mode: \"0440\" and an fsGroup"
                .to_owned(),
        );
    }

    let mut mounted: Vec<(String, usize)> = Vec::new();
    for name in &req.mount_init_containers {
        match init.iter().position(|c| &c.name == name) {
            Some(i) => mounted.push((name.clone(), i)),
            None => errors.push(format!(
                "keyhaven.io/mount-init-containers: the pod has no init container {}; it has: {}",
                crate::annotations::shown(name),
                list(init.iter().map(|c| c.name.as_str()))
            )),
        }
    }
    for c in spec.containers.iter().chain(
        mounted
            .iter()
            .filter_map(|(_, i)| init.get(*i))
            .collect::<Vec<_>>(),
    ) {
        if c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path.trim_end_matches('/') == SECRETS_DIR)
        {
            errors.push(format!(
                "container {}: already mounts a volume at {SECRETS_DIR}, where the secrets go",
                crate::annotations::shown(&c.name)
            ));
        }
    }

    // Names that do not clash with the pod's own.
    let mut container_names: BTreeSet<String> = spec
        .containers
        .iter()
        .chain(init.iter())
        .map(|c| c.name.clone())
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .map(|c| c.name.clone()),
        )
        .collect();
    let mut volume_names: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    let secrets_vol = unique("keyhaven-secrets", &mut volume_names);
    let token_vol = unique("keyhaven-token", &mut volume_names);
    let tls = broker_addr.starts_with("https://");
    let ca_vol = tls.then(|| unique("keyhaven-broker-ca", &mut volume_names));

    let volumes = Volumes {
        secrets: secrets_vol,
        token: token_vol,
        ca: ca_vol,
    };
    let mut agents = Vec::new();
    if matches!(req.mode, Mode::InitOnly | Mode::Both) {
        let name = unique("keyhaven-agent-init", &mut container_names);
        agents.push(agent_container(
            name,
            args(req, &broker_addr, None),
            &volumes,
            resources.clone(),
            cfg,
            None,
        ));
    }
    if matches!(req.mode, Mode::Sidecar | Mode::Both) {
        let name = unique("keyhaven-agent", &mut container_names);
        agents.push(agent_container(
            name,
            args(req, &broker_addr, Some(port)),
            &volumes,
            resources,
            cfg,
            Some(port),
        ));
    }
    // The agent itself must accept the command line (e.g. the template compiles).
    for a in &agents {
        if let Err(e) = check_agent_args(a.command.as_deref().unwrap_or_default()) {
            errors.push(format!("the agent would refuse this configuration: {e}"));
        }
    }
    if !errors.is_empty() {
        errors.dedup();
        return Err(errors);
    }

    let mut ops = Vec::new();
    let mut annotation = serde_json::Map::new();
    annotation.insert(STATUS.to_owned(), Value::from(INJECTED));
    add_to_map(&mut ops, raw, &["metadata", "annotations"], annotation);

    let new_volumes = volumes.objects(cfg);
    append(&mut ops, raw, &["spec", "volumes"], new_volumes);

    let mount = value(&VolumeMount {
        name: volumes.secrets.clone(),
        mount_path: SECRETS_DIR.to_owned(),
        read_only: Some(true),
        ..Default::default()
    });
    for i in 0..spec.containers.len() {
        let at = i.to_string();
        append(
            &mut ops,
            raw,
            &["spec", "containers", &at, "volumeMounts"],
            vec![mount.clone()],
        );
    }
    // Before the agents are inserted at the front, while the indices are the pod's own.
    for (_, i) in &mounted {
        let at = i.to_string();
        append(
            &mut ops,
            raw,
            &["spec", "initContainers", &at, "volumeMounts"],
            vec![mount.clone()],
        );
    }
    let agents: Vec<Value> = agents.iter().map(value).collect();
    if raw
        .pointer("/spec/initContainers")
        .is_some_and(Value::is_array)
    {
        for (i, a) in agents.into_iter().enumerate() {
            ops.push(add(&["spec", "initContainers", &i.to_string()], a));
        }
    } else {
        ops.push(add(&["spec", "initContainers"], Value::Array(agents)));
    }
    Ok(Mutation { ops, warnings })
}

/// The names of the volumes the agent uses.
struct Volumes {
    secrets: String,
    token: String,
    ca: Option<String>,
}

impl Volumes {
    fn mounts(&self) -> Vec<VolumeMount> {
        let mut m = vec![
            VolumeMount {
                name: self.token.clone(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: self.secrets.clone(),
                mount_path: SECRETS_DIR.to_owned(),
                ..Default::default()
            },
        ];
        if let Some(ca) = &self.ca {
            m.push(VolumeMount {
                name: ca.clone(),
                mount_path: CA_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        m
    }

    fn objects(&self, cfg: &InjectionConfig) -> Vec<Value> {
        let mut v = vec![
            value(&Volume {
                name: self.secrets.clone(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".to_owned()),
                    size_limit: Some(k8s(&cfg.secrets_volume_size)),
                }),
                ..Default::default()
            }),
            value(&Volume {
                name: self.token.clone(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(AUDIENCE.to_owned()),
                            expiration_seconds: Some(cfg.token_expiration.as_secs() as i64),
                            path: "token".to_owned(),
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ];
        if let Some(ca) = &self.ca {
            v.push(value(&Volume {
                name: ca.clone(),
                config_map: Some(ConfigMapVolumeSource {
                    name: cfg.broker_ca_configmap.clone(),
                    items: Some(vec![KeyToPath {
                        key: cfg.broker_ca_key.clone(),
                        path: "ca.crt".to_owned(),
                        mode: None,
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            }));
        }
        v
    }
}

/// The agent's command line: `port` for the sidecar, `None` for `--once`.
pub fn args(req: &Request, broker_addr: &str, port: Option<u16>) -> Vec<String> {
    let mut a = vec![
        "broker-agent".to_owned(),
        format!("--broker-addr={broker_addr}"),
    ];
    if broker_addr.starts_with("https://") {
        a.push(format!("--ca-file={CA_DIR}/ca.crt"));
    }
    a.push(format!("--token-file={TOKEN_DIR}/token"));
    a.push(format!("--output-dir={SECRETS_DIR}"));
    a.push("--log-format=json".to_owned());
    match port {
        Some(p) => a.push(format!("--metrics-addr=0.0.0.0:{p}")),
        None => a.push("--once".to_owned()),
    }
    if let Some(v) = &req.on_expiry {
        a.push(format!("--on-expiry={v}"));
    }
    if let Some(v) = &req.on_revoked {
        a.push(format!("--on-revoked={v}"));
    }
    if let Some(t) = req.ttl {
        a.push(format!("--ttl={}s", t.as_secs()));
    }
    if let Some(m) = &req.file_mode {
        a.push(format!("--file-mode={m}"));
    }
    for f in &req.files {
        a.push(format!("--secret={}={}", f.path, f.file));
        if let Some(fmt) = &f.format {
            a.push(format!("--format={}={fmt}", f.file));
        }
        if let Some(k) = &f.key {
            a.push(format!("--key={}={k}", f.file));
        }
        if let Some(t) = &f.template {
            a.push(format!("--template={}={t}", f.file));
        }
    }
    a
}

/// Parses and validates a command line the way the agent does at startup.
pub fn check_agent_args(args: &[String]) -> Result<(), String> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    // Building the agent's clap command costs more than parsing with it: build it once.
    static COMMAND: std::sync::OnceLock<clap::Command> = std::sync::OnceLock::new();
    let first_line = |e: clap::Error| {
        let text = e.to_string();
        text.lines().next().unwrap_or_default().to_owned()
    };
    let matches = COMMAND
        .get_or_init(broker_agent::config::Cli::command)
        .clone()
        .try_get_matches_from(args)
        .map_err(first_line)?;
    let cli = broker_agent::config::Cli::from_arg_matches(&matches).map_err(first_line)?;
    broker_agent::config::load(&cli).map_err(|e| e.to_string())?;
    Ok(())
}

fn agent_container(
    name: String,
    command: Vec<String>,
    volumes: &Volumes,
    resources: Option<ResourceRequirements>,
    cfg: &InjectionConfig,
    port: Option<u16>,
) -> Container {
    let probe = |path: &str, period: i32, failures: i32| {
        port.map(|p| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::Int(i32::from(p)),
                ..Default::default()
            }),
            period_seconds: Some(period),
            failure_threshold: Some(failures),
            ..Default::default()
        })
    };
    Container {
        name,
        image: Some(cfg.agent_image.clone()),
        image_pull_policy: Some(cfg.agent_image_pull_policy.clone()),
        command: Some(command),
        // A native sidecar (Kubernetes 1.29+): starts before the app, runs beside it, stops
        // after it — and does not keep a Job's pod alive.
        restart_policy: port.map(|_| "Always".to_owned()),
        // Holds the app (and later init containers) back until every file is written.
        startup_probe: probe("/readyz", 1, 120),
        readiness_probe: probe("/readyz", 10, 3),
        liveness_probe: probe("/healthz", 10, 3),
        resources,
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(volumes.mounts()),
        ..Default::default()
    }
}

fn resources(req: &Request, cfg: &InjectionConfig) -> Result<ResourceRequirements, Vec<String>> {
    let mut errors = Vec::new();
    let mut bounded = |name: &str, v: &Option<Quantity>, max: &Quantity| {
        if let Some(q) = v {
            if q > max {
                errors.push(format!(
                    "keyhaven.io/{name}: {q} is over this injector's bound {max}"
                ));
            }
        }
    };
    bounded("cpu-request", &req.cpu_request, &cfg.max_agent_cpu);
    bounded("cpu-limit", &req.cpu_limit, &cfg.max_agent_cpu);
    bounded("memory-request", &req.memory_request, &cfg.max_agent_memory);
    bounded("memory-limit", &req.memory_limit, &cfg.max_agent_memory);
    let cpu_req = req.cpu_request.as_ref().unwrap_or(&cfg.agent_cpu_request);
    let cpu_lim = req.cpu_limit.as_ref().or(cfg.agent_cpu_limit.as_ref());
    let mem_req = req
        .memory_request
        .as_ref()
        .unwrap_or(&cfg.agent_memory_request);
    let mem_lim = req.memory_limit.as_ref().unwrap_or(&cfg.agent_memory_limit);
    if cpu_lim.is_some_and(|l| cpu_req > l) {
        errors.push("keyhaven.io/cpu-request: over the agent's CPU limit".to_owned());
    }
    if mem_req > mem_lim {
        errors.push(format!(
            "keyhaven.io/memory-request: {mem_req} is over the agent's memory limit {mem_lim}"
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_owned(), k8s(cpu_req));
    requests.insert("memory".to_owned(), k8s(mem_req));
    let mut limits = BTreeMap::new();
    limits.insert("memory".to_owned(), k8s(mem_lim));
    if let Some(l) = cpu_lim {
        limits.insert("cpu".to_owned(), k8s(l));
    }
    Ok(ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..Default::default()
    })
}

fn k8s(q: &Quantity) -> K8sQuantity {
    K8sQuantity(q.as_str().to_owned())
}

fn value<T: serde::Serialize>(t: &T) -> Value {
    // Serializing k8s-openapi types to a `Value` cannot fail (string keys, no non-finite
    // floats).
    serde_json::to_value(t).unwrap_or(Value::Null)
}

fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

/// `base`, or `base-2`, `base-3`… whichever is not taken; records it as taken.
fn unique(base: &str, taken: &mut BTreeSet<String>) -> String {
    let mut name = base.to_owned();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

/// Appends `items` to the array at `tokens`, creating it when the pod has none.
fn append(ops: &mut Vec<PatchOperation>, raw: &Value, tokens: &[&str], items: Vec<Value>) {
    let ptr = pointer(tokens);
    if raw.pointer(ptr.as_str()).is_some_and(Value::is_array) {
        for item in items {
            let mut at = tokens.to_vec();
            at.push("-");
            ops.push(add(&at, item));
        }
    } else {
        ops.push(add(tokens, Value::Array(items)));
    }
}

/// Adds `entries` to the object at `tokens`, creating it when the pod has none.
fn add_to_map(
    ops: &mut Vec<PatchOperation>,
    raw: &Value,
    tokens: &[&str],
    entries: serde_json::Map<String, Value>,
) {
    let ptr = pointer(tokens);
    if raw.pointer(ptr.as_str()).is_some_and(Value::is_object) {
        for (k, v) in entries {
            let mut at = tokens.to_vec();
            at.push(&k);
            ops.push(add(&at, v));
        }
    } else {
        ops.push(add(tokens, Value::Object(entries)));
    }
}
