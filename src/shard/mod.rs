//! A shard: one thread, one monoio runtime (io_uring, or epoll where
//! io_uring is unavailable), one SO_REUSEPORT listener. It owns its
//! connections and its topic index; no other thread touches them. Other
//! threads reach it only through its inbox ([`crate::bus`]).
//!
//! Three kinds of tasks run on a shard: the accept loop, one task per
//! connection (its reader; writes are done inline, see
//! [`crate::connection`]), and the shard loop, which drains the inbox in
//! batches and runs the once-a-second sweep for heartbeats and deadlines
//! (no timer per connection).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn, Instrument};

use crate::broker::Broker;
use crate::bus::{ConnId, Inbox, ShardMsg};
use crate::config::Config;
use crate::connection::{self, Conn, Phase};
use crate::metrics::{Disconnect, Drop, ShardMetrics};
use crate::protocol::{
    close, code, encode_drain, encode_error, encode_ok, encode_topic_error, OkExtra,
};
use crate::topic::TopicName;
use crate::ws::frame::{encode_frame, OpCode};
use crate::ws::handshake::HandshakeError;

/// Inbox messages handled before the shard flushes writes and yields.
const INBOX_BATCH: usize = 256;
/// Bytes read from a socket per `recv`, into the shard's one scratch buffer.
pub const SCRATCH_SIZE: usize = 64 << 10;
/// Interval of the per-shard sweep (heartbeats, handshake and close deadlines).
const SWEEP_MS: u64 = 1000;
/// The close reason of 4009 when the node (not the client) missed messages.
const FELL_BEHIND: &str = "server fell behind: resubscribe with since";
/// Grace after the drain window before the shard exits regardless.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// What a shard thread needs to start.
#[derive(Debug)]
pub struct ShardSetup {
    /// Shard number, 0-based.
    pub id: usize,
    /// Validated settings.
    pub config: Arc<Config>,
    /// Where publishes and subscribes go.
    pub broker: Arc<dyn Broker>,
    /// This shard's counters.
    pub metrics: Arc<ShardMetrics>,
    /// This shard's inbox.
    pub inbox: Inbox,
    /// This shard's listener (SO_REUSEPORT, non-blocking).
    pub listener: std::net::TcpListener,
    /// Token verification; `None` when anonymous clients are allowed everything.
    pub auth: Option<Arc<crate::auth::Verifier>>,
    /// Connections of the whole node, from accept to close (every shard
    /// counts here).
    pub node_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Which shards serve which topics ([`crate::bus::Interest`]).
    pub interest: Arc<crate::bus::Interest>,
    /// Policy per namespace, validated from `config.namespaces`.
    pub namespaces: crate::namespace::Namespaces,
}

