//! A fake of OpenAI's ChatKit Sessions API (`POST /v1/chatkit/sessions`,
//! `POST /v1/chatkit/sessions/{id}/cancel`) that checks what the real API checks — auth,
//! the `OpenAI-Beta: chatkit_beta=v1` header, content type, body shape and bounds, unknown
//! parameters — and answers what it answers, so a wrong request from the gate fails a test.
//! Every request is recorded; failure modes (error statuses, hanging, refused connections)
//! are switched at runtime.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::RngExt;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::certs::Leaf;

/// The API key [`FakeOptions::default`] expects.
pub const TEST_API_KEY: &str = "sk-test-chatkitgate-4f1c2a9e8b7d6c5e4f3a2b1c0d9e8f7a";
/// The workflow id [`FakeOptions::default`] knows.
pub const TEST_WORKFLOW_ID: &str = "wf_68e5c0ffee1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";
/// `retry-after` (seconds) sent with `Mode::Status(429)`.
pub const RATE_LIMIT_RETRY_AFTER_SECS: u64 = 7;
/// Session lifetime when the request has no `expires_after` (the API's default, 10 minutes).
pub const DEFAULT_EXPIRES_SECONDS: u64 = 600;

const MAX_STATE_VARIABLE_KEY_CHARS: usize = 64;
const MAX_STATE_VARIABLE_STRING_CHARS: usize = 10_485_760;

#[derive(Clone)]
pub struct FakeOptions {
    /// `Authorization: Bearer <api_key>` is required on every call.
    pub api_key: String,
    /// Workflow ids that exist; any other `workflow.id` gets 404.
    pub workflows: Vec<String>,
    /// Serve HTTPS with this leaf instead of plain HTTP.
    pub tls: Option<Leaf>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions { api_key: TEST_API_KEY.to_string(), workflows: vec![TEST_WORKFLOW_ID.to_string()], tls: None }
    }
}

/// How the fake answers (every endpoint, every request), switchable with `set_mode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Validate and answer like the real API.
    Normal,
    /// Answer every request with this status and the real API's error body for it
    /// (429 adds `retry-after: RATE_LIMIT_RETRY_AFTER_SECS`).
    Status(u16),
    /// Read the request, then never answer (until the fake is shut down or dropped).
    Hang,
    /// Wait this long, then answer as in `Normal`.
    Delay(Duration),
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path without the query, e.g. `/v1/chatkit/sessions`.
    pub path: String,
    pub query: Option<String>,
    /// Lowercased header names; repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON; `None` when empty or not JSON (see `raw_body`).
    pub body: Option<Value>,
    pub raw_body: String,
    /// The `x-request-id` the fake answered with.
    pub response_request_id: String,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// A running fake ChatKit API on 127.0.0.1. Dropping it stops it.
