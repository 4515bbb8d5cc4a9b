//! A stand-in for Grafana's HTTP API. Grafana itself cannot run on these
//! machines, so this in-process server (hyper, 127.0.0.1:0) plays it: it
//! checks the request shapes of Grafana's documented legacy API — basic
//! auth, JSON bodies, required keys, uid rules (≤ 40 characters of
//! `[a-zA-Z0-9_-]`), folder references, `overwrite` semantics — and answers
//! with Grafana's status codes and body shapes. It is stricter than Grafana
//! in one way: unknown top-level keys in a request body are refused (400),
//! so a misspelt key (`folderUID`) fails the test instead of being ignored.
//!
//! Endpoints: `GET /api/health` (no credentials, as in Grafana),
//! `GET/POST /api/folders[/:uid]`, `PUT /api/folders/:uid`,
//! `GET /api/datasources/uid/:uid`, `POST /api/datasources`,
//! `PUT /api/datasources/uid/:uid`, `GET /api/dashboards/uid/:uid`,
//! `POST /api/dashboards/db`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Normal,
    /// Every request is refused with 403 (a Viewer's credentials).
    Forbidden,
    /// Every write (POST, PUT) answers 404, as a reverse proxy that passes
    /// only reads on to Grafana would: the lookups say "absent", the
    /// writes find no route.
    WritesNotFound,
}

#[derive(Default)]
pub struct State {
    pub folders: BTreeMap<String, Value>,
    pub datasources: BTreeMap<String, Value>,
    /// The secrets that came in `secureJsonData` (Grafana keeps them
    /// encrypted and never returns them).
    pub secrets: BTreeMap<String, Value>,
    pub dashboards: BTreeMap<String, (Value, String)>,
    /// `METHOD path` of every request, in order.
    pub log: Vec<String>,
    /// Requests refused for their shape: (request, reason).
    pub refused: Vec<(String, String)>,
    next_id: u64,
}

