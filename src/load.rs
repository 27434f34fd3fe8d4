//! The load generator behind `ringcast load`: real WebSocket clients on a
//! monoio runtime, measuring what users feel.
//!
//! - `fanout`: S subscribers on one topic, one publisher at R msg/s with
//!   B-byte payloads for D seconds: deliveries/s, expected vs received, and
//!   publish-to-deliver latency percentiles (HDR histogram). Publisher and
//!   subscribers share this process's clock, so latency needs no clock sync.
//!   With `--redis URL` the publisher is a producer instead: pipelined
//!   `XADD`s to the topic's partition stream on its own thread (the redis
//!   crate blocks), so latency is XADD -> subscriber.
//! - `idle`: S idle connections; the server's RSS (from /proc, by
//!   `--server-pid`) before and after, per connection, plus the kernel's
//!   TCP memory from /proc/net/sockstat.
//!
//! Connections bind round-robin to source addresses 127.0.0.1..=127.0.0.N
//! (`--source-ips N`) so one target port can take more than ~28k clients.
//! Every run is bounded in count and time and stops by itself.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::config::HumanDuration;
use crate::ws::frame::{encode_masked, Decoder, Message, OpCode};

/// Arguments of `ringcast load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Server address (host:port of the WebSocket listener).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: SocketAddr,
    /// Subscribers (fanout) or idle connections (idle).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Messages per second from the publisher (fanout).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Payload bytes per message (fanout).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// How long to publish (fanout) or hold (idle).
    #[arg(long, default_value = "10s")]
    pub duration: HumanDuration,
    /// Topic to use.
    #[arg(long, default_value = "load")]
    pub topic: String,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N to spread connections over.
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Server process id, to read its memory (idle).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Rounds of connect-then-close (connect).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Publish by `XADD` straight to this Redis (fanout), as a producer
    /// does, instead of the WebSocket `pub` op; the server must read the
    /// same Redis with the default partitions and key prefix.
    #[arg(long)]
    pub redis: Option<String>,
    /// Hard cap on the whole run; the tool exits with an error past it.
    #[arg(long, default_value = "120s")]
    pub timeout: HumanDuration,
}

/// Load scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// One topic, many subscribers, one publisher.
    Fanout,
    /// Many idle connections: memory per connection.
    Idle,
    /// Connect S clients, close them, `--rounds` times: handshakes per second.
    Connect,
}

/// Runs a scenario on a fresh single-thread runtime.
pub fn run(args: &LoadArgs) -> anyhow::Result<()> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(8192)
        .enable_timer()
        .build()
        .context("building the load runtime")?;
    let limit = args.timeout.0;
    rt.block_on(async {
        match monoio::time::timeout(limit, scenario(args)).await {
            Ok(r) => r,
            Err(_) => bail!("load run exceeded --timeout {limit:?}"),
        }
    })
}

async fn scenario(args: &LoadArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Fanout => fanout(args).await,
        Scenario::Idle => idle(args).await,
        Scenario::Connect => connect(args).await,
    }
}

/// One client connection of the load tool.
struct LoadConn {
    stream: TcpStream,
    buf: BytesMut,
    decoder: Decoder,
}

fn source_addr(i: usize, ips: u8) -> SocketAddr {
    let last = 1 + (i % usize::from(ips.max(1))) as u8;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)
}

