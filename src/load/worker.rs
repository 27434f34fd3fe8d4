//! One load worker process: its share of the client connections, driven by
//! one epoll loop on one thread with one read buffer, the way the server
//! drives its own (a task and a buffer per connection would make the tool,
//! not the server, the bottleneck on a machine whose cores it shares).
//!
//! The parent talks to a worker over its stdin and stdout, one line each way:
//! the worker prints `ready {json}` once its connections are up (and
//! subscribed), then answers `count` with `count {json}` (messages received
//! so far) and `report` with `report {json}` (everything since the last
//! report, latency histogram included, then resets). `quit` or end of stdin
//! closes every connection and exits; so does the parent dying. In the
//! `connect` scenario the worker instead prints one `round {json}` per round
//! of connect-then-close and exits.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::frames::{error_code, has_op, seq, server_frame, stamp};
use super::tally::Tally;
use super::LoadArgs;
use crate::client::{check_accept, new_key};
use crate::sys;
use crate::ws::frame::{encode_masked, OpCode};

/// Connections a worker has between `connect` and `welcome` at once: the
/// server's accept backlog (and the kernel's SYN backlog) must not overflow,
/// or the kernel drops SYNs and the client retries a second later.
const MAX_IN_FLIGHT: usize = 512;
/// Bytes read per `recv`.
const SCRATCH: usize = 256 << 10;
/// The epoll token of the worker's stdin.
const STDIN_TOKEN: u64 = u64::MAX;
/// A connection that makes no progress for this long fails the run.
const STALL: Duration = Duration::from_secs(30);

/// Where one client connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `connect` issued, waiting for writability.
    Connecting,
    /// Upgrade request sent, waiting for the 101 response.
    Upgrading,
    /// Upgraded, waiting for `welcome`.
    Welcome,
    /// `sub` sent, waiting for its `ok`.
    Subscribing,
    /// Ready; counting messages.
    Open,
    /// Finished (closed by either side).
    Closed,
}

/// One client connection of the worker.
struct Client {
    fd: OwnedFd,
    state: State,
    /// Bytes of an incomplete frame (or response head) carried to the next read.
    pending: Vec<u8>,
    /// This connection's `Sec-WebSocket-Key` (RFC 6455 §4.1: a fresh
    /// nonce per connection), kept to check the server's accept.
    key: [u8; 24],
    /// The topic this client subscribes to, if any.
    topic: Option<usize>,
    /// The sequence number (`"q"`) the next message of its topic should
    /// carry: one publisher per topic numbers them from 0.
    next_seq: u64,
}

/// The worker: every connection, its epoll instance and its tallies.
struct Worker<'a> {
    args: &'a LoadArgs,
    epoll: sys::Epoll,
    clients: Vec<Option<Client>>,
    scratch: Vec<u8>,
    topics: Vec<String>,
    tally: Tally,
    received_total: u64,
    /// Connections in `Open` state.
    open: usize,
    /// Connections being set up (between `connect` and `Open`).
    in_flight: usize,
    /// Next connection (local index) to start.
    next: usize,
    /// `connect` rounds done: each round connects from its own source
    /// addresses, so no round reuses a 4-tuple the server may still hold.
    round: usize,
    /// Whether new clients subscribe after `welcome`.
    subscribe: bool,
    stdin_line: String,
    stdin_eof: bool,
    last_progress: Instant,
    /// The upgrade request, built once; each connection writes its own key
    /// at `key_at` before sending it.
    request: Vec<u8>,
    key_at: usize,
}

