//! A small HTTP server that speaks the part of the kube-apiserver's API a pod /
//! service-account watch uses: `GET /api/v1/{pods,serviceaccounts}` lists (all namespaces)
//! with `metadata.resourceVersion`, and `?watch=true&resourceVersion=N` streams
//! newline-delimited `WatchEvent`s (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, `ERROR`),
//! replaying the events after `N` from its history first, as the apiserver's watch cache does.
//!
//! Faults, as a real apiserver shows them: [`FakeKube::expire_watches`] ends every open watch
//! with an `ERROR` event carrying a 410 (Gone) `Status` and forgets its history, so a watch
//! resumed from an older resourceVersion gets 410 too and must list again;
//! [`FakeKube::set_down`] closes every open watch and answers 503 until it is up again.
//! Objects are served as `PartialObjectMetadata` (what a metadata-only client asks for), and
//! every request must carry the bearer token given at start (else 401).
//!
//! A real apiserver is not available on these machines; this is what the tests run against.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_stream::StreamExt as _;

/// The two resources served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `pods`.
    Pods,
    /// `serviceaccounts`.
    ServiceAccounts,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::ServiceAccounts => "serviceaccounts",
        }
    }
}

#[derive(Debug, Clone)]
struct Obj {
    uid: String,
    rv: u64,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Obj>,
    /// Events after `compacted`, in order: (rv, kind, type, object).
    history: Vec<(u64, Kind, &'static str, Value)>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    compacted: u64,
    watchers: Vec<(Kind, UnboundedSender<Bytes>)>,
    down: bool,
    /// `list pods`, `watch pods from 7`, ... in arrival order.
    requests: Vec<String>,
}

fn object(ns: &str, name: &str, o: &Obj) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": o.uid,
            "resourceVersion": o.rv.to_string(),
        },
    })
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

impl State {
    fn event(&mut self, kind: Kind, ty: &'static str, ns: &str, name: &str, o: &Obj) {
        let obj = object(ns, name, o);
        let ev = line(&json!({ "type": ty, "object": obj }));
        self.history.push((o.rv, kind, ty, obj));
        self.watchers
            .retain(|(k, tx)| *k != kind || tx.send(ev.clone()).is_ok());
    }
}

/// The fake apiserver; stops on drop.
#[derive(Debug)]
pub struct FakeKube {
    state: Arc<Mutex<State>>,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKube {
    /// Serves on a free loopback port (its own thread and runtime), admitting `token`.
    pub fn start(token: &str) -> FakeKube {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr: SocketAddr = std_listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..State::default()
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (st, token) = (state.clone(), format!("Bearer {token}"));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
                    let (st, token) = (st.clone(), token.clone());
                    async move { handle(&st, &token, &uri, &headers) }
                });
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
        });
        FakeKube {
            state,
            url: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Creates (or replaces) an object: `ADDED`.
    pub fn add(&self, kind: Kind, ns: &str, name: &str, uid: &str) {
        self.with(|s| {
            s.rv += 1;
            let o = Obj {
                uid: uid.into(),
                rv: s.rv,
            };
            s.objects.insert((kind, ns.into(), name.into()), o.clone());
            s.event(kind, "ADDED", ns, name, &o);
        });
    }

    /// Deletes an object: `DELETED` with its last state. Panics when it does not exist.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        self.with(|s| {
            let mut o = s
                .objects
                .remove(&(kind, ns.into(), name.into()))
                .expect("no such object");
            s.rv += 1;
            o.rv = s.rv;
            s.event(kind, "DELETED", ns, name, &o);
        });
    }

    /// Ends every open watch with `ERROR` 410 (Gone) and forgets the history, as an apiserver
    /// whose watch cache moved past the clients' resourceVersion.
    pub fn expire_watches(&self) {
        self.with(|s| {
            let gone = line(&json!({
                "type": "ERROR",
                "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": "too old resource version",
                },
            }));
            for (_, tx) in s.watchers.drain(..) {
                let _ = tx.send(gone.clone());
            }
            s.history.clear();
            s.compacted = s.rv + 1;
        });
    }

    /// Down: every open watch is cut (the connection just ends) and requests are answered
    /// 503 until it is up again. Up: served again.
    pub fn set_down(&self, down: bool) {
        self.with(|s| {
            s.down = down;
            if down {
                s.watchers.clear();
            }
        });
    }

    /// The requests so far (`list pods`, `watch pods from 107`, ...).
    pub fn requests(&self) -> Vec<String> {
        self.with(|s| s.requests.clone())
    }

    /// Open watches of `kind`.
    pub fn watching(&self, kind: Kind) -> usize {
        self.with(|s| {
            s.watchers
                .iter()
                .filter(|(k, tx)| *k == kind && !tx.is_closed())
                .count()
        })
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn status(code: StatusCode, reason: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": reason, "code": code.as_u16(), "message": reason,
    });
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn handle(st: &Mutex<State>, token: &str, uri: &Uri, headers: &HeaderMap) -> Response {
    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(token) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let kind = match uri.path() {
        "/api/v1/pods" => Kind::Pods,
        "/api/v1/serviceaccounts" => Kind::ServiceAccounts,
        _ => return status(StatusCode::NOT_FOUND, "NotFound"),
    };
    let query: BTreeMap<String, String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
    if s.down {
        s.requests.push(format!("refused {}", kind.plural()));
        return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    }
    if !watch {
        s.requests.push(format!("list {}", kind.plural()));
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|((_, ns, name), o)| object(ns, name, o))
            .collect();
        let body = json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": { "resourceVersion": s.rv.to_string() },
            "items": items,
        });
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    s.requests
        .push(format!("watch {} from {from}", kind.plural()));
    let (tx, rx) = unbounded_channel::<Bytes>();
    if from + 1 < s.compacted {
        // As the apiserver: 200, then an ERROR event with a 410 Status, then the end.
        let _ = tx.send(line(&json!({
            "type": "ERROR",
            "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", s.compacted),
            },
        })));
        drop(tx);
    } else {
        for (rv, k, ty, obj) in &s.history {
            if *k == kind && *rv > from {
                let _ = tx.send(line(&json!({ "type": ty, "object": obj })));
            }
        }
        s.watchers.push((kind, tx));
    }
    let body = Body::from_stream(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(Ok::<Bytes, std::convert::Infallible>),
    );
    (StatusCode::OK, [("content-type", "application/json")], body).into_response()
}
