//! The admin HTTP endpoint, on its own address, apart from client traffic:
//! `GET /metrics` (Prometheus text), `GET /healthz` (liveness: every
//! shard's loop ticked lately), `GET /readyz` (readiness: accepting and the
//! broker up), `GET /stats` (JSON), `GET /dashboard` (live charts), and
//! `POST /publish` for producers that speak HTTP rather than Redis.
//!
//! It runs on one thread of its own with a current-thread tokio runtime and
//! hyper's HTTP/1.1 server, never on a shard's thread. Connections are
//! served concurrently, at most [`MAX_CONNECTIONS`] at once (past it a new
//! one is answered 503 and closed); a request head must arrive within
//! [`HEADER_TIMEOUT`], a body within [`BODY_TIMEOUT`] and at most
//! [`MAX_BODY`] bytes, so an idle or trickling client never holds up a
//! probe.

mod publish;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::{debug, warn};

use crate::broker::Broker;
use crate::bus::Bus;
use crate::config::Config;
use crate::metrics::{uptime_ms, BrokerMetrics, ShardMetrics};

/// Admin connections served at once; past it a new one gets 503 at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Time for a request head to arrive (hyper's header read timeout).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for a request body to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body (`POST /publish`): a batch of publishes.
pub const MAX_BODY: usize = 1 << 20;
/// A shard whose loop has not ticked for this long fails `/healthz`.
pub const STUCK_AFTER: Duration = Duration::from_secs(5);
/// `GET /dashboard`: one page, no build step, nothing fetched from
/// outside; it reads `/stats`, `/metrics` and `/readyz` once a second.
const DASHBOARD: &str = include_str!("dashboard.html");
/// Longest a connection may live, whatever it does.
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);

/// What the endpoint reads: the node's counters and state, and the broker
/// for HTTP publishes.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Each shard's counters, by shard number.
    pub shards: Vec<Arc<ShardMetrics>>,
    /// The broker's counters.
    pub broker_metrics: Arc<BrokerMetrics>,
    /// Where `POST /publish` goes.
    pub broker: Arc<dyn Broker>,
    /// The shards' inboxes (their depth, for `/stats`).
    pub bus: Bus,
    /// Set when the drain starts: `/readyz` answers 503 from then on.
    pub draining: Arc<AtomicBool>,
    /// Validated settings (`admin_api_key`, `max_publish_size`).
    pub config: Arc<Config>,
    /// Namespaces, for the topics of HTTP publishes.
    pub namespaces: crate::namespace::Namespaces,
}

/// Binds `addr` and serves on a thread of its own; returns the bound
/// address. Binding happens here, so a taken port fails the start.
pub fn spawn(addr: SocketAddr, admin: Admin) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || runtime.block_on(serve(listener, Arc::new(admin))))?;
    Ok(local)
}

async fn serve(listener: std::net::TcpListener, admin: Arc<Admin>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin endpoint cannot listen");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "admin connection ended"),
                Err(_) => debug!(%peer, "admin connection over its time limit"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

/// Every slot is taken: a short 503, then close.
async fn refuse_busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let body = "admin endpoint busy: too many connections\n";
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(head.as_bytes())).await;
}

/// A response with a body and its content type.
fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", body.to_string())
}

async fn route(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let depths = admin.bus.depths();
            let body = crate::metrics::scrape(&admin.shards, &admin.broker_metrics, depths);
            reply(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        (&Method::GET, "/healthz") => healthz(admin),
        (&Method::GET, "/readyz") => readyz(admin),
        (&Method::GET, "/stats") => json(StatusCode::OK, &stats(admin)),
        (&Method::GET, "/dashboard") => {
            reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD)
        }
        (&Method::POST, "/publish") => publish::handle(admin, req).await,
        (_, "/metrics" | "/healthz" | "/readyz" | "/stats" | "/dashboard") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: this path is GET only\n",
        ),
        (_, "/publish") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: /publish is POST only\n",
        ),
        (_, path) => text(
            StatusCode::NOT_FOUND,
            format!(
                "unknown path {:?}: try /metrics, /healthz, /readyz, /stats, /dashboard \
                 or POST /publish\n",
                path.chars().take(64).collect::<String>()
            ),
        ),
    }
}

/// Liveness: 200 while every shard's loop ticked within [`STUCK_AFTER`];
/// 503 naming each stuck shard otherwise (a restart is the cure).
fn healthz(admin: &Admin) -> Response<Full<Bytes>> {
    let now = uptime_ms();
    let stuck: Vec<String> = admin
        .shards
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let idle = now.saturating_sub(m.ticked_ms.load(Ordering::Relaxed));
            (idle >= STUCK_AFTER.as_millis() as u64)
                .then(|| format!("shard {i}: no tick for {idle} ms"))
        })
        .collect();
    if stuck.is_empty() {
        text(StatusCode::OK, "ok\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stuck: {}\n", stuck.join("; ")),
        )
    }
}

/// Readiness: 200 while the node accepts clients and its broker is up; 503
/// while draining or while Redis is unreachable (after start: a node that
/// cannot reach Redis at start does not start).
fn readyz(admin: &Admin) -> Response<Full<Bytes>> {
    if admin.draining.load(Ordering::Acquire) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    if admin.broker_metrics.up.load(Ordering::Relaxed) != 1 {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker down: Redis is unreachable\n",
        );
    }
    text(StatusCode::OK, "ready\n")
}

/// `GET /stats`: the node at a glance, per shard and for the broker.
fn stats(admin: &Admin) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let depths = admin.bus.depths();
    let now = uptime_ms();
    let shards: Vec<serde_json::Value> = admin
        .shards
        .iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::json!({
                "shard": i,
                "connections": m.connections_active.load(Relaxed),
                "subscriptions": m.subscriptions_active.load(Relaxed),
                "topics": m.topic_index_entries.load(Relaxed),
                "delivered_total": m.messages_delivered.load(Relaxed),
                "published_total": m.messages_published.load(Relaxed),
                "dropped_total": m.dropped_total(),
                "inbox_depth": depths.get(i).copied().unwrap_or(0),
                "last_tick_ms_ago": now.saturating_sub(m.ticked_ms.load(Relaxed)),
            })
        })
        .collect();
    let b = &admin.broker_metrics;
    serde_json::json!({
        "node": admin.config.node_name,
        "uptime_ms": now,
        "draining": admin.draining.load(Ordering::Acquire),
        "broker": {
            "kind": if admin.config.redis.is_some() { "redis" } else { "embedded" },
            "up": b.up.load(Relaxed) == 1,
            "entries_read_total": b.entries_read.load(Relaxed),
            "reader_disconnects_total": b.reader_disconnects.load(Relaxed),
            "gaps_total": b.gaps.load(Relaxed),
        },
        "shards": shards,
    })
}
