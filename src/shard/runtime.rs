//! A shard's thread and its loops: the runtime (io_uring, or epoll where
//! io_uring is unavailable), the accept loop, the readiness loop, the sweep
//! loop and the inbox loop; and how a shard reports a failure to its
//! supervisor instead of ending the process.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn, Instrument};

use super::conn::Conn;
use super::sweep::SWEEP_MS;
use super::{Shard, ShardSetup, SCRATCH_SIZE};
use crate::bus::Inbox;
use crate::id::ConnId;
use crate::ws::frame::{encode_frame, OpCode};

/// Inbox messages handled before the shard flushes writes and yields.
const INBOX_BATCH: usize = 256;
/// Grace after the drain window before the shard exits regardless.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

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
    pub(super) fn new(what: &'static str, error: impl std::fmt::Display) -> Self {
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
    let span = tracing::info_span!("shard", id = setup.id.0);
    let _guard = span.enter();
    if setup.config.pin_cores {
        if let Err(e) = crate::sys::pin_to_cpu(setup.id.index()) {
            warn!(error = %e, "cannot pin to core");
        }
    }
    let uring = monoio::utils::detect_uring();
    if !uring {
        warn!("io_uring unavailable or disabled; using the epoll driver and data path");
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
    rt.block_on(run(setup, uring).instrument(span.clone()))?;
    info!("shard stopped");
    Ok(())
}

async fn run(setup: ShardSetup, uring: bool) -> Result<(), ShardFailure> {
    let listener_fd = setup.listener.as_raw_fd();
    let listener = monoio::net::TcpListener::from_std(setup.listener)
        .map_err(|e| ShardFailure::new("cannot register the listener", e))?;
    let want_ring = uring && setup.config.data_path == crate::config::DataPath::IoUring;
    let (io, why_not) = super::io::Io::open(want_ring)
        .map_err(|e| ShardFailure::new("cannot create the epoll instance", e))?;
    if let Some(e) = why_not {
        warn!(error = %e, "cannot set up the io_uring data path; using epoll");
    }
    info!(data_path = io.name(), "data path");
    let waiter = io
        .try_clone_fd()
        .and_then(crate::sys::FdWaiter::new)
        .map_err(|e| ShardFailure::new("cannot wait for the data path", e))?;
    let per_ip_limit = setup
        .config
        .max_connections_per_ip
        .div_ceil(setup.config.shards)
        .max(1) as u32;
    let compression_level = setup.config.compression_level;
    // The embedded broker's part for the topics this shard keeps.
    setup.broker.attach(setup.id);
    let shard = Rc::new(Shard {
        io,
        id: setup.id,
        config: setup.config,
        broker: setup.broker,
        metrics: setup.metrics,
        auth: setup.auth,
        grants: crate::auth::GrantsCache::default(),
        anonymous: Rc::new(crate::auth::Identity::anonymous()),
        guest: Rc::new(crate::auth::Identity::guest()),
        namespaces: setup.namespaces,
        presence: setup.presence,
        node_connections: setup.node_connections,
        shard_connections: Cell::new(0),
        per_ip: RefCell::new(HashMap::new()),
        per_ip_limit,
        handshakes: RefCell::new(HashMap::new()),
        refusing: RefCell::default(),
        conns: RefCell::default(),
        topics: RefCell::new(HashMap::new()),
        wild: RefCell::new(super::patterns::Wildcards::default()),
        stamp: Cell::new(0),
        dirty: RefCell::new(Vec::new()),
        scratch: RefCell::new(vec![0; SCRATCH_SIZE]),
        next_conn: Cell::new(0),
        sweeps: Cell::new(0),
        started: Instant::now(),
        now_ms: Cell::new(0),
        draining: Cell::new(false),
        listener_fd: Cell::new(listener_fd),
        ping: encode_frame(OpCode::Ping, b""),
        deflater: RefCell::new(crate::ws::deflate::Deflater::new(compression_level)),
        inflater: RefCell::default(),
        failure: RefCell::new(None),
        failure_waker: RefCell::new(None),
        io_more: Cell::new(false),
        io_waker: Cell::new(None),
    });
    shard.metrics.ticked_ms.store(
        crate::metrics::uptime_ms(),
        std::sync::atomic::Ordering::Relaxed,
    );
    monoio::spawn(accept_loop(shard.clone(), listener));
    monoio::spawn(sweep_loop(shard.clone()));
    monoio::spawn(poll_loop(shard.clone(), waiter));
    #[cfg(debug_assertions)]
    {
        arm_debug_panic(shard.id.index());
        arm_debug_stall(shard.id.index());
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

/// Test-only, debug builds only, like [`DEBUG_PANIC_SHARD_ENV`]: shard N
/// blocks its own thread for [`DEBUG_STALL_FOR`] (a loop that is stuck,
/// not dead) [`DEBUG_PANIC_AFTER`] after it is up, so `/healthz` can be
/// seen naming it.
#[cfg(debug_assertions)]
pub const DEBUG_STALL_SHARD_ENV: &str = "RINGCAST_DEBUG_STALL_SHARD";

/// How long the shard named by [`DEBUG_STALL_SHARD_ENV`] stays stuck.
#[cfg(debug_assertions)]
pub const DEBUG_STALL_FOR: Duration = Duration::from_secs(8);

#[cfg(debug_assertions)]
fn arm_debug_stall(id: usize) {
    let wanted = std::env::var(DEBUG_STALL_SHARD_ENV).ok();
    if wanted.and_then(|v| v.trim().parse::<usize>().ok()) != Some(id) {
        return;
    }
    warn!(
        env = DEBUG_STALL_SHARD_ENV,
        "test-only fault injection: this shard will stall"
    );
    monoio::spawn(async move {
        monoio::time::sleep(DEBUG_PANIC_AFTER).await;
        // Blocks the shard's thread on purpose: nothing else runs here.
        std::thread::sleep(DEBUG_STALL_FOR);
    });
}

#[cfg(debug_assertions)]
fn arm_debug_failure(shard: &Rc<Shard>) {
    let wanted = std::env::var(DEBUG_FAIL_SHARD_ENV).ok();
    if wanted.and_then(|v| v.trim().parse::<usize>().ok()) != Some(shard.id.index()) {
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
                let busy = Instant::now();
                backoff = Duration::from_millis(5);
                if shard.draining.get() {
                    break;
                }
                // The handshake deadline starts now, not at the last tick.
                shard.tick();
                shard.on_accept(crate::sys::into_owned_fd(stream), peer);
                shard.flush_dirty();
                shard.metrics.add_busy(busy);
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

/// Waits for connection readiness (and, on the data ring, completed sends)
/// and acts on it: the only place a connection's socket is read.
pub(super) async fn poll_loop(shard: Rc<Shard>, waiter: crate::sys::FdWaiter) {
    let mut events = vec![crate::sys::empty_event(); EVENTS_BATCH];
    loop {
        let ready = if shard.io_more.replace(false) {
            // Work left by the last flush (`Shard::flush_dirty`): go on
            // with it once the other tasks (accept, the inbox) had a turn.
            yield_now().await;
            Ok(())
        } else {
            monoio::select! {
                r = waiter.ready() => r,
                _ = shard.more_io() => Ok(()),
            }
        };
        if let Err(e) = ready {
            return shard.fail(ShardFailure::new("polling connections failed", e));
        }
        let busy = Instant::now();
        shard.tick();
        match &shard.io {
            super::io::Io::Epoll(epoll) => loop {
                let n = match epoll.wait(&mut events) {
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
            },
            // Reaps the completions, acts on them, sends what they leave.
            super::io::Io::Ring(_) => shard.flush_dirty(),
        }
        shard.metrics.add_busy(busy);
    }
}

async fn sweep_loop(shard: Rc<Shard>) {
    let mut window = crate::metrics::BusyWindow::start(&shard.metrics);
    loop {
        monoio::time::sleep(Duration::from_millis(SWEEP_MS)).await;
        let busy = Instant::now();
        // The busy ratio of the period that just ended.
        window.roll(&shard.metrics, busy);
        shard.tick();
        shard.metrics.ticked_ms.store(
            crate::metrics::uptime_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
        shard.sweep();
        shard.forget_full_budgets();
        shard.flush_dirty();
        shard.metrics.add_busy(busy);
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
        // Busy from here to the yield (the waits above are not).
        let busy = Instant::now();
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
        shard.metrics.add_busy(busy);
        // Let connection tasks run between batches.
        yield_now().await;
    }
}

impl Shard {
    /// Takes in an accepted socket: registry, readiness, connection caps.
    /// TCP_NODELAY comes from the listener (Linux copies it to accepted
    /// sockets).
    pub(super) fn on_accept(
        self: &Rc<Self>,
        socket: std::os::fd::OwnedFd,
        peer: std::net::SocketAddr,
    ) {
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
        if let Err(e) = self.watch(&conn) {
            warn!(error = %e, "cannot watch a new connection");
            return;
        }
        debug!(conn = id.0, %peer, "accepted");
        self.conns.borrow_mut().insert(conn.clone());
        self.sync_gauges();
        // Counted from now on, or refused at once: a socket that never
        // sends its upgrade request must not escape the caps. A trusted
        // proxy's connection is counted once it names its client.
        if !self.trusts(peer.ip()) {
            super::upgrade::admit(self, &conn);
        }
    }

    /// Acts on one connection's readiness.
    pub(super) fn on_ready(self: &Rc<Self>, id: ConnId, events: u32) {
        let Some(conn) = self.conn(id) else { return };
        if events & crate::sys::EPOLLOUT != 0 {
            self.on_writable(&conn);
        }
        let hangup =
            events & (crate::sys::EPOLLRDHUP | crate::sys::EPOLLHUP | crate::sys::EPOLLERR);
        if events & !crate::sys::EPOLLOUT != 0
            && !super::input::on_readable(self, &conn, hangup != 0)
        {
            self.unwatch(&conn);
            super::input::finish(self, &conn);
        }
    }

    /// Records why this shard cannot go on and wakes the shard loop, which
    /// ends; the supervisor logs it and stops the node.
    pub(super) fn fail(&self, failure: ShardFailure) {
        tracing::error!(error = %failure, "shard failed");
        self.failure.borrow_mut().get_or_insert(failure);
        if let Some(w) = self.failure_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves once [`Shard::flush_dirty`] left work no readiness will
    /// show ([`Shard::io_left`]).
    async fn more_io(&self) {
        std::future::poll_fn(|cx| {
            if self.io_more.replace(false) {
                std::task::Poll::Ready(())
            } else {
                self.io_waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// Resolves once [`Shard::fail`] was called.
    pub(super) async fn failed(&self) {
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
}

/// Lets every other ready task of this shard run once before continuing.
pub(super) async fn yield_now() {
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
