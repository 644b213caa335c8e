//! An in-memory Kubernetes API server behind a `tower::Service`, for driving the reconciler
//! without a cluster (the pattern of kube-rs's controller tests, with state instead of a script).
//!
//! It stores objects by path, answers get, list (with label selectors), create, server-side
//! apply (as a merge; on the status subresource, which one manager owns, as a replacement),
//! merge and JSON patches (status subresource included), replace with
//! resourceVersion checks, and delete (deletionTimestamp while finalizers remain). Faults can be
//! injected per method and path. Every request is logged so tests can count writes.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

#[derive(Default)]
pub struct Fake {
    objs: Mutex<BTreeMap<String, Value>>,
    log: Mutex<Vec<(Method, String)>>,
    faults: Mutex<Vec<Fault>>,
    rv: Mutex<u64>,
}

struct Fault {
    method: Method,
    path_contains: String,
    code: u16,
    times: usize,
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// `(collection path, name, subresource)` of a namespaced path.
fn split(path: &str) -> (String, Option<String>, Option<String>) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let i = segs.iter().position(|s| *s == "namespaces").unwrap_or(0);
    let coll_end = (i + 3).min(segs.len());
    let coll = format!("/{}", segs[..coll_end].join("/"));
    (
        coll,
        segs.get(i + 3).map(|s| s.to_string()),
        segs.get(i + 4).map(|s| s.to_string()),
    )
}

/// RFC 7386 merge (null removes).
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches(labels: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        labels[k].as_str() == Some(v)
    })
}

