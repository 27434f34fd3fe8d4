//! Starting and stopping a node: bind the listeners (refusing a port another
//! process holds), build the broker and the bus, start one shard thread per
//! core and the admin endpoint, then supervise: a signal starts the drain,
//! a shard that dies unexpectedly ends the process with status 1.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use anyhow::{bail, Context as _};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{error, info, warn};

use crate::auth::{Claims, Verifier};
use crate::broker::memory::{MemoryBroker, Retention};
use crate::broker::redis::{self, RedisBroker};
use crate::broker::Broker;
use crate::bus::{self, Bus};
use crate::config::Config;
use crate::metrics::{BrokerMetrics, ShardMetrics, Totals};
use crate::shard::{self, ShardSetup};

/// Pending connections the kernel queues per shard listener (capped by
/// `net.core.somaxconn`; `ringcast doctor` checks it).
pub const LISTEN_BACKLOG: i32 = 4096;

/// File descriptors a node needs besides one per connection: listeners,
/// epoll and io_uring instances, signal and admin sockets, Redis
/// connections. `serve` warns, and `ringcast doctor` warns, when the
/// open-file limit is below `max_connections` plus this.
pub const FD_RESERVE: u64 = 64;

/// Runs a node until it is drained by SIGTERM/SIGINT. Prints one line to
/// stdout when ready: `ringcast ready ws=ADDR admin=ADDR|off`.
pub fn run(config: Arc<Config>) -> anyhow::Result<()> {
    // Starts the clock every liveness stamp is read against.
    crate::metrics::uptime_ms();
    if !config.huge_pages {
        // Before the shards start their heaps; see Config::huge_pages.
        if let Err(e) = crate::sys::disable_transparent_huge_pages() {
            warn!(error = %e, "cannot turn transparent huge pages off");
        }
    }
    raise_open_file_limit(config.max_connections);
    let listeners = bind_listeners(config.listen, config.shards)?;
    let local = listeners[0].local_addr()?;
    let metrics: Vec<Arc<ShardMetrics>> = (0..config.shards).map(|_| Arc::default()).collect();
    let (senders, inboxes): (Vec<_>, Vec<_>) =
        metrics.iter().map(|m| bus::inbox(m.clone())).unzip();
    let bus = Bus::new(senders);
    let retention = Retention {
        size: config.history_size,
        ttl: config.history_ttl,
        idempotency_window: config.idempotency_window,
    };
    let broker_metrics = Arc::new(BrokerMetrics::default());
    // Config::check validated them; a Config built another way is refused
    // here, never replaced by the implicit namespace.
    let namespaces = crate::namespace::Namespaces::from_config(&config.namespaces)
        .map_err(|e| anyhow::anyhow!("invalid namespaces: {}", e.join("; ")))?;
    let redis = redis_settings(&config);
    let broker: Arc<dyn Broker> = match redis.clone() {
        Some(settings) => {
            warn_ignored_history(&config);
            Arc::new(
                RedisBroker::start(
                    settings,
                    config.outbound_queue,
                    bus.clone(),
                    broker_metrics.clone(),
                )
                .context("starting the Redis Streams broker")?,
            )
        }
        None => Arc::new(
            MemoryBroker::start(bus.clone(), retention, &namespaces)
                .context("starting the embedded broker")?,
        ),
    };
    let presence = if namespaces.any_presence() {
        let world = match redis {
            Some(settings) => crate::presence::World::Redis(settings),
            None => crate::presence::World::Embedded(broker.clone()),
        };
        let settings = crate::presence::Settings {
            node_name: config.node_name.clone(),
            ttl: config.presence_ttl,
            leave_delay: config.presence_leave_delay,
        };
        let p = crate::presence::Presence::start(
            settings,
            world,
            namespaces.clone(),
            bus.clone(),
            broker_metrics.clone(),
        )
        .context("starting presence")?;
        Some(p)
    } else {
        None
    };
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !config.stats_log_interval.is_zero() {
        spawn_stats_log(
            config.stats_log_interval,
            metrics.clone(),
            broker_metrics.clone(),
        )?;
    }
    let admin = match config.admin_listen {
        Some(addr) => {
            let admin = crate::admin::Admin {
                shards: metrics.clone(),
                broker_metrics,
                broker: broker.clone(),
                bus: bus.clone(),
                draining: draining.clone(),
                config: config.clone(),
                namespaces: namespaces.clone(),
            };
            Some(crate::admin::spawn(addr, admin).context("starting the admin endpoint")?)
        }
        None => None,
    };
    if config.allow_anonymous {
        warn!("anonymous mode: every client may subscribe and publish to every topic");
    }
    let (auth, dev_token) = verifier(&config)?;
    let node_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (exit_tx, exit_rx) = mpsc::channel::<(usize, ShardExit)>();
    for (id, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let setup = ShardSetup {
            id: crate::id::ShardId(id as u16),
            config: config.clone(),
            broker: broker.clone(),
            metrics: metrics[id].clone(),
            inbox,
            listener,
            auth: auth.clone(),
            node_connections: node_connections.clone(),
            namespaces: namespaces.clone(),
            presence: presence.clone(),
        };
        let tx = exit_tx.clone();
        thread::Builder::new()
            .name(format!("shard-{id}-supervisor"))
            .spawn(move || {
                let exit = match shard::spawn(setup).map(|h| h.join()) {
                    Ok(Ok(Ok(()))) => ShardExit::Stopped,
                    Ok(Ok(Err(failure))) => ShardExit::Failed(failure.to_string()),
                    Ok(Err(_)) => ShardExit::Panicked,
                    Err(e) => ShardExit::Failed(format!("cannot start the shard thread: {e}")),
                };
                let _ = tx.send((id, exit));
            })?;
    }
    drop(exit_tx);
    watch_signals(
        bus.clone(),
        config.drain_window.as_millis() as u64,
        draining.clone(),
    )?;
    let admin_text = admin.map_or_else(|| "off".to_string(), |a| a.to_string());
    info!(ws = %local, admin = %admin_text, shards = config.shards, node = %config.node_name, "ready");
    println!("ringcast ready ws={local} admin={admin_text}");
    if let Some(token) = dev_token {
        // Printed, never logged: it is only as secret as this terminal.
        println!("ringcast dev-token {token}");
        println!(
            "  (no --auth-hmac-secret, --auth-public-key or --auth-jwks given: this token is \
             signed with an ephemeral secret made at start, valid 24 h, for user \"dev\" and \
             every topic; connect with ws://{local}/ws?token=TOKEN. Configure a real key for \
             production.)"
        );
    }
    let _ = std::io::stdout().flush();
    let result = supervise(&exit_rx, config.shards, &draining, &bus);
    if let Some(p) = presence {
        // Clients were told to reconnect within the drain window: hold
        // their leaves past it, so one that reconnects elsewhere never
        // leaves.
        let hold = config.drain_window + config.presence_leave_delay;
        p.stop(hold, std::time::Duration::from_secs(3));
    }
    result
}