pub struct FakeChatKit {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

struct State {
    api_key: String,
    workflows: Vec<String>,
    mode: Mutex<Mode>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Session objects in creation order, with their current status.
    sessions: Mutex<Vec<Value>>,
    cancelled: Mutex<Vec<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeChatKit {
    /// Binds 127.0.0.1:0 and serves HTTP/1.1 and HTTP/2 (HTTPS when `opts.tls` is set).
    pub async fn start(opts: FakeOptions) -> FakeChatKit {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind fake ChatKit API");
        let addr = listener.local_addr().expect("local addr");
        let tls = opts.tls.as_ref().map(|leaf| TlsAcceptor::from(leaf.server_config()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = Arc::new(State {
            api_key: opts.api_key,
            workflows: opts.workflows,
            mode: Mutex::new(Mode::Normal),
            requests: Mutex::new(Vec::new()),
            sessions: Mutex::new(Vec::new()),
            cancelled: Mutex::new(Vec::new()),
        });
        let accept_task = tokio::spawn(accept_loop(listener, tls, state.clone(), shutdown_rx));
        FakeChatKit { addr, scheme, state, shutdown, accept_task: Mutex::new(Some(accept_task)) }
    }

    /// `FakeChatKit::start(FakeOptions::default())`: plain HTTP, [`TEST_API_KEY`],
    /// [`TEST_WORKFLOW_ID`].
    pub async fn start_default() -> FakeChatKit {
        Self::start(FakeOptions::default()).await
    }

    /// `http://127.0.0.1:PORT/v1` (`https://…` with TLS): the value for `chatkit.api_base`.
    pub fn api_base(&self) -> String {
        format!("{}://127.0.0.1:{}/v1", self.scheme, self.addr.port())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn api_key(&self) -> &str {
        &self.state.api_key
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    pub fn mode(&self) -> Mode {
        lock(&self.state.mode).clone()
    }

    /// Stops listening and closes every open connection (hanging requests included): new
    /// connections are refused from when this returns. Recordings stay readable.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let task = lock(&self.accept_task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Every request received so far, in order, whatever the mode or outcome.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// Requests received at the create endpoint (`POST /v1/chatkit/sessions`), any outcome.
    pub fn create_requests(&self) -> Vec<RecordedRequest> {
        self.requests().into_iter().filter(|r| r.method == "POST" && r.path == CREATE_PATH).collect()
    }

    /// Number of requests received at the create endpoint, whatever their outcome
    /// (`created_sessions().len()` counts the successful ones).
    pub fn create_count(&self) -> usize {
        lock(&self.state.requests).iter().filter(|r| r.method == "POST" && r.path == CREATE_PATH).count()
    }

    /// Sessions created successfully, in order, as `chatkit.session` objects with their
    /// current `status` (`"cancelled"` once cancelled).
    pub fn created_sessions(&self) -> Vec<Value> {
        lock(&self.state.sessions).clone()
    }

    pub fn session(&self, id: &str) -> Option<Value> {
        lock(&self.state.sessions).iter().find(|s| s["id"] == id).cloned()
    }

    pub fn session_by_secret(&self, client_secret: &str) -> Option<Value> {
        lock(&self.state.sessions).iter().find(|s| s["client_secret"] == client_secret).cloned()
    }

    /// Ids of successful cancel calls, in order (a session cancelled twice appears twice).
    pub fn cancelled_ids(&self) -> Vec<String> {
        lock(&self.state.cancelled).clone()
    }

    /// Forgets recorded requests (sessions and cancellations stay).
    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }
}

const CREATE_PATH: &str = "/v1/chatkit/sessions";

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // e.g. EMFILE: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => return,
        };
        let tls = tls.clone();
        let state = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serve_connection(stream, tls, state) => {}
                // Dropping the connection future closes the socket.
                () = stopped(&mut shutdown) => {}
            }
        });
    }
}

/// Resolves once shutdown is requested or the [`FakeChatKit`] is dropped.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn serve_connection(stream: TcpStream, tls: Option<TlsAcceptor>, state: Arc<State>) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    match tls {
        Some(acceptor) => {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        }
        None => {
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        }
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let request_id = format!("req_{}", random_hex(16));
    let (parts, body) = req.into_parts();
    let raw = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let mut headers = BTreeMap::<String, String>::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_ascii_lowercase())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers,
        body: serde_json::from_slice(&raw).ok(),
        raw_body: String::from_utf8_lossy(&raw).into_owned(),
        response_request_id: request_id.clone(),
    };
    lock(&state.requests).push(recorded.clone());

    let mode = lock(&state.mode).clone();
    let result = match mode {
        // Pending forever: the connection closes only when the client gives up or the fake
        // shuts down (which drops the connection, and this future with it).
        Mode::Hang => std::future::pending().await,
        Mode::Status(status) => Err(ApiError::for_status(status)),
        Mode::Delay(delay) => {
            tokio::time::sleep(delay).await;
            route(&state, &parts.method, &recorded, &raw)
        }
        Mode::Normal => route(&state, &parts.method, &recorded, &raw),
    };
    let (status, body, extra_headers) = match result {
        Ok(body) => (StatusCode::OK, body, Vec::new()),
        Err(error) => (error.status, error.body(), error.headers),
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("x-request-id", HeaderValue::from_str(&request_id).expect("request id header"));
    h.insert("openai-version", HeaderValue::from_static("2020-10-01"));
    h.insert("openai-processing-ms", HeaderValue::from_static("42"));
    for (name, value) in extra_headers {
        h.insert(name, HeaderValue::from_str(&value).expect("header value"));
    }
    response
}