/// Runs a worker process (`ringcast load worker ...`, started by the parent).
pub(crate) fn run(args: &LoadArgs) -> anyhow::Result<()> {
    sys::raise_nofile_limit().context("raising the open-file limit")?;
    let stdin_fd = io::stdin().as_raw_fd();
    sys::set_nonblocking(stdin_fd).context("making stdin non-blocking")?;
    let mut w = Worker::new(args)?;
    w.epoll
        .add(stdin_fd, sys::EPOLLIN, STDIN_TOKEN)
        .context("watching stdin")?;
    let out = &mut io::stdout().lock();
    if args.rounds_mode {
        for round in 0..args.rounds {
            w.wait_for("next")?;
            let start = sys::monotonic_us();
            w.connect_all()?;
            let end = sys::monotonic_us();
            let line = serde_json::json!({"round": round, "start_us": start, "end_us": end, "connections": w.open});
            writeln!(out, "round {line}")?;
            out.flush()?;
            w.close_all(round % 2 == 0);
            w.round += 1;
        }
        return Ok(());
    }
    w.connect_all()?;
    writeln!(
        out,
        "ready {}",
        serde_json::json!({"connections": w.open, "at_us": sys::monotonic_us()})
    )?;
    out.flush()?;
    while !w.stdin_eof {
        w.poll(100)?;
        while let Some(cmd) = w.take_command() {
            match cmd.as_str() {
                "count" => writeln!(
                    out,
                    "count {}",
                    serde_json::json!({"received_total": w.received_total, "open": w.open})
                )?,
                "report" => {
                    writeln!(out, "report {}", w.tally.to_json(w.received_total))?;
                    w.tally = Tally::new()?;
                }
                "quit" => w.stdin_eof = true,
                other => bail!("unknown worker command {other:?}"),
            }
            out.flush()?;
        }
    }
    w.close_all(true);
    Ok(())
}