impl LoadConn {
    /// Connects from `source`, upgrades, and reads the welcome frame.
    async fn open(target: SocketAddr, source: SocketAddr) -> anyhow::Result<LoadConn> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        crate::sys::bind_address_no_port(std::os::fd::AsRawFd::as_raw_fd(&sock))?;
        sock.bind(&source.into())?;
        sock.connect(&target.into())
            .with_context(|| format!("connecting to {target} from {source}"))?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        let stream = TcpStream::from_std(sock.into())?;
        let mut c = LoadConn {
            stream,
            buf: BytesMut::with_capacity(4096),
            decoder: Decoder::new_client(1 << 24),
        };
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: ringcast.v1\r\n\r\n"
        );
        c.write(req.into_bytes()).await?;
        loop {
            if let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !c.buf.starts_with(b"HTTP/1.1 101") {
                    bail!(
                        "upgrade refused: {}",
                        String::from_utf8_lossy(&c.buf[..end])
                    );
                }
                let _ = c.buf.split_to(end + 4);
                break;
            }
            c.fill().await?;
        }
        match c.next().await? {
            Message::Text(t) if has_op(&t, "welcome") => Ok(c),
            other => bail!("expected welcome, got {other:?}"),
        }
    }

    async fn write(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        let (res, _) = self.stream.write_all(bytes).await;
        res?;
        Ok(())
    }

    async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        let frame = encode_masked(
            OpCode::Text,
            true,
            text.as_bytes(),
            fastrand::u32(..).to_be_bytes(),
        );
        self.write(frame.to_vec()).await
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let chunk = vec![0u8; 16384];
        let (res, chunk) = self.stream.read(chunk).await;
        let n = res?;
        if n == 0 {
            bail!("server closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn next(&mut self) -> anyhow::Result<Message> {
        loop {
            match self.decoder.decode(&mut self.buf)? {
                Some(Message::Ping(p)) => {
                    let pong = encode_masked(OpCode::Pong, true, &p, [1, 2, 3, 4]);
                    self.write(pong.to_vec()).await?;
                }
                Some(m) => return Ok(m),
                None => self.fill().await?,
            }
        }
    }

    async fn subscribe(&mut self, topic: &str) -> anyhow::Result<()> {
        self.send_text(&format!(
            "{{\"op\":\"sub\",\"id\":1,\"topic\":\"{topic}\"}}"
        ))
        .await?;
        match self.next().await? {
            Message::Text(t) if has_op(&t, "ok") => Ok(()),
            other => bail!("subscribe failed: {other:?}"),
        }
    }
}