/// Logs one `stats` line (info) every `interval`: connections and
/// subscriptions now; deliveries per second, drops and errors over the
/// interval (`metrics::Totals`). A thread of its own reading the same
/// atomics as `/metrics`; it ends with the process.
fn spawn_stats_log(
    interval: std::time::Duration,
    shards: Vec<Arc<ShardMetrics>>,
    broker: Arc<BrokerMetrics>,
) -> anyhow::Result<()> {
    let mut last = (std::time::Instant::now(), Totals::read(&shards, &broker));
    thread::Builder::new()
        .name("stats-log".into())
        .spawn(move || loop {
            thread::sleep(interval);
            let (at, now) = (std::time::Instant::now(), Totals::read(&shards, &broker));
            let secs = at.duration_since(last.0).as_secs_f64().max(1e-3);
            let per_s = now.delivered.saturating_sub(last.1.delivered) as f64 / secs;
            info!(
                connections = now.connections,
                subscriptions = now.subscriptions,
                deliveries_per_s = (per_s * 10.0).round() / 10.0,
                drops = now.dropped.saturating_sub(last.1.dropped),
                errors = now.errors.saturating_sub(last.1.errors),
                "stats"
            );
            last = (at, now);
        })
        .context("starting the stats log thread")?;
    Ok(())
}

