//! One load worker process: its share of the client connections, driven by
//! one epoll loop on one thread with one read buffer, the way the server
//! drives its own (a task and a buffer per connection would make the tool,
//! not the server, the bottleneck on a machine whose cores it shares).
//!
//! The parent talks to a worker over its stdin and stdout, one line each way:
//! the worker prints `ready {json}` once its connections are up (and
//! subscribed), then answers `count` with `count {json}` (messages received
//! so far) and `report` with `report {json}` (everything since the last
//! report, latency histogram included, then resets), and `churn on` / `churn
//! off` with `churn {json}` (while on, every second it drops `--churn` of
//! its open subscribers and connects them again, each resubscribing from
//! its position). `quit` or end of stdin
//! closes every connection and exits; so does the parent dying. In the
//! `connect` scenario the worker instead prints one `round {json}` per round
//! of connect-then-close and exits.
//!
//! With `--worker-follow` (the `churn` scenario) its subscribers also
//! follow the server as docs/PROTOCOL.md asks of a client
//! (`worker/follow.rs`): after a `drain` they reconnect when it says, after
//! any other close or a failed attempt after a backoff, and resubscribe
//! from their position. Without it a server close ends a subscriber.

mod follow;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::client::{process, upgrade_request, Client, Outcome, State};
use super::tally::Tally;
use super::LoadArgs;
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
    /// The next connection a churn tick drops.
    churn_next: usize,
    /// The inflater for permessage-deflate messages (`--deflate`).
    codec: super::client::Codec,
    /// The upgrade request, built once; each connection writes its own key
    /// at `key_at` before sending it.
    request: Vec<u8>,
    key_at: usize,
    /// `--token-secret`: where the token is in `request`, its length, and
    /// the `exp` of every token of this run.
    token_at: Option<(usize, usize, u64)>,
    /// `--worker-follow`: subscribers follow the server's drains and
    /// closes instead of ending.
    follow: bool,
    /// When to act on a client: (µs, index, its `attempt` then). A
    /// waiting client reconnects; an attempt still under way has timed
    /// out. An entry whose attempt has moved on is stale and skipped.
    timers: BinaryHeap<Reverse<(u64, usize, u32)>>,
    /// Jitter for backoffs.
    rng: fastrand::Rng,
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
    let mut churn_at: Option<Instant> = None;
    while !w.stdin_eof {
        w.poll(if churn_at.is_some() { 10 } else { 100 })?;
        if let Some(at) = churn_at.filter(|at| at.elapsed() >= Duration::from_secs(1)) {
            churn_at = Some(at + Duration::from_secs(1));
            w.churn_tick()?;
        }
        while let Some(cmd) = w.take_command() {
            match cmd.as_str() {
                "churn on" | "churn off" => {
                    churn_at = (cmd == "churn on").then(Instant::now);
                    writeln!(out, "churn {}", serde_json::json!({"open": w.open}))?;
                }
                "count" => writeln!(
                    out,
                    "count {}",
                    serde_json::json!({"received_total": w.received_total, "open": w.open})
                )?,
                "report" => {
                    w.snapshot_nodes();
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
        // With --token-secret every connection writes its own token over
        // the first one's (all are the same length).
        let exp = crate::auth::now_secs() + 86_400;
        let first = args.token_secret.as_deref().map(|secret| {
            super::connection_token(secret, &args.topic, args.worker_first, (exp, args.wildcard))
        });
        let token = first.as_deref().or(args.token.as_deref());
        let (request, key_at) = upgrade_request(args.target, token, args.deflate);
        let token_at = first.as_ref().map(|t| {
            let at = request
                .windows(t.len())
                .position(|w| w == t.as_bytes())
                .unwrap_or(0);
            (at, t.len(), exp)
        });
        Ok(Worker {
            args,
            epoll: sys::Epoll::new().context("creating the epoll instance")?,
            clients: Vec::with_capacity(args.connections),
            scratch: vec![0; SCRATCH],
            topics: super::topic_names(args)
                .iter()
                .map(|t| super::sub_target(t, args.wildcard))
                .collect(),
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
            token_at,
            churn_next: 0,
            codec: Default::default(),
            follow: args.worker_follow,
            timers: BinaryHeap::new(),
            rng: fastrand::Rng::new(),
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
        let fd = self.connect_socket(global)?;
        let token = self.clients.len() as u64;
        self.epoll
            .add(fd.as_raw_fd(), sys::EPOLLOUT, token)
            .context("watching a connection")?;
        let topic = (self.subscribe && !self.topics.is_empty()).then(|| global % self.topics.len());
        self.clients.push(Some(Client::new(fd, topic)));
        self.next += 1;
        self.in_flight += 1;
        self.time_attempt(token as usize, sys::monotonic_us());
        Ok(())
    }

    /// A socket connecting (non-blocking) from connection `global`'s source address.
    fn connect_socket(&self, global: usize) -> anyhow::Result<OwnedFd> {
        let fd = self.new_socket(global)?;
        start_connect(&fd, self.args.target).with_context(|| {
            let source = super::round_source(self.round, global, self.args.source_ips);
            format!("connecting to {} from {source}", self.args.target)
        })?;
        Ok(fd)
    }

    /// A non-blocking socket bound to connection `global`'s source address
    /// (the port is chosen at connect), not yet connected.
    fn new_socket(&self, global: usize) -> anyhow::Result<OwnedFd> {
        let source = super::round_source(self.round, global, self.args.source_ips);
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .context("creating a socket (is the open-file limit too low?)")?;
        sys::bind_address_no_port(sock.as_raw_fd())?;
        sock.bind(&source.into())
            .with_context(|| format!("binding {source}"))?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        Ok(OwnedFd::from(sock))
    }

    /// Churn: drops the next `--churn` share of the open subscribers and
    /// connects them again; each resubscribes from its position.
    fn churn_tick(&mut self) -> anyhow::Result<()> {
        let n = (self.open as f64 * self.args.churn).ceil() as usize;
        let now = sys::monotonic_us();
        let mut done = 0;
        for _ in 0..self.clients.len() {
            if done == n {
                break;
            }
            let i = self.churn_next % self.clients.len();
            self.churn_next += 1;
            match self.clients.get_mut(i) {
                // A drained one (its 1001 still to read) follows its drain.
                Some(Some(c)) if c.state == State::Open && c.drain.is_none() => c.churned_at = now,
                _ => continue,
            }
            // The old socket closes with no close frame: a phone that
            // loses its network sends none.
            self.leave(i, now)?;
            self.reconnect(i, now)?;
            done += 1;
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (less when a timer is due sooner) for
    /// readiness, handles what is ready, then the timers that are due.
    fn poll(&mut self, timeout_ms: i32) -> anyhow::Result<()> {
        let mut events = [sys::empty_event(); 1024];
        let timeout_ms = match self.timers.peek() {
            Some(Reverse((at, ..))) => {
                let ms = at.saturating_sub(sys::monotonic_us()).div_ceil(1000);
                timeout_ms.min(i32::try_from(ms).unwrap_or(i32::MAX))
            }
            None => timeout_ms,
        };
        let n = self.epoll.wait_timeout(&mut events, timeout_ms)?;
        for ev in &events[..n] {
            let (token, bits) = (ev.u64, ev.events);
            if token == STDIN_TOKEN {
                self.read_stdin();
                continue;
            }
            self.on_event(token as usize, bits)?;
        }
        self.fire_timers(sys::monotonic_us())
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
            State::Waiting => Ok(()),
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
            if self.follow {
                return self.attempt_failed(i, format!("connect: {e}"), sys::monotonic_us());
            }
            bail!("connecting to {}: {e}", self.args.target);
        }
        self.request[self.key_at..self.key_at + c.key.len()].copy_from_slice(&c.key);
        if let (Some((at, len, exp)), Some(secret)) = (self.token_at, &self.args.token_secret) {
            let token = super::connection_token(
                secret,
                &self.args.topic,
                self.args.worker_first + i,
                (exp, self.args.wildcard),
            );
            if token.len() != len {
                bail!(
                    "connection {i}'s token is {} bytes, the first one's {len}",
                    token.len()
                );
            }
            self.request[at..at + len].copy_from_slice(token.as_bytes());
        }
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
        self.tally.wire_bytes += n as u64;
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
            &mut self.codec,
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
                if self.follow {
                    return self.on_server_close(i, Some(code), now);
                }
                self.on_close_frame(i, code)
            }
            Outcome::Refused(status, _) if self.follow => {
                self.attempt_failed(i, format!("upgrade refused: {status}"), now)
            }
            Outcome::Refused(status, body) => bail!("upgrade refused: {status}: {body}"),
            Outcome::Fatal(why) => bail!("{why}"),
        }
    }

    /// Not following the server: a close frame ends the subscriber.
    fn on_close_frame(&mut self, i: usize, code: u16) -> anyhow::Result<()> {
        self.forget(i, |state| {
            format!("the server closed a connection ({code}) while it was {state:?} (see its log)")
        })
    }

    /// Forgets client `i`, whose connection ended: an open one is counted
    /// off; one that was still connecting fails the run with `why`.
    fn forget(&mut self, i: usize, why: impl FnOnce(State) -> String) -> anyhow::Result<()> {
        let Some(c) = self.clients.get_mut(i).and_then(Option::take) else {
            return Ok(());
        };
        let _ = self.epoll.delete(c.fd.as_raw_fd());
        match c.state {
            State::Open => {
                self.open -= 1;
                Ok(())
            }
            other => bail!("{}", why(other)),
        }
    }

    /// The server closed a connection (or it failed).
    fn on_eof(&mut self, i: usize) -> anyhow::Result<()> {
        if self.follow {
            return self.on_server_close(i, None, sys::monotonic_us());
        }
        self.forget(i, |state| {
            format!(
                "the server closed a connection while it was {state:?} (see its log; \
                 raise --max-handshakes-per-ip / --max-connections-per-ip for load runs)"
            )
        })
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
        // Their indexes will be the next round's clients'.
        self.timers.clear();
    }
}

/// Starts a non-blocking connect of `fd` to `target`.
fn start_connect(fd: &OwnedFd, target: std::net::SocketAddr) -> io::Result<()> {
    match socket2::SockRef::from(fd).connect(&target.into()) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
        _ => Ok(()),
    }
}
