//! One AdmissionReview in, one out: which requests are ours, and the answer — allowed
//! untouched, allowed with the patch, or refused with a message naming what to fix.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::DynamicObject;
use serde_json::Value;

use crate::annotations::{self, Decision};
use crate::config::InjectionConfig;
use crate::mutate;

/// The only AdmissionReview version we answer (the webhook configuration asks for it).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// Longest refusal message (the apiserver passes it to the user).
const MAX_MESSAGE: usize = 4096;

/// What happened to a request, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The pod was patched.
    Injected,
    /// Allowed untouched: not a pod CREATE, not opted in, excluded namespace, or injected
    /// already.
    Untouched(&'static str),
    /// The pod was refused (bad annotations, clashes).
    Denied,
    /// The body was not an AdmissionReview we can answer.
    Invalid,
}

impl Outcome {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Untouched(_) => "untouched",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
        }
    }
}

/// The answer to one AdmissionReview.
#[derive(Debug)]
pub struct Answer {
    /// The AdmissionReview to send back.
    pub body: Value,
    /// What happened.
    pub outcome: Outcome,
    /// The pod with the patch applied (when injected).
    pub patched: Option<Value>,
}

/// Answers the AdmissionReview in `body`.
pub fn answer(body: &[u8], cfg: &InjectionConfig) -> Answer {
    let invalid = |why: &str| Answer {
        body: encode(AdmissionResponse::invalid(why)),
        outcome: Outcome::Invalid,
        patched: None,
    };
    let Ok(mut raw) = serde_json::from_slice::<Value>(body) else {
        return invalid("the body is not JSON");
    };
    if raw.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION)
        || raw.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return invalid("not an admission.k8s.io/v1 AdmissionReview");
    }
    let object = raw
        .get_mut("request")
        .and_then(|r| r.get_mut("object"))
        .map(Value::take)
        .unwrap_or(Value::Null);
    let request: AdmissionRequest<DynamicObject> =
        match serde_json::from_value::<AdmissionReview<DynamicObject>>(raw)
            .ok()
            .and_then(|r| r.try_into().ok())
        {
            Some(r) => r,
            None => return invalid("the AdmissionReview has no valid request"),
        };
    let allow = |why: &'static str| Answer {
        body: encode(AdmissionResponse::from(&request)),
        outcome: Outcome::Untouched(why),
        patched: None,
    };
    let deny = |message: String| {
        let mut r = AdmissionResponse::from(&request).deny(bounded(message));
        r.result.code = 400;
        r.result.reason = "BadRequest".to_owned();
        Answer {
            body: encode(r),
            outcome: Outcome::Denied,
            patched: None,
        }
    };

    let is_pod = request.kind.group.is_empty()
        && request.kind.version == "v1"
        && request.kind.kind == "Pod"
        && request.sub_resource.is_none();
    if !is_pod {
        return allow("not a pod");
    }
    if !matches!(request.operation, Operation::Create) {
        return allow("not a create");
    }
    let namespace = request
        .namespace
        .clone()
        .or_else(|| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_default();
    if cfg.exclude_namespaces.contains(&namespace)
        || cfg.own_namespace.as_deref() == Some(namespace.as_str())
    {
        return allow("excluded namespace");
    }
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(p) => p,
        Err(_) => return deny("keyhaven: the request's object is not a valid v1 Pod".into()),
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let notes = pod.metadata.annotations.clone().unwrap_or_default();
    let req = match annotations::decide(&labels, &notes) {
        Ok(Decision::NotRequested) => return allow("not opted in"),
        Ok(Decision::AlreadyInjected) => return allow("injected already"),
        Ok(Decision::Inject(r)) => r,
        Err(errors) => return deny(refusal(&errors)),
    };
    let m = match mutate::mutation(&object, &pod, &req, cfg) {
        Ok(m) => m,
        Err(errors) => return deny(refusal(&errors)),
    };
    // Apply our own patch before sending it: a patch the apiserver could not apply would
    // fail the pod's creation with a less helpful message.
    let mut patched = object;
    if json_patch::patch(&mut patched, &m.ops).is_err() {
        tracing::error!(
            namespace,
            "built a JSON Patch that does not apply; refusing the pod"
        );
        return deny("keyhaven: internal error building the patch".into());
    }
    let mut r = match AdmissionResponse::from(&request).with_patch(json_patch::Patch(m.ops)) {
        Ok(r) => r,
        Err(_) => return deny("keyhaven: internal error encoding the patch".into()),
    };
    if !m.warnings.is_empty() {
        r.warnings = Some(m.warnings);
    }
    Answer {
        body: encode(r),
        outcome: Outcome::Injected,
        patched: Some(patched),
    }
}

fn refusal(errors: &[String]) -> String {
    format!(
        "keyhaven: this pod asks for secrets, but {}",
        errors.join("; ")
    )
}

fn bounded(mut m: String) -> String {
    if m.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push('…');
    }
    m
}

/// The response AdmissionReview as JSON, with the patch base64-encoded as the Kubernetes API
/// documents it (`AdmissionResponse.patch` is bytes).
fn encode(response: AdmissionResponse) -> Value {
    let patch = response.patch.clone();
    let mut v = serde_json::to_value(response.into_review()).unwrap_or(Value::Null);
    if let (Some(p), Some(r)) = (patch, v.get_mut("response")) {
        r["patch"] = Value::from(base64::engine::general_purpose::STANDARD.encode(p));
    }
    if v.get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        v["apiVersion"] = Value::from(API_VERSION);
        v["kind"] = Value::from("AdmissionReview");
    }
    v
}

/// Decodes the base64 patch of a response AdmissionReview (tests, `mutate --patched-pod`).
pub fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let b64 = response.pointer("/response/patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// An AdmissionReview v1 request to create `pod` in `namespace`, shaped as the kube-apiserver
/// sends it to a mutating webhook (for `mutate --pod`, tests and benches).
pub fn create_request(pod: &Value, namespace: &str, uid: &str) -> Value {
    serde_json::json!({
        "kind": "AdmissionReview",
        "apiVersion": API_VERSION,
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}