/// Shard-local state, shared by the shard's tasks through `Rc`.
pub(crate) struct Shard {
    pub(crate) id: usize,
    pub(crate) config: Arc<Config>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) metrics: Arc<ShardMetrics>,
    /// Token verification; `None`: anonymous clients may do everything.
    pub(crate) auth: Option<Arc<crate::auth::Verifier>>,
    /// The identity every anonymous client shares.
    pub(crate) anonymous: Rc<crate::auth::Identity>,
    /// The identity of clients without a token in anonymous namespaces.
    pub(crate) guest: Rc<crate::auth::Identity>,
    /// Policy per namespace.
    pub(crate) namespaces: crate::namespace::Namespaces,
    /// Connections of the whole node, from accept to close.
    node_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections of this shard, from accept to close (upgrade requests
    /// still being sent included).
    shard_connections: Cell<usize>,
    /// Connections per client address on this shard, from accept to close.
    per_ip: RefCell<HashMap<std::net::IpAddr, u32>>,
    /// This shard's share of `max_connections_per_ip`.
    per_ip_limit: u32,
    /// Upgrade budget per client address: (tokens, last refill ms).
    handshakes: RefCell<HashMap<std::net::IpAddr, (f32, u64)>>,
    pub(crate) conns: RefCell<HashMap<ConnId, Rc<Conn>>>,
    /// The topic index: every topic with a live or pending subscription here.
    pub(crate) topics: RefCell<HashMap<TopicName, Local>>,
    /// Which topics each shard serves; this shard writes its own bit, for
    /// exactly the topics in its index.
    interest: Arc<crate::bus::Interest>,
    /// Connections with frames queued since the last flush.
    dirty: RefCell<Vec<Rc<Conn>>>,
    /// Readiness of every connection of this shard.
    pub(crate) epoll: crate::sys::Epoll,
    /// The one read buffer every connection of this shard reads into.
    pub(crate) scratch: RefCell<Vec<u8>>,
    next_conn: Cell<u64>,
    /// Sweeps done: which connections the next one pings.
    sweeps: Cell<u64>,
    started: Instant,
    now_ms: Cell<u64>,
    draining: Cell<bool>,
    listener_fd: Cell<RawFd>,
    /// Pre-encoded ping frame, shared by every connection.
    ping: Bytes,
    /// Set by a task that cannot go on; the shard loop then ends and the
    /// shard thread returns it to its supervisor.
    failure: RefCell<Option<ShardFailure>>,
    /// The shard loop, waiting for [`Shard::failed`].
    failure_waker: RefCell<Option<std::task::Waker>>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a shard stopped before its drain: what its supervisor
/// ([`crate::server`]) logs before it stops the node. A shard never exits
/// the process itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {error}")]
pub struct ShardFailure {
    /// What the shard was doing.
    pub what: &'static str,
    /// The system's error.
    pub error: String,
}

impl ShardFailure {
    fn new(what: &'static str, error: impl std::fmt::Display) -> Self {
        Self {
            what,
            error: error.to_string(),
        }
    }
}

/// Starts a shard on its own thread; the thread ends after the drain
/// (`Ok`), or early with the failure that stopped it.
pub fn spawn(
    setup: ShardSetup,
) -> std::io::Result<std::thread::JoinHandle<Result<(), ShardFailure>>> {
    std::thread::Builder::new()
        .name(format!("shard-{}", setup.id))
        .spawn(move || run_thread(setup))
}

fn run_thread(setup: ShardSetup) -> Result<(), ShardFailure> {
    let span = tracing::info_span!("shard", id = setup.id);
    let _guard = span.enter();
    if setup.config.pin_cores {
        if let Err(e) = crate::sys::pin_to_cpu(setup.id) {
            warn!(error = %e, "cannot pin to core");
        }
    }
    let uring = monoio::utils::detect_uring();
    if !uring {
        warn!("io_uring unavailable or disabled; using the epoll driver");
    }
    let built = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(4096)
        .enable_timer()
        .build();
    let mut rt = built.map_err(|e| ShardFailure::new("cannot build the runtime", e))?;
    info!(
        driver = if uring { "io_uring" } else { "epoll" },
        "shard up"
    );
    rt.block_on(run(setup).instrument(span.clone()))?;
    info!("shard stopped");
    Ok(())
}

async fn run(setup: ShardSetup) -> Result<(), ShardFailure> {
    let listener_fd = setup.listener.as_raw_fd();
    let listener = monoio::net::TcpListener::from_std(setup.listener)
        .map_err(|e| ShardFailure::new("cannot register the listener", e))?;
    let epoll = crate::sys::Epoll::new()
        .map_err(|e| ShardFailure::new("cannot create the epoll instance", e))?;
    let waiter = epoll
        .try_clone_fd()
        .map(crate::sys::pollable)
        .and_then(monoio::net::TcpStream::from_std)
        .map_err(|e| ShardFailure::new("cannot poll the epoll instance", e))?;
    let per_ip_limit = setup
        .config
        .max_connections_per_ip
        .div_ceil(setup.config.shards)
        .max(1) as u32;
    let shard = Rc::new(Shard {
        epoll,
        id: setup.id,
        config: setup.config,
        broker: setup.broker,
        metrics: setup.metrics,
        auth: setup.auth,
        anonymous: Rc::new(crate::auth::Identity::anonymous()),
        guest: Rc::new(crate::auth::Identity::guest()),
        namespaces: setup.namespaces,
        node_connections: setup.node_connections,
        shard_connections: Cell::new(0),
        per_ip: RefCell::new(HashMap::new()),
        per_ip_limit,
        handshakes: RefCell::new(HashMap::new()),
        conns: RefCell::new(HashMap::new()),
        topics: RefCell::new(HashMap::new()),
        interest: setup.interest,
        dirty: RefCell::new(Vec::new()),
        scratch: RefCell::new(vec![0; SCRATCH_SIZE]),
        next_conn: Cell::new(0),
        sweeps: Cell::new(0),
        started: Instant::now(),
        now_ms: Cell::new(0),
        draining: Cell::new(false),
        listener_fd: Cell::new(listener_fd),
        ping: encode_frame(OpCode::Ping, b""),
        failure: RefCell::new(None),
        failure_waker: RefCell::new(None),
    });
    monoio::spawn(accept_loop(shard.clone(), listener));
    monoio::spawn(sweep_loop(shard.clone()));
    monoio::spawn(poll_loop(shard.clone(), waiter));
    #[cfg(debug_assertions)]
    {
        arm_debug_panic(shard.id);
        arm_debug_failure(&shard);
    }
    shard_loop(&shard, &setup.inbox).await;
    let failure = shard.failure.borrow_mut().take();
    failure.map_or(Ok(()), Err)
}

/// Test-only fault injection, in debug builds only (release builds do not
/// read it): with `RINGCAST_DEBUG_PANIC_SHARD=N`, shard N panics
/// [`DEBUG_PANIC_AFTER`] after it is up, so the tests (which run the debug
/// binary) can check the supervision in [`crate::server`]: the dead shard
/// is logged and the process exits 1 instead of hanging. Never set it in
/// production; a release build ignores it.
#[cfg(debug_assertions)]
pub const DEBUG_PANIC_SHARD_ENV: &str = "RINGCAST_DEBUG_PANIC_SHARD";

/// How long after start-up the shard named by [`DEBUG_PANIC_SHARD_ENV`] panics.
#[cfg(debug_assertions)]
pub const DEBUG_PANIC_AFTER: Duration = Duration::from_millis(300);

/// Test-only, debug builds only, like [`DEBUG_PANIC_SHARD_ENV`]: shard N
/// reports a failure to its supervisor (as a failed `epoll_wait` would)
/// [`DEBUG_PANIC_AFTER`] after it is up.
#[cfg(debug_assertions)]
pub const DEBUG_FAIL_SHARD_ENV: &str = "RINGCAST_DEBUG_FAIL_SHARD";

#[cfg(debug_assertions)]
fn arm_debug_failure(shard: &Rc<Shard>) {
    let wanted = std::env::var(DEBUG_FAIL_SHARD_ENV).ok();
    if wanted.and_then(|v| v.trim().parse::<usize>().ok()) != Some(shard.id) {
        return;
    }
    warn!(
        env = DEBUG_FAIL_SHARD_ENV,
        "test-only fault injection: this shard will fail"
    );
    let shard = shard.clone();
    monoio::spawn(async move {
        monoio::time::sleep(DEBUG_PANIC_AFTER).await;
        shard.fail(ShardFailure::new(
            "injected failure (test-only, debug builds)",
            DEBUG_FAIL_SHARD_ENV,
        ));
    });
}

#[cfg(debug_assertions)]
fn arm_debug_panic(id: usize) {
    let wanted = std::env::var(DEBUG_PANIC_SHARD_ENV).ok();
    if wanted.and_then(|v| v.trim().parse::<usize>().ok()) != Some(id) {
        return;
    }
    warn!(
        env = DEBUG_PANIC_SHARD_ENV,
        after_ms = DEBUG_PANIC_AFTER.as_millis() as u64,
        "test-only fault injection: this shard will panic"
    );
    monoio::spawn(async move {
        monoio::time::sleep(DEBUG_PANIC_AFTER).await;
        panic!("{DEBUG_PANIC_SHARD_ENV}={id}: injected panic (test-only, debug builds)");
    });
}

async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                if shard.draining.get() {
                    break;
                }
                // The handshake deadline starts now, not at the last tick.
                shard.tick();
                shard.on_accept(crate::sys::into_owned_fd(stream), peer);
                shard.flush_dirty();
            }
            Err(_) if shard.draining.get() => break,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    debug!("accept loop stopped");
}

