//! `/metrics` as Prometheus reads it, against the real binary: `promtool
//! check metrics` accepts a scrape under each broker; the per-shard gauges
//! carry a `shard` label; the publish-to-deliver histogram counts each
//! message once per shard that queued it; the publish sources, the inbox
//! depth, the busy ratio, the Redis read lag and the process metrics are
//! there and mean what they say; the test helper refuses an absent metric;
//! and `--stats-log-interval` logs its line.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::redis::{xadd, TestRedis};
use common::{metric_in, parse_metrics, raw, TestServer};
use ringcast::client::{Client, Event};
use serde_json::json;

const KEY: &str = "metrics-key-0123456789";

/// Runs `promtool check metrics` on `text`; panics with its complaints,
/// or with how to install it when it is missing.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|e| {
        panic!(
            "promtool not found ({e}): install Debian's `prometheus` package \
             (apt-get install prometheus; tests/run does it)"
        )
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}\nscrape:\n{text}",
        out.status
    );
}

fn recv_msgs(c: &mut Client, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Msg { .. }) => got += 1,
            Ok(_) => {}
            Err(e) => panic!("after {got} of {n} messages: {e}"),
        }
    }
}

/// One publish through `POST /publish`.
fn http_publish(server: &TestServer, topic: &str) {
    let auth = format!("Bearer {KEY}");
    let body = json!({ "topic": topic, "data": { "via": "http" } }).to_string();
    let (status, text) =
        server.admin_request("POST", "/publish", &[("Authorization", &auth)], &body);
    assert_eq!(status, 200, "{text}");
}

/// A subscriber to `news`, one client and one HTTP publish to it, both
/// received; returns the subscriber.
fn traffic(server: &TestServer) -> Client {
    let mut sub = Client::connect(&server.url()).unwrap();
    sub.subscribe("news", None).unwrap();
    let mut publisher = Client::connect(&server.url()).unwrap();
    publisher.publish("news", &json!({ "n": 1 })).unwrap();
    http_publish(server, "news");
    recv_msgs(&mut sub, 2);
    sub
}

/// The families every scrape has, whichever the broker.
const ALWAYS: [&str; 20] = [
    "ringcast_connections_active",
    "ringcast_subscriptions_active",
    "ringcast_registry_connections",
    "ringcast_topic_index_entries",
    "ringcast_topics_announced",
    "ringcast_shard_inbox_depth",
    "ringcast_shard_busy_ratio",
    "ringcast_shard_busy_seconds_total",
    "ringcast_connections_accepted_total",
    "ringcast_messages_delivered_total",
    "ringcast_messages_published_total",
    "ringcast_messages_dropped_total",
    "ringcast_client_disconnects_total",
    "ringcast_handshake_failures_total",
    "ringcast_publish_to_deliver_seconds",
    "ringcast_broker_up",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
];