impl<'a> Worker<'a> {
    fn new(args: &'a LoadArgs) -> anyhow::Result<Worker<'a>> {
        let (request, key_at) = upgrade_request(args.target, args.token.as_deref());
        Ok(Worker {
            args,
            epoll: sys::Epoll::new().context("creating the epoll instance")?,
            clients: Vec::with_capacity(args.connections),
            scratch: vec![0; SCRATCH],
            topics: super::topic_names(args),
            tally: Tally::new()?,
            received_total: 0,
            open: 0,
            in_flight: 0,
            next: 0,
            round: 0,
            subscribe: args.worker_subscribe,
            stdin_line: String::new(),
            stdin_eof: false,
            last_progress: Instant::now(),
            request,
            key_at,
        })
    }

    /// Opens (and subscribes) every connection of this worker.
    fn connect_all(&mut self) -> anyhow::Result<()> {
        self.clients.clear();
        self.next = 0;
        self.open = 0;
        self.last_progress = Instant::now();
        while self.open < self.args.connections {
            while self.in_flight < MAX_IN_FLIGHT && self.next < self.args.connections {
                self.start_one()?;
            }
            self.poll(10)?;
            if self.stdin_eof {
                bail!("the parent went away while connecting");
            }
            if self.last_progress.elapsed() > STALL {
                bail!(
                    "no connection progressed for {STALL:?} ({} of {} open)",
                    self.open,
                    self.args.connections
                );
            }
        }
        Ok(())
    }

    /// Starts one non-blocking connect.
    fn start_one(&mut self) -> anyhow::Result<()> {
        let global = self.args.worker_first + self.next;
        let source = super::round_source(self.round, global, self.args.source_ips);
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .context("creating a socket (is the open-file limit too low?)")?;
        sys::bind_address_no_port(sock.as_raw_fd())?;
        sock.bind(&source.into())
            .with_context(|| format!("binding {source}"))?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        match sock.connect(&self.args.target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("connecting to {} from {source}", self.args.target))
            }
        }
        let fd = OwnedFd::from(sock);
        let token = self.clients.len() as u64;
        self.epoll
            .add(fd.as_raw_fd(), sys::EPOLLOUT, token)
            .context("watching a connection")?;
        let topic = (self.subscribe && !self.topics.is_empty()).then(|| global % self.topics.len());
        self.clients.push(Some(Client {
            fd,
            state: State::Connecting,
            pending: Vec::new(),
            key: new_key(),
            topic,
            next_seq: 0,
        }));
        self.next += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// Waits up to `timeout_ms` for readiness and handles what is ready.
    fn poll(&mut self, timeout_ms: i32) -> anyhow::Result<()> {
        let mut events = [sys::empty_event(); 1024];
        let n = self.epoll.wait_timeout(&mut events, timeout_ms)?;
        for ev in &events[..n] {
            let (token, bits) = (ev.u64, ev.events);
            if token == STDIN_TOKEN {
                self.read_stdin();
                continue;
            }
            self.on_event(token as usize, bits)?;
        }
        Ok(())
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match sys::read(io::stdin().as_raw_fd(), &mut buf) {
                Ok(0) => {
                    self.stdin_eof = true;
                    let _ = self.epoll.delete(io::stdin().as_raw_fd());
                    return;
                }
                Ok(n) => self
                    .stdin_line
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => return,
            }
        }
    }

    /// Waits for the parent's `word` (any other command is an error).
    fn wait_for(&mut self, word: &str) -> anyhow::Result<()> {
        loop {
            if let Some(cmd) = self.take_command() {
                if cmd == word {
                    return Ok(());
                }
                bail!("expected {word:?} from the parent, got {cmd:?}");
            }
            if self.stdin_eof {
                bail!("the parent went away");
            }
            self.poll(100)?;
        }
    }

    fn take_command(&mut self) -> Option<String> {
        let at = self.stdin_line.find('\n')?;
        let line: String = self.stdin_line.drain(..=at).collect();
        Some(line.trim().to_string())
    }

    fn on_event(&mut self, i: usize, bits: u32) -> anyhow::Result<()> {
        let Some(Some(c)) = self.clients.get(i) else {
            return Ok(());
        };
        match c.state {
            State::Connecting => self.on_connected(i),
            State::Closed => Ok(()),
            _ if bits & sys::EPOLLIN != 0 || bits & !sys::EPOLLOUT != 0 => self.on_readable(i),
            _ => Ok(()),
        }
    }

    fn on_connected(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(Some(c)) = self.clients.get_mut(i) else {
            return Ok(());
        };
        let fd = c.fd.as_raw_fd();
        let sock = socket2::SockRef::from(&c.fd);
        if let Some(e) = sock.take_error()? {
            bail!("connecting to {}: {e}", self.args.target);
        }
        self.request[self.key_at..self.key_at + c.key.len()].copy_from_slice(&c.key);
        match sys::send(fd, &self.request) {
            Ok(n) if n == self.request.len() => {}
            Ok(_) => bail!("the upgrade request did not fit an empty socket"),
            Err(e) => bail!("sending the upgrade request: {e}"),
        }
        c.state = State::Upgrading;
        self.epoll.modify(fd, sys::EPOLLIN, i as u64)?;
        Ok(())
    }

    fn on_readable(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(Some(c)) = self.clients.get_mut(i) else {
            return Ok(());
        };
        let fd = c.fd.as_raw_fd();
        let n = match sys::recv(fd, &mut self.scratch) {
            Ok(0) => return self.on_eof(i),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(_) => return self.on_eof(i),
        };
        let now = sys::monotonic_us();
        // Parse from the scratch buffer directly unless a partial frame waits.
        let mut buf = std::mem::take(&mut c.pending);
        let data: &[u8] = if buf.is_empty() {
            &self.scratch[..n]
        } else {
            buf.extend_from_slice(&self.scratch[..n]);
            &buf
        };
        let (used, outcome) = process(
            c,
            data,
            now,
            &mut self.tally,
            &mut self.received_total,
            &self.topics,
        );
        let rest = data.get(used..).unwrap_or_default();
        if !rest.is_empty() {
            let mut keep = Vec::with_capacity(rest.len().max(256));
            keep.extend_from_slice(rest);
            c.pending = keep;
        } else if buf.capacity() > 0 && buf.capacity() <= 4096 {
            buf.clear();
            c.pending = buf;
        }
        match outcome {
            Outcome::Nothing => Ok(()),
            Outcome::Progress(from, to) => {
                self.last_progress = Instant::now();
                if from != State::Open && to == State::Open {
                    self.in_flight -= 1;
                    self.open += 1;
                }
                Ok(())
            }
            Outcome::Closed(code) => {
                *self.tally.closes.entry(code.to_string()).or_default() += 1;
                self.on_eof(i)
            }
            Outcome::Fatal(why) => bail!("{why}"),
        }
    }

    /// The server closed a connection (or it failed).
    fn on_eof(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(slot) = self.clients.get_mut(i) else {
            return Ok(());
        };
        let Some(c) = slot.take() else {
            return Ok(());
        };
        let _ = self.epoll.delete(c.fd.as_raw_fd());
        match c.state {
            State::Open => {
                self.open -= 1;
                Ok(())
            }
            State::Closed => Ok(()),
            other => bail!(
                "the server closed a connection while it was {other:?} (see its log; \
                 raise --max-handshakes-per-ip / --max-connections-per-ip for load runs)"
            ),
        }
    }

    /// Closes every connection: with a close frame, or by dropping the socket.
    fn close_all(&mut self, polite: bool) {
        let close = encode_masked(OpCode::Close, true, &1000u16.to_be_bytes(), [1, 2, 3, 4]);
        for c in self.clients.drain(..).flatten() {
            if polite {
                let _ = sys::send(c.fd.as_raw_fd(), &close);
            }
            let _ = self.epoll.delete(c.fd.as_raw_fd());
        }
        self.open = 0;
        self.in_flight = 0;
    }
}

