//! The load generator behind `ringcast load`: real WebSocket clients,
//! measuring what users feel.
//!
//! Scenarios:
//! - `fanout`: S subscribers on one topic, one publisher at R msg/s with
//!   B-byte payloads for D seconds: deliveries/s, expected vs received, and
//!   publish-to-deliver latency percentiles (HDR histogram).
//! - `topics`: S subscribers spread over T topics (subscriber i on topic
//!   i mod T, e.g. one topic per user), `--publishers` connections
//!   publishing round-robin over the topics at R msg/s in all.
//! - `idle`: S idle connections: the server's RSS per connection (from
//!   /proc, by `--server-pid`) and the kernel's socket and slab memory.
//! - `connect`: S clients connected, then closed, `--rounds` times:
//!   handshakes per second and the time to connect all S. Each round
//!   connects from source addresses of its own (a fresh set of clients, no
//!   4-tuple the server may still hold from the round before) after a
//!   [`ROUND_PAUSE`] that lets the server finish the previous round's closes.
//! - `ramp`: `fanout` (or `topics` with `--topics`) at rising rates,
//!   `--step` times more each step, until deliveries fall behind or p99
//!   passes `--p99-bound`: the maximum sustained deliveries per second.
//!
//! Shape: the subscribers live in worker processes (`--procs`, by default
//! one per 16,000 connections, since a process here may hold only ~20,000
//! fds), each driving its connections with one epoll loop and one read
//! buffer (`worker.rs`); connections bind round-robin to source addresses
//! 127.0.0.1 ..= 127.0.0.N (`--source-ips`) so one server port can take more
//! than the ~28,000 ephemeral ports of one address. The parent publishes
//! (`publish.rs`), over WebSocket or, with `--redis`, by `XADD` as a producer
//! does; payloads carry their CLOCK_MONOTONIC send time, one clock for every
//! process on the machine, so latency needs no clock sync. Every run is
//! bounded by `--timeout` and stops by itself; workers exit when the parent
//! does. Output: a table for people, then one JSON line per result.

/// `println!` that does not panic when stdout is gone (`... | head`).
macro_rules! out {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod publish;
mod tally;
mod worker;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::config::HumanDuration;
use publish::{Publisher, Sent, Via};
use tally::Tally;

/// Connections per worker process when `--procs` is not given: under the
/// ~20,000 fds a process may hold here, with room for the rest.
const PER_PROC: usize = 16_000;
/// Connections per source address: under the ~28,000 ephemeral ports.
const PER_SOURCE_IP: usize = 25_000;

/// Arguments of `ringcast load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Server address (host:port of the WebSocket listener).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: SocketAddr,
    /// Subscribers (fanout, topics, ramp) or connections (idle, connect).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Messages per second, all publishers together (the first step of `ramp`).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// How long to publish (each step, for ramp) or to hold (idle).
    #[arg(long, default_value = "10s")]
    pub duration: HumanDuration,
    /// Topic (fanout), or the prefix of the topics `PREFIX.0`, `PREFIX.1`, ...
    #[arg(long, default_value = "load")]
    pub topic: String,
    /// Topics (topics scenario; default 100; ramp: default 1).
    #[arg(long)]
    pub topics: Option<usize>,
    /// Publishing connections (topics and ramp), each taking a share of the
    /// topics and of the rate.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N to spread connections
    /// over (raised to one per 25,000 connections when lower).
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Worker processes holding the connections (0: one per 16,000).
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    /// Server process id, to read its memory (idle).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Rounds of connect-then-close (connect).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Publish by `XADD` straight to this Redis, as a producer does,
    /// instead of the WebSocket `pub` op; the server must read the same
    /// Redis with the default partitions and key prefix.
    #[arg(long)]
    pub redis: Option<String>,
    /// A token for every connection (`?token=`), for servers that require one.
    #[arg(long)]
    pub token: Option<String>,
    /// How long to wait after publishing for every message to land.
    #[arg(long, default_value = "5s")]
    pub settle: HumanDuration,
    /// Ramp: rate multiplier per step.
    #[arg(long, default_value_t = 1.5)]
    pub step: f64,
    /// Ramp: stop past this rate (msg/s).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_rate: u64,
    /// Ramp: a step whose p99 latency passes this bound (ms) has fallen behind.
    #[arg(long, default_value_t = 100.0)]
    pub p99_bound: f64,
    /// Hard cap on the whole run; the tool exits with an error past it.
    #[arg(long, default_value = "120s")]
    pub timeout: HumanDuration,
    /// Worker only: global index of this worker's first connection.
    #[arg(long, default_value_t = 0, hide = true)]
    pub worker_first: usize,
    /// Worker only: subscribe each connection after `welcome`.
    #[arg(long, hide = true)]
    pub worker_subscribe: bool,
    /// Worker only: run connect-then-close rounds, one per `next` command.
    #[arg(long, hide = true)]
    pub rounds_mode: bool,
}