pub struct StandIn {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    pub mode: Arc<Mutex<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    pub async fn start(user: &str, password: &str) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            next_id: 1,
            ..Default::default()
        }));
        let mode = Arc::new(Mutex::new(Mode::Normal));
        let creds = format!("{user}:{password}");
        let (st, md) = (state.clone(), mode.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (st, md, creds) = (st.clone(), md.clone(), creds.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, md, creds) = (st.clone(), md.clone(), creds.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(handle(req, &st, &md, &creds).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        StandIn {
            addr,
            state,
            mode,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn writes(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|l| !l.starts_with("GET "))
            .cloned()
            .collect()
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn valid_uid(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 40
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn basic_ok(req: &Request<hyper::body::Incoming>, creds: &str) -> bool {
    use base64_lite::encode;
    req.headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h == format!("Basic {}", encode(creds.as_bytes())))
}

/// Checks that `body` is an object, has `required` keys of the right JSON
/// type, and no keys outside `allowed`.
fn shape(body: &Value, required: &[(&str, &str)], allowed: &[&str]) -> Result<(), String> {
    let Some(o) = body.as_object() else {
        return Err("body is not a JSON object".into());
    };
    for (k, t) in required {
        let v = o.get(*k).ok_or_else(|| format!("missing {k:?}"))?;
        let ok = match *t {
            "string" => v.as_str().is_some_and(|s| !s.is_empty()),
            "object" => v.is_object(),
            "bool" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            return Err(format!("{k:?} must be a non-empty {t}"));
        }
    }
    for k in o.keys() {
        if !allowed.contains(&k.as_str()) && !required.iter().any(|(r, _)| r == k) {
            return Err(format!("unknown key {k:?}"));
        }
    }
    Ok(())
}

const DATASOURCE_KEYS: &[&str] = &[
    "uid",
    "name",
    "type",
    "access",
    "url",
    "user",
    "database",
    "basicAuth",
    "basicAuthUser",
    "withCredentials",
    "isDefault",
    "jsonData",
    "secureJsonData",
    "version",
];

async fn handle(
    req: Request<hyper::body::Incoming>,
    st: &Arc<Mutex<State>>,
    md: &Arc<Mutex<Mode>>,
    creds: &str,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let line = format!("{method} {path}");
    st.lock().unwrap().log.push(line.clone());
    if method == "GET" && path == "/api/health" {
        return reply(
            200,
            json!({"commit": "standin", "database": "ok", "version": "11.3.0"}),
        );
    }
    if method != "GET" && *md.lock().unwrap() == Mode::WritesNotFound {
        return reply(404, json!({"message": "Not found"}));
    }
    if !basic_ok(&req, creds) {
        return reply(401, json!({"message": "Invalid username or password"}));
    }
    if *md.lock().unwrap() == Mode::Forbidden {
        return reply(403, json!({"message": "Permission denied"}));
    }
    let is_json = req
        .headers()
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else if !is_json {
        return refuse(st, &line, "body without Content-Type: application/json");
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return refuse(st, &line, &format!("bad JSON: {e}")),
        }
    };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut s = st.lock().unwrap();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["api", "folders", uid]) => match s.folders.get(*uid) {
            Some(f) => reply(200, f.clone()),
            None => reply(
                404,
                json!({"message": "folder not found", "status": "not-found"}),
            ),
        },
        ("POST", ["api", "folders"]) => {
            if let Err(e) = shape(
                &body,
                &[("title", "string")],
                &["uid", "parentUid", "description"],
            ) {
                drop(s);
                return refuse(st, &line, &e);
            }
            let uid = body["uid"].as_str().unwrap_or("generated").to_string();
            if !valid_uid(&uid) {
                drop(s);
                return refuse(st, &line, "invalid uid");
            }
            if s.folders.contains_key(&uid) {
                return reply(
                    409,
                    json!({"message": "a folder with the same uid already exists"}),
                );
            }
            let id = s.next_id;
            s.next_id += 1;
            let f = json!({"id": id, "uid": uid, "title": body["title"], "url": format!("/dashboards/f/{uid}/"), "version": 1});
            s.folders.insert(uid, f.clone());
            reply(200, f)
        }
        ("PUT", ["api", "folders", uid]) => {
            if let Err(e) = shape(
                &body,
                &[("title", "string")],
                &["version", "overwrite", "description"],
            ) {
                drop(s);
                return refuse(st, &line, &e);
            }
            if body["version"].is_null() && body["overwrite"] != json!(true) {
                drop(s);
                return refuse(st, &line, "needs version or overwrite: true");
            }
            let uid = uid.to_string();
            match s.folders.get_mut(&uid) {
                Some(f) => {
                    f["title"] = body["title"].clone();
                    f["version"] = json!(f["version"].as_u64().unwrap_or(1) + 1);
                    reply(200, f.clone())
                }
                None => reply(404, json!({"message": "folder not found"})),
            }
        }
        ("GET", ["api", "datasources", "uid", uid]) => match s.datasources.get(*uid) {
            Some(d) => reply(200, d.clone()),
            None => reply(404, json!({"message": "Data source not found"})),
        },
        ("POST", ["api", "datasources"]) | ("PUT", ["api", "datasources", "uid", _]) => {
            if let Err(e) = shape(
                &body,
                &[("name", "string"), ("type", "string"), ("access", "string")],
                DATASOURCE_KEYS,
            ) {
                drop(s);
                return refuse(st, &line, &e);
            }
            if !["proxy", "direct"].contains(&body["access"].as_str().unwrap_or("")) {
                drop(s);
                return refuse(st, &line, "access must be proxy or direct");
            }
            let uid = if method == "PUT" {
                parts[3].to_string()
            } else {
                body["uid"].as_str().unwrap_or("generated").to_string()
            };
            if !valid_uid(&uid) {
                drop(s);
                return refuse(st, &line, "invalid uid");
            }
            let exists = s.datasources.contains_key(&uid);
            if method == "POST" && exists {
                return reply(
                    409,
                    json!({"message": "data source with the same uid already exists"}),
                );
            }
            if method == "PUT" && !exists {
                return reply(404, json!({"message": "Data source not found"}));
            }
            let name_taken = s
                .datasources
                .iter()
                .any(|(u, d)| *u != uid && d["name"] == body["name"]);
            if name_taken {
                return reply(
                    409,
                    json!({"message": "data source with the same name already exists"}),
                );
            }
            let id = match s.datasources.get(&uid) {
                Some(d) => d["id"].as_u64().unwrap_or(0),
                None => {
                    s.next_id += 1;
                    s.next_id
                }
            };
            let mut stored = body.clone();
            let secret = stored
                .as_object_mut()
                .and_then(|o| o.remove("secureJsonData"));
            let mut fields = serde_json::Map::new();
            if let Some(sec) = &secret {
                for k in sec.as_object().into_iter().flat_map(|o| o.keys()) {
                    fields.insert(k.clone(), json!(true));
                }
                s.secrets.insert(uid.clone(), sec.clone());
            } else if let Some(old) = s.datasources.get(&uid) {
                fields = old["secureJsonFields"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
            }
            stored["id"] = json!(id);
            stored["uid"] = json!(uid);
            stored["orgId"] = json!(1);
            stored["readOnly"] = json!(false);
            stored["secureJsonFields"] = Value::Object(fields);
            s.datasources.insert(uid.clone(), stored.clone());
            let msg = if method == "POST" {
                "Datasource added"
            } else {
                "Datasource updated"
            };
            reply(
                200,
                json!({"datasource": stored, "id": id, "message": msg, "name": body["name"]}),
            )
        }
        ("GET", ["api", "dashboards", "uid", uid]) => match s.dashboards.get(*uid) {
            Some((d, folder)) => reply(
                200,
                json!({"dashboard": d, "meta": {"folderUid": folder, "slug": uid, "url": format!("/d/{uid}/"), "provisioned": false}}),
            ),
            None => reply(404, json!({"message": "Dashboard not found"})),
        },
        ("POST", ["api", "dashboards", "db"]) => {
            if let Err(e) = shape(
                &body,
                &[("dashboard", "object")],
                &["folderUid", "folderId", "overwrite", "message"],
            ) {
                drop(s);
                return refuse(st, &line, &e);
            }
            let d = &body["dashboard"];
            if d["title"].as_str().is_none_or(|t| t.is_empty()) {
                drop(s);
                return refuse(st, &line, "dashboard.title is required");
            }
            if !d["schemaVersion"].is_u64() || !d["panels"].is_array() {
                drop(s);
                return refuse(st, &line, "dashboard.schemaVersion and panels required");
            }
            let uid = d["uid"].as_str().unwrap_or("").to_string();
            if !valid_uid(&uid) {
                drop(s);
                return refuse(st, &line, "dashboard.uid must be 1-40 of [a-zA-Z0-9_-]");
            }
            let folder = body["folderUid"].as_str().unwrap_or("").to_string();
            if !folder.is_empty() && !s.folders.contains_key(&folder) {
                return reply(
                    400,
                    json!({"message": "folder not found", "status": "not-found"}),
                );
            }
            let overwrite = body["overwrite"] == json!(true);
            let (id, version) = match s.dashboards.get(&uid) {
                Some(_) if !overwrite => {
                    return reply(
                        412,
                        json!({"message": "A dashboard with the same uid already exists", "status": "name-exists"}),
                    )
                }
                Some((old, _)) => (
                    old["id"].as_u64().unwrap_or(0),
                    old["version"].as_u64().unwrap_or(0) + 1,
                ),
                None => {
                    s.next_id += 1;
                    (s.next_id, 1)
                }
            };
            let mut stored = d.clone();
            stored["id"] = json!(id);
            stored["version"] = json!(version);
            s.dashboards.insert(uid.clone(), (stored, folder));
            reply(
                200,
                json!({"id": id, "uid": uid, "url": format!("/d/{uid}/"), "status": "success", "version": version, "slug": uid}),
            )
        }
        _ => reply(404, json!({"message": "Not found"})),
    }
}

fn refuse(st: &Arc<Mutex<State>>, line: &str, why: &str) -> Response<Full<Bytes>> {
    st.lock()
        .unwrap()
        .refused
        .push((line.to_string(), why.to_string()));
    reply(400, json!({"message": format!("bad request: {why}")}))
}

/// Base64 for the `Authorization: Basic` check (no extra dependency).
mod base64_lite {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(b: &[u8]) -> String {
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            out.push(T[(n >> 18) as usize & 63] as char);
            out.push(T[(n >> 12) as usize & 63] as char);
            out.push(if c.len() > 1 {
                T[(n >> 6) as usize & 63] as char
            } else {
                '='
            });
            out.push(if c.len() > 2 {
                T[n as usize & 63] as char
            } else {
                '='
            });
        }
        out
    }
}