/// Whether a server frame's JSON says `"op":"<op>"` (key order may vary: the
/// baseline server sorts its keys).
fn has_op(frame: &[u8], op: &str) -> bool {
    let needle = format!("\"op\":\"{op}\"");
    frame.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Shared tallies of the fanout subscribers.
struct Tally {
    received: Cell<u64>,
    latency_us: RefCell<Histogram<u64>>,
    base: Instant,
}

/// Reads the `"t":NNN` stamp (µs since `base`) from a msg frame's payload.
fn stamp(payload: &[u8]) -> Option<u64> {
    let at = payload.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits = payload[at..].iter().take_while(|b| b.is_ascii_digit());
    Some(digits.fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

async fn connect_all(args: &LoadArgs) -> anyhow::Result<(Vec<LoadConn>, Duration)> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(args.connections);
    // Connect in waves so the listen backlog never overflows.
    const WAVE: usize = 256;
    let mut i = 0;
    while i < args.connections {
        let n = WAVE.min(args.connections - i);
        let wave: Vec<_> = (i..i + n)
            .map(|k| monoio::spawn(LoadConn::open(args.target, source_addr(k, args.source_ips))))
            .collect();
        for h in wave {
            conns.push(h.await?);
        }
        i += n;
    }
    Ok((conns, started.elapsed()))
}

async fn fanout(args: &LoadArgs) -> anyhow::Result<()> {
    let (mut subs, connect_time) = connect_all(args).await?;
    for s in &mut subs {
        s.subscribe(&args.topic).await?;
    }
    let tally = Rc::new(Tally {
        received: Cell::new(0),
        latency_us: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        base: Instant::now(),
    });
    for s in subs {
        monoio::spawn(subscriber(s, tally.clone()));
    }
    let pad = "x".repeat(args.size.saturating_sub(24));
    let published = match &args.redis {
        Some(url) => publish_redis(url, args, &pad, tally.base).await?,
        None => {
            let mut publisher =
                LoadConn::open(args.target, source_addr(0, args.source_ips)).await?;
            publish(&mut publisher, args, &pad, &tally).await?
        }
    };
    let expected = published * args.connections as u64;
    // Give in-flight messages up to 5 s to land.
    let settle = Instant::now();
    while tally.received.get() < expected && settle.elapsed() < Duration::from_secs(5) {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = args.duration.0.as_secs_f64() + settle.elapsed().as_secs_f64();
    report_fanout(args, published, expected, &tally, elapsed, connect_time);
    Ok(())
}

async fn subscriber(mut c: LoadConn, tally: Rc<Tally>) {
    while let Ok(m) = c.next().await {
        if let Message::Text(t) = m {
            if let Some(sent) = stamp(&t) {
                let now = tally.base.elapsed().as_micros() as u64;
                let _ = tally
                    .latency_us
                    .borrow_mut()
                    .record(now.saturating_sub(sent).max(1));
                tally.received.set(tally.received.get() + 1);
            }
        }
    }
}

/// Publishes at `rate` for `duration` in 1 ms ticks; returns how many were sent.
async fn publish(
    p: &mut LoadConn,
    args: &LoadArgs,
    pad: &str,
    tally: &Tally,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < args.duration.0 {
        let due = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
        let mut batch = Vec::new();
        while sent < due {
            let t = tally.base.elapsed().as_micros();
            let body = format!(
                "{{\"op\":\"pub\",\"topic\":\"{}\",\"data\":{{\"t\":{t},\"p\":\"{pad}\"}}}}",
                args.topic
            );
            batch.extend_from_slice(&encode_masked(
                OpCode::Text,
                true,
                body.as_bytes(),
                [9, 8, 7, 6],
            ));
            sent += 1;
        }
        if !batch.is_empty() {
            p.write(batch).await?;
        }
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(sent)
}

/// Publishes like [`publish`], by pipelined `XADD` on a thread of its own
/// (one pipeline per 1 ms tick) while this runtime keeps reading.
async fn publish_redis(
    url: &str,
    args: &LoadArgs,
    pad: &str,
    base: Instant,
) -> anyhow::Result<u64> {
    let d = crate::config::Config::default();
    let settings = crate::broker::redis::Settings {
        url: url.to_owned(),
        partitions: d.redis_partitions,
        key_prefix: d.redis_key_prefix,
        maxlen: d.redis_maxlen,
        cache_size: 0,
    };
    let mut conn = crate::broker::redis::connect(url, Some(Duration::from_secs(5)))
        .with_context(|| format!("connecting to {url}"))?;
    let (topic, pad, rate, duration) = (
        args.topic.clone(),
        pad.to_owned(),
        args.rate,
        args.duration.0,
    );
    let thread = std::thread::Builder::new().name("load-xadd".into()).spawn(
        move || -> anyhow::Result<u64> {
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < duration {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                let mut cmds = Vec::new();
                while sent + (cmds.len() as u64) < due {
                    let t = base.elapsed().as_micros();
                    let data = format!("{{\"t\":{t},\"p\":\"{pad}\"}}");
                    cmds.push(crate::broker::redis::xadd_cmd(
                        &settings, &topic, None, &data,
                    ));
                }
                if !cmds.is_empty() {
                    let n = cmds.len() as u64;
                    for v in conn.pipeline_each(cmds).context("XADD pipeline")? {
                        if let ::redis::Value::ServerError(e) = v {
                            bail!("XADD refused: {e:?}");
                        }
                    }
                    sent += n;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(sent)
        },
    )?;
    while !thread.is_finished() {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the XADD thread panicked"))?
}

fn report_fanout(
    args: &LoadArgs,
    published: u64,
    expected: u64,
    tally: &Tally,
    secs: f64,
    connect: Duration,
) {
    let h = tally.latency_us.borrow();
    let received = tally.received.get();
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "fanout  subscribers={} rate={}/s size={}B duration={:?}\n\
         connect  {:.3}s for {} clients\n\
         published {published}  expected {expected}  received {received}  ({:.4}%)\n\
         deliveries/s {:.0}\n\
         latency ms  p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        args.connections,
        args.rate,
        args.size,
        args.duration.0,
        connect.as_secs_f64(),
        args.connections,
        100.0 * received as f64 / expected.max(1) as f64,
        received as f64 / secs,
        q(0.5),
        q(0.99),
        q(0.999),
        h.max() as f64 / 1000.0,
    );
    println!(
        "{{\"scenario\":\"fanout\",\"subscribers\":{},\"rate\":{},\"size\":{},\"published\":{published},\
         \"expected\":{expected},\"received\":{received},\"deliveries_per_s\":{:.0},\"p50_ms\":{:.3},\
         \"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\"connect_s\":{:.3}}}",
        args.connections,
        args.rate,
        args.size,
        received as f64 / secs,
        q(0.5),
        q(0.99),
        q(0.999),
        h.max() as f64 / 1000.0,
        connect.as_secs_f64()
    );
}

/// Connects and closes `--connections` clients `--rounds` times. Even
/// rounds close with a close frame, odd rounds just drop the socket.
async fn connect(args: &LoadArgs) -> anyhow::Result<()> {
    let mut rates = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        let (conns, took) = connect_all(args).await?;
        rates.push(conns.len() as f64 / took.as_secs_f64());
        for mut c in conns {
            if round % 2 == 0 {
                let close =
                    encode_masked(OpCode::Close, true, &1000u16.to_be_bytes(), [1, 2, 3, 4]);
                let _ = c.write(close.to_vec()).await;
            }
        }
    }
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    println!(
        "connect  {} rounds x {} clients  handshakes/s median {:.0}  min {:.0}  max {:.0}",
        args.rounds,
        args.connections,
        median,
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0)
    );
    println!(
        "{{\"scenario\":\"connect\",\"rounds\":{},\"connections\":{},\"handshakes_per_s_median\":{median:.0}}}",
        args.rounds, args.connections
    );
    Ok(())
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Kernel TCP memory in pages, from /proc/net/sockstat.
fn tcp_mem_pages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

async fn idle(args: &LoadArgs) -> anyhow::Result<()> {
    let pid = args
        .server_pid
        .context("idle needs --server-pid to read the server's memory")?;
    let before = rss_bytes(pid).context("cannot read the server's /proc status")?;
    let kmem_before = tcp_mem_pages().unwrap_or(0);
    let (conns, connect_time) = connect_all(args).await?;
    // Let the server settle (allocator, lazy structures), then measure.
    monoio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_bytes(pid).context("cannot read the server's /proc status")?;
    let kmem_after = tcp_mem_pages().unwrap_or(0);
    let n = conns.len() as f64;
    let per_conn = after.saturating_sub(before) as f64 / n;
    // Both ends of every loopback connection are on this machine: halve.
    let kernel_per_conn = (kmem_after.saturating_sub(kmem_before) * 4096) as f64 / n / 2.0;
    println!(
        "idle  connections={} connect={:.3}s\nserver RSS  before {:.1} MiB  after {:.1} MiB  per connection {:.0} B\n\
         kernel TCP memory per connection (sockstat, one side) {:.0} B",
        conns.len(),
        connect_time.as_secs_f64(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per_conn,
        kernel_per_conn
    );
    println!(
        "{{\"scenario\":\"idle\",\"connections\":{},\"connect_s\":{:.3},\"rss_before\":{before},\"rss_after\":{after},\
         \"bytes_per_conn\":{per_conn:.0},\"kernel_bytes_per_conn\":{kernel_per_conn:.0}}}",
        conns.len(),
        connect_time.as_secs_f64()
    );
    monoio::time::sleep(args.duration.0.min(Duration::from_secs(60))).await;
    drop(conns);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_read_from_the_payload() {
        assert_eq!(
            stamp(br#"{"op":"msg","data":{"t":12345,"p":"x"}}"#),
            Some(12345)
        );
        assert_eq!(stamp(b"{}"), None);
    }

    #[test]
    fn sources_rotate_over_loopback_addresses() {
        assert_eq!(source_addr(0, 3).ip().to_string(), "127.0.0.1");
        assert_eq!(source_addr(4, 3).ip().to_string(), "127.0.0.2");
        assert_eq!(source_addr(7, 0).ip().to_string(), "127.0.0.1");
    }
}