/// Load scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// One topic, many subscribers, one publisher.
    Fanout,
    /// Many topics (subscriber i on topic i mod T), publishers spread over them.
    Topics,
    /// Many idle connections: memory per connection.
    Idle,
    /// Connect S clients, close them, `--rounds` times: handshakes per second.
    Connect,
    /// Rising publish rates until delivery falls behind: the maximum sustained rate.
    Ramp,
    /// A worker process, started by the others (not for direct use).
    #[value(hide = true)]
    Worker,
}

/// Runs a scenario.
pub fn run(args: &LoadArgs) -> anyhow::Result<()> {
    if args.scenario == Scenario::Worker {
        return worker::run(args);
    }
    let mut args = args.clone();
    let needed = args.connections.div_ceil(PER_SOURCE_IP).clamp(1, 254) as u8;
    args.source_ips = args.source_ips.max(needed);
    watchdog(args.timeout.0);
    match args.scenario {
        Scenario::Fanout | Scenario::Topics => deliver(&args),
        Scenario::Ramp => ramp(&args),
        Scenario::Idle => idle(&args),
        Scenario::Connect => connect(&args),
        Scenario::Worker => unreachable!("handled above"),
    }
}

/// Ends the process past `--timeout`; the workers see their stdin close and exit too.
fn watchdog(limit: Duration) {
    let _ = std::thread::Builder::new()
        .name("load-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!("load: the run exceeded --timeout {limit:?}");
            std::process::exit(1);
        });
}

/// The source address of connection `i`: 127.0.0.1 ..= 127.0.0.N.
fn source_addr(i: usize, ips: u8) -> SocketAddr {
    let last = 1 + (i % usize::from(ips.max(1))) as u8;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)
}

/// The source address of connection `i` in `connect` round `round` (0 in
/// every other scenario): round r uses the `ips` addresses after those of
/// round r-1 (wrapping past 127.0.0.254), so a round never reuses a 4-tuple
/// of the round before while the server may still be closing it.
fn round_source(round: usize, i: usize, ips: u8) -> SocketAddr {
    let ips = usize::from(ips.max(1));
    source_addr(round * ips + i % ips, 254)
}

/// The topics of a run: `--topic` alone, or `PREFIX.0 .. PREFIX.T-1`.
fn topic_names(args: &LoadArgs) -> Vec<String> {
    match topic_count(args) {
        1 => vec![args.topic.clone()],
        n => (0..n).map(|i| format!("{}.{i}", args.topic)).collect(),
    }
}

fn topic_count(args: &LoadArgs) -> usize {
    let n = match args.scenario {
        Scenario::Fanout => 1,
        Scenario::Topics => args.topics.unwrap_or(100),
        _ => args.topics.unwrap_or(1),
    };
    n.clamp(1, args.connections.max(1))
}

/// Subscribers of each topic: connection i is on topic i mod T.
fn subscribers_per_topic(connections: usize, topics: usize) -> Vec<u64> {
    (0..topics)
        .map(|t| (connections / topics + usize::from(t < connections % topics)) as u64)
        .collect()
}

/// The worker processes of one run.
struct Workers {
    procs: Vec<Proc>,
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Workers {
    /// Starts the workers, sharing `--connections` between them.
    fn spawn(args: &LoadArgs, subscribe: bool, rounds_mode: bool) -> anyhow::Result<Workers> {
        let n = if args.procs == 0 {
            args.connections.div_ceil(PER_PROC)
        } else {
            args.procs
        }
        .clamp(1, args.connections.max(1));
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut procs = Vec::with_capacity(n);
        let mut first = 0;
        for i in 0..n {
            let share = args.connections / n + usize::from(i < args.connections % n);
            let mut cmd = Command::new(&exe);
            cmd.args(["load", "worker", "--target"])
                .arg(args.target.to_string())
                .args(["--connections", &share.to_string()])
                .args(["--worker-first", &first.to_string()])
                .args(["--source-ips", &args.source_ips.to_string()])
                .args(["--topic", &args.topic])
                .args(["--topics", &topic_count(args).to_string()])
                .args(["--rounds", &args.rounds.to_string()]);
            if subscribe {
                cmd.arg("--worker-subscribe");
            }
            if rounds_mode {
                cmd.arg("--rounds-mode");
            }
            if let Some(t) = &args.token {
                cmd.args(["--token", t]);
            }
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a load worker")?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                bail!("a load worker has no pipes");
            };
            procs.push(Proc {
                child,
                stdin,
                out: BufReader::new(stdout),
            });
            first += share;
        }
        Ok(Workers { procs })
    }

