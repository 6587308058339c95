//! A small HTTP server that speaks the part of the kube-apiserver's API a storage migration
//! uses — discovery, list (limit/continue), get, create, update with resourceVersion
//! conflicts, `/metrics` — and stores objects in a real etcd exactly as the apiserver does
//! with a KMS v2 provider: `k8s:enc:kms:v2:keyhaven:` + `EncryptedObject`, the DEK seed
//! encrypted by the real plugin over its socket.
//!
//! Like the apiserver it learns the plugin's key_id from Status and makes a new seed (one
//! Encrypt) when it changes; [`FakeApiserver::freeze_key`] stops it noticing, as an
//! apiserver between two Status polls. Faults are injected per object: a persistent 500, a
//! conflicting write just before an update (409), an object that vanishes (404).
//! A real apiserver is not available on these machines; this is what the tests run against.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use keyhaven_proto::kms::v2::{DecryptRequest, EncryptRequest, EncryptedObject, StatusRequest};
use kms_plugin::storage::{classify, encode_kms_v2, Stored};
use prost::Message;
use serde_json::{json, Value};
use testkit::etcd::EtcdMember;

/// Provider name in the (imagined) EncryptionConfiguration.
pub const PROVIDER: &str = "keyhaven";

/// A served resource.
#[derive(Debug, Clone, Copy)]
struct Res {
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
}

const RESOURCES: [Res; 2] = [
    Res {
        group: "",
        plural: "secrets",
        kind: "Secret",
    },
    Res {
        group: "example.com",
        plural: "widgets",
        kind: "Widget",
    },
];

impl Res {
    fn api_version(&self) -> String {
        match self.group {
            "" => "v1".into(),
            g => format!("{g}/v1"),
        }
    }

    fn etcd_dir(&self, prefix: &str) -> String {
        match self.group {
            "" => format!("{prefix}/{}", self.plural),
            g => format!("{prefix}/{g}/{}", self.plural),
        }
    }

    fn discovery(&self) -> Value {
        json!({
            "name": self.plural,
            "singularName": self.kind.to_lowercase(),
            "namespaced": true,
            "kind": self.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        })
    }
}

/// Faults injected by object name (`namespace/name`).
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Every update of these answers 500.
    pub fail: HashSet<String>,
    /// The next update of these meets a conflicting write first (409).
    pub conflict_once: HashSet<String>,
    /// These are deleted just before their next update (404).
    pub vanish: HashSet<String>,
    /// Every list answers 500.
    pub fail_list: bool,
    /// Each update waits this long first (to make a migration slow enough to interrupt).
    pub update_delay: Duration,
}

struct WriteKey {
    key_id: String,
    annotations: HashMap<String, Vec<u8>>,
    encrypted_seed: Vec<u8>,
    seed: zeroize::Zeroizing<Vec<u8>>,
}

struct State {
    etcd: etcd_client::Client,
    prefix: String,
    plugin: String,
    write_key: tokio::sync::Mutex<Option<WriteKey>>,
    seeds: Mutex<HashMap<Vec<u8>, zeroize::Zeroizing<Vec<u8>>>>,
    frozen: AtomicBool,
    faults: Mutex<Faults>,
    to_storage: Mutex<HashMap<String, u64>>,
}

/// The running server; stopped on drop.
pub struct FakeApiserver {
    /// `127.0.0.1:port`.
    pub addr: SocketAddr,
    /// A kubeconfig that points at it.
    pub kubeconfig: PathBuf,
    state: Arc<State>,
    rt: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for FakeApiserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiserver")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

type Reply = Result<Value, (StatusCode, String)>;

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

fn reason(code: StatusCode) -> &'static str {
    match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::CONFLICT => "Conflict",
        StatusCode::BAD_REQUEST => "BadRequest",
        _ => "InternalError",
    }
}