fn route(state: &State, method: &Method, req: &RecordedRequest, raw: &[u8]) -> Result<Value, ApiError> {
    let invalid_url = || ApiError::invalid_url(method, &req.path);
    enum Endpoint<'a> {
        Create,
        Cancel(&'a str),
    }
    let endpoint = if req.path == CREATE_PATH {
        Endpoint::Create
    } else if let Some(id) = req
        .path
        .strip_prefix("/v1/chatkit/sessions/")
        .and_then(|rest| rest.strip_suffix("/cancel"))
        .filter(|id| !id.is_empty() && !id.contains('/'))
    {
        Endpoint::Cancel(id)
    } else {
        return Err(invalid_url());
    };
    if method != Method::POST {
        return Err(invalid_url());
    }
    check_auth(state, req)?;
    check_beta(req)?;
    match endpoint {
        Endpoint::Create => create(state, req, raw),
        Endpoint::Cancel(id) => cancel(state, id, raw),
    }
}

fn check_auth(state: &State, req: &RecordedRequest) -> Result<(), ApiError> {
    let Some(auth) = req.header("authorization") else {
        return Err(ApiError::new(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password \
             field (with blank username) if you're accessing the API from your browser and are \
             prompted for a username and password. You can obtain an API key from \
             https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
        ));
    };
    let presented = auth.strip_prefix("Bearer ").unwrap_or(auth);
    if auth.starts_with("Bearer ") && presented == state.api_key {
        return Ok(());
    }
    Err(ApiError::new(
        401,
        &format!(
            "Incorrect API key provided: {}. You can find your API key at \
             https://platform.openai.com/account/api-keys.",
            mask_key(presented)
        ),
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    ))
}

/// Like the real API: never echo a key back, show only its last four characters.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(4)..].iter().collect();
    format!("{}{tail}", "*".repeat(chars.len().saturating_sub(4).min(40)))
}

fn check_beta(req: &RecordedRequest) -> Result<(), ApiError> {
    let ok = req.header("openai-beta").is_some_and(|v| v.split(',').any(|beta| beta.trim() == "chatkit_beta=v1"));
    if ok {
        return Ok(());
    }
    Err(ApiError::new(
        400,
        "You must provide the 'OpenAI-Beta: chatkit_beta=v1' header to access the ChatKit API.",
        "invalid_request_error",
        None,
        None,
    ))
}

fn parse_json_object(raw: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let not_json = || {
        ApiError::new(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but \
             what was sent was not valid JSON. If you have trouble figuring out how to fix this, \
             please contact us through our help center at help.openai.com.)",
            "invalid_request_error",
            None,
            None,
        )
    };
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::invalid_type("body", "an object", &other)),
        Err(_) => Err(not_json()),
    }
}

fn create(state: &State, req: &RecordedRequest, raw: &[u8]) -> Result<Value, ApiError> {
    let content_type = req.header("content-type").unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            400,
            &format!(
                "Invalid Content-Type header ({content_type}), expected application/json. \
                 (HINT: If you're using curl, you can pass -H 'Content-Type: application/json')"
            ),
            "invalid_request_error",
            None,
            None,
        ));
    }
    let body = parse_json_object(raw)?;
    let params = validate_create(&body)?;
    if !state.workflows.contains(&params.workflow_id) {
        return Err(ApiError::new(
            404,
            &format!("Workflow with id '{}' not found.", params.workflow_id),
            "invalid_request_error",
            Some("workflow.id"),
            None,
        ));
    }
    let session = json!({
        "id": format!("cksess_{}", random_hex(24)),
        "object": "chatkit.session",
        "chatkit_configuration": params.chatkit_configuration,
        "client_secret": format!("ek_{}_{}", random_hex(16), random_alphanumeric(48)),
        "expires_at": unix_now() + params.expires_seconds,
        "max_requests_per_1_minute": params.max_requests_per_1_minute,
        "rate_limits": { "max_requests_per_1_minute": params.max_requests_per_1_minute },
        "status": "active",
        "user": params.user,
        "workflow": {
            "id": params.workflow_id,
            "state_variables": params.state_variables,
            "tracing": { "enabled": params.tracing_enabled },
            "version": params.version,
        },
    });
    lock(&state.sessions).push(session.clone());
    Ok(session)
}