    /// Reads one line `<kind> {json}` from every worker.
    fn collect(&mut self, kind: &str) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::with_capacity(self.procs.len());
        for (i, p) in self.procs.iter_mut().enumerate() {
            let mut line = String::new();
            let n = p.out.read_line(&mut line)?;
            if n == 0 {
                let status = p.child.wait()?;
                bail!(
                    "load worker {i} exited ({status}) before its {kind} line; its error is above"
                );
            }
            let Some(json) = line.strip_prefix(kind).map(str::trim) else {
                bail!("load worker {i} said {line:?}, expected {kind}");
            };
            all.push(serde_json::from_str(json).with_context(|| format!("worker line {line:?}"))?);
        }
        Ok(all)
    }

    /// Sends a command to every worker and reads its answers.
    fn ask(&mut self, cmd: &str, answer: &str) -> anyhow::Result<Vec<Value>> {
        for p in &mut self.procs {
            writeln!(p.stdin, "{cmd}").context("a load worker went away")?;
            p.stdin.flush()?;
        }
        self.collect(answer)
    }

    /// Messages received so far, all workers.
    fn received(&mut self) -> anyhow::Result<u64> {
        Ok(self
            .ask("count", "count")?
            .iter()
            .map(|v| v["received_total"].as_u64().unwrap_or(0))
            .sum())
    }

    /// Waits until `expected` messages arrived or `limit` passed; returns the time waited.
    fn settle(&mut self, expected: u64, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while self.received()? < expected && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }

    /// Every worker's tally since the last report, merged.
    fn report(&mut self) -> anyhow::Result<Tally> {
        let mut t = Tally::new()?;
        for v in self.ask("report", "report")? {
            t.add(&v)?;
        }
        Ok(t)
    }

    /// Tells every worker to close its connections, and waits for them.
    fn quit(mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            let _ = writeln!(p.stdin, "quit");
        }
        for (i, p) in self.procs.iter_mut().enumerate() {
            let status = p.child.wait()?;
            if !status.success() {
                bail!("load worker {i} failed ({status})");
            }
        }
        Ok(())
    }
}

/// The publishers of a run and the share of topics each one takes.
struct Publishers {
    pubs: Vec<(Publisher, Vec<usize>)>,
    errors_seen: u64,
}

impl Publishers {
    fn connect(args: &LoadArgs, topics: usize) -> anyhow::Result<Publishers> {
        let via = match &args.redis {
            Some(url) => Via::Redis(url.clone()),
            None => Via::WebSocket {
                target: args.target,
                token: args.token.clone(),
            },
        };
        let n = args.publishers.clamp(1, topics.max(1));
        let mut pubs = Vec::with_capacity(n);
        for j in 0..n {
            let share: Vec<usize> = (j..topics).step_by(n).collect();
            pubs.push((Publisher::connect(&via)?, share));
        }
        Ok(Publishers {
            pubs,
            errors_seen: 0,
        })
    }

    /// Publishes at `rate` msg/s in all for `duration`; what each topic got.
    fn run(&mut self, names: &[String], rate: f64, args: &LoadArgs) -> anyhow::Result<Sent> {
        let per = rate / self.pubs.len() as f64;
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pubs
                .iter_mut()
                .map(|(p, share)| {
                    let topics: Vec<String> = share.iter().map(|&t| names[t].clone()).collect();
                    let share = share.clone();
                    s.spawn(move || {
                        p.run(&topics, per, args.size, args.duration.0)
                            .map(|sent| (share, sent))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a publisher panicked")))
                })
                .collect::<Vec<_>>()
        });
        let mut sent = Sent {
            per_topic: vec![0; names.len()],
        };
        for r in results {
            let (share, got) = r?;
            for (i, t) in share.into_iter().enumerate() {
                sent.per_topic[t] += got.per_topic[i];
            }
        }
        Ok(sent)
    }