impl FakeApiserver {
    /// Serves on a free loopback port, storing in `etcd` under `/registry`, encrypting with
    /// the plugin listening on `plugin` (`unix:///path`).
    pub fn start(etcd: &EtcdMember, plugin: &str) -> FakeApiserver {
        let rt = crate::process::runtime();
        let client = rt.block_on(etcd.client()).expect("etcd client");
        let state = Arc::new(State {
            etcd: client,
            prefix: "/registry".into(),
            plugin: plugin.to_owned(),
            write_key: tokio::sync::Mutex::new(None),
            seeds: Mutex::default(),
            frozen: AtomicBool::new(false),
            faults: Mutex::default(),
            to_storage: Mutex::default(),
        });
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let st = state.clone();
        let app = axum::Router::new().fallback(move |m: Method, u: Uri, b: Bytes| {
            let st = st.clone();
            async move { st.handle(m, u, b).await }
        });
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::tempdir().expect("dir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\nusers:\n- name: fake\n  user:\n    token: not-checked\n"
            ),
        )
        .expect("kubeconfig");
        FakeApiserver {
            addr,
            kubeconfig,
            state,
            rt: Some(rt),
            _dir: dir,
        }
    }

    /// Stops (or resumes) noticing a new key_id from Status: writes keep the current key.
    pub fn freeze_key(&self, frozen: bool) {
        self.state.frozen.store(frozen, Ordering::SeqCst);
    }

    /// Sets the injected faults.
    pub fn set_faults(&self, f: Faults) {
        *self.state.faults.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Forgets decrypted seeds, so the next read of each Decrypts again (a restart).
    pub fn forget_seeds(&self) {
        self.state
            .seeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.as_ref().expect("runtime").block_on(f)
    }

    /// Creates an object through the same path a POST takes (blocking).
    pub fn create(&self, resource: &str, ns: &str, name: &str, data: Value) {
        let res = RESOURCES
            .iter()
            .find(|r| r.plural == resource)
            .expect("served resource");
        let obj = json!({
            "apiVersion": res.api_version(), "kind": res.kind,
            "metadata": {"name": name, "namespace": ns}, "data": data,
        });
        let r = self.block_on(self.state.create(res, ns, obj));
        assert!(r.is_ok(), "create {ns}/{name}: {r:?}");
    }

    /// Reads an object back, decrypted through the plugin (blocking).
    pub fn read(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let res = RESOURCES.iter().find(|r| r.plural == resource)?;
        let key = format!("{}/{ns}/{name}", res.etcd_dir(&self.state.prefix));
        self.block_on(self.state.read(&key)).ok().flatten()
    }
}