/// One descriptor per connection: raises the soft open-file limit to the
/// hard one (the default soft limit, 1024, would stop the node near a
/// thousand clients), and warns when even that cannot hold
/// `max_connections`: accepts past it fail with EMFILE.
fn raise_open_file_limit(max_connections: usize) {
    let needed = max_connections as u64 + FD_RESERVE;
    match crate::sys::raise_nofile_limit() {
        Ok(limit) if limit < needed => warn!(
            limit,
            needed,
            "open-file limit below --max-connections: raise LimitNOFILE (tuning/README.md, \
             `ringcast doctor`)"
        ),
        Ok(limit) => info!(limit, "open-file limit"),
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// How a shard thread ended.
#[derive(Debug)]
enum ShardExit {
    /// Its loop ended: after the drain, or (unexpected) without one.
    Stopped,
    /// It reported why it could not go on.
    Failed(String),
    /// It panicked.
    Panicked,
}

/// How long the other shards get to close their clients (drain frame,
/// close 1001) after one shard failed, before the process exits 1.
const FAILURE_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The Redis broker's settings, or `None` for the embedded broker.
fn redis_settings(config: &Config) -> Option<redis::Settings> {
    Some(redis::Settings {
        url: config.redis.clone()?,
        keys: redis::Keys::new(
            &config.redis_key_prefix,
            config.redis_partitions,
            config.redis_key_layout,
        ),
        maxlen: config.redis_maxlen,
        cache_size: config.redis_cache_size,
        idempotency_window: config.idempotency_window,
    })
}

/// Namespaces' `history_size` / `history_ttl` shape the embedded broker's
/// per-topic history only; with Redis, history is the partition stream
/// (`--redis-maxlen`). Say so rather than ignore them silently.
fn warn_ignored_history(config: &Config) {
    let named: Vec<&str> = config
        .namespaces
        .iter()
        .filter(|n| n.history_size.is_some() || n.history_ttl.is_some())
        .map(|n| n.name.as_str())
        .collect();
    if !named.is_empty() {
        warn!(
            namespaces = ?named,
            "namespace history_size / history_ttl are ignored with --redis: history is per \
             partition stream (--redis-maxlen), shared by every topic of the partition"
        );
    }
}

/// Builds the token verifier from the settings. With no key configured
/// (and not anonymous), makes an ephemeral secret and a development token.
fn verifier(config: &Config) -> anyhow::Result<(Option<Arc<Verifier>>, Option<String>)> {
    let (iss, aud) = (
        config.auth_issuer.as_deref(),
        config.auth_audience.as_deref(),
    );
    if let Some(secret) = &config.auth_hmac_secret {
        return Ok((
            Some(Arc::new(Verifier::hmac(secret.as_bytes(), iss, aud))),
            None,
        ));
    }
    if let Some(path) = &config.auth_public_key {
        let pem = std::fs::read(path)
            .with_context(|| format!("auth_public_key: cannot read {}", path.display()))?;
        let alg = match config.auth_algorithm.as_str() {
            "ES256" => jsonwebtoken::Algorithm::ES256,
            _ => jsonwebtoken::Algorithm::RS256,
        };
        let v = Verifier::public_key(&pem, alg, iss, aud)
            .map_err(|e| anyhow::anyhow!("auth_public_key: {e}"))?;
        return Ok((Some(Arc::new(v)), None));
    }
    if let Some(path) = &config.auth_jwks {
        let json = std::fs::read(path)
            .with_context(|| format!("auth_jwks: cannot read {}", path.display()))?;
        let v = Verifier::jwks(&json, iss, aud).map_err(|e| anyhow::anyhow!("auth_jwks: {e}"))?;
        return Ok((Some(Arc::new(v)), None));
    }
    if config.allow_anonymous || config.echo {
        return Ok((None, None));
    }
    let secret = crate::auth::random_secret().context("making an ephemeral auth secret")?;
    let claims = Claims {
        sub: "dev".into(),
        exp: crate::auth::now_secs() + 24 * 3600,
        subs: vec!["#".into()],
        pubs: vec!["#".into()],
    };
    // With --auth-issuer / --auth-audience the token must carry them too.
    let token = crate::auth::mint_hmac_for(secret.as_bytes(), &claims, iss, aud);
    warn!("no auth key configured: using an ephemeral secret; see the development token on stdout");
    Ok((
        Some(Arc::new(Verifier::hmac(secret.as_bytes(), iss, aud))),
        Some(token),
    ))
}

/// Waits for the shards. Every shard ending after the drain is a clean
/// stop; one that fails, panics or ends without a drain stops the node:
/// logged, the other shards told to close their clients (a drain with no
/// window, so clients reconnect elsewhere at once), then exit 1 once they
/// did or after [`FAILURE_STOP_GRACE`].
fn supervise(
    exits: &mpsc::Receiver<(usize, ShardExit)>,
    shards: usize,
    draining: &std::sync::atomic::AtomicBool,
    bus: &Bus,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::AcqRel;
    for stopped in 0..shards {
        let Ok((id, exit)) = exits.recv() else { break };
        let why = match exit {
            ShardExit::Stopped if draining.load(std::sync::atomic::Ordering::Acquire) => continue,
            ShardExit::Stopped => "exited unexpectedly".to_string(),
            ShardExit::Failed(failure) => format!("failed: {failure}"),
            ShardExit::Panicked => "panicked".to_string(),
        };
        error!(shard = id, "shard {why}; stopping the node");
        if !draining.swap(true, AcqRel) {
            bus.drain(0);
        }
        let deadline = std::time::Instant::now() + FAILURE_STOP_GRACE;
        for _ in stopped + 1..shards {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if exits.recv_timeout(left).is_err() {
                break;
            }
        }
        bail!("shard {id} {why}; stopping the node");
    }
    info!("drained; bye");
    Ok(())
}

fn watch_signals(
    bus: Bus,
    window_ms: u64,
    draining: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if draining.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    warn!(signal = sig, "second signal: exiting now");
                    std::process::exit(1);
                }
                info!(signal = sig, window_ms, "draining");
                bus.drain(window_ms);
            }
        })?;
    Ok(())
}

