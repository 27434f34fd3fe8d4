//! The load tool's publishers: WebSocket `pub` frames over plain blocking
//! sockets, or pipelined `XADD`s straight to Redis as a producer does. Each
//! publisher runs on a thread of its own in the parent process and paces
//! itself in 1 ms ticks; every payload carries its send time (`"t":`,
//! monotonic µs) for the workers to measure latency against.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::client::{check_accept, new_key};
use crate::sys::monotonic_us;
use crate::ws::frame::{encode_masked, OpCode};

/// Where publishes go.
#[derive(Debug, Clone)]
pub(super) enum Via {
    /// The server's WebSocket `pub` op.
    WebSocket {
        target: SocketAddr,
        token: Option<String>,
    },
    /// `XADD` to this Redis URL (default partitions and key prefix, this
    /// key layout).
    Redis(String, crate::broker::redis::KeyLayout),
}

/// One publishing connection, held open across the steps of a run.
pub(super) struct Publisher {
    socket: Option<TcpStream>,
    /// The Redis connection and the settings its `XADD`s are built from.
    redis: Option<(crate::broker::redis::Conn, crate::broker::redis::Settings)>,
    /// Error replies the server sent to this publisher (a reader thread counts).
    pub(super) errors: Arc<AtomicU64>,
    /// The next sequence number (`"q"`) of each topic of its share, by
    /// position: one publisher per topic, numbered from 0 across the steps
    /// of a run, so a subscriber can tell a gap, a duplicate or a reorder.
    next_seq: Vec<u64>,
}

/// What one publishing step sent, per topic.
#[derive(Debug, Clone, Default)]
pub(super) struct Sent {
    pub(super) per_topic: Vec<u64>,
}

impl Sent {
    pub(super) fn total(&self) -> u64 {
        self.per_topic.iter().sum()
    }
}

impl Publisher {
    /// Connects (and upgrades, for WebSocket).
    pub(super) fn connect(via: &Via) -> anyhow::Result<Publisher> {
        let errors = Arc::new(AtomicU64::new(0));
        match via {
            Via::WebSocket { target, token } => {
                let socket = ws_connect(*target, token.as_deref())?;
                let reader = socket.try_clone()?;
                let counter = errors.clone();
                std::thread::Builder::new()
                    .name("load-pub-reader".into())
                    .spawn(move || drain_replies(reader, &counter))?;
                Ok(Publisher {
                    socket: Some(socket),
                    redis: None,
                    errors,
                    next_seq: Vec::new(),
                })
            }
            Via::Redis(url, layout) => {
                let conn = crate::broker::redis::connect(url, Some(Duration::from_secs(5)))
                    .with_context(|| format!("connecting to {url}"))?;
                let d = crate::config::Config::default();
                let settings = crate::broker::redis::Settings {
                    url: url.clone(),
                    keys: crate::broker::redis::Keys::new(
                        &d.redis_key_prefix,
                        d.redis_partitions,
                        *layout,
                    ),
                    maxlen: d.redis_maxlen,
                    cache_size: 0,
                    idempotency_window: d.idempotency_window,
                };
                Ok(Publisher {
                    socket: None,
                    redis: Some((conn, settings)),
                    errors,
                    next_seq: Vec::new(),
                })
            }
        }
    }