/// The upgrade request every connection sends, and the offset of its
/// `Sec-WebSocket-Key` value: built once, each connection writes its own
/// key there before sending (no allocation per connection).
fn upgrade_request(target: SocketAddr, token: Option<&str>) -> (Vec<u8>, usize) {
    let path = match token {
        Some(t) => format!("/ws?token={t}"),
        None => "/ws".to_string(),
    };
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ringcast.v1\r\n\
         Sec-WebSocket-Key: "
    );
    let key_at = head.len();
    let mut request = head.into_bytes();
    request.extend_from_slice(&[b'='; 24]);
    request.extend_from_slice(b"\r\n\r\n");
    (request, key_at)
}

/// What processing a read led to.
enum Outcome {
    Nothing,
    /// The connection moved from one state to another.
    Progress(State, State),
    /// The server sent a close frame with this code.
    Closed(u16),
    /// The run cannot go on.
    Fatal(String),
}

/// Handles every complete frame (or the response head) in `data`; returns
/// the bytes used and what happened.
fn process(
    c: &mut Client,
    data: &[u8],
    now: u64,
    tally: &mut Tally,
    total: &mut u64,
    topics: &[String],
) -> (usize, Outcome) {
    let before = c.state;
    let mut at = 0;
    if c.state == State::Upgrading {
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (0, Outcome::Nothing);
        };
        if !data.starts_with(b"HTTP/1.1 101") {
            let head = String::from_utf8_lossy(&data[..end]);
            let first = head.lines().next().unwrap_or_default().to_string();
            let body = String::from_utf8_lossy(data.get(end + 4..).unwrap_or_default());
            return (
                data.len(),
                Outcome::Fatal(format!("upgrade refused: {first}: {}", body.trim())),
            );
        }
        at = end + 4;
        if let Err(e) = check_accept(&data[..at], &c.key) {
            return (data.len(), Outcome::Fatal(e.to_string()));
        }
        c.state = State::Welcome;
    }
    loop {
        let frame = match server_frame(&data[at..]) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(why) => return (data.len(), Outcome::Fatal(why.to_string())),
        };
        let payload = &data[at + frame.start..at + frame.end];
        at += frame.end;
        match frame.opcode {
            0x1 => {
                if let Some(outcome) = on_text(c, payload, now, tally, total, topics) {
                    return (at, outcome);
                }
            }
            0x8 => {
                let code = payload
                    .get(..2)
                    .map_or(1005, |b| u16::from_be_bytes([b[0], b[1]]));
                c.state = State::Closed;
                return (at, Outcome::Closed(code));
            }
            0x9 => {
                let pong = encode_masked(OpCode::Pong, true, payload, [1, 2, 3, 4]);
                let _ = sys::send(c.fd.as_raw_fd(), &pong);
            }
            _ => {}
        }
    }
    let outcome = if c.state != before {
        Outcome::Progress(before, c.state)
    } else {
        Outcome::Nothing
    };
    (at, outcome)
}

