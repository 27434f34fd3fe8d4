//! `POST /publish` to a node's admin endpoint, for producers that speak
//! HTTP (`ringcast publish --http`). Plain HTTP/1.1 over a std
//! `TcpStream`, one request per connection: the admin address is on a
//! private network, without TLS.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use super::{ClientError, Result};

/// How long the whole request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes `data` to `topic` through the admin endpoint at `base`
/// (`http://HOST:PORT`) with the node's API key; returns the message id.
/// A refusal is [`ClientError::Server`] with the HTTP status as its code
/// and the endpoint's reason.
pub fn http_publish(
    base: &str,
    key: &str,
    topic: &str,
    event: Option<&str>,
    data: &Value,
    idempotency_key: Option<&str>,
) -> Result<String> {
    let addr = base
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| {
            ClientError::Protocol(format!("bad admin URL {base:?}: expected http://HOST:PORT"))
        })?;
    let mut item = serde_json::json!({ "topic": topic, "data": data });
    if let Some(e) = event {
        item["event"] = Value::from(e);
    }
    if let Some(k) = idempotency_key {
        item["key"] = Value::from(k);
    }
    let body = item.to_string();
    let request = format!(
        "POST /publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("not an HTTP response: {head:.80}")))?;
    if status != 200 {
        return Err(ClientError::Server {
            code: status,
            reason: body.trim().to_string(),
        });
    }
    let answer: Value = serde_json::from_str(body)
        .map_err(|e| ClientError::Protocol(format!("unreadable answer {body:.80}: {e}")))?;
    answer["mid"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| ClientError::Protocol(format!("no mid in {body:.80}")))
}