/// Ready events harvested per `epoll_wait`.
const EVENTS_BATCH: usize = 1024;

/// Waits for connection readiness and acts on it: the only place a
/// connection's socket is read.
async fn poll_loop(shard: Rc<Shard>, waiter: monoio::net::TcpStream) {
    let mut events = vec![crate::sys::empty_event(); EVENTS_BATCH];
    loop {
        if let Err(e) = waiter.readable(false).await {
            return shard.fail(ShardFailure::new("polling connections failed", e));
        }
        shard.tick();
        loop {
            let n = match shard.epoll.wait(&mut events) {
                Ok(n) => n,
                Err(e) => return shard.fail(ShardFailure::new("epoll_wait failed", e)),
            };
            for ev in &events[..n] {
                let (token, bits) = (ev.u64, ev.events);
                shard.on_ready(ConnId(token), bits);
            }
            shard.flush_dirty();
            if n < events.len() {
                break;
            }
        }
    }
}

async fn sweep_loop(shard: Rc<Shard>) {
    loop {
        monoio::time::sleep(Duration::from_millis(SWEEP_MS)).await;
        shard.tick();
        shard.sweep();
        shard.forget_full_budgets();
        shard.flush_dirty();
    }
}

async fn shard_loop(shard: &Rc<Shard>, inbox: &Inbox) {
    let mut drain_deadline: Option<u64> = None;
    loop {
        if let Some(deadline) = drain_deadline {
            if shard.conns.borrow().is_empty() || shard.now_ms() >= deadline {
                break;
            }
            // While draining, wake at least every 100 ms to check the exit condition.
            monoio::select! {
                _ = inbox.ready() => {},
                _ = monoio::time::sleep(Duration::from_millis(100)) => {},
            }
            shard.tick();
        } else {
            monoio::select! {
                _ = inbox.ready() => {},
                _ = shard.failed() => {},
            }
        }
        if shard.failure.borrow().is_some() {
            // The supervisor stops the node; nothing here is served any more.
            break;
        }
        if inbox.take_lagged() {
            shard.on_lagged();
        }
        // A flag, not a message: a full inbox cannot lose it (crate::bus).
        if let Some(window_ms) = inbox.take_drain() {
            if drain_deadline.is_none() {
                shard.tick();
                let window = Duration::from_millis(window_ms) + DRAIN_GRACE;
                drain_deadline = Some(shard.now_ms().saturating_add(window.as_millis() as u64));
                shard.start_drain(window_ms);
            }
        }
        for _ in 0..INBOX_BATCH {
            let Some(msg) = inbox.try_recv() else { break };
            shard.handle(msg);
        }
        shard.flush_dirty();
        // Let connection tasks run between batches.
        yield_now().await;
    }
}

