//! The kube-apiserver as the storage migration meets it (`kube`): the client from a
//! kubeconfig or the in-cluster config, resources resolved by discovery, and the canary that
//! proves the apiserver writes under a given key_id before anything is re-written.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::TypeMeta;
use kube::discovery::{verbs, ApiCapabilities, ApiResource, Scope};
use kube::{Client, Config};

use crate::etcd::{Etcd, EtcdError};
use crate::storage::{classify, object_key, Stored};

/// How to reach the apiserver.
#[derive(Debug, Clone, Default, Args)]
pub struct KubeArgs {
    /// kubeconfig file. Default: `$KUBECONFIG`, then `~/.kube/config`, then the in-cluster
    /// service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the canary Secret written to prove which key the apiserver writes under.
    #[arg(long, env = "KEYHAVEN_CANARY_NAMESPACE", default_value = "kube-system")]
    pub canary_namespace: String,
}

/// Name of the canary Secret.
pub const CANARY_NAME: &str = "keyhaven-kms-canary";

/// Why talking to the apiserver failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiserverError {
    /// No usable configuration.
    #[error("kubeconfig: {0}")]
    Config(String),
    /// A request failed.
    #[error("{what}: {source}")]
    Request {
        /// What we were doing.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The resource is not served, or cannot be listed and updated.
    #[error("{0}")]
    Resource(String),
    /// Reading the canary back from etcd failed.
    #[error("reading the canary from etcd: {0}")]
    Etcd(#[from] EtcdError),
}

/// Connects with `--kubeconfig`, or infers the configuration.
pub async fn client(args: &KubeArgs) -> Result<Client, ApiserverError> {
    let cfg = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ApiserverError::Config(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| ApiserverError::Config(format!("{}: {e}", path.display())))?
        }
        None => Config::infer()
            .await
            .map_err(|e| ApiserverError::Config(e.to_string()))?,
    };
    Client::try_from(cfg).map_err(|source| ApiserverError::Request {
        what: "building the Kubernetes client".into(),
        source,
    })
}

/// A resource the migration re-writes.
#[derive(Debug, Clone)]
pub struct Resource {
    /// As the operator named it (`secrets`, `widgets.example.com`).
    pub name: String,
    /// Group, version, kind and plural.
    pub api: ApiResource,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
}

impl Resource {
    /// The typed handle for one namespace (or the cluster).
    pub fn api(&self, client: &Client, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) if self.namespaced => Api::namespaced_with(client.clone(), ns, &self.api),
            _ => Api::all_with(client.clone(), &self.api),
        }
    }

    /// The object's `apiVersion`/`kind`, which list items may leave out.
    pub fn type_meta(&self) -> TypeMeta {
        TypeMeta {
            api_version: self.api.api_version.clone(),
            kind: self.api.kind.clone(),
        }
    }
}

/// Resolves `secrets` or `<plural>.<group>` through discovery, and checks it can be listed
/// and updated.
pub async fn resolve(client: &Client, name: &str) -> Result<Resource, ApiserverError> {
    let (plural, group) = name.split_once('.').unwrap_or((name, ""));
    let g = kube::discovery::group(client, group)
        .await
        .map_err(|e| match e {
            kube::Error::Discovery(_) => ApiserverError::Resource(format!(
                "resource {name}: the apiserver serves no API group {group:?}"
            )),
            source => ApiserverError::Request {
                what: format!("discovering API group {group:?}"),
                source,
            },
        })?;
    let found: Vec<(ApiResource, ApiCapabilities)> = g.recommended_resources();
    let Some((api, caps)) = found.iter().find(|(ar, _)| ar.plural == plural).cloned() else {
        let mut served: Vec<&str> = found.iter().map(|(ar, _)| ar.plural.as_str()).collect();
        served.sort_unstable();
        return Err(ApiserverError::Resource(format!(
            "resource {name} does not exist on the apiserver (group {group:?} serves: {})",
            served.join(", ")
        )));
    };
    for verb in [verbs::LIST, verbs::GET, verbs::UPDATE] {
        if !caps.supports_operation(verb) {
            return Err(ApiserverError::Resource(format!(
                "resource {name} does not support {verb}: it cannot be re-written"
            )));
        }
    }
    Ok(Resource {
        name: name.to_owned(),
        api,
        namespaced: caps.scope == Scope::Namespaced,
    })
}

/// What the canary showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanaryResult {
    /// Read back from etcd: stored under this key_id (or not under KMS v2: the format).
    Etcd(Result<String, String>),
    /// From the apiserver's own metrics: whether it has written under the key.
    Metrics(bool),
}