impl Fake {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A kube client talking to this fake.
    pub fn client(self: &Arc<Self>) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let (code, v) = me.handle(&parts, &bytes);
                let resp = Response::builder()
                    .status(StatusCode::from_u16(code).unwrap())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(v.to_string())))
                    .unwrap();
                Ok::<_, Infallible>(resp)
            }
        });
        kube::Client::new(svc, "default")
    }

    pub fn fail(&self, method: Method, path_contains: &str, code: u16, times: usize) {
        self.faults.lock().unwrap().push(Fault {
            method,
            path_contains: path_contains.into(),
            code,
            times,
        });
    }

    /// Requests other than GET so far.
    pub fn writes(&self) -> Vec<(Method, String)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m != Method::GET)
            .cloned()
            .collect()
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.objs.lock().unwrap().get(path).cloned()
    }

    pub fn put(&self, path: &str, mut v: Value) {
        self.stamp(&mut v, true);
        self.objs.lock().unwrap().insert(path.into(), v);
    }

    pub fn remove(&self, path: &str) {
        self.objs.lock().unwrap().remove(path);
    }

    pub fn list(&self, coll: &str) -> Vec<Value> {
        self.objs
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| split(k).0 == coll)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn stamp(&self, v: &mut Value, new: bool) {
        let mut rv = self.rv.lock().unwrap();
        *rv += 1;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        if new {
            if v["metadata"]["uid"].is_null() {
                v["metadata"]["uid"] = json!(format!("uid-{rv}"));
            }
            if v["metadata"]["creationTimestamp"].is_null() {
                v["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            v["metadata"]["generation"] = json!(1);
        }
    }

    fn handle(&self, parts: &http::request::Parts, body: &[u8]) -> (u16, Value) {
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or("").to_string();
        let method = parts.method.clone();
        self.log
            .lock()
            .unwrap()
            .push((method.clone(), path.clone()));
        {
            let mut faults = self.faults.lock().unwrap();
            if let Some(f) = faults
                .iter_mut()
                .find(|f| f.method == method && path.contains(&f.path_contains) && f.times > 0)
            {
                f.times -= 1;
                let reason = match f.code {
                    409 => "Conflict",
                    404 => "NotFound",
                    _ => "InternalError",
                };
                return status(f.code, reason, format!("injected {} on {path}", f.code));
            }
        }
        let ctype = parts
            .headers
            .get("content-type")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        let data: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let (coll, name, sub) = split(&path);
        let key = name.as_ref().map(|n| format!("{coll}/{n}"));
        let mut objs = self.objs.lock().unwrap();
        match (method, key) {
            (Method::GET, Some(k)) => match objs.get(&k) {
                Some(v) => (200, v.clone()),
                None => status(404, "NotFound", format!("{k} not found")),
            },
            (Method::GET, None) => {
                let sel = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("labelSelector="))
                    .map(percent_decode)
                    .unwrap_or_default();
                let items: Vec<Value> = objs
                    .iter()
                    .filter(|(k, v)| split(k).0 == coll && matches(&v["metadata"]["labels"], &sel))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            (Method::POST, None) => {
                let n = data["metadata"]["name"].as_str().unwrap_or("").to_string();
                let k = format!("{coll}/{n}");
                if objs.contains_key(&k) {
                    return status(409, "AlreadyExists", format!("{k} already exists"));
                }
                let mut v = data;
                drop(objs);
                self.stamp(&mut v, true);
                self.objs.lock().unwrap().insert(k, v.clone());
                (201, v)
            }
            (Method::PATCH, Some(k)) => {
                let exists = objs.contains_key(&k);
                if !exists && !ctype.contains("apply-patch") {
                    return status(404, "NotFound", format!("{k} not found"));
                }
                let mut v = objs.get(&k).cloned().unwrap_or_else(|| json!({}));
                let before_spec = v["spec"].clone();
                if ctype.contains("json-patch") {
                    // Like the API server, a `test` for null passes on a missing path.
                    let data: Vec<Value> = data
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && op["path"].as_str().is_some_and(|p| v.pointer(p).is_none()))
                        })
                        .collect();
                    let ops: json_patch::Patch = match serde_json::from_value(Value::Array(data)) {
                        Ok(p) => p,
                        Err(e) => return status(400, "BadRequest", e.to_string()),
                    };
                    if let Err(e) = json_patch::patch(&mut v, &ops) {
                        return status(422, "Invalid", e.to_string());
                    }
                } else if sub.as_deref() == Some("status") && ctype.contains("apply-patch") {
                    // Server-side apply by the one manager of the status: fields it no longer
                    // sends are removed, so the applied status is the whole status.
                    v["status"] = data["status"].clone();
                } else if sub.as_deref() == Some("status") {
                    merge(&mut v["status"], &data["status"]);
                } else {
                    let mut d = data;
                    if let Some(o) = d.as_object_mut() {
                        o.remove("status");
                    }
                    merge(&mut v, &d);
                }
                if exists && v["spec"] != before_spec {
                    let g = v["metadata"]["generation"].as_i64().unwrap_or(1);
                    v["metadata"]["generation"] = json!(g + 1);
                }
                drop(objs);
                self.stamp(&mut v, !exists);
                let mut objs = self.objs.lock().unwrap();
                // Finalizers removed from an object being deleted: it goes.
                if !v["metadata"]["deletionTimestamp"].is_null()
                    && v["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|a| a.is_empty())
                {
                    objs.remove(&k);
                } else {
                    objs.insert(k, v.clone());
                }
                (200, v)
            }
            (Method::PUT, Some(k)) => {
                let Some(cur) = objs.get(&k).cloned() else {
                    return status(404, "NotFound", format!("{k} not found"));
                };
                if data["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                    return status(
                        409,
                        "Conflict",
                        format!("{k}: the object has been modified"),
                    );
                }
                let mut v = data;
                drop(objs);
                self.stamp(&mut v, false);
                self.objs.lock().unwrap().insert(k, v.clone());
                (200, v)
            }
            (Method::DELETE, Some(k)) => {
                let Some(mut v) = objs.get(&k).cloned() else {
                    return status(404, "NotFound", format!("{k} not found"));
                };
                if v["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                {
                    v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                    objs.insert(k, v.clone());
                } else {
                    objs.remove(&k);
                }
                (200, v)
            }
            (m, _) => status(405, "MethodNotAllowed", format!("{m} {path}")),
        }
    }
}