impl Shard {
    /// Takes in an accepted socket: registry, readiness, connection caps.
    /// TCP_NODELAY comes from the listener (Linux copies it to accepted
    /// sockets).
    fn on_accept(self: &Rc<Self>, socket: std::os::fd::OwnedFd, peer: std::net::SocketAddr) {
        self.metrics
            .connections_accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = ConnId(self.next_conn.get());
        self.next_conn.set(id.0 + 1);
        let conn = Rc::new(Conn::new(
            id,
            socket,
            peer.ip(),
            self.now_ms(),
            &self.config,
        ));
        if let Err(e) = self.epoll.add(conn.fd(), crate::sys::EPOLLIN, id.0) {
            warn!(error = %e, "cannot watch a new connection");
            return;
        }
        debug!(conn = id.0, %peer, "accepted");
        self.conns.borrow_mut().insert(id, conn.clone());
        self.sync_gauges();
        // Counted from now on, or refused at once: a socket that never
        // sends its upgrade request must not escape the caps.
        connection::admit(self, &conn);
    }

    /// Acts on one connection's readiness.
    fn on_ready(self: &Rc<Self>, id: ConnId, events: u32) {
        let Some(conn) = self.conn(id) else { return };
        if events & crate::sys::EPOLLOUT != 0 {
            connection::on_writable(self, &conn);
        }
        if events & !crate::sys::EPOLLOUT != 0 && !connection::on_readable(self, &conn) {
            let _ = self.epoll.delete(conn.fd());
            connection::finish(self, &conn);
        }
    }

    /// Adds or removes EPOLLOUT for a connection whose socket is full.
    pub(crate) fn watch_writable(&self, conn: &Conn, on: bool) {
        let events = if on {
            crate::sys::EPOLLIN | crate::sys::EPOLLOUT
        } else {
            crate::sys::EPOLLIN
        };
        if self.epoll.modify(conn.fd(), events, conn.id.0).is_err() {
            conn.shut();
        }
    }

