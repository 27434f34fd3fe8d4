//! `ringcast load` against a real server: each scenario runs small and
//! bounded, and its JSON line must add up (every expected message received,
//! counts matching the server's own metrics), so the figures in
//! benches/RESULTS.md come from a tool that is itself tested.

mod common;

use std::process::{Command, Stdio};

use common::redis::TestRedis;
use common::TestServer;

/// Runs `ringcast load ARGS` and returns its JSON lines.
fn load(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .arg("load")
        .args(args)
        .args(["--timeout", "60s"])
        .stdin(Stdio::null())
        .output()
        .expect("run ringcast load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON result line"))
        .collect()
}

#[test]
fn fanout_delivers_every_message_to_every_subscriber_across_worker_processes() {
    let server = TestServer::start(&[]);
    let target = server.addr.to_string();
    let before = server.metric("ringcast_messages_delivered_total");
    let r = &load(&[
        "fanout",
        "--target",
        &target,
        "--connections",
        "60",
        "--procs",
        "3",
        "--source-ips",
        "2",
        "--rate",
        "200",
        "--duration",
        "1s",
    ])[0];
    let published = r["published"].as_u64().unwrap();
    assert!(published >= 150, "{r}");
    assert_eq!(r["expected"].as_u64().unwrap(), published * 60, "{r}");
    assert_eq!(r["received"], r["expected"], "{r}");
    // Every subscriber had every message once, in its publisher's order.
    assert_eq!(
        (r["out_of_order"].as_u64(), r["missing"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    assert!(r["p50_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(
        server.metric("ringcast_messages_delivered_total") - before,
        (published * 60) as f64
    );
}

/// Both data paths carry the same deliveries: every message to every
/// subscriber once and in order, bigger messages too (so sends are cut by
/// full sockets), and the ring's submissions show which path ran.
#[test]
fn both_data_paths_deliver_every_message_in_order() {
    let legacy = std::env::var_os("MONOIO_FORCE_LEGACY_DRIVER").is_some_and(|v| v == "1");
    for path in ["io_uring", "epoll"] {
        // 200 x 300 msg/s x 20 KB is 1.2 GB/s for the tool to read: on a
        // busy machine a subscriber fell the default 1 MiB (50 messages)
        // behind and was closed 4009. Order and completeness are what this
        // test checks; the bound has tests of its own (tests/slow_consumer.rs).
        let server = TestServer::start(&["--data-path", path, "--outbound-queue", "32MiB"]);
        let target = server.addr.to_string();
        let r = &load(&[
            "fanout",
            "--target",
            &target,
            "--connections",
            "200",
            "--rate",
            "300",
            "--size",
            "20000",
            "--duration",
            "1s",
        ])[0];
        let published = r["published"].as_u64().unwrap();
        assert!(published >= 200, "{path}: {r}");
        assert_eq!(r["received"].as_u64(), Some(published * 200), "{path}: {r}");
        assert_eq!(
            (r["out_of_order"].as_u64(), r["missing"].as_u64()),
            (Some(0), Some(0)),
            "{path}: {r}"
        );
        let writes = server.metric("ringcast_socket_writes_total");
        let submits = server.metric("ringcast_io_uring_submits_total");
        assert!(writes >= 200.0, "{path}: {writes} writes");
        if path == "io_uring" && !legacy {
            // Many sends per submission: the point of the ring.
            assert!(
                submits > 0.0 && submits < writes,
                "{path}: {submits} submits, {writes} writes"
            );
        } else {
            assert_eq!(submits, 0.0, "{path}: the ring ran");
        }
    }
}

#[test]
fn fanout_by_xadd_reaches_subscribers_through_redis() {
    // The producer path of benches/redis_load.sh: the tool XADDs, the node reads.
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let target = server.addr.to_string();
    let r = &load(&[
        "fanout",
        "--target",
        &target,
        "--connections",
        "20",
        "--rate",
        "200",
        "--duration",
        "1s",
        "--redis",
        &redis.url(),
    ])[0];
    let published = r["published"].as_u64().unwrap();
    assert!(published >= 150, "{r}");
    assert_eq!(r["received"].as_u64().unwrap(), published * 20, "{r}");
    assert_eq!(
        (r["out_of_order"].as_u64(), r["missing"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    assert_eq!(
        server.metric("ringcast_broker_entries_read_total"),
        published as f64
    );
}

/// `churn` on `server`: 300 subscribers over 3 topics, a third of them
/// dropping and resubscribing from their position every second while 60
/// msg/s go out for 3 s; every one must end with every message exactly once.
fn churn_on(server: &TestServer, extra: &[&str]) -> serde_json::Value {
    let target = server.addr.to_string();
    let mut args = vec![
        "churn",
        "--target",
        &target,
        "--connections",
        "300",
        "--topics",
        "3",
        "--publishers",
        "3",
        "--rate",
        "60",
        "--duration",
        "3s",
        "--churn",
        "0.34",
        "--settle",
        "10s",
    ];
    args.extend_from_slice(extra);
    let r = load(&args).remove(0);
    assert_eq!(r["received"], r["expected"], "{r}");
    for key in ["out_of_order", "missing", "unrecovered"] {
        assert_eq!(r[key].as_u64(), Some(0), "{key}: {r}");
    }
    // Three ticks of about 100 (fewer as the open count dips).
    let reconnects = r["reconnects"].as_u64().expect("reconnects");
    assert!((150..=400).contains(&reconnects), "{r}");
    assert!(
        r["recovery_p50_ms"].as_f64().expect("recovery_p50_ms") > 0.0,
        "{r}"
    );
    r
}

#[test]
fn churn_every_subscriber_ends_with_every_message_exactly_once() {
    let server = TestServer::start(&[]);
    churn_on(&server, &[]);
    // The server saw them come back: one accepted connection per reconnect.
    let accepted = server.metric("ringcast_connections_accepted_total");
    assert!(accepted >= 300.0 + 150.0, "{accepted}");
}

#[test]
fn churn_through_redis_recovers_from_the_streams() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let url = redis.url();
    churn_on(&server, &["--redis", &url]);
}

#[test]
fn deflate_inflates_what_comes_compressed_and_reads_fewer_bytes() {
    let server = TestServer::start(&[]);
    let target = server.addr.to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "fanout",
            "--target",
            &target,
            "--connections",
            "50",
            "--rate",
            "40",
            "--duration",
            "1s",
            "--json",
            "--size",
            "1500",
        ];
        args.extend_from_slice(extra);
        let r = load(&args).remove(0);
        assert_eq!(r["received"], r["expected"], "{r}");
        assert_eq!(r["out_of_order"].as_u64(), Some(0), "{r}");
        r["wire_bytes_per_delivery"].as_f64().expect("wire bytes")
    };
    let plain = run(&[]);
    assert_eq!(server.metric("ringcast_messages_compressed_total"), 0.0);
    let deflated = run(&["--deflate"]);
    // Compressed once per shard per message, read compressed by all 50.
    assert!(server.metric("ringcast_messages_compressed_total") >= 1.0);
    assert!(
        plain > 1300.0 && deflated < plain * 0.8,
        "{plain} vs {deflated}"
    );
}

#[test]
fn topics_spreads_subscribers_and_publishers_over_topics() {
    let server = TestServer::start(&[]);
    let target = server.addr.to_string();
    let r = &load(&[
        "topics",
        "--target",
        &target,
        "--connections",
        "50",
        "--topics",
        "7",
        "--publishers",
        "3",
        "--rate",
        "350",
        "--duration",
        "1s",
    ])[0];
    assert_eq!(r["topics"], 7, "{r}");
    let published = r["published"].as_u64().unwrap();
    // Subscribers per topic: 8,7,7,7,7,7,7; each message reaches its topic's.
    let expected = r["expected"].as_u64().unwrap();
    assert!(
        expected >= published * 7 && expected <= published * 8,
        "{r}"
    );
    assert_eq!(r["received"], r["expected"], "{r}");
    assert_eq!(
        (r["out_of_order"].as_u64(), r["missing"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    // The tool closed every subscriber on its way out.
    server.wait_for(
        "every subscription released",
        std::time::Duration::from_secs(10),
        |s| s.metric("ringcast_subscriptions_active") == 0.0,
    );
}

#[test]
fn ramp_reports_each_step_and_the_highest_sustained_one() {
    let server = TestServer::start(&[]);
    let target = server.addr.to_string();
    let r = &load(&[
        "ramp",
        "--target",
        &target,
        "--connections",
        "20",
        "--rate",
        "100",
        "--step",
        "2",
        "--max-rate",
        "400",
        "--duration",
        "1s",
        "--settle",
        "3s",
        "--p99-bound",
        "5000",
    ])[0];
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{r}");
    for (s, rate) in steps.iter().zip([100.0, 200.0, 400.0]) {
        assert_eq!(s["rate"].as_f64().unwrap(), rate, "{s}");
        assert_eq!(s["received"], s["expected"], "{s}");
        assert_eq!(s["verdict"], "sustained", "{s}");
        // Numbered across steps: no step starts the sequence again.
        assert_eq!(
            (s["out_of_order"].as_u64(), s["missing"].as_u64()),
            (Some(0), Some(0)),
            "{s}"
        );
    }
    assert_eq!(r["max_sustained_rate"].as_f64().unwrap(), 400.0, "{r}");
}

#[test]
fn a_step_that_loses_messages_is_not_sustained() {
    // An 8 KiB message cannot fit a 4 KiB outbound bound: every subscriber
    // is closed with 4009 at the first one. The tool must see the closes
    // and call the step fallen behind, never sustained.
    let server = TestServer::start(&["--outbound-queue", "4KiB"]);
    let target = server.addr.to_string();
    let r = &load(&[
        "ramp",
        "--target",
        &target,
        "--connections",
        "10",
        "--rate",
        "50",
        "--size",
        "8192",
        "--max-rate",
        "50",
        "--duration",
        "1s",
        "--settle",
        "1s",
    ])[0];
    let step = &r["steps"][0];
    assert_ne!(step["verdict"], "sustained", "{r}");
    assert_eq!(step["received"], 0, "{r}");
    assert!(r["max_sustained_rate"].is_null(), "{r}");
}

#[test]
fn idle_subscribers_with_tokens_of_their_own_each_get_a_message_first() {
    const SECRET: &str = "load-tool-test-secret-0123456789abcdef";
    let server = TestServer::start(&["--auth-hmac-secret", SECRET]);
    let target = server.addr.to_string();
    let pid = server.child.id().to_string();
    // The tool reads the memory while the connections are held (--duration).
    let probe = std::thread::spawn({
        let admin = server.admin;
        move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let text = common::http_request(admin, "GET", "/metrics", &[], "").1;
                let subs = common::metric_in(&text, "ringcast_subscriptions_active").unwrap_or(0.0);
                if subs >= 300.0 || std::time::Instant::now() > deadline {
                    return (
                        subs,
                        common::metric_in(&text, "ringcast_messages_delivered_total"),
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    });
    let r = &load(&[
        "idle",
        "--target",
        &target,
        "--connections",
        "300",
        "--server-pid",
        &pid,
        "--duration",
        "3s",
        "--subscribe",
        "--token-secret",
        SECRET,
    ])[0];
    assert_eq!(
        (r["subscribed"].as_bool(), r["tokens"].as_bool()),
        (Some(true), Some(true)),
        "{r}"
    );
    assert!(
        r["bytes_per_conn"].as_f64().expect("bytes_per_conn") > 0.0,
        "{r}"
    );
    assert!(
        r["anon_bytes_per_conn"]
            .as_f64()
            .expect("anon_bytes_per_conn")
            > 0.0,
        "{r}"
    );
    let (subs, _) = probe.join().expect("the probe");
    assert_eq!(
        subs, 300.0,
        "every connection subscribed under its own token"
    );
    // One message each, before the measurement.
    assert!(server.metric("ringcast_messages_delivered_total") >= 300.0);
    assert_eq!(server.metric("ringcast_handshake_failures_total"), 0.0);
}

#[test]
fn idle_and_connect_count_what_they_hold() {
    let server = TestServer::start(&[]);
    let target = server.addr.to_string();
    let pid = server.child.id().to_string();
    let r = &load(&[
        "idle",
        "--target",
        &target,
        "--connections",
        "300",
        "--server-pid",
        &pid,
        "--duration",
        "0s",
    ])[0];
    assert_eq!(r["connections"], 300, "{r}");
    assert!(r["rss_after"].as_u64().unwrap() > 0, "{r}");
    let r = &load(&[
        "connect",
        "--target",
        &target,
        "--connections",
        "200",
        "--rounds",
        "3",
        "--procs",
        "2",
    ])[0];
    assert_eq!(r["connect_all_s"].as_array().unwrap().len(), 3, "{r}");
    assert!(r["handshakes_per_s_median"].as_f64().unwrap() > 0.0, "{r}");
    server.wait_for(
        "every connection released",
        std::time::Duration::from_secs(10),
        |s| s.metric("ringcast_registry_connections") == 0.0,
    );
    assert_eq!(
        server.metric("ringcast_connections_accepted_total"),
        300.0 + 600.0
    );
}

#[test]
fn topics_with_wildcard_subscribes_by_pattern_and_gets_the_same_deliveries() {
    let args = |target: &str| -> Vec<String> {
        [
            "topics",
            "--target",
            target,
            "--connections",
            "20",
            "--topics",
            "10",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--wildcard",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let server = TestServer::start(&[]);
    let a = args(&server.addr.to_string());
    let r = &load(&a.iter().map(String::as_str).collect::<Vec<_>>())[0];
    assert_eq!(r["wildcard"], true, "{r}");
    let published = r["published"].as_u64().unwrap();
    assert!(published >= 150, "{r}");
    assert_eq!(r["received"].as_u64().unwrap(), published * 2, "{r}");
    assert_eq!(
        (r["out_of_order"].as_u64(), r["missing"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    // They were patterns: a server whose namespace forbids them refuses all.
    let file = std::env::temp_dir().join(format!("ringcast-loadwild-{}.toml", std::process::id()));
    std::fs::write(&file, "[[namespaces]]\nname = \"\"\nwildcards = false\n").unwrap();
    let strict = TestServer::start(&["--config", file.to_str().unwrap()]);
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .arg("load")
        .args(args(&strict.addr.to_string()))
        .args(["--timeout", "60s"])
        .stdin(Stdio::null())
        .output()
        .expect("run ringcast load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not allow wildcard subscriptions"),
        "{stderr}"
    );
    std::fs::remove_file(file).unwrap();
}

#[test]
fn fanout_by_xadd_follows_the_even_key_layout() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url(), "--redis-key-layout", "even"]);
    let target = server.addr.to_string();
    let r = &load(&[
        "fanout",
        "--target",
        &target,
        "--connections",
        "10",
        "--rate",
        "200",
        "--duration",
        "1s",
        "--redis",
        &redis.url(),
        "--redis-key-layout",
        "even",
    ])[0];
    let published = r["published"].as_u64().unwrap();
    assert!(published >= 150, "{r}");
    assert_eq!(r["received"].as_u64().unwrap(), published * 10, "{r}");
}