fn assert_families(text: &str, names: &[&str]) {
    for name in names {
        assert!(
            text.contains(&format!("\n# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
}

#[test]
fn promtool_accepts_a_scrape_under_the_embedded_broker() {
    let server = TestServer::start(&["--admin-api-key", KEY]);
    let _sub = traffic(&server);
    let text = server.metrics_text();
    promtool_check(&text);
    assert_families(&text, &ALWAYS);
    let m = |s: &str| metric_in(&text, s).unwrap_or_else(|| panic!("{s} absent:\n{text}"));
    assert_eq!(
        m(r#"ringcast_messages_published_total{source="client"}"#),
        1.0
    );
    assert_eq!(
        m(r#"ringcast_messages_published_total{source="http"}"#),
        1.0
    );
    assert_eq!(
        m(r#"ringcast_messages_published_total{source="redis"}"#),
        0.0,
        "no Redis"
    );
    assert!(
        !text.contains("ringcast_broker_read_lag_seconds"),
        "the embedded broker has no reader: no read lag"
    );
    assert_eq!(m("ringcast_publish_to_deliver_seconds_count"), 2.0);
    // The process metrics are this process's.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let started = m("process_start_time_seconds");
    assert!(
        started <= now.as_secs_f64() + 1.0 && started > now.as_secs_f64() - 600.0,
        "process_start_time_seconds {started}"
    );
    assert!(m("process_resident_memory_bytes") > 1e6);
    assert!(m("process_open_fds") >= 5.0, "listeners, epoll, sockets");
}

#[test]
fn promtool_accepts_a_scrape_under_redis_and_the_reader_reports_its_lag() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url(), "--admin-api-key", KEY]);
    let mut sub = traffic(&server);
    // A producer's XADD: seen only as read from Redis.
    xadd(
        &mut redis.conn(),
        "news",
        &[("topic", "news"), ("data", "3")],
    );
    recv_msgs(&mut sub, 1);
    let source = |s: &str| format!(r#"ringcast_messages_published_total{{source="{s}"}}"#);
    // The reader counts after it hands an entry to the shards.
    server.wait_for("3 entries read", Duration::from_secs(5), |s| {
        s.metric(&source("redis")) == 3.0
    });
    let text = server.metrics_text();
    promtool_check(&text);
    assert_families(&text, &ALWAYS);
    assert_families(&text, &["ringcast_broker_read_lag_seconds"]);
    let m = |s: &str| metric_in(&text, s).unwrap_or_else(|| panic!("{s} absent:\n{text}"));
    assert_eq!(m(&source("client")), 1.0);
    assert_eq!(m(&source("http")), 1.0);
    assert_eq!(
        m(&source("redis")),
        m("ringcast_broker_entries_read_total"),
        "redis: every entry read, this node's own publishes included"
    );
    // "news" is in partition 0 of 16 (README's producer example); the
    // other partitions were never read: no series.
    let lag = m(r#"ringcast_broker_read_lag_seconds{partition="0"}"#);
    assert!((0.0..5.0).contains(&lag), "read lag {lag}");
    assert!(!text.contains(r#"ringcast_broker_read_lag_seconds{partition="1"}"#));
    assert_eq!(m("ringcast_publish_to_deliver_seconds_count"), 3.0);
}

#[test]
fn per_shard_series_carry_the_shard_and_latency_counts_once_per_shard() {
    let server = TestServer::start(&["--shards", "2"]);
    let per_shard = |s: &TestServer, name: &str| -> [f64; 2] {
        let text = s.metrics_text();
        [0, 1].map(|i| {
            metric_in(&text, &format!("{name}{{shard=\"{i}\"}}"))
                .unwrap_or_else(|| panic!("{name} of shard {i} absent:\n{text}"))
        })
    };
    // Clients until both shards hold one (SO_REUSEPORT spreads them by
    // address hash).
    let mut subs = Vec::new();
    while per_shard(&server, "ringcast_connections_active").contains(&0.0) {
        assert!(subs.len() < 64, "every client landed on one shard");
        subs.push(Client::connect(&server.url()).unwrap());
    }
    assert_eq!(
        server.metric("ringcast_connections_active"),
        subs.len() as f64,
        "the helper sums the shards"
    );
    for s in &mut subs {
        s.subscribe("t", None).unwrap();
    }
    let mut publisher = Client::connect(&server.url()).unwrap();
    const N: usize = 7;
    for i in 0..N {
        publisher.publish("t", &json!(i)).unwrap();
    }
    // Nobody listens to "quiet": not queued anywhere, not measured.
    publisher.publish("quiet", &json!(0)).unwrap();
    for s in &mut subs {
        recv_msgs(s, N);
    }
    let name = "ringcast_publish_to_deliver_seconds";
    assert_eq!(
        per_shard(&server, &format!("{name}_count")),
        [N as f64; 2],
        "once per message per shard, whatever its subscribers"
    );
    let text = server.metrics_text();
    for shard in ["0", "1"] {
        let buckets: Vec<(f64, f64)> = parse_metrics(&text)
            .into_iter()
            .filter(|(n, l, _)| n == &format!("{name}_bucket") && l[0].1 == shard)
            .map(|(_, l, v)| (l[1].1.parse().unwrap(), v))
            .collect();
        assert!(buckets.len() >= 10, "{buckets:?}");
        assert!(buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, N as f64));
        let le10 = buckets.iter().find(|(le, _)| *le == 10.0).unwrap().1;
        assert_eq!(le10, N as f64, "loopback: all within 10 s");
        let sum = metric_in(&text, &format!("{name}_sum{{shard=\"{shard}\"}}")).unwrap();
        assert!((0.0..10.0 * N as f64).contains(&sum), "sum {sum}");
    }
    for depth in per_shard(&server, "ringcast_shard_inbox_depth") {
        assert!(depth >= 0.0);
    }
    // The busy ratio is over the sweep's period (1 s): wait for one.
    std::thread::sleep(Duration::from_millis(1200));
    for ratio in per_shard(&server, "ringcast_shard_busy_ratio") {
        assert!((0.0..=1.0).contains(&ratio), "busy ratio {ratio}");
    }
    for busy in per_shard(&server, "ringcast_shard_busy_seconds_total") {
        assert!(busy > 0.0 && busy < 60.0, "busy {busy} s");
    }
}

#[test]
fn the_metric_helper_refuses_an_absent_metric() {
    let server = TestServer::start(&[]);
    for absent in [
        "ringcast_no_such_metric_total",
        r#"ringcast_messages_published_total{source="carrier_pigeon"}"#,
    ] {
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.metric(absent)));
        let panic = got.expect_err(absent);
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains(absent), "{message}");
    }
    // A present metric that is 0 reads as 0.
    assert_eq!(server.metric("ringcast_subscriptions_active"), 0.0);
    let m = server.metrics();
    assert_eq!(m["ringcast_connections_active"], 0.0, "summed shards");
    assert_eq!(m["ringcast_connections_active{shard=\"1\"}"], 0.0);
}

/// The `stats` lines of a JSON log, as their fields.
fn stats_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "stats")
        .map(|v| v["fields"].clone())
        .collect()
}

#[test]
fn stats_log_interval_logs_connections_deliveries_drops_and_errors() {
    let server = TestServer::start(&["--stats-log-interval", "200ms", "--log-format", "json"]);
    let mut sub = Client::connect(&server.url()).unwrap();
    sub.subscribe("news", None).unwrap();
    let mut publisher = Client::connect(&server.url()).unwrap();
    for i in 0..20 {
        publisher.publish("news", &json!(i)).unwrap();
    }
    recv_msgs(&mut sub, 20);
    // A refused upgrade is an error.
    let mut bad = raw::connect(server.addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = raw::read_head(&mut bad);
    assert!(head.starts_with("HTTP/1.1 4"), "{head}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut delivered, mut errored) = (false, false);
    while !(delivered && errored) {
        assert!(
            Instant::now() < deadline,
            "no stats line with deliveries and errors:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
        for line in stats_lines(&server.log()) {
            for field in [
                "connections",
                "subscriptions",
                "deliveries_per_s",
                "drops",
                "errors",
            ] {
                assert!(line[field].is_number(), "{field} in {line}");
            }
            delivered |= line["connections"] == 2 && line["deliveries_per_s"].as_f64() > Some(0.0);
            errored |= line["errors"].as_u64() >= Some(1);
        }
    }
    // One line per interval: 200 ms apart, not more often.
    let before = stats_lines(&server.log()).len();
    std::thread::sleep(Duration::from_millis(1000));
    let lines = stats_lines(&server.log()).len() - before;
    assert!((3..=6).contains(&lines), "{lines} lines in 1 s at 200 ms");
}

#[test]
fn stats_log_interval_zero_logs_nothing() {
    let server = TestServer::start(&["--stats-log-interval", "0", "--log-format", "json"]);
    let _c = Client::connect(&server.url()).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(stats_lines(&server.log()).is_empty(), "{}", server.log());
}
