//! The read-only HTTP listener of `serve` and `train` (`--http ADDR`): the dashboard at `/`
//! ([`crate::dashboard`]) and `/metrics` in the OpenMetrics text format
//! ([`crate::exposition`]). hyper serves HTTP/1.1 on a runtime of its own, so that neither scraping nor a hostile client touches training. On loopback
//! it answers anyone on the host; on any other address only a request that carries the
//! cluster's shared secret as a bearer token (compared in constant time), but for the
//! dashboard's page itself, which holds no data. At most
//! [`MAX_CONNECTIONS`] connections at once (more are closed at once), 16 KiB of request
//! head, 10 s to send it, 30 s a connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::exposition::{render, View};

/// Connections served at once, at most.
pub const MAX_CONNECTIONS: usize = 256;
const HEAD_MAX: usize = 16 << 10;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);

struct Served {
    view: View,
    /// The coordinator's listener for workers, where this process has one.
    cluster: Option<Arc<layerwise_net::Cluster>>,
    /// The bearer token a request must carry (on a non-loopback address).
    token: Option<Vec<u8>>,
}

/// Compares two byte strings in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, content_type.parse().expect("a valid header value"));
    r
}

fn answer(served: &Served, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    // The page itself holds no data (it asks for the token, then fetches with it).
    let public = matches!(req.uri().path(), "/" | "/favicon.ico");
    if let Some(token) = served.token.as_ref().filter(|_| !public) {
        let given = req.headers().get(hyper::header::AUTHORIZATION).map(|v| v.as_bytes());
        let ok = given.and_then(|g| g.strip_prefix(b"Bearer ")).is_some_and(|g| same(g, token));
        if !ok {
            return reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "a bearer token (the shared secret) is needed\n".into(),
            );
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "read-only: GET only\n".into());
    }
    let path = req.uri().path();
    if let Some(file) = path.strip_prefix("/api/curves/") {
        let log = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "log=1"));
        return match crate::dashboard::curves(&served.view, file, log) {
            Some(Ok(svg)) => reply(StatusCode::OK, "image/svg+xml", svg),
            Some(Err(e)) => reply(StatusCode::NOT_FOUND, "text/plain", format!("{e}\n")),
            None => reply(StatusCode::NOT_FOUND, "text/plain", "no such job\n".into()),
        };
    }
    match path {
        "/api/jobs" => reply(StatusCode::OK, "application/json", crate::dashboard::jobs(&served.view)),
        "/favicon.ico" => reply(StatusCode::NO_CONTENT, "image/x-icon", String::new()),
        "/metrics" => {
            let view = served.view.clone();
            let text = render(&view, served.cluster.as_deref());
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text)
        }
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", crate::dashboard::PAGE.into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Starts the listener on `addr` for `view`, in a thread of its own; returns the address
/// it listens on. A non-loopback address needs `secret` (requests then carry it).
pub fn start(
    addr: &str,
    view: View,
    cluster: Option<Arc<layerwise_net::Cluster>>,
    secret: Option<Vec<u8>>,
) -> Result<SocketAddr, String> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| format!("--http {addr}: cannot listen there: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let token = match (local.ip().is_loopback(), secret) {
        (true, _) => None,
        (false, Some(s)) => Some(s),
        (false, None) => {
            return Err(format!(
                "--http {addr}: beyond loopback every request must carry the shared secret; set LAYERWISE_SECRET or --secret-file"
            ))
        }
    };
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let served = Arc::new(Served { view, cluster, token });
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => return tracing::error!("--http: cannot start its runtime: {e}"),
            };
            runtime.block_on(accept(listener, served));
        })
        .map_err(|e| format!("--http: cannot start its thread: {e}"))?;
    tracing::info!("metrics on http://{local}/metrics");
    Ok(local)
}

async fn accept(listener: std::net::TcpListener, served: Arc<Served>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!("--http: {e}"),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("--http: cannot accept a connection ({e}); pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue }; // full: closed at once
        let served = served.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let served = served.clone();
                async move { Ok::<_, Infallible>(answer(&served, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(HEAD_MAX)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
            drop(slot);
        });
    }
}