    /// Whether the drain has started (new upgrades get 503).
    pub(crate) fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Counts a just-accepted connection from `ip` toward the caps, or
    /// names the first one it is over, in docs/PROTOCOL.md order (429 before
    /// 503): this shard's share of `max_connections_per_ip`, an upgrade
    /// budget already spent (`max_handshakes_per_ip`, not taken here), then
    /// `max_connections_per_shard` and `max_connections`. A connection
    /// counted here is uncounted by [`Shard::release`].
    pub(crate) fn admit(&self, ip: std::net::IpAddr) -> Result<(), HandshakeError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.per_ip.borrow().get(&ip).copied().unwrap_or(0) >= self.per_ip_limit {
            return Err(HandshakeError::TooManyConnections {
                reason: "max_connections_per_ip reached for this address",
            });
        }
        if !self.handshake_budget_left(ip) {
            return Err(HandshakeError::TooManyConnections {
                reason: "max_handshakes_per_ip: too many upgrades per second from this address",
            });
        }
        if self.shard_connections.get() >= self.config.max_connections_per_shard {
            return Err(HandshakeError::Unavailable {
                reason: "shard is full (max_connections_per_shard)",
            });
        }
        // Taken first, then checked: shards admit concurrently.
        if self.node_connections.fetch_add(1, Relaxed) >= self.config.max_connections {
            self.node_connections.fetch_sub(1, Relaxed);
            return Err(HandshakeError::Unavailable {
                reason: "server is full (max_connections)",
            });
        }
        self.shard_connections.set(self.shard_connections.get() + 1);
        *self.per_ip.borrow_mut().entry(ip).or_insert(0) += 1;
        Ok(())
    }

    /// Whether `ip` has an upgrade left in its budget, without taking it.
    fn handshake_budget_left(&self, ip: std::net::IpAddr) -> bool {
        let per_sec = self.config.max_handshakes_per_ip;
        if per_sec == 0 {
            return true;
        }
        let rate = (per_sec as f32 / self.config.shards as f32).max(1.0);
        let now = self.now_ms();
        self.handshakes
            .borrow()
            .get(&ip)
            .is_none_or(|(tokens, at)| {
                *tokens + now.saturating_sub(*at) as f32 / 1000.0 * rate >= 1.0
            })
    }

    /// Takes one upgrade from `ip`'s budget (`max_handshakes_per_ip`, this
    /// shard's share, refilled continuously); false when it is spent.
    pub(crate) fn handshake_allowed(&self, ip: std::net::IpAddr) -> bool {
        let per_sec = self.config.max_handshakes_per_ip;
        if per_sec == 0 {
            return true;
        }
        let rate = (per_sec as f32 / self.config.shards as f32).max(1.0);
        let now = self.now_ms();
        let mut budgets = self.handshakes.borrow_mut();
        let (tokens, at) = budgets.entry(ip).or_insert((rate, now));
        *tokens = (*tokens + now.saturating_sub(*at) as f32 / 1000.0 * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets upgrade budgets that have refilled (bounded memory).
    fn forget_full_budgets(&self) {
        let rate = (self.config.max_handshakes_per_ip as f32 / self.config.shards as f32).max(1.0);
        let now = self.now_ms();
        self.handshakes.borrow_mut().retain(|_, (tokens, at)| {
            *tokens + now.saturating_sub(*at) as f32 / 1000.0 * rate < rate
        });
    }

    /// Uncounts a connection counted by [`Shard::admit`].
    pub(crate) fn release(&self, ip: std::net::IpAddr) {
        self.node_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.shard_connections
            .set(self.shard_connections.get().saturating_sub(1));
        let mut per_ip = self.per_ip.borrow_mut();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }

    /// Milliseconds since the shard started, as of the last tick.
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    /// Refreshes the coarse clock.
    pub(crate) fn tick(&self) {
        self.now_ms.set(self.started.elapsed().as_millis() as u64);
    }

    /// Records why this shard cannot go on and wakes the shard loop, which
    /// ends; the supervisor logs it and stops the node.
    fn fail(&self, failure: ShardFailure) {
        tracing::error!(error = %failure, "shard failed");
        self.failure.borrow_mut().get_or_insert(failure);
        if let Some(w) = self.failure_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves once [`Shard::fail`] was called.
    async fn failed(&self) {
        std::future::poll_fn(|cx| {
            if self.failure.borrow().is_some() {
                std::task::Poll::Ready(())
            } else {
                *self.failure_waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// The `conn` string sent in `welcome`.
    pub(crate) fn conn_name(&self, id: ConnId) -> String {
        format!("c-{}-{}", self.id, id.0)
    }

    fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Deliver { topic, frame, .. } => self.deliver(&topic, &frame),
            ShardMsg::Subscribed {
                reply,
                topic,
                replay,
                recovered,
                epoch,
                last,
            } => self.on_subscribed(reply, topic, replay, recovered, (&epoch, last)),
            ShardMsg::SubscribeFailed {
                reply,
                topic,
                reason,
            } => {
                let Some(conn) = self.conn(reply.conn) else {
                    return;
                };
                if conn.take_pending(&topic) {
                    self.end_pending(&topic);
                }
                let frame = encode_topic_error(reply.req, code::UNAVAILABLE, &topic, reason);
                self.queue(&conn, frame);
            }
            ShardMsg::PartitionGap {
                partition,
                partitions,
            } => self.on_partition_gap(partition, partitions),
            ShardMsg::Published {
                reply,
                topic,
                result,
            } => {
                let Some(conn) = self.conn(reply.conn) else {
                    return;
                };
                match result {
                    Ok(mid) if reply.req.is_some() => {
                        let extra = OkExtra {
                            mid: Some(mid),
                            ..OkExtra::default()
                        };
                        self.queue(&conn, encode_ok(reply.req, Some(&topic), extra));
                    }
                    Ok(_) => {}
                    Err(reason) => {
                        self.queue(&conn, encode_error(reply.req, code::UNAVAILABLE, &reason))
                    }
                }
            }
        }
    }

    /// The broker's answer to a `sub`: the replay, the `ok`, then the
    /// subscription goes live. A replay that would not fit the outbound
    /// queue beside what is queued already is not sent at all: the `ok`
    /// says `recovered:false` at once (the client refetches its state)
    /// and the frames are counted as dropped, so a recovery never gets its
    /// own connection closed with 4009 and never loops.
    fn on_subscribed(
        &self,
        reply: crate::bus::ReplyTo,
        topic: TopicName,
        replay: Vec<Bytes>,
        recovered: Option<bool>,
        (epoch, last): (&str, crate::broker::MsgId),
    ) {
        let Some(conn) = self.conn(reply.conn) else {
            return;
        };
        let wanted = conn.take_pending(&topic);
        if wanted && !connection::may_subscribe(self, &conn, &topic) {
            self.end_pending(&topic);
            // A refreshed token narrowed `subs` while the broker
            // answered: the `sub` ends refused, nothing replayed.
            let reason = "topic not allowed by the refreshed token";
            let frame = encode_topic_error(reply.req, code::FORBIDDEN_TOPIC, &topic, reason);
            return self.queue(&conn, frame);
        }
        let ok = |recovered| {
            let extra = OkExtra {
                epoch: Some(epoch),
                last: Some(last),
                recovered,
                mid: None,
            };
            encode_ok(reply.req, Some(&topic), extra)
        };
        let mut answer = ok(recovered);
        let replay_bytes: usize = replay.iter().map(Bytes::len).sum();
        if conn.queued_bytes() + replay_bytes + answer.len() > self.config.outbound_queue {
            debug!(
                conn = conn.id.0,
                topic = %topic,
                frames = replay.len(),
                bytes = replay_bytes,
                "replay over the outbound queue: answering recovered:false"
            );
            self.metrics
                .dropped_n(Drop::ReplayTooLarge, replay.len() as u64);
            answer = ok(Some(false));
        } else {
            for frame in replay {
                self.queue_msg(&conn, frame);
            }
        }
        self.queue(&conn, answer);
        if wanted && conn.phase() == Phase::Open {
            // Pending becomes live: the entry (and the announcement) stays.
            let mut topics = self.topics.borrow_mut();
            let local = topics.entry(topic.clone()).or_default();
            local.pending = local.pending.saturating_sub(1);
            conn.add_live(topic, local.live.len() as u32);
            local.live.push(conn);
            drop(topics);
            self.metrics
                .subscriptions_active
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if wanted {
            // Closing meanwhile: it never becomes live.
            self.end_pending(&topic);
        }
    }

    fn conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Queues one shared `msg` frame to every local subscriber of `topic`.
    fn deliver(&self, topic: &TopicName, frame: &Bytes) {
        let topics = self.topics.borrow();
        let Some(local) = topics.get(topic) else {
            return;
        };
        for conn in &local.live {
            self.queue_msg(conn, frame.clone());
        }
    }

    /// Queues a `msg` frame: counted as delivered, or as dropped with its reason.
    pub(crate) fn queue_msg(&self, conn: &Rc<Conn>, frame: Bytes) {
        if conn.phase() != Phase::Open {
            self.metrics.dropped(Drop::ConnectionClosed);
        } else if self.try_queue(conn, frame) {
            self.metrics
                .messages_delivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.metrics.dropped(Drop::SlowConsumer);
        }
    }

    /// Queues a frame (a message, reply or pong) within the connection's
    /// `outbound_queue` bound and marks it for the next flush. Past the bound
    /// the client is not reading: what is unsent is dropped (counted) and
    /// the connection is closed with 4009. Returns whether it was queued.
    pub(crate) fn try_queue(&self, conn: &Rc<Conn>, frame: Bytes) -> bool {
        if conn.queued_bytes() + frame.len() > self.config.outbound_queue {
            if conn.phase() == Phase::Open {
                let discarded = conn.discard_unsent();
                self.metrics.dropped_n(Drop::ConnectionClosed, discarded);
                let reason = "slow consumer: outbound queue over its bound";
                self.close(conn, close::SLOW, reason, Disconnect::Slow);
            }
            return false;
        }
        self.queue_unbounded(conn, frame);
        true
    }

    /// [`Shard::try_queue`] for replies and control frames.
    pub(crate) fn queue(&self, conn: &Rc<Conn>, frame: Bytes) {
        let _ = self.try_queue(conn, frame);
    }

    /// Queues a frame whatever the bound: close frames and HTTP responses,
    /// which are small and end the connection.
    pub(crate) fn queue_unbounded(&self, conn: &Rc<Conn>, frame: Bytes) {
        if conn.push(frame) {
            self.dirty.borrow_mut().push(conn.clone());
        }
    }

    /// Writes every dirty connection's queue, one vectored write each.
    pub(crate) fn flush_dirty(&self) {
        let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
        for conn in dirty {
            connection::flush(self, &conn);
        }
    }

    /// Starts a server-initiated close: the close frame goes after what is
    /// queued, and the socket is shut when the client answers or at the close timeout.
    pub(crate) fn close(&self, conn: &Rc<Conn>, code: u16, reason: &str, why: Disconnect) {
        if matches!(conn.phase(), Phase::Closing | Phase::Closed) {
            return;
        }
        self.metrics.disconnect(why);
        let deadline = self
            .now_ms()
            .saturating_add(self.config.close_timeout.as_millis() as u64);
        conn.set_closing(deadline);
        self.queue_unbounded(conn, crate::ws::frame::encode_close(code, reason));
    }

    /// The once-a-second pass over every connection: deadlines, token
    /// expiry, silence, and pings. Pings need no per-connection timestamp:
    /// a heartbeat spans `k` sweeps and a connection is pinged on the sweeps
    /// where `(sweep + id) % k == 0`, so each one gets a ping every
    /// heartbeat and each sweep pings only 1/k of the shard, not all at once.
    fn sweep(&self) {
        let now = self.now_ms();
        let hb = self.config.heartbeat.as_millis() as u64;
        let slots = (hb / SWEEP_MS).max(1);
        let round = self.sweeps.get();
        self.sweeps.set(round.wrapping_add(1));
        let wall = crate::auth::now_secs();
        // Decide under one borrow of the registry, then act on the few that
        // need it (acting may touch the registry).
        let due: Vec<(Rc<Conn>, Due)> = self
            .conns
            .borrow()
            .values()
            .filter_map(|conn| {
                let due = match conn.phase() {
                    Phase::Handshake if now >= conn.deadline() => Due::HandshakeTimeout,
                    Phase::Open => {
                        let identity = conn.identity.borrow();
                        match identity.as_ref() {
                            None if now >= conn.deadline() => Due::AuthTimeout,
                            Some(i) if i.expires_at <= wall => Due::TokenExpired,
                            _ if now.saturating_sub(conn.last_rx()) >= hb.saturating_mul(2) => {
                                Due::Silent
                            }
                            _ if (round.wrapping_add(conn.id.0)) % slots == 0 => Due::Ping,
                            _ => return None,
                        }
                    }
                    Phase::Closing if now >= conn.deadline() => Due::CloseTimeout,
                    _ => return None,
                };
                Some((conn.clone(), due))
            })
            .collect();
        for (conn, due) in due {
            match due {
                // Like every handshake error: an HTTP answer, then close.
                Due::HandshakeTimeout => connection::refuse(self, &conn, &HandshakeError::Timeout),
                Due::AuthTimeout => self.close(
                    &conn,
                    close::NOT_AUTHENTICATED,
                    "authentication timed out",
                    Disconnect::Auth,
                ),
                Due::TokenExpired => self.close(
                    &conn,
                    close::NOT_AUTHENTICATED,
                    "token expired",
                    Disconnect::Auth,
                ),
                Due::Silent => {
                    debug!(
                        conn = conn.id.0,
                        silent_ms = now.saturating_sub(conn.last_rx()),
                        "heartbeat timeout"
                    );
                    self.metrics.disconnect(Disconnect::Heartbeat);
                    conn.shut();
                }
                Due::Ping if !self.config.echo => self.queue(&conn, self.ping.clone()),
                Due::Ping => {}
                Due::CloseTimeout => conn.shut(),
            }
        }
    }

    fn start_drain(&self, window_ms: u64) {
        if self.draining.replace(true) {
            return;
        }
        crate::sys::shutdown(self.listener_fd.get());
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        info!(connections = conns.len(), window_ms, "draining");
        for conn in conns {
            match conn.phase() {
                Phase::Open => {
                    let delay = if window_ms == 0 {
                        0
                    } else {
                        fastrand::u64(0..window_ms)
                    };
                    if !self.config.echo {
                        self.queue(&conn, encode_drain(delay));
                    }
                    self.close(
                        &conn,
                        close::GOING_AWAY,
                        "server going away",
                        Disconnect::Drain,
                    );
                }
                // Mid-upgrade: an HTTP answer too, like every refusal.
                Phase::Handshake => {
                    let draining = HandshakeError::Unavailable {
                        reason: "server is draining",
                    };
                    connection::refuse(self, &conn, &draining);
                }
                Phase::Closing | Phase::Closed => {}
            }
        }
    }

    /// The inbox overflowed: some message never reached this shard, so every
    /// subscriber here may have a gap. Close them with 4009 so they recover.
    fn on_lagged(&self) {
        warn!("shard inbox overflowed; closing subscribers so they recover");
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        for conn in conns.iter().filter(|c| c.phase() == Phase::Open) {
            self.close(conn, close::SLOW, FELL_BEHIND, Disconnect::Slow);
        }
    }

    /// A Redis partition lost entries before the node read them: every
    /// subscriber of a topic in it has a hole. Close them with 4009, like
    /// a lagged shard; their `since` is from before the gap, so recovery
    /// answers `recovered:false` (the reader refuses it) and they refetch.
    /// A scan of this shard's topics, once per gap (rare), never per message.
    fn on_partition_gap(&self, partition: u32, partitions: u32) {
        let conns: Vec<Rc<Conn>> = self
            .topics
            .borrow()
            .iter()
            .filter(|(t, _)| crate::broker::redis::partition(t.as_str(), partitions) == partition)
            .flat_map(|(_, local)| local.live.iter().cloned())
            .collect();
        let mut closed = 0usize;
        // A connection with several topics in the partition is listed once
        // per topic; `close` leaves one already closing alone.
        for conn in conns.iter().filter(|c| c.phase() == Phase::Open) {
            self.close(conn, close::SLOW, FELL_BEHIND, Disconnect::Slow);
            closed += 1;
        }
        if closed > 0 {
            warn!(
                partition,
                closed, "partition lost entries before they were read; closing its subscribers so they recover"
            );
        }
    }

    /// Forgets a finished connection: registry, topic index, counters.
    pub(crate) fn remove(&self, conn: &Rc<Conn>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.conns.borrow_mut().remove(&conn.id);
        let subs = conn.take_all();
        let mut topics = self.topics.borrow_mut();
        let mut live = 0;
        for sub in &subs {
            let gone = if sub.is_live() {
                live += 1;
                detach(&mut topics, &sub.topic, sub.slot())
            } else {
                release_pending(&mut topics, &sub.topic)
            };
            if gone {
                self.interest.remove(&sub.topic, self.id);
            }
        }
        drop(topics);
        self.sync_gauges();
        self.metrics.subscriptions_active.fetch_sub(live, Relaxed);
    }

    /// Records a `sub` about to go to the broker. A topic new to this
    /// shard enters the index and is announced first ([`crate::bus`]), so
    /// nothing published from the subscription's start misses this shard.
    pub(crate) fn add_pending(&self, conn: &Conn, topic: &TopicName) {
        let mut topics = self.topics.borrow_mut();
        let local = topics.entry(topic.clone()).or_insert_with(|| {
            self.interest.add(topic, self.id);
            Local::default()
        });
        local.pending += 1;
        drop(topics);
        conn.add_pending(topic.clone());
        self.sync_gauges();
    }

    /// A pending `sub` ended without becoming live.
    fn end_pending(&self, topic: &TopicName) {
        if release_pending(&mut self.topics.borrow_mut(), topic) {
            self.interest.remove(topic, self.id);
        }
        self.sync_gauges();
    }

    /// Publishes the sizes of the registry and the topic index as gauges,
    /// after every change to either: what `/metrics` shows is the maps
    /// themselves, not a count kept beside them that could drift.
    fn sync_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let conns = self.conns.borrow().len() as i64;
        let topics = self.topics.borrow().len() as i64;
        let announced = if self.interest.tracked() { topics } else { 0 };
        self.metrics.registry_connections.store(conns, Relaxed);
        self.metrics.topic_index_entries.store(topics, Relaxed);
        self.metrics.topics_announced.store(announced, Relaxed);
    }

    /// Unsubscribes one connection from one topic; false if it was not subscribed.
    pub(crate) fn unsubscribe(&self, conn: &Rc<Conn>, topic: &TopicName) -> bool {
        let Some(slot) = conn.take_live(topic) else {
            let pending = conn.take_pending(topic);
            if pending {
                self.end_pending(topic);
            }
            return pending;
        };
        if detach(&mut self.topics.borrow_mut(), topic, slot) {
            self.interest.remove(topic, self.id);
        }
        self.sync_gauges();
        self.metrics
            .subscriptions_active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        true
    }
}

/// One topic of a shard's index: the live subscribers (a connection's
/// `Sub::slot` is its index in `live`) and the `sub`s for it still waiting
/// on the broker. The entry lives while either is non-zero, and exactly
/// that long the topic is announced in [`crate::bus::Interest`].
#[derive(Debug, Default)]
pub(crate) struct Local {
    pub(crate) live: Vec<Rc<Conn>>,
    pending: u32,
}

impl Local {
    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.pending == 0
    }
}

/// Removes the subscriber at `slot` of `topic`'s list, and the topic once
/// it has none, live or pending; true when the topic left the index. O(1):
/// the last subscriber takes the slot and is told so.
fn detach(topics: &mut HashMap<TopicName, Local>, topic: &TopicName, slot: u32) -> bool {
    let Some(local) = topics.get_mut(topic) else {
        return false;
    };
    let slot = slot as usize;
    if slot < local.live.len() {
        local.live.swap_remove(slot);
        if let Some(moved) = local.live.get(slot) {
            moved.move_slot(topic, slot as u32);
        }
    }
    forget_if_empty(topics, topic)
}

/// Counts one pending `sub` of `topic` as over; true when the topic left the index.
fn release_pending(topics: &mut HashMap<TopicName, Local>, topic: &TopicName) -> bool {
    if let Some(local) = topics.get_mut(topic) {
        local.pending = local.pending.saturating_sub(1);
    }
    forget_if_empty(topics, topic)
}

fn forget_if_empty(topics: &mut HashMap<TopicName, Local>, topic: &TopicName) -> bool {
    let empty = topics.get(topic).is_some_and(Local::is_empty);
    if empty {
        topics.remove(topic);
    }
    empty
}

/// What the sweep found due for a connection.
#[derive(Debug, Clone, Copy)]
enum Due {
    HandshakeTimeout,
    AuthTimeout,
    TokenExpired,
    Silent,
    Ping,
    CloseTimeout,
}

/// Lets every other ready task of this shard run once before continuing.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, config: &Config) -> Rc<Conn> {
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        let peer = std::net::IpAddr::from([127, 0, 0, 1]);
        Rc::new(Conn::new(ConnId(id), fd, peer, 0, config))
    }

    fn attach(topics: &mut HashMap<TopicName, Local>, topic: &TopicName, c: &Rc<Conn>) {
        let local = topics.entry(topic.clone()).or_default();
        c.add_live(topic.clone(), local.live.len() as u32);
        local.live.push(c.clone());
    }

    #[test]
    fn a_topic_stays_indexed_while_it_has_a_live_or_pending_subscription() {
        let config = Config::default();
        let t = TopicName::new("t").unwrap();
        let c = conn(1, &config);
        let mut topics: HashMap<TopicName, Local> = HashMap::new();
        topics.entry(t.clone()).or_default().pending = 2;
        attach(&mut topics, &t, &c);
        assert!(
            !release_pending(&mut topics, &t),
            "one pending and one live left"
        );
        assert!(!detach(&mut topics, &t, 0), "one pending left");
        assert!(topics.contains_key(&t));
        assert!(release_pending(&mut topics, &t), "the last one");
        assert!(topics.is_empty());
        // Releasing what is not there changes nothing.
        assert!(!release_pending(&mut topics, &t));
        assert!(!detach(&mut topics, &t, 0));
        assert!(topics.is_empty());
    }

    #[test]
    fn detaching_in_any_order_keeps_every_slot_true() {
        let config = Config::default();
        let (a, b) = (TopicName::new("a").unwrap(), TopicName::new("b").unwrap());
        let conns: Vec<Rc<Conn>> = (0..50).map(|i| conn(i, &config)).collect();
        let mut topics = HashMap::new();
        for c in &conns {
            attach(&mut topics, &a, c);
            if c.id.0 % 3 == 0 {
                attach(&mut topics, &b, c);
            }
        }
        let mut order: Vec<usize> = (0..conns.len()).collect();
        fastrand::Rng::with_seed(7).shuffle(&mut order);
        for (n, &i) in order.iter().enumerate() {
            for sub in conns[i].take_all().iter().filter(|s| s.is_live()) {
                detach(&mut topics, &sub.topic, sub.slot());
            }
            let left: Vec<&Rc<Conn>> = order[n + 1..].iter().map(|&k| &conns[k]).collect();
            let list = topics.get(&a).map_or(&[][..], |l| &l.live[..]);
            assert_eq!(list.len(), left.len());
            for (slot, c) in list.iter().enumerate() {
                assert!(
                    left.iter().any(|l| Rc::ptr_eq(l, c)),
                    "a gone conn is still listed"
                );
                assert_eq!(c.take_live(&a), Some(slot as u32));
                c.add_live(a.clone(), slot as u32);
            }
        }
        assert!(topics.is_empty(), "{:?}", topics.keys().collect::<Vec<_>>());
    }
}