impl Drop for FakeApiserver {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl State {
    async fn handle(self: Arc<Self>, method: Method, uri: Uri, body: Bytes) -> Response {
        let path = uri.path().trim_end_matches('/');
        let query: HashMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            // Our continue tokens are hex and limits are numbers: nothing to percent-decode.
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        match path {
            "/api" => {
                return axum::Json(json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}))
                .into_response()
            }
            "/apis" => {
                return axum::Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                "name": "example.com",
                "versions": [{"groupVersion": "example.com/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "example.com/v1", "version": "v1"}}]}))
                .into_response()
            }
            "/metrics" => return self.metrics().into_response(),
            _ => {}
        }
        let (group, rest) = if let Some(r) = path.strip_prefix("/api/v1") {
            ("", r)
        } else if let Some(r) = path.strip_prefix("/apis/example.com/v1") {
            ("example.com", r)
        } else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no route {path}"),
            );
        };
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        if segs.is_empty() {
            let list: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == group)
                .map(Res::discovery)
                .collect();
            let gv = if group.is_empty() {
                "v1".to_string()
            } else {
                format!("{group}/v1")
            };
            return axum::Json(json!({"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": gv, "resources": list}))
            .into_response();
        }
        let (ns, plural, name) = match segs.as_slice() {
            [plural] => (None, *plural, None),
            ["namespaces", ns, plural] => (Some(*ns), *plural, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
            _ => {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("no route {path}"),
                )
            }
        };
        let Some(res) = RESOURCES
            .iter()
            .find(|r| r.group == group && r.plural == plural)
        else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource {plural}"),
            );
        };
        let body: Option<Value> = serde_json::from_slice(&body).ok();
        let r: Reply = match (method, ns, name) {
            (Method::GET, _, None) => self.list(res, ns, &query).await,
            (Method::POST, Some(ns), None) => match body {
                Some(b) => self.create(res, ns, b).await,
                None => Err((StatusCode::BAD_REQUEST, "body is not JSON".into())),
            },
            (Method::GET, Some(ns), Some(name)) => {
                let key = format!("{}/{ns}/{name}", res.etcd_dir(&self.prefix));
                match self.read(&key).await {
                    Ok(Some(v)) => Ok(v),
                    Ok(None) => Err((
                        StatusCode::NOT_FOUND,
                        format!("{plural} \"{name}\" not found"),
                    )),
                    Err(e) => Err(e),
                }
            }
            (Method::PUT, Some(ns), Some(name)) => match body {
                Some(b) => self.update(res, ns, name, b).await,
                None => Err((StatusCode::BAD_REQUEST, "body is not JSON".into())),
            },
            (m, _, _) => Err((StatusCode::METHOD_NOT_ALLOWED, format!("{m} not served"))),
        };
        match r {
            Ok(v) => axum::Json(v).into_response(),
            Err((code, msg)) => status(code, reason(code), msg),
        }
    }

    fn metrics(&self) -> String {
        use sha2::Digest;
        let m = self.to_storage.lock().unwrap_or_else(|p| p.into_inner());
        let mut s =
            String::from("# TYPE apiserver_envelope_encryption_key_id_hash_total counter\n");
        for (key_id, n) in m.iter() {
            s.push_str(&format!(
                "apiserver_envelope_encryption_key_id_hash_total{{apiserver_id_hash=\"sha256:00\",key_id_hash=\"sha256:{}\",provider_name=\"{PROVIDER}\",transformation_type=\"to_storage\"}} {n}\n",
                hex::encode(sha2::Sha256::digest(key_id.as_bytes()))
            ));
        }
        s
    }

    fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn list(&self, res: &Res, ns: Option<&str>, q: &HashMap<String, String>) -> Reply {
        if self.faults().fail_list {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "etcdserver: request timed out".into(),
            ));
        }
        let dir = match ns {
            Some(ns) => format!("{}/{ns}/", res.etcd_dir(&self.prefix)),
            None => format!("{}/", res.etcd_dir(&self.prefix)),
        };
        let limit: i64 = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
        let start = match q.get("continue").filter(|c| !c.is_empty()) {
            Some(c) => {
                hex::decode(c).map_err(|_| (StatusCode::BAD_REQUEST, "bad continue".to_string()))?
            }
            None => dir.clone().into_bytes(),
        };
        let end = kms_plugin::etcd::prefix_end(dir.as_bytes());
        let mut etcd = self.etcd.clone();
        let r = etcd
            .get(
                start,
                Some(GetOptions::new().with_range(end).with_limit(limit)),
            )
            .await
            .map_err(internal)?;
        let mut items = Vec::new();
        for kv in r.kvs() {
            if let Some(v) = self.decode(kv.value(), kv.mod_revision()).await? {
                items.push(v);
            }
        }
        let mut meta =
            json!({"resourceVersion": r.header().map(|h| h.revision()).unwrap_or(0).to_string()});
        if r.more() {
            if let Some(last) = r.kvs().last() {
                let mut next = last.key().to_vec();
                next.push(0);
                meta["continue"] = json!(hex::encode(next));
                meta["remainingItemCount"] = json!(r.count() - r.kvs().len() as i64);
            }
        }
        Ok(
            json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(),
            "metadata": meta, "items": items}),
        )
    }

    async fn create(&self, res: &Res, ns: &str, mut obj: Value) -> Reply {
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_owned();
        if name.is_empty() {
            return Err((StatusCode::BAD_REQUEST, "metadata.name required".into()));
        }
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
        let key = format!("{}/{ns}/{name}", res.etcd_dir(&self.prefix));
        let rev = self.store(&key, &obj, None).await?;
        obj["metadata"]["resourceVersion"] = json!(rev.to_string());
        Ok(obj)
    }

    async fn update(&self, res: &Res, ns: &str, name: &str, mut obj: Value) -> Reply {
        let id = format!("{ns}/{name}");
        let key = format!("{}/{ns}/{name}", res.etcd_dir(&self.prefix));
        let faults = self.faults();
        if !faults.update_delay.is_zero() {
            tokio::time::sleep(faults.update_delay).await;
        }
        if faults.fail.contains(&id) {
            return Err((StatusCode::INTERNAL_SERVER_ERROR, "injected failure".into()));
        }
        if faults.vanish.contains(&id) {
            let mut etcd = self.etcd.clone();
            etcd.delete(key.clone(), None).await.map_err(internal)?;
        }
        let take_conflict = {
            let mut f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            f.conflict_once.remove(&id)
        };
        if take_conflict {
            // Someone else writes the object first.
            if let Some(mut cur) = self.read(&key).await? {
                let rv: i64 = cur["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                cur["metadata"]["labels"] = json!({"touched": "by-someone-else"});
                self.store(&key, &cur, Some(rv)).await?;
            }
        }
        let rv: i64 = obj["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or((
                StatusCode::BAD_REQUEST,
                "metadata.resourceVersion required".to_string(),
            ))?;
        let rev = self.store(&key, &obj, Some(rv)).await?;
        obj["metadata"]["resourceVersion"] = json!(rev.to_string());
        Ok(obj)
    }

    /// The key the apiserver writes under now (asking Status unless frozen).
    async fn write_key(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<WriteKey>>, (StatusCode, String)> {
        let mut wk = self.write_key.lock().await;
        if wk.is_some() && self.frozen.load(Ordering::SeqCst) {
            return Ok(wk);
        }
        let mut c = kms_plugin::client::connect(&self.plugin)
            .await
            .map_err(internal)?;
        let st = c
            .status(StatusRequest {})
            .await
            .map_err(internal)?
            .into_inner();
        if wk.as_ref().map(|k| k.key_id.as_str()) != Some(st.key_id.as_str()) {
            let seed = zeroize::Zeroizing::new(rand::random::<[u8; 32]>().to_vec());
            let e = c
                .encrypt(EncryptRequest {
                    plaintext: seed.to_vec(),
                    uid: "fake-apiserver".into(),
                })
                .await
                .map_err(internal)?
                .into_inner();
            if e.key_id != st.key_id {
                return Err(internal("Encrypt key_id differs from Status key_id"));
            }
            *wk = Some(WriteKey {
                key_id: e.key_id,
                annotations: e.annotations,
                encrypted_seed: e.ciphertext,
                seed,
            });
        }
        Ok(wk)
    }

    /// Encrypts and writes `obj` at `key` if its mod revision is `expect` (None: absent).
    async fn store(
        &self,
        key: &str,
        obj: &Value,
        expect: Option<i64>,
    ) -> Result<i64, (StatusCode, String)> {
        let mut clean = obj.clone();
        if let Some(m) = clean["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let plain = serde_json::to_vec(&clean).map_err(internal)?;
        let (value, key_id) = {
            let guard = self.write_key().await?;
            let wk = guard.as_ref().ok_or_else(|| internal("no write key"))?;
            let nonce: [u8; 12] = rand::random();
            let cipher = Aes256Gcm::new_from_slice(&wk.seed).map_err(internal)?;
            let mut data = nonce.to_vec();
            data.extend(
                cipher
                    .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
                    .map_err(internal)?,
            );
            let o = EncryptedObject {
                encrypted_data: data,
                key_id: wk.key_id.clone(),
                encrypted_dek_source: wk.encrypted_seed.clone(),
                annotations: wk.annotations.clone(),
                encrypted_dek_source_type: 0,
            };
            (encode_kms_v2(PROVIDER, &o), wk.key_id.clone())
        };
        let cmp = match expect {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        };
        let mut etcd = self.etcd.clone();
        let txn = Txn::new()
            .when(vec![cmp])
            .and_then(vec![TxnOp::put(key, value, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let r = etcd.txn(txn).await.map_err(internal)?;
        if !r.succeeded() {
            let exists = r.op_responses().into_iter().any(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => !g.kvs().is_empty(),
                _ => false,
            });
            return Err(match (expect, exists) {
                (Some(_), false) => (StatusCode::NOT_FOUND, format!("{key} not found")),
                (None, true) => (StatusCode::CONFLICT, format!("{key} already exists")),
                _ => (
                    StatusCode::CONFLICT,
                    "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again".into(),
                ),
            });
        }
        *self
            .to_storage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key_id)
            .or_default() += 1;
        Ok(r.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn read(&self, key: &str) -> Result<Option<Value>, (StatusCode, String)> {
        let mut etcd = self.etcd.clone();
        let r = etcd.get(key, None).await.map_err(internal)?;
        match r.kvs().first() {
            Some(kv) => self.decode(kv.value(), kv.mod_revision()).await,
            None => Ok(None),
        }
    }

    /// Decrypts a stored value (KMS v2 through the plugin, or plain JSON).
    async fn decode(&self, value: &[u8], rev: i64) -> Result<Option<Value>, (StatusCode, String)> {
        let plain = match classify(value) {
            Stored::KmsV2 { .. } => {
                let rest = &value[kms_plugin::storage::KMS_V2_PREFIX.len() + PROVIDER.len() + 1..];
                let o = EncryptedObject::decode(rest).map_err(internal)?;
                let cached = self
                    .seeds
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&o.encrypted_dek_source)
                    .cloned();
                let seed = match cached {
                    Some(s) => s,
                    None => {
                        let mut c = kms_plugin::client::connect(&self.plugin)
                            .await
                            .map_err(internal)?;
                        let pt = c
                            .decrypt(DecryptRequest {
                                ciphertext: o.encrypted_dek_source.clone(),
                                uid: "fake-apiserver".into(),
                                key_id: o.key_id.clone(),
                                annotations: o.annotations.clone(),
                            })
                            .await
                            .map_err(internal)?
                            .into_inner()
                            .plaintext;
                        let s = zeroize::Zeroizing::new(pt);
                        self.seeds
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(o.encrypted_dek_source.clone(), s.clone());
                        s
                    }
                };
                if o.encrypted_data.len() < 12 {
                    return Err(internal("encrypted data too short"));
                }
                let (nonce, ct) = o.encrypted_data.split_at(12);
                let cipher = Aes256Gcm::new_from_slice(&seed).map_err(internal)?;
                cipher
                    .decrypt(Nonce::from_slice(nonce), ct)
                    .map_err(internal)?
            }
            Stored::Other("identity-json") => value.to_vec(),
            _ => return Ok(None),
        };
        let mut v: Value = serde_json::from_slice(&plain).map_err(internal)?;
        v["metadata"]["resourceVersion"] = json!(rev.to_string());
        Ok(Some(v))
    }
}

fn internal(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}
