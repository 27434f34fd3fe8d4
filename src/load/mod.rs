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
//! - `churn`: `fanout` (or `topics` with `--topics`) while every second
//!   `--churn` of the open subscribers drop their connection (no close
//!   frame, as a phone losing its network) and come back, resubscribing
//!   with `since` and `epoch` from their position: reconnects per second,
//!   recovery latency (drop to `ok`, replay included), and every
//!   subscriber must end with every message exactly once. Its subscribers
//!   also follow the server as docs/PROTOCOL.md asks of a client: after a
//!   `drain` they reconnect when its `reconnect_in_ms` says, after any
//!   other close or a failed attempt after a backoff, and resubscribe the
//!   same way; the report counts drains, failed attempts and the `node` of
//!   every `welcome`. `--churn 0` drops none: with a node drained behind a
//!   proxy, the drain-at-scale test (tests/deploy/drain.rs).
//!
//! Every payload carries `"q"`, its number in its topic (one publisher per
//! topic, from 0 across a run's steps); each subscriber takes only the next
//! number or a later one, so a duplicate or a reorder is counted (and fails
//! the run) instead of cancelling a loss out in the totals.
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

mod client;
mod frames;
mod procs;
mod publish;
mod scenarios;
mod tally;
mod worker;

pub use scenarios::ROUND_PAUSE;
use scenarios::{connect, deliver, idle, ramp};

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::config::HumanDuration;

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
    /// Redis with the default partitions and key prefix, and the key
    /// layout of `--redis-key-layout`.
    #[arg(long)]
    pub redis: Option<String>,
    /// With `--redis`: the servers' `--redis-key-layout`.
    #[arg(long, default_value = "legacy")]
    pub redis_key_layout: crate::broker::redis::KeyLayout,
    /// A token for every connection (`?token=`), for servers that require one.
    #[arg(long)]
    pub token: Option<String>,
    /// How long to wait after publishing for every message to land.
    #[arg(long, default_value = "5s")]
    pub settle: HumanDuration,
    /// Idle: each connection subscribes (to its topic, as in `topics`) and
    /// receives one message before the server's memory is read: what an
    /// idle subscriber costs, not a bare connection.
    #[arg(long)]
    pub subscribe: bool,
    /// Each connection gets a token of its own, HS256 with this secret (the
    /// server's `--auth-hmac-secret`): user `user-NNNNNNNN`, `subs` its
    /// topic patterns and a `news.#`, `pubs` its topic; the publishers get
    /// one allowed every topic. What real users' tokens look like.
    #[arg(long, hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Subscribers subscribe to a pattern that matches only their topic
    /// (the topic with its first segment as `*`: `*.5` for `load.5`)
    /// instead of the topic itself: the same load as without it, through
    /// the server's wildcard matching. Tokens (`--token-secret`) then also
    /// carry `#`.
    #[arg(long)]
    pub wildcard: bool,
    /// Offer permessage-deflate (as browsers do) and inflate what comes
    /// compressed; `wire_bytes_per_delivery` then tells what it saved.
    #[arg(long)]
    pub deflate: bool,
    /// Payloads are a realistic notification (JSON: names, words, ids and
    /// prices, different in every message) of about `--size` bytes, rather
    /// than padding, which compresses unrealistically well.
    #[arg(long)]
    pub json: bool,
    /// Churn: the share of subscribers (0 to 1) that drop their connection
    /// and come back (resubscribing with `since` and `epoch`) each second.
    /// 0 drops none: the subscribers then only follow the server (a
    /// `drain`, a close).
    #[arg(long, default_value_t = 0.1)]
    pub churn: f64,
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
    /// Worker only: subscribers follow the server's `drain` and closes
    /// (reconnect and resubscribe) instead of ending.
    #[arg(long, hide = true)]
    pub worker_follow: bool,
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
    /// Fanout (or topics, with `--topics`) while `--churn` of the
    /// subscribers drop and resubscribe from their position every second,
    /// and every subscriber follows the server's `drain` (reconnecting
    /// after its `reconnect_in_ms`) and closes (after a backoff): every
    /// subscriber must end with every message exactly once.
    Churn,
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
    if let (Some(secret), None) = (&args.token_secret, &args.token) {
        args.token = Some(publisher_token(secret));
    }
    let needed = args.connections.div_ceil(PER_SOURCE_IP).clamp(1, 254) as u8;
    args.source_ips = args.source_ips.max(needed);
    if !(0.0..=1.0).contains(&args.churn) {
        bail!(
            "--churn {} is not a share of the subscribers (0 to 1)",
            args.churn
        );
    }
    watchdog(args.timeout.0);
    match args.scenario {
        Scenario::Fanout | Scenario::Topics | Scenario::Churn => deliver(&args),
        Scenario::Ramp => ramp(&args),
        Scenario::Idle => idle(&args),
        Scenario::Connect => connect(&args),
        Scenario::Worker => unreachable!("handled above"),
    }
}

/// The token of connection `global` under `--token-secret`: its own user,
/// the patterns a real subscriber's token carries. Every token of a run
/// has the same length (fixed-width user, one `exp`), so a worker writes
/// each one into the same upgrade request.
pub(super) fn connection_token(
    secret: &str,
    topic: &str,
    global: usize,
    (exp, wildcard): (u64, bool),
) -> String {
    let mut subs = vec![
        topic.to_string(),
        format!("{topic}.*"),
        "news.#".to_string(),
    ];
    if wildcard {
        subs.push("#".to_string());
    }
    let claims = crate::auth::Claims {
        sub: format!("user-{global:08}"),
        exp,
        subs,
        pubs: vec![topic.to_string()],
    };
    crate::auth::mint_hmac_for(secret.as_bytes(), &claims, None, None)
}

/// The publishers' token under `--token-secret`: every topic.
fn publisher_token(secret: &str) -> String {
    let claims = crate::auth::Claims {
        sub: "load-publisher".to_string(),
        exp: crate::auth::now_secs() + 86_400,
        subs: Vec::new(),
        pubs: vec!["#".to_string()],
    };
    crate::auth::mint_hmac_for(secret.as_bytes(), &claims, None, None)
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

/// What a subscriber of `topic` sends in its `sub`: the topic, or with
/// `--wildcard` the pattern that matches only it among the run's topics.
fn sub_target(topic: &str, wildcard: bool) -> String {
    match (wildcard, topic.split_once('.')) {
        (false, _) => topic.to_string(),
        (true, Some((_, rest))) => format!("*.{rest}"),
        (true, None) => "*".to_string(),
    }
}

/// Subscribers of each topic: connection i is on topic i mod T.
fn subscribers_per_topic(connections: usize, topics: usize) -> Vec<u64> {
    (0..topics)
        .map(|t| (connections / topics + usize::from(t < connections % topics)) as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::procs::expected;
    use super::publish::Sent;
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