fn cancel(state: &State, id: &str, raw: &[u8]) -> Result<Value, ApiError> {
    // The SDKs send no body; tolerate an empty JSON object too.
    if !raw.iter().all(u8::is_ascii_whitespace) {
        let body = parse_json_object(raw)?;
        if let Some(key) = body.keys().next() {
            return Err(ApiError::unknown_parameter(key));
        }
    }
    let mut sessions = lock(&state.sessions);
    let Some(session) = sessions.iter_mut().find(|s| s["id"] == id) else {
        return Err(ApiError::new(
            404,
            &format!("ChatKit session with id '{id}' not found."),
            "invalid_request_error",
            Some("session_id"),
            None,
        ));
    };
    session["status"] = json!("cancelled");
    let session = session.clone();
    drop(sessions);
    lock(&state.cancelled).push(id.to_string());
    Ok(session)
}

struct CreateParams {
    user: String,
    workflow_id: String,
    version: Value,
    state_variables: Value,
    tracing_enabled: bool,
    expires_seconds: u64,
    max_requests_per_1_minute: u64,
    chatkit_configuration: Value,
}

/// Validates a create body against the documented schema. Strict on purpose: an optional
/// field sent as `null` is a type error (send it or leave it out).
fn validate_create(body: &Map<String, Value>) -> Result<CreateParams, ApiError> {
    check_keys(body, "", &["user", "workflow", "expires_after", "rate_limits", "chatkit_configuration"])?;

    let user = string(required(body, "", "user")?, "user")?;
    if user.is_empty() {
        return Err(ApiError::empty_string("user"));
    }

    let workflow = object(required(body, "", "workflow")?, "workflow")?;
    check_keys(workflow, "workflow", &["id", "version", "state_variables", "tracing"])?;
    let workflow_id = string(required(workflow, "workflow", "id")?, "workflow.id")?;
    if workflow_id.is_empty() {
        return Err(ApiError::empty_string("workflow.id"));
    }
    let version = match workflow.get("version") {
        Some(v) => json!(string(v, "workflow.version")?),
        None => Value::Null,
    };
    let state_variables = match workflow.get("state_variables") {
        Some(v) => {
            let vars = object(v, "workflow.state_variables")?;
            for (key, value) in vars {
                let path = format!("workflow.state_variables.{key}");
                if key.chars().count() > MAX_STATE_VARIABLE_KEY_CHARS {
                    return Err(ApiError::new(
                        400,
                        &format!(
                            "Invalid 'workflow.state_variables': key '{key}' is too long. \
                             Expected a key with maximum length {MAX_STATE_VARIABLE_KEY_CHARS}, \
                             but got a key with length {} instead.",
                            key.chars().count()
                        ),
                        "invalid_request_error",
                        Some(&path),
                        Some("string_above_max_length"),
                    ));
                }
                match value {
                    Value::String(s) if s.chars().count() > MAX_STATE_VARIABLE_STRING_CHARS => {
                        return Err(ApiError::new(
                            400,
                            &format!("Invalid '{path}': string too long."),
                            "invalid_request_error",
                            Some(&path),
                            Some("string_above_max_length"),
                        ));
                    }
                    Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
                    other => {
                        return Err(ApiError::invalid_type(&path, "one of a string, a number, or a boolean", other));
                    }
                }
            }
            Value::Object(vars.clone())
        }
        None => Value::Null,
    };
    let tracing_enabled = match workflow.get("tracing") {
        Some(v) => {
            let tracing = object(v, "workflow.tracing")?;
            check_keys(tracing, "workflow.tracing", &["enabled"])?;
            optional_bool(tracing, "workflow.tracing", "enabled")?.unwrap_or(true)
        }
        None => true,
    };

    let expires_seconds = match body.get("expires_after") {
        Some(v) => {
            let expires = object(v, "expires_after")?;
            check_keys(expires, "expires_after", &["anchor", "seconds"])?;
            let anchor = string(required(expires, "expires_after", "anchor")?, "expires_after.anchor")?;
            if anchor != "created_at" {
                return Err(ApiError::new(
                    400,
                    &format!("Invalid value: '{anchor}'. Supported values are: 'created_at'."),
                    "invalid_request_error",
                    Some("expires_after.anchor"),
                    Some("invalid_value"),
                ));
            }
            integer(required(expires, "expires_after", "seconds")?, "expires_after.seconds", 1, Some(600))?
        }
        None => DEFAULT_EXPIRES_SECONDS,
    };

    let max_requests_per_1_minute = match body.get("rate_limits") {
        Some(v) => {
            let limits = object(v, "rate_limits")?;
            check_keys(limits, "rate_limits", &["max_requests_per_1_minute"])?;
            match limits.get("max_requests_per_1_minute") {
                Some(v) => integer(v, "rate_limits.max_requests_per_1_minute", 1, None)?,
                None => 10,
            }
        }
        None => 10,
    };

    let mut titling = true;
    let (mut upload, mut max_file_size, mut max_files) = (false, 512, 10);
    let (mut history, mut recent_threads) = (true, Value::Null);
    if let Some(v) = body.get("chatkit_configuration") {
        let config = object(v, "chatkit_configuration")?;
        check_keys(config, "chatkit_configuration", &["automatic_thread_titling", "file_upload", "history"])?;
        if let Some(v) = config.get("automatic_thread_titling") {
            let p = "chatkit_configuration.automatic_thread_titling";
            let t = object(v, p)?;
            check_keys(t, p, &["enabled"])?;
            titling = optional_bool(t, p, "enabled")?.unwrap_or(titling);
        }
        if let Some(v) = config.get("file_upload") {
            let p = "chatkit_configuration.file_upload";
            let f = object(v, p)?;
            check_keys(f, p, &["enabled", "max_file_size", "max_files"])?;
            upload = optional_bool(f, p, "enabled")?.unwrap_or(upload);
            if let Some(v) = f.get("max_file_size") {
                max_file_size = integer(v, &format!("{p}.max_file_size"), 1, Some(512))?;
            }
            if let Some(v) = f.get("max_files") {
                max_files = integer(v, &format!("{p}.max_files"), 1, None)?;
            }
        }
        if let Some(v) = config.get("history") {
            let p = "chatkit_configuration.history";
            let h = object(v, p)?;
            check_keys(h, p, &["enabled", "recent_threads"])?;
            history = optional_bool(h, p, "enabled")?.unwrap_or(history);
            if let Some(v) = h.get("recent_threads") {
                recent_threads = json!(integer(v, &format!("{p}.recent_threads"), 1, None)?);
            }
        }
    }

    Ok(CreateParams {
        user: user.to_string(),
        workflow_id: workflow_id.to_string(),
        version,
        state_variables,
        tracing_enabled,
        expires_seconds,
        max_requests_per_1_minute,
        chatkit_configuration: json!({
            "automatic_thread_titling": { "enabled": titling },
            "file_upload": {
                "enabled": upload,
                "max_file_size": max_file_size,
                "max_files": max_files,
            },
            "history": { "enabled": history, "recent_threads": recent_threads },
        }),
    })
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

fn check_keys(map: &Map<String, Value>, prefix: &str, allowed: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::unknown_parameter(&join(prefix, unknown))),
        None => Ok(()),
    }
}

