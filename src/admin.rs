//! The admin HTTP endpoint, on its own port, apart from client traffic:
//! `GET /metrics` (Prometheus text) and `GET /healthz`. It runs on one
//! plain thread with blocking sockets: scrapes are rare and small, and
//! nothing here may touch a shard's thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::{render, BrokerMetrics, ShardMetrics};

/// Largest admin request head read.
const MAX_REQUEST: usize = 8192;

/// Binds `addr` and serves on a background thread; returns the bound address.
pub fn spawn(
    addr: SocketAddr,
    shards: Vec<Arc<ShardMetrics>>,
    broker: Arc<BrokerMetrics>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &shards, &broker);
            }
        })?;
    Ok(local)
}

fn serve(
    mut stream: TcpStream,
    shards: &[Arc<ShardMetrics>],
    broker: &BrokerMetrics,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let line = buf[..len].split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, ctype, body) = match (method, path) {
        (b"GET", b"/metrics") => {
            let refs: Vec<&ShardMetrics> = shards.iter().map(|m| &**m).collect();
            let mut text = render(&refs);
            broker.render_into(&mut text);
            ("200 OK", "text/plain; version=0.0.4", text)
        }
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        (b"GET", _) => (
            "404 Not Found",
            "text/plain",
            "unknown path: try /metrics or /healthz\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n".into(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}
