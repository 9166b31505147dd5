//! The metrics listener: `/metrics` (Prometheus text), `/healthz` (the agent answers) and
//! `/readyz` (its probes are attached and its control socket listens), over HTTP/1.1 with hyper.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{body::Bytes, header, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What `/readyz` answers; set by the agent once it is ready, cleared when it stops.
#[derive(Debug, Default, Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// A scraper that never finishes its request holds a connection this long at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` (so a taken port fails the start) and serves until the task is aborted;
/// `/metrics` is what `render` says at each scrape (the agent's or the collector's registry).
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    render: fn() -> String,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("metrics listener {addr}: {e}"))?;
    tracing::info!(%addr, "serving metrics");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: wait instead of spinning.
                    tracing::warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let health = health.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, health.clone(), render));
                let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                // A bad request or a slow client ends its connection only.
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, connection).await;
            });
        }
    }))
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    health: Health,
    render: fn() -> String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    let response = match request.uri().path() {
        "/metrics" => {
            let body = tokio::task::spawn_blocking(render).await.unwrap_or_default();
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found: /metrics, /healthz, /readyz\n"),
    };
    Ok(response)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