    /// Error replies the server sent to publishers since the last call.
    fn new_errors(&mut self) -> u64 {
        let total: u64 = self
            .pubs
            .iter()
            .map(|(p, _)| p.errors.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let new = total - self.errors_seen;
        self.errors_seen = total;
        new
    }
}

/// Messages the subscribers should get for what was sent.
fn expected(sent: &Sent, subs: &[u64]) -> u64 {
    sent.per_topic.iter().zip(subs).map(|(n, s)| n * s).sum()
}

/// Starts the workers and waits until every connection is up (and
/// subscribed, with `subscribe`); returns them, the seconds it took, and
/// the connections opened.
fn start_workers(args: &LoadArgs, subscribe: bool) -> anyhow::Result<(Workers, f64, u64)> {
    let start = crate::sys::monotonic_us();
    let mut workers = Workers::spawn(args, subscribe, false)?;
    let ready = workers.collect("ready")?;
    let end = ready
        .iter()
        .filter_map(|v| v["at_us"].as_u64())
        .max()
        .unwrap_or(start);
    let opened = ready
        .iter()
        .map(|v| v["connections"].as_u64().unwrap_or(0))
        .sum();
    Ok((workers, end.saturating_sub(start) as f64 / 1e6, opened))
}

/// `fanout` and `topics`: one publishing window, then the figures.
fn deliver(args: &LoadArgs) -> anyhow::Result<()> {
    let names = topic_names(args);
    let subs = subscribers_per_topic(args.connections, names.len());
    let (mut workers, connect_s, _) = start_workers(args, true)?;
    let mut pubs = Publishers::connect(args, names.len())?;
    let sent = pubs.run(&names, args.rate as f64, args)?;
    let expected = expected(&sent, &subs);
    let waited = workers.settle(expected, args.settle.0)?;
    let tally = workers.report()?;
    let pub_errors = pubs.new_errors();
    workers.quit()?;
    let secs = args.duration.0.as_secs_f64() + waited.as_secs_f64();
    let rate = tally.received as f64 / secs;
    let scenario = if args.scenario == Scenario::Topics {
        "topics"
    } else {
        "fanout"
    };
    out!(
        "{scenario}  subscribers={} topics={} publishers={} rate={}/s size={}B duration={:?} via={}",
        args.connections,
        names.len(),
        pubs.pubs.len(),
        args.rate,
        args.size,
        args.duration.0,
        if args.redis.is_some() { "xadd" } else { "websocket" },
    );
    out!(
        "connect     {connect_s:.3} s for {} clients",
        args.connections
    );
    out!(
        "published   {}  expected {expected}  received {}  ({:.4} %)",
        sent.total(),
        tally.received,
        100.0 * tally.received as f64 / expected.max(1) as f64
    );
    out!(
        "deliveries  {rate:.0}/s (received over the window plus {:.2} s settling)",
        waited.as_secs_f64()
    );
    out!(
        "latency ms  p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        tally.ms(0.5),
        tally.ms(0.99),
        tally.ms(0.999),
        tally.max_ms()
    );
    let notes = tally.anomalies();
    if !notes.is_empty() || pub_errors > 0 {
        out!("note        {notes} publisher error replies: {pub_errors}");
    }
    out!(
        "{}",
        serde_json::json!({
            "scenario": scenario, "subscribers": args.connections, "topics": names.len(),
            "rate": args.rate, "size": args.size, "duration_s": args.duration.0.as_secs_f64(),
            "published": sent.total(), "expected": expected, "received": tally.received,
            "deliveries_per_s": rate.round(), "settle_s": waited.as_secs_f64(),
            "p50_ms": tally.ms(0.5), "p99_ms": tally.ms(0.99), "p999_ms": tally.ms(0.999),
            "max_ms": tally.max_ms(), "connect_s": connect_s,
            "closes": tally.closes, "errors": tally.errors, "publisher_errors": pub_errors,
        })
    );
    Ok(())
}

/// `ramp`: rising rates over the same connections until a step falls behind.
fn ramp(args: &LoadArgs) -> anyhow::Result<()> {
    let names = topic_names(args);
    let subs = subscribers_per_topic(args.connections, names.len());
    let (mut workers, connect_s, _) = start_workers(args, true)?;
    let mut pubs = Publishers::connect(args, names.len())?;
    out!(
        "ramp  subscribers={} topics={} size={}B step={:?} x{} p99 bound {} ms (connected in {connect_s:.3} s)",
        args.connections,
        names.len(),
        args.size,
        args.duration.0,
        args.step,
        args.p99_bound
    );
    out!(
        "{:>10} {:>12} {:>12} {:>12} {:>9} {:>9} {:>9}  verdict",
        "msg/s",
        "offered/s",
        "delivered/s",
        "received %",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    let mut rate = args.rate.max(1) as f64;
    let mut best: Option<(f64, f64)> = None;
    let mut steps = Vec::new();
    while rate <= args.max_rate as f64 {
        let before = workers.received()?;
        let sent = pubs.run(&names, rate, args)?;
        let expected = expected(&sent, &subs);
        let waited = workers.settle(before + expected, args.settle.0)?;
        let tally = workers.report()?;
        let pub_errors = pubs.new_errors();
        let secs = args.duration.0.as_secs_f64();
        let offered = expected as f64 / secs;
        let delivered = tally.received as f64 / (secs + waited.as_secs_f64());
        let complete = tally.received >= expected && tally.closes.is_empty() && pub_errors == 0;
        let verdict = if !complete {
            "fell behind (not everything arrived)"
        } else if tally.ms(0.99) > args.p99_bound {
            "fell behind (p99 over the bound)"
        } else {
            "sustained"
        };
        out!(
            "{:>10.0} {:>12.0} {:>12.0} {:>12.4} {:>9.2} {:>9.2} {:>9.2}  {verdict}{}",
            rate,
            offered,
            delivered,
            100.0 * tally.received as f64 / expected.max(1) as f64,
            tally.ms(0.5),
            tally.ms(0.99),
            tally.max_ms(),
            if tally.anomalies().is_empty() {
                String::new()
            } else {
                format!(" [{}]", tally.anomalies())
            }
        );
        steps.push(serde_json::json!({
            "rate": rate.round(), "offered_per_s": offered.round(), "delivered_per_s": delivered.round(),
            "expected": expected, "received": tally.received, "p50_ms": tally.ms(0.5),
            "p99_ms": tally.ms(0.99), "p999_ms": tally.ms(0.999), "max_ms": tally.max_ms(),
            "verdict": verdict,
        }));
        if verdict != "sustained" {
            break;
        }
        best = Some((rate, delivered));
        rate *= args.step.max(1.01);
    }
    workers.quit()?;
    match best {
        Some((r, d)) => out!(
            "max sustained: {d:.0} deliveries/s ({r:.0} msg/s x {} subscribers)",
            args.connections
        ),
        None => out!("max sustained: none (the first step already fell behind: lower --rate)"),
    }
    out!(
        "{}",
        serde_json::json!({
            "scenario": "ramp", "subscribers": args.connections, "topics": names.len(), "size": args.size,
            "step_s": args.duration.0.as_secs_f64(), "p99_bound_ms": args.p99_bound,
            "max_sustained_deliveries_per_s": best.map(|(_, d)| d.round()),
            "max_sustained_rate": best.map(|(r, _)| r.round()), "steps": steps,
        })
    );
    Ok(())
}

/// `idle`: hold S connections and read what they cost the server.
fn idle(args: &LoadArgs) -> anyhow::Result<()> {
    let pid = args
        .server_pid
        .context("idle needs --server-pid to read the server's memory")?;
    let before = rss_bytes(pid).context("cannot read the server's /proc status")?;
    let (kmem_before, slab_before) = (tcp_mem_pages().unwrap_or(0), slab_bytes().unwrap_or(0));
    let (workers, connect_s, n) = start_workers(args, false)?;
    // Let the server settle (allocator, lazy structures), then measure.
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_bytes(pid).context("cannot read the server's /proc status")?;
    let (kmem_after, slab_after) = (tcp_mem_pages().unwrap_or(0), slab_bytes().unwrap_or(0));
    let per_conn = after.saturating_sub(before) as f64 / n.max(1) as f64;
    // Both ends of every loopback connection are on this machine: halve.
    let kernel_tcp = (kmem_after.saturating_sub(kmem_before) * 4096) as f64 / n.max(1) as f64 / 2.0;
    let kernel_slab = slab_after.saturating_sub(slab_before) as f64 / n.max(1) as f64 / 2.0;
    out!(
        "idle  connections={n} connect={connect_s:.3}s\n\
         server RSS  before {:.1} MiB  after {:.1} MiB  per connection {per_conn:.0} B\n\
         kernel, per connection, one side: TCP buffers {kernel_tcp:.0} B (sockstat), slab {kernel_slab:.0} B (meminfo)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
    );
    out!(
        "{}",
        serde_json::json!({
            "scenario": "idle", "connections": n, "connect_s": connect_s, "rss_before": before,
            "rss_after": after, "bytes_per_conn": per_conn.round(),
            "kernel_tcp_bytes_per_conn": kernel_tcp.round(), "kernel_slab_bytes_per_conn": kernel_slab.round(),
        })
    );
    std::thread::sleep(args.duration.0.min(Duration::from_secs(60)));
    workers.quit()
}

/// The pause between `connect` rounds.
pub const ROUND_PAUSE: Duration = Duration::from_millis(500);

/// `connect`: rounds of connect-all then close-all, all workers starting
/// each round together.
fn connect(args: &LoadArgs) -> anyhow::Result<()> {
    let mut workers = Workers::spawn(args, false, true)?;
    let mut spans = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        if round > 0 {
            std::thread::sleep(ROUND_PAUSE);
        }
        let rounds = workers.ask("next", "round")?;
        let start = rounds
            .iter()
            .filter_map(|v| v["start_us"].as_u64())
            .min()
            .unwrap_or(0);
        let end = rounds
            .iter()
            .filter_map(|v| v["end_us"].as_u64())
            .max()
            .unwrap_or(start);
        let n: u64 = rounds
            .iter()
            .map(|v| v["connections"].as_u64().unwrap_or(0))
            .sum();
        spans.push((end.saturating_sub(start).max(1) as f64 / 1e6, n));
    }
    workers.quit()?;
    let mut rates: Vec<f64> = spans.iter().map(|(s, n)| *n as f64 / s).collect();
    rates.sort_by(f64::total_cmp);
    let mut times: Vec<f64> = spans.iter().map(|(s, _)| *s).collect();
    times.sort_by(f64::total_cmp);
    let mid = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(0.0);
    out!(
        "connect  {} rounds x {} clients  handshakes/s median {:.0}  min {:.0}  max {:.0}  \
         time to connect all: median {:.3} s",
        args.rounds,
        args.connections,
        mid(&rates),
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0),
        mid(&times),
    );
    out!(
        "{}",
        serde_json::json!({
            "scenario": "connect", "rounds": args.rounds, "connections": args.connections,
            "handshakes_per_s_median": mid(&rates).round(), "connect_all_s_median": mid(&times),
            "connect_all_s": times,
        })
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

/// Kernel TCP buffer memory in pages, from /proc/net/sockstat.
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

/// Kernel slab memory (sockets, inodes, epoll items...), from /proc/meminfo.
fn slab_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("Slab:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_rotate_over_loopback_addresses() {
        assert_eq!(source_addr(0, 3).ip().to_string(), "127.0.0.1");
        assert_eq!(source_addr(4, 3).ip().to_string(), "127.0.0.2");
        assert_eq!(source_addr(7, 0).ip().to_string(), "127.0.0.1");
    }

    #[test]
    fn connect_rounds_never_share_a_source_address_with_the_round_before() {
        for ips in [1u8, 2, 3, 25] {
            for round in 0..20usize {
                let this: Vec<_> = (0..100).map(|i| round_source(round, i, ips)).collect();
                let next: Vec<_> = (0..100).map(|i| round_source(round + 1, i, ips)).collect();
                assert!(
                    this.iter().all(|a| !next.contains(a)),
                    "ips {ips} round {round}"
                );
                assert!(this.iter().all(|a| a.ip() != Ipv4Addr::new(127, 0, 0, 0)));
                assert!(this.iter().all(|a| a.ip() != Ipv4Addr::new(127, 0, 0, 255)));
            }
        }
        // Round 0 is what every other scenario uses.
        assert_eq!(round_source(0, 4, 3), source_addr(4, 3));
    }

    #[test]
    fn subscribers_spread_evenly_over_topics() {
        assert_eq!(subscribers_per_topic(10, 3), vec![4, 3, 3]);
        assert_eq!(subscribers_per_topic(2, 1), vec![2]);
        let sent = Sent {
            per_topic: vec![5, 1, 0],
        };
        assert_eq!(expected(&sent, &[4, 3, 3]), 23);
    }
}