/// Checks a message's sequence number against the one its subscriber
/// expects: the next one, or a later one (the gap counted missing), is
/// taken; an earlier one is a duplicate or reordered (counted, not taken).
/// A message without a number (another publisher) is taken as it is.
fn in_order(next: &mut u64, q: Option<u64>, tally: &mut Tally) -> bool {
    let Some(q) = q else { return true };
    if q < *next {
        tally.out_of_order += 1;
        return false;
    }
    tally.missing += q - *next;
    *next = q + 1;
    true
}

/// Handles one text frame; `Some` when it ends processing.
fn on_text(
    c: &mut Client,
    payload: &[u8],
    now: u64,
    tally: &mut Tally,
    total: &mut u64,
    topics: &[String],
) -> Option<Outcome> {
    match c.state {
        State::Open => {
            if let Some(sent) = stamp(payload) {
                if in_order(&mut c.next_seq, seq(payload), tally) {
                    let _ = tally.latency_us.record(now.saturating_sub(sent).max(1));
                    tally.received += 1;
                    *total += 1;
                }
            } else if has_op(payload, "error") {
                *tally
                    .errors
                    .entry(error_code(payload).to_string())
                    .or_default() += 1;
            } else if !has_op(payload, "ok") && !has_op(payload, "pong") {
                tally.unstamped += 1;
            }
            None
        }
        State::Welcome if has_op(payload, "welcome") => {
            match c.topic.and_then(|t| topics.get(t)) {
                Some(topic) => {
                    let sub = format!("{{\"op\":\"sub\",\"id\":1,\"topic\":\"{topic}\"}}");
                    let frame = encode_masked(OpCode::Text, true, sub.as_bytes(), [7, 7, 7, 7]);
                    if sys::send(c.fd.as_raw_fd(), &frame).is_err() {
                        return Some(Outcome::Fatal("sending sub failed".into()));
                    }
                    c.state = State::Subscribing;
                }
                None => c.state = State::Open,
            }
            None
        }
        State::Subscribing if has_op(payload, "ok") => {
            c.state = State::Open;
            None
        }
        _ => Some(Outcome::Fatal(format!(
            "unexpected frame while {:?}: {}",
            c.state,
            String::from_utf8_lossy(&payload[..payload.len().min(200)])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_of_every_length_form_parse() {
        assert!(server_frame(&[0x81]).unwrap().is_none());
        let f = server_frame(&[0x81, 2, b'h', b'i']).unwrap().unwrap();
        assert_eq!((f.opcode, f.start, f.end), (1, 2, 4));
        let mut long = vec![0x81, 126, 1, 0];
        long.resize(4 + 256, b'x');
        let f = server_frame(&long).unwrap().unwrap();
        assert_eq!((f.start, f.end), (4, 260));
        assert!(server_frame(&long[..100]).unwrap().is_none());
        let huge = [0x81, 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert!(server_frame(&huge).is_err());
        assert!(server_frame(&[0x81, 0x82, 0, 0, 0, 0]).is_err());
        assert!(server_frame(&[0x01, 1, b'x']).is_err());
    }

    #[test]
    fn stamps_ops_and_codes_are_read_from_payloads() {
        assert_eq!(
            stamp(br#"{"op":"msg","data":{"t":12345,"p":"x"}}"#),
            Some(12345)
        );
        assert_eq!(stamp(b"{}"), None);
        assert_eq!(
            seq(br#"{"op":"msg","data":{"t":1,"q":77,"p":"x"}}"#),
            Some(77)
        );
        assert_eq!(seq(br#"{"t":1}"#), None);
        assert!(has_op(br#"{"code":4008,"op":"error"}"#, "error"));
        assert!(!has_op(br#"{"op":"ok"}"#, "error"));
        assert_eq!(error_code(br#"{"op":"error","code":4008}"#), 4008);
        assert_eq!(error_code(br#"{"op":"error"}"#), 0);
    }

    #[test]
    fn a_loss_and_a_duplicate_no_longer_cancel_out() {
        let mut tally = Tally::new().unwrap();
        let mut next = 0;
        // 0, 1, then 1 again (duplicate), 3 (2 lost), 2 (late), 4.
        let taken: Vec<bool> = [0, 1, 1, 3, 2, 4]
            .into_iter()
            .map(|q| in_order(&mut next, Some(q), &mut tally))
            .collect();
        assert_eq!(taken, [true, true, false, true, false, true]);
        assert_eq!((tally.out_of_order, tally.missing), (2, 1));
        assert_eq!(next, 5);
        // Unnumbered messages are taken and change nothing.
        assert!(in_order(&mut next, None, &mut tally));
        assert_eq!((tally.out_of_order, tally.missing, next), (2, 1, 5));
    }

    /// A connection in `Upgrading` with a fresh key; its fd is never
    /// written while the response head is read.
    fn upgrading() -> Client {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        Client {
            fd,
            state: State::Upgrading,
            pending: Vec::new(),
            key: new_key(),
            topic: None,
            next_seq: 0,
        }
    }

    fn answer(accept: &str) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        head.extend_from_slice(b"\x81\x10{\"op\":\"welcome\"}");
        head
    }

    #[test]
    fn the_upgrade_answer_must_carry_the_accept_of_this_connections_key() {
        let (mut tally, mut total) = (Tally::new().unwrap(), 0);
        let mut c = upgrading();
        let good = tungstenite::handshake::derive_accept_key(&c.key);
        let data = answer(&good);
        let (used, outcome) = process(&mut c, &data, 0, &mut tally, &mut total, &[]);
        assert_eq!(used, data.len());
        assert!(
            matches!(outcome, Outcome::Progress(State::Upgrading, State::Open)),
            "{:?}",
            c.state
        );
        // Another connection's accept (here: the RFC sample key's) is refused.
        let mut c = upgrading();
        let (_, outcome) = process(
            &mut c,
            &answer("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            0,
            &mut tally,
            &mut total,
            &[],
        );
        let Outcome::Fatal(why) = outcome else {
            panic!("a wrong accept was taken")
        };
        let expected = tungstenite::handshake::derive_accept_key(&c.key);
        assert!(
            why.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") && why.contains(&expected),
            "{why}"
        );
    }

    #[test]
    fn each_connection_sends_its_own_key_in_the_shared_request() {
        let target = "127.0.0.1:8080".parse().unwrap();
        let (mut request, key_at) = upgrade_request(target, Some("tok"));
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        for key in [a, b] {
            request[key_at..key_at + key.len()].copy_from_slice(&key);
            // The server's own parser reads it as this key, 16 bytes in base64.
            let (req, used) = crate::ws::handshake::parse_request(&request, 8192)
                .unwrap()
                .unwrap();
            assert_eq!(req.key.as_bytes(), key);
            assert_eq!(
                (used, req.query.as_deref()),
                (request.len(), Some("token=tok"))
            );
        }
    }
}