fn required<'a>(map: &'a Map<String, Value>, prefix: &str, key: &str) -> Result<&'a Value, ApiError> {
    map.get(key).ok_or_else(|| {
        let path = join(prefix, key);
        ApiError::new(
            400,
            &format!("Missing required parameter: '{path}'."),
            "invalid_request_error",
            Some(&path),
            Some("missing_required_parameter"),
        )
    })
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object().ok_or_else(|| ApiError::invalid_type(path, "an object", v))
}

fn string<'a>(v: &'a Value, path: &str) -> Result<&'a str, ApiError> {
    v.as_str().ok_or_else(|| ApiError::invalid_type(path, "a string", v))
}

fn optional_bool(map: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<bool>, ApiError> {
    match map.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| ApiError::invalid_type(&join(prefix, key), "a boolean", v)),
    }
}

fn integer(v: &Value, path: &str, min: i64, max: Option<i64>) -> Result<u64, ApiError> {
    let Some(n) = v.as_i64() else {
        return Err(ApiError::invalid_type(path, "an integer", v));
    };
    if n < min {
        return Err(ApiError::new(
            400,
            &format!(
                "Invalid '{path}': integer below minimum value. Expected a value >= {min}, but \
                 got {n} instead."
            ),
            "invalid_request_error",
            Some(path),
            Some("integer_below_min_value"),
        ));
    }
    if let Some(max) = max.filter(|max| n > *max) {
        return Err(ApiError::new(
            400,
            &format!(
                "Invalid '{path}': integer above maximum value. Expected a value <= {max}, but \
                 got {n} instead."
            ),
            "invalid_request_error",
            Some(path),
            Some("integer_above_max_value"),
        ));
    }
    Ok(n.unsigned_abs())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An API error: `{"error":{"message","type","param","code"}}` with a status.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(
        status: u16,
        message: &str,
        kind: &'static str,
        param: Option<&str>,
        code: Option<&'static str>,
    ) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).expect("valid status"),
            message: message.to_string(),
            kind,
            param: param.map(str::to_string),
            code,
            headers: Vec::new(),
        }
    }

    fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    fn invalid_url(method: &Method, path: &str) -> ApiError {
        ApiError::new(404, &format!("Invalid URL ({method} {path})"), "invalid_request_error", None, None)
    }

    fn unknown_parameter(path: &str) -> ApiError {
        ApiError::new(
            400,
            &format!("Unknown parameter: '{path}'."),
            "invalid_request_error",
            Some(path),
            Some("unknown_parameter"),
        )
    }

    fn invalid_type(path: &str, expected: &str, got: &Value) -> ApiError {
        ApiError::new(
            400,
            &format!("Invalid type for '{path}': expected {expected}, but got {} instead.", kind_of(got)),
            "invalid_request_error",
            Some(path),
            Some("invalid_type"),
        )
    }

    fn empty_string(path: &str) -> ApiError {
        ApiError::new(
            400,
            &format!(
                "Invalid '{path}': empty string. Expected a string with minimum length 1, but got \
                 an empty string instead."
            ),
            "invalid_request_error",
            Some(path),
            Some("empty_string"),
        )
    }

    fn server_error(status: u16) -> ApiError {
        ApiError::new(
            status,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
        )
    }

    /// What the real API answers with `status` when something is wrong on its side or ours.
    fn for_status(status: u16) -> ApiError {
        match status {
            400 => ApiError::new(400, "Invalid request.", "invalid_request_error", None, None),
            401 => ApiError::new(
                401,
                "Incorrect API key provided: ********************************wxyz. You can find \
                 your API key at https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            403 => ApiError::new(
                403,
                "You have insufficient permissions for this operation.",
                "invalid_request_error",
                None,
                Some("insufficient_permissions"),
            ),
            404 => ApiError::new(
                404,
                &format!("Workflow with id '{TEST_WORKFLOW_ID}' not found."),
                "invalid_request_error",
                Some("workflow.id"),
                None,
            ),
            429 => {
                let mut error = ApiError::new(
                    429,
                    &format!(
                        "Rate limit reached for requests in organization org-test on requests \
                         per min (RPM): Limit 60, Used 60, Requested 1. Please try again in \
                         {RATE_LIMIT_RETRY_AFTER_SECS}s. Visit \
                         https://platform.openai.com/account/rate-limits to learn more."
                    ),
                    "requests",
                    None,
                    Some("rate_limit_exceeded"),
                );
                error.headers = vec![
                    ("retry-after", RATE_LIMIT_RETRY_AFTER_SECS.to_string()),
                    ("x-ratelimit-limit-requests", "60".to_string()),
                    ("x-ratelimit-remaining-requests", "0".to_string()),
                    ("x-ratelimit-reset-requests", format!("{RATE_LIMIT_RETRY_AFTER_SECS}s")),
                ];
                error
            }
            503 => ApiError::new(
                503,
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
                None,
            ),
            status if status >= 500 => ApiError::server_error(status),
            status => ApiError::new(status, "Request failed.", "invalid_request_error", None, None),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
}

fn random_alphanumeric(len: usize) -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(len).map(char::from).collect()
}