/// Binds one SO_REUSEPORT listener per shard. A port held by another
/// process is refused: SO_REUSEPORT would otherwise quietly share it.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpListener>> {
    if addr.port() != 0 {
        // The probe has no SO_REUSEPORT, so it fails on any socket bound there.
        // Closed connections lingering in FIN_WAIT2 also fail the probe, so
        // a failure counts only when a socket is really listening there.
        let probe = new_socket(addr, false)?;
        if let Err(e) = probe.bind(&addr.into()) {
            if e.kind() != std::io::ErrorKind::AddrInUse || someone_listens_on(addr).unwrap_or(true)
            {
                bail!("listen: cannot bind {addr}: {e} (is another process using it?)");
            }
        }
    }
    let mut out = Vec::with_capacity(n);
    let mut bound = addr;
    for _ in 0..n {
        let s = new_socket(bound, true)?;
        s.bind(&bound.into())
            .with_context(|| format!("listen: cannot bind {bound}"))?;
        s.listen(LISTEN_BACKLOG)
            .with_context(|| format!("listen: cannot listen on {bound}"))?;
        s.set_nonblocking(true)?;
        // Accepted sockets inherit TCP_NODELAY on Linux: one setsockopt
        // here instead of one per connection.
        s.set_nodelay(true)?;
        let l: TcpListener = s.into();
        bound = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Whether /proc/net/tcp{,6} shows a listening socket on `addr`'s port at
/// `addr`'s IP or a wildcard. `None` when /proc cannot be read.
fn someone_listens_on(addr: SocketAddr) -> Option<bool> {
    let mut any_read = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        any_read = true;
        if table_has_listener(&text, addr) {
            return Some(true);
        }
    }
    any_read.then_some(false)
}

/// Whether a /proc/net/tcp or /proc/net/tcp6 table (its whole text, header
/// line first) has a socket in LISTEN on `addr`'s port whose local address
/// conflicts with `addr`: the same IP (an IPv4 address also in its
/// IPv4-mapped IPv6 form, and back), a wildcard, or any IP when `addr`
/// itself is a wildcard.
fn table_has_listener(table: &str, addr: SocketAddr) -> bool {
    const LISTEN: &str = "0A";
    let port = format!("{:04X}", addr.port());
    let mut same = vec![proc_net_hex(addr.ip())];
    match addr.ip() {
        IpAddr::V4(v4) => same.push(proc_net_hex(IpAddr::V6(v4.to_ipv6_mapped()))),
        IpAddr::V6(v6) => same.extend(v6.to_ipv4_mapped().map(|v4| proc_net_hex(v4.into()))),
    }
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let (Some(local), Some(_remote), Some(state)) = (cols.nth(1), cols.next(), cols.next())
        else {
            return false;
        };
        let Some((ip, p)) = local.rsplit_once(':') else {
            return false;
        };
        let wildcard = ip.bytes().all(|b| b == b'0');
        let same_ip = same.iter().any(|s| s.eq_ignore_ascii_case(ip));
        state == LISTEN && p == port && (wildcard || same_ip || addr.ip().is_unspecified())
    })
}