impl CanaryResult {
    /// Whether the apiserver wrote the canary under `key_id`.
    pub fn is_under(&self, key_id: &str) -> bool {
        match self {
            CanaryResult::Etcd(Ok(k)) => k == key_id,
            CanaryResult::Etcd(Err(_)) => false,
            CanaryResult::Metrics(b) => *b,
        }
    }

    /// A line for the operator.
    pub fn describe(&self) -> String {
        match self {
            CanaryResult::Etcd(Ok(k)) => format!("canary stored under key_id {k}"),
            CanaryResult::Etcd(Err(f)) => format!("canary stored as {f}, not under KMS v2"),
            CanaryResult::Metrics(true) => {
                "the apiserver's metrics show a write under the key".into()
            }
            CanaryResult::Metrics(false) => {
                "the apiserver's metrics show no write under the key yet".into()
            }
        }
    }
}

/// Writes the canary Secret through the apiserver (a real change, so the apiserver must
/// store it), then reads which key it was stored under: from etcd when given, else from the
/// apiserver's `apiserver_envelope_encryption_key_id_hash_total` metric.
pub async fn write_canary(
    client: &Client,
    args: &KubeArgs,
    etcd: Option<&Etcd>,
    key_id: &str,
) -> Result<CanaryResult, ApiserverError> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &args.canary_namespace,
        &ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()),
    );
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string();
    let req = |what: &str| {
        let what = format!(
            "{what} canary Secret {}/{CANARY_NAME}",
            args.canary_namespace
        );
        move |source| ApiserverError::Request { what, source }
    };
    match api.get_opt(CANARY_NAME).await.map_err(req("reading"))? {
        Some(mut obj) => {
            obj.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert("keyhaven.dev/canary-written".into(), stamp);
            api.replace(CANARY_NAME, &PostParams::default(), &obj)
                .await
                .map_err(req("updating"))?;
        }
        None => {
            let obj: DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": CANARY_NAME,
                    "namespace": args.canary_namespace,
                    "annotations": {"keyhaven.dev/canary-written": stamp},
                    "labels": {"app.kubernetes.io/managed-by": "keyhaven-kms-plugin"},
                },
                "type": "Opaque",
                "data": {},
            }))
            .map_err(|e| ApiserverError::Config(format!("canary object: {e}")))?;
            api.create(&PostParams::default(), &obj)
                .await
                .map_err(req("creating"))?;
        }
    }
    if let Some(etcd) = etcd {
        let key = object_key(
            etcd.prefix(),
            "secrets",
            Some(&args.canary_namespace),
            CANARY_NAME,
        );
        let stored = etcd.get(&key).await?.map(|v| classify(&v));
        return Ok(CanaryResult::Etcd(match stored {
            Some(Stored::KmsV2 { key_id, .. }) => Ok(key_id),
            Some(other) => Err(other.format().to_owned()),
            None => Err(format!("missing from etcd at {key}")),
        }));
    }
    let metrics = client
        .request_text(
            http::Request::get("/metrics")
                .body(Vec::new())
                .map_err(|e| ApiserverError::Config(e.to_string()))?,
        )
        .await
        .map_err(|source| ApiserverError::Request {
            what: "reading the apiserver's /metrics (needs `get` on the non-resource URL /metrics)"
                .into(),
            source,
        })?;
    Ok(CanaryResult::Metrics(metrics_show_write(&metrics, key_id)))
}

/// The apiserver labels its envelope metrics with `key_id_hash="sha256:<hex>"` of the
/// key_id; a `to_storage` count means it has written under that key.
pub fn metrics_show_write(metrics: &str, key_id: &str) -> bool {
    use sha2::Digest;
    let hash = format!(
        "key_id_hash=\"sha256:{}\"",
        hex::encode(sha2::Sha256::digest(key_id.as_bytes()))
    );
    metrics.lines().any(|l| {
        l.starts_with("apiserver_envelope_encryption_key_id_hash_total{")
            && l.contains(&hash)
            && l.contains("transformation_type=\"to_storage\"")
            && l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_the_key_by_its_sha256() {
        let key = "keyhaven-kek-v1-00";
        use sha2::Digest;
        let h = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        let m = format!(
            "# HELP x\napiserver_envelope_encryption_key_id_hash_total{{apiserver_id_hash=\"sha256:aa\",key_id_hash=\"sha256:{h}\",provider_name=\"keyhaven\",transformation_type=\"to_storage\"}} 3\n"
        );
        assert!(metrics_show_write(&m, key));
        assert!(!metrics_show_write(&m, "keyhaven-kek-v1-01"));
        assert!(!metrics_show_write(
            &m.replace("to_storage", "from_storage"),
            key
        ));
        assert!(!metrics_show_write(&m.replace("} 3", "} 0"), key));
    }
}
