//! Many subscribers through a proxy, one thread each (a blocking
//! `ringcast::client::Client`, small stacks), each recording what it saw:
//! which node took each of its connections, every message, every `drain`
//! and close, and its reconnects. A subscriber follows docs/PROTOCOL.md
//! by hand, not through `Reconnecting`, so that the test sees the `drain`
//! and the close code: after `drain` it waits `reconnect_in_ms`, after a
//! close without one it backs off, then reconnects through the proxy and
//! resubscribes with `since` and `epoch`.
#![allow(unreachable_pub)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringcast::client::{Client, ClientError, Event};

/// Stack of a subscriber thread: the client needs little, and a few
/// thousand threads of the default 2 MiB would reserve gigabytes.
const STACK: usize = 256 << 10;

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// The `node` of each connection's `welcome`, in order.
    pub nodes: Vec<String>,
    /// `seq` of every message, in the order received.
    pub seqs: Vec<u64>,
    /// Ids of every message, in the order received.
    pub ids: Vec<String>,
    /// `drain` (with its `reconnect_in_ms`) and `close CODE`, in order.
    pub events: Vec<String>,
    /// `reconnect_in_ms` of each drain.
    pub drain_ms: Vec<u64>,
    /// Time from each `drain` to its reconnect's start.
    pub waited: Vec<Duration>,
    /// The `recovered` of each resubscription.
    pub recovered: Vec<Option<bool>>,
    /// Connection attempts that failed (through the proxy).
    pub failed_connects: Vec<String>,
    /// Why the subscriber gave up, if it did.
    pub error: Option<String>,
}

/// A running crowd.
pub struct Crowd {
    handles: Vec<JoinHandle<Seen>>,
    /// How many messages each subscriber waits for; `u64::MAX` until the
    /// publisher is done.
    pub want: Arc<AtomicU64>,
}

/// Starts `n` subscribers of `topic` on `url`, `batch` at a time (each
/// batch connected and subscribed before the next starts), and returns once
/// all are subscribed. Panics naming the first that could not.
pub fn start(n: usize, batch: usize, url: &str, topic: &str, deadline: Instant) -> Crowd {
    let want = Arc::new(AtomicU64::new(u64::MAX));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (url, topic, want, ready) = (
            url.to_string(),
            topic.to_string(),
            want.clone(),
            ready_tx.clone(),
        );
        let h = std::thread::Builder::new()
            .name(format!("sub-{i}"))
            .stack_size(STACK)
            .spawn(move || subscriber(&url, &topic, &ready, &want, deadline))
            .unwrap();
        handles.push(h);
        if (i + 1) % batch == 0 || i + 1 == n {
            for _ in 0..(i % batch) + 1 {
                let left = deadline.saturating_duration_since(Instant::now());
                match ready_rx.recv_timeout(left) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("subscriber could not subscribe: {e}"),
                    Err(_) => panic!("subscribers not ready in time ({} started)", i + 1),
                }
            }
        }
    }
    Crowd { handles, want }
}

impl Crowd {
    /// Tells every subscriber how many messages there are and waits for
    /// them to have them all (or give up at their deadline).
    pub fn finish(self, messages: u64) -> Vec<Seen> {
        self.want.store(messages, Ordering::Release);
        self.handles
            .into_iter()
            .map(|h| h.join().expect("subscriber thread panicked"))
            .collect()
    }
}

/// Connects through the proxy and subscribes, retrying a failed attempt
/// (recorded) with a short backoff until `deadline`.
fn connect(
    url: &str,
    topic: &str,
    since: Option<(&str, &str)>,
    seen: &mut Seen,
    deadline: Instant,
) -> Result<(Client, ringcast::client::Subscribed), String> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        let attempt = Client::connect(url)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut c| {
                let node = c.welcome["node"].as_str().unwrap_or_default().to_string();
                let sub = c
                    .subscribe(topic, since)
                    .map_err(|e| format!("subscribe on {node}: {e}"))?;
                Ok((c, node, sub))
            });
        match attempt {
            Ok((c, node, sub)) => {
                seen.nodes.push(node);
                return Ok((c, sub));
            }
            Err(e) => {
                let phase = if since.is_some() {
                    "reconnect"
                } else {
                    "first"
                };
                let elapsed = started.elapsed();
                seen.failed_connects
                    .push(format!("{phase}: {e} (after {elapsed:.1?})"));
                if Instant::now() + backoff > deadline {
                    return Err(format!("cannot connect through the proxy: {e}"));
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Records a `msg`: its `seq` and id.
fn record(seen: &mut Seen, topic: &str, event: Event) {
    if let Event::Msg { topic: t, id, data } = event {
        assert_eq!(t, topic);
        seen.seqs.push(data["seq"].as_u64().expect("seq"));
        seen.ids.push(id);
    }
}

fn subscriber(
    url: &str,
    topic: &str,
    ready: &mpsc::Sender<Result<(), String>>,
    want: &AtomicU64,
    deadline: Instant,
) -> Seen {
    let mut seen = Seen::default();
    let (mut client, sub) = match connect(url, topic, None, &mut seen, deadline) {
        Ok(ok) => ok,
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            seen.error = Some(e);
            return seen;
        }
    };
    let _ = ready.send(Ok(()));
    // Where a resubscription starts: the last id received, or the `ok`'s `last`.
    let (mut last, mut epoch) = (sub.last, sub.epoch);
    let mut drained: Option<(Instant, u64)> = None;
    while (seen.seqs.len() as u64) < want.load(Ordering::Acquire) {
        if Instant::now() > deadline {
            seen.error = Some(format!("gave up with {} messages", seen.seqs.len()));
            break;
        }
        let code = match client.recv(Duration::from_millis(100)) {
            Ok(Event::Msg { topic: t, id, data }) => {
                last = id.clone();
                record(&mut seen, topic, Event::Msg { topic: t, id, data });
                continue;
            }
            Ok(Event::Frame(v)) if v["op"] == "drain" => {
                let ms = v["reconnect_in_ms"].as_u64().expect("reconnect_in_ms");
                seen.events.push("drain".into());
                seen.drain_ms.push(ms);
                drained = Some((Instant::now(), ms));
                continue;
            }
            Ok(Event::Frame(_)) | Err(ClientError::Timeout) => continue,
            Ok(Event::Close(code, _)) | Err(ClientError::Closed(code, _)) => code,
            Err(_) => 1006,
        };
        seen.events.push(format!("close {code}"));
        // After a drain, when the server said; otherwise a short backoff.
        match drained.take() {
            Some((at, ms)) => {
                let until = at + Duration::from_millis(ms);
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                seen.waited.push(at.elapsed());
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
        match connect(url, topic, Some((&last, &epoch)), &mut seen, deadline) {
            Ok((c, sub)) => {
                client = c;
                seen.recovered.push(sub.recovered);
                for e in sub.replayed {
                    if let Event::Msg { id, .. } = &e {
                        last = id.clone();
                    }
                    record(&mut seen, topic, e);
                }
                if !sub.last.is_empty() {
                    last = sub.last;
                }
                epoch = sub.epoch;
            }
            Err(e) => {
                seen.error = Some(e);
                break;
            }
        }
    }
    client.close();
    seen
}