/// An IP address as /proc/net/tcp{,6} print it: each 32-bit word of the
/// address (one for IPv4, four for IPv6) in host byte order, as `%08X`.
fn proc_net_hex(ip: IpAddr) -> String {
    let octets = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    octets
        .chunks_exact(4)
        .map(|w| {
            let mut word = [0u8; 4];
            word.copy_from_slice(w);
            format!("{:08X}", u32::from_ne_bytes(word))
        })
        .collect()
}

fn new_socket(addr: SocketAddr, reuse_port: bool) -> anyhow::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        // Shards never set TCP_NODELAY per connection; this is why they may not.
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listeners[0].set_nonblocking(false).unwrap();
        let (accepted, _) = listeners[0].accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn a_port_held_elsewhere_is_refused() {
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_listeners(other.local_addr().unwrap(), 2).unwrap_err();
        assert!(
            err.to_string().contains("is another process using it"),
            "{err}"
        );
    }

    /// /proc/net/tcp6 as Linux prints it (x86, little-endian): a listener
    /// on [::1]:8080, one on [2001:db8::5]:8080, one on [::ffff:127.0.0.1]:9000,
    /// one on [::]:7000, and an established connection on port 8081.
    #[cfg(target_endian = "little")]
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41 1 0000000000000000 100 0 0 10 0
   1: B80D0120000000000000000005000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 42 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 43 1 0000000000000000 100 0 0 10 0
   3: 00000000000000000000000000000000:1B58 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 44 1 0000000000000000 100 0 0 10 0
   4: 00000000000000000000000001000000:1F91 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000  1000        0 45 1 0000000000000000 20 4 30 10 -1
";

    #[cfg(target_endian = "little")]
    #[test]
    fn proc_net_hex_matches_the_kernel_format() {
        assert_eq!(proc_net_hex("127.0.0.1".parse().unwrap()), "0100007F");
        assert_eq!(
            proc_net_hex("::1".parse().unwrap()),
            "00000000000000000000000001000000"
        );
        assert_eq!(
            proc_net_hex("2001:db8::5".parse().unwrap()),
            "B80D0120000000000000000005000000"
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn specific_ipv6_listeners_are_found_in_tcp6() {
        let at = |a: &str| table_has_listener(TCP6, a.parse().unwrap());
        assert!(at("[::1]:8080"));
        assert!(at("[2001:db8::5]:8080"));
        assert!(at("[2001:DB8:0::5]:8080"), "any spelling of the address");
        assert!(!at("[2001:db8::6]:8080"), "another address, same port");
        assert!(!at("[::1]:8081"), "established, not listening");
        assert!(!at("[::1]:8082"), "nothing there");
        // The IPv4-mapped form and IPv4 conflict both ways.
        assert!(at("127.0.0.1:9000"));
        assert!(at("[::ffff:127.0.0.1]:9000"));
        assert!(!at("127.0.0.2:9000"));
        // A wildcard listener conflicts with every address; a wildcard
        // address with every listener on its port.
        assert!(at("[2001:db8::7]:7000"));
        assert!(at("10.0.0.1:7000"));
        assert!(at("[::]:8080"));
    }

    #[test]
    fn an_ipv6_port_held_elsewhere_is_refused() {
        // Needs IPv6 on loopback; without it there is nothing to refuse.
        let Ok(other) = TcpListener::bind("[::1]:0") else {
            eprintln!("no IPv6 loopback here: skipping");
            return;
        };
        let addr = other.local_addr().unwrap();
        assert_eq!(someone_listens_on(addr), Some(true));
        let err = bind_listeners(addr, 2).unwrap_err();
        assert!(
            err.to_string().contains("is another process using it"),
            "{err}"
        );
        drop(other);
        assert_eq!(someone_listens_on(addr), Some(false));
    }

    #[test]
    fn port_zero_binds_every_shard_to_one_port() {
        let ls = bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }
}