    /// Publishes to `topics` round-robin at `rate` msg/s in all for
    /// `duration`, `size`-byte payloads; returns what went to each topic.
    pub(super) fn run(
        &mut self,
        topics: &[String],
        rate: f64,
        size: usize,
        json: bool,
        duration: Duration,
    ) -> anyhow::Result<Sent> {
        let pad = "x".repeat(size);
        let mut sent = Sent {
            per_topic: vec![0; topics.len()],
        };
        self.next_seq.resize(topics.len(), 0);
        if topics.is_empty() || rate <= 0.0 {
            return Ok(sent);
        }
        let start = Instant::now();
        let mut n = 0u64;
        let mut batch = Vec::new();
        let mut cmds = Vec::new();
        while start.elapsed() < duration {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            while n < due {
                let t = n as usize % topics.len();
                let q = self.next_seq[t];
                self.next_seq[t] += 1;
                let data = if json {
                    notification(monotonic_us(), q, size)
                } else {
                    let mut data = format!("{{\"t\":{},\"q\":{q},\"p\":\"", monotonic_us());
                    // `size` bytes in all (at least the stamp and number).
                    data.push_str(&pad[..size.saturating_sub(data.len() + 2)]);
                    data.push_str("\"}");
                    data
                };
                match &self.redis {
                    None => {
                        let body = format!(
                            "{{\"op\":\"pub\",\"topic\":\"{}\",\"data\":{data}}}",
                            topics[t]
                        );
                        let mask = (n as u32).to_be_bytes();
                        batch.extend_from_slice(&encode_masked(
                            OpCode::Text,
                            true,
                            body.as_bytes(),
                            mask,
                        ));
                    }
                    Some((_, settings)) => cmds.push(crate::broker::redis::xadd_cmd(
                        settings, &topics[t], None, &data,
                    )),
                }
                sent.per_topic[t] += 1;
                n += 1;
            }
            self.flush(&mut batch, &mut cmds)?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(sent)
    }

    fn flush(&mut self, batch: &mut Vec<u8>, cmds: &mut Vec<::redis::Cmd>) -> anyhow::Result<()> {
        if let Some(s) = &mut self.socket {
            if !batch.is_empty() {
                s.write_all(batch).context("publishing")?;
                batch.clear();
            }
        }
        if let Some((conn, _)) = &mut self.redis {
            if !cmds.is_empty() {
                for v in conn
                    .pipeline_each(std::mem::take(cmds))
                    .context("XADD pipeline")?
                {
                    if let ::redis::Value::ServerError(e) = v {
                        bail!("XADD refused: {e:?}");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Opens a blocking WebSocket connection and reads through `welcome`.
fn ws_connect(target: SocketAddr, token: Option<&str>) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("connecting the publisher to {target}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let path = token.map_or_else(|| "/ws".to_string(), |t| format!("/ws?token={t}"));
    let key = new_key();
    let key = std::str::from_utf8(&key).expect("base64 is ASCII");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: ringcast.v1\r\n\r\n"
    )?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s
            .read(&mut buf)
            .context("reading the publisher's upgrade")?;
        if n == 0 {
            bail!("the server closed the publisher's connection during the upgrade");
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if !got.starts_with(b"HTTP/1.1 101") {
                bail!(
                    "publisher upgrade refused: {}",
                    String::from_utf8_lossy(&got[..end])
                );
            }
            check_accept(&got[..end + 4], key.as_bytes()).context("publisher upgrade")?;
            if super::frames::has_op(&got[end..], "welcome") {
                break;
            }
        }
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Reads and discards the server's frames to the publisher, counting error replies.
fn drain_replies(mut s: TcpStream, errors: &AtomicU64) {
    let mut buf = vec![0u8; 64 << 10];
    let mut reported = false;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
        let chunk = &buf[..n];
        if super::frames::has_op(chunk, "error") {
            errors.fetch_add(1, Ordering::Relaxed);
            if !reported {
                reported = true;
                let text = String::from_utf8_lossy(&chunk[..chunk.len().min(300)]);
                eprintln!("load: the server refused a publish: {text}");
            }
        }
    }
}

/// Words a notification is made of.
const WORDS: [&str; 48] = [
    "order",
    "shipped",
    "delivery",
    "tomorrow",
    "between",
    "morning",
    "package",
    "tracking",
    "account",
    "payment",
    "received",
    "thanks",
    "your",
    "the",
    "and",
    "for",
    "with",
    "update",
    "price",
    "dropped",
    "item",
    "wishlist",
    "available",
    "again",
    "limited",
    "stock",
    "reply",
    "comment",
    "mentioned",
    "you",
    "in",
    "thread",
    "meeting",
    "starts",
    "minutes",
    "room",
    "invoice",
    "overdue",
    "reminder",
    "friend",
    "request",
    "accepted",
    "photo",
    "liked",
    "security",
    "login",
    "device",
    "new",
];
const NAMES: [&str; 12] = [
    "Maria Lopez",
    "Wei Chen",
    "Amara Okafor",
    "Jonas Berg",
    "Priya Nair",
    "Luca Rossi",
    "Sofia Novak",
    "Kenji Sato",
    "Fatima Zahra",
    "Liam Walsh",
    "Ana Souza",
    "Omar Haddad",
];

/// A notification as an application would send one: a JSON object of
/// about `size` bytes with a type, a user, a title, a body of words and
/// line items, its fields drawn afresh for every message (seeded by `q`),
/// and the tool's stamp (`t`) and number (`q`).
pub(super) fn notification(t: u64, q: u64, size: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(q.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ t);
    let words = |rng: &mut fastrand::Rng, n: usize| -> String {
        (0..n)
            .map(|_| WORDS[rng.usize(..WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = format!(
        "{{\"t\":{t},\"q\":{q},\"type\":\"{}.{}\",\"id\":\"n_{:016x}\",\
         \"user\":{{\"id\":{},\"name\":\"{}\",\"locale\":\"en-GB\"}},\
         \"title\":\"{}\",\"body\":\"{}\",\"ts\":{},\"items\":[",
        WORDS[rng.usize(..WORDS.len())],
        WORDS[rng.usize(..WORDS.len())],
        rng.u64(..),
        rng.u32(1..10_000_000),
        NAMES[rng.usize(..NAMES.len())],
        words(&mut rng, 5),
        words(&mut rng, 24),
        1_764_800_000 + rng.u32(..1_000_000),
    );
    let mut first = true;
    while s.len() + 120 < size {
        if !first {
            s.push(',');
        }
        first = false;
        s.push_str(&format!(
            "{{\"sku\":\"SKU-{:06}\",\"name\":\"{}\",\"qty\":{},\"price\":{}.{:02}}}",
            rng.u32(..1_000_000),
            words(&mut rng, 3),
            rng.u8(1..9),
            rng.u16(1..500),
            rng.u8(..100),
        ));
    }
    s.push_str("]}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_is_json_of_about_its_size_and_differs_each_time() {
        let a = notification(123, 0, 1500);
        let b = notification(124, 1, 1500);
        assert_ne!(a, b);
        for n in [&a, &b] {
            let v: serde_json::Value = serde_json::from_str(n).unwrap();
            assert!((1300..=1600).contains(&n.len()), "{}", n.len());
            assert!(v["items"].as_array().unwrap().len() >= 5, "{v}");
        }
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!((v["t"].as_u64(), v["q"].as_u64()), (Some(123), Some(0)));
        // The worker's readers find the stamp and number in it.
        assert_eq!(super::super::frames::stamp(a.as_bytes()), Some(123));
        assert_eq!(super::super::frames::seq(b.as_bytes()), Some(1));
        // Small sizes still give a whole object.
        serde_json::from_str::<serde_json::Value>(&notification(1, 2, 10)).unwrap();
    }
}
