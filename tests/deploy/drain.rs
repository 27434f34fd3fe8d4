//! The real-proxy scenario: two nodes on one Redis behind nginx or
//! HAProxy (started from the deploy/ file); least connections and
//! cross-node delivery checked with a few clients, then `ringcast load
//! churn --churn 0` (the real binary: subscribers that follow the server's
//! `drain` as docs/PROTOCOL.md asks) through the proxy while one node
//! drains, every subscriber checked message by message by the load tool.
#![allow(unreachable_pub)]

use std::io::Read as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::proxy::{Kind, Node, Proxy};
use crate::common::redis::TestRedis;
use crate::common::TestServer;
use crate::EXIT_GRACE;
use ringcast::client::{Client, Event};

/// Subscribers of the drain test (the goal is a few thousand), held by
/// the load tool's one worker process on one epoll loop, on a 2-core
/// machine shared with the proxy, two debug-build nodes and Redis. The
/// open-file limit here (20,000) would allow about 9,000: the proxy holds
/// two descriptors per client. The scenario runs in the suite's first pass
/// only ([`drain_through`]).
const SUBSCRIBERS: usize = 2_000;

/// The drained node's `--drain-window`: 1,000 reconnects over it, about
/// 200 per second, each a connect through the proxy and a recovery.
const DRAIN_WINDOW: Duration = Duration::from_secs(5);

/// Messages per second, published by `XADD` (as a producer does) before,
/// during and after the drain: 2,000 subscribers make it 20,000
/// deliveries a second through the proxy.
const RATE: u64 = 10;

/// Messages every subscriber of the node to drain has before SIGTERM, so
/// that every subscriber is live first.
const BEFORE_DRAIN: u64 = 10;

/// How long the load tool publishes: the messages before the drain, the
/// drain window, and 1.5 s more (live messages reach the drained node's
/// subscribers on the other node), with 0.5 s for the test to notice.
const PUBLISH_FOR: Duration = Duration::from_secs(8);

/// Connection attempts that may time out (the load tool gives an attempt
/// 5 s) and be retried, out of ~3,000: on this shared 2-core machine, with
/// the other tests of this file running too, a few may when the machine
/// is saturated. Every other failure (a refusal, a 502 or 503 from the
/// proxy) fails the test, and so does any subscriber that does not come back.
const TIMEOUTS_TOLERATED: u64 = 10;

/// The HS256 secret of the nodes; every client sends a token in `?token=`,
/// which the proxies must not log.
const SECRET: &str = "deploy-test-secret-0123456789abcdef";

/// Proxy runs one at a time: each loads the machine on its own.
static ONE_PROXY_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn token() -> String {
    let claims = ringcast::auth::Claims {
        sub: "deploy-test".into(),
        exp: ringcast::auth::now_secs() + 3600,
        subs: vec!["#".into()],
        pubs: vec!["#".into()],
    };
    ringcast::auth::mint_hmac_for(SECRET.as_bytes(), &claims, None, None)
}

fn node(redis: &TestRedis, name: &str) -> TestServer {
    let window = format!("{}s", DRAIN_WINDOW.as_secs());
    TestServer::start(&[
        "--redis",
        &redis.url(),
        "--node-name",
        name,
        "--drain-window",
        &window,
        "--auth-hmac-secret",
        SECRET,
        // The proxy names each client (deploy/ trusts its proxies too).
        "--trusted-proxies",
        "127.0.0.1",
        // Every client of the load tool is 127.0.0.1 as well.
        "--max-connections-per-ip",
        "100000",
        "--max-handshakes-per-ip",
        "0",
    ])
}

fn as_node(s: &TestServer) -> Node {
    Node {
        ws: s.addr,
        admin: s.admin,
    }
}

/// `welcome`'s node of a client.
fn node_of(c: &Client) -> String {
    c.welcome["node"].as_str().unwrap().to_string()
}

/// Through the proxy, sequentially: 6 clients split 3/3; after 2 of node
/// a's leave, the next 2 both go to a (round robin would split them);
/// then each client receives what is published on either node.
fn least_connections_and_cross_node_delivery(proxy: &Proxy, a: &TestServer, b: &TestServer) {
    let url = proxy.url(&format!("?token={}", token()));
    let mut clients: Vec<Client> = (0..6).map(|_| Client::connect(&url).unwrap()).collect();
    let on = |cs: &[Client], n: &str| cs.iter().filter(|c| node_of(c) == n).count();
    assert_eq!((on(&clients, "a"), on(&clients, "b")), (3, 3));
    for _ in 0..2 {
        let i = clients.iter().position(|c| node_of(c) == "a").unwrap();
        clients.remove(i).close();
    }
    a.wait_for("a holds 1 client", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 1.0
    });
    for _ in 0..2 {
        let c = Client::connect(&url).unwrap();
        assert_eq!(node_of(&c), "a", "least connections: a has fewer");
        clients.push(c);
    }
    let topic = "cross";
    for c in &mut clients {
        c.subscribe(topic, None).unwrap();
    }
    let tok = token();
    for (server, name) in [(a, "a"), (b, "b")] {
        let mut direct = Client::connect(&format!("{}?token={tok}", server.url())).unwrap();
        direct.publish(topic, &json!({"on": name})).unwrap();
        direct.close();
    }
    for c in &mut clients {
        let mut got = Vec::new();
        while got.len() < 2 {
            match c.recv(Duration::from_secs(5)).unwrap() {
                Event::Msg { data, .. } => got.push(data["on"].as_str().unwrap().to_string()),
                _ => continue,
            }
        }
        assert_eq!(got, ["a", "b"], "client on {}", node_of(c));
    }
    for c in clients {
        c.close();
    }
    client_address_reaches_the_node(proxy, a, b);
}

/// A client from 127.0.0.3 through the proxy (which connects to the nodes
/// from 127.0.0.1): the node that takes it logs 127.0.0.3 as the client,
/// read from nginx's X-Forwarded-For or HAProxy's PROXY v2 header.
fn client_address_reaches_the_node(proxy: &Proxy, a: &TestServer, b: &TestServer) {
    use std::io::{Read, Write};
    let url = proxy.url("");
    let hostport = url.trim_start_matches("ws://").split('/').next().unwrap();
    let mut s = crate::common::raw::connect_from("127.0.0.3", hostport.parse().unwrap());
    let request = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut head = [0; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101", "upgraded through the proxy");
    let named = |n: &TestServer| {
        n.log()
            .lines()
            .any(|l| l.contains("client address from a trusted proxy") && l.contains("127.0.0.3"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(named(a) || named(b)) {
        assert!(Instant::now() < deadline, "no node logged client 127.0.0.3");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ringcast load`, running; killed (by its id) if the test fails first,
/// its workers then exit with it.
struct LoadRun {
    child: Option<Child>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl LoadRun {
    fn start(args: &[String]) -> LoadRun {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .arg("load")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ringcast load");
        let read = |mut r: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let stdout = read(Box::new(child.stdout.take().unwrap()));
        let stderr = read(Box::new(child.stderr.take().unwrap()));
        LoadRun {
            child: Some(child),
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// Panics with its output if it has exited (it should run until `finish`).
    fn check_running(&mut self) {
        let child = self.child.as_mut().unwrap();
        if let Ok(Some(status)) = child.try_wait() {
            let (out, err) = self.output();
            panic!("ringcast load exited early ({status}):\n{out}\n{err}");
        }
    }

    fn output(&mut self) -> (String, String) {
        let join = |h: Option<JoinHandle<String>>| h.map(|h| h.join().unwrap()).unwrap_or_default();
        (join(self.stdout.take()), join(self.stderr.take()))
    }

    /// Waits up to `within` for it to exit: its status, stdout and stderr.
    fn finish(mut self, within: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + within;
        let mut child = self.child.take().unwrap();
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let (out, err) = self.output();
                panic!("ringcast load still running after {within:?}:\n{out}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (out, err) = self.output();
        (status, out, err)
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The load tool's arguments: `churn --churn 0`, its subscribers only
/// following the server, through the proxy; publishing by `XADD`.
fn load_args(proxy: &Proxy, redis: &TestRedis, token: &str, topic: &str) -> Vec<String> {
    let target = format!("127.0.0.1:{}", proxy.port);
    let publish_for = format!("{}ms", PUBLISH_FOR.as_millis());
    [
        "churn",
        "--churn",
        "0",
        "--target",
        &target,
        "--connections",
        &SUBSCRIBERS.to_string(),
        "--topic",
        topic,
        "--token",
        token,
        "--redis",
        &redis.url(),
        "--rate",
        &RATE.to_string(),
        "--duration",
        &publish_for,
        "--settle",
        "20s",
        "--timeout",
        "50s",
    ]
    .map(String::from)
    .to_vec()
}

/// Waits (polling) until `what` holds, while the load tool runs.
fn wait_while_loading(
    load: &mut LoadRun,
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + within;
    while !done() {
        load.check_running();
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole scenario in front of `kind`; returns how long it took. Not in
/// tests/run's second pass (`MONOIO_FORCE_LEGACY_DRIVER`): what it checks
/// is the proxies and the recipes, which the shards' driver does not
/// change, and twice the load would only load the machine (`None`).
pub fn drain_through(kind: Kind) -> Option<Duration> {
    if std::env::var_os("MONOIO_FORCE_LEGACY_DRIVER").is_some() {
        eprintln!("{kind:?} drain: run in the io_uring pass only");
        return None;
    }
    let _one = ONE_PROXY_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let redis = TestRedis::start();
    let mut a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut proxy = Proxy::start(kind, &[as_node(&a), as_node(&b)]);
    least_connections_and_cross_node_delivery(&proxy, &a, &b);

    // The load tool's subscribers through the proxy, spread over both nodes.
    let topic = "drain-test";
    let tok = token();
    let delivered_by_a = a.metric("ringcast_messages_delivered_total");
    let mut load = LoadRun::start(&load_args(&proxy, &redis, &tok, topic));
    let subscribed = |n: &TestServer| n.metric("ringcast_subscriptions_active") as usize;
    wait_while_loading(
        &mut load,
        "every subscriber on a node",
        Duration::from_secs(30),
        || subscribed(&a) + subscribed(&b) == SUBSCRIBERS,
    );
    let (on_a, on_b) = (subscribed(&a), subscribed(&b));
    assert!(
        on_a.abs_diff(on_b) <= SUBSCRIBERS / 10,
        "least connections spreads them: a {on_a}, b {on_b}"
    );

    // Once a's subscribers have messages, drain a while publishing goes on.
    wait_while_loading(
        &mut load,
        "a's subscribers live",
        Duration::from_secs(10),
        || {
            a.metric("ringcast_messages_delivered_total") - delivered_by_a
                >= (on_a as u64 * BEFORE_DRAIN) as f64
        },
    );
    a.signal_term();
    let exit = a.wait_exit(DRAIN_WINDOW + EXIT_GRACE + Duration::from_secs(1));
    assert!(
        exit.is_some_and(|s| s.success()),
        "a drained and exited 0: {exit:?}\n{}",
        a.log()
    );
    let (status, out, err) = load.finish(Duration::from_secs(45));
    let elapsed = started.elapsed();
    // A proxy logs a WebSocket request when its connection ends: the load
    // tool's last ones just closed.
    let ws_requests = |p: &Proxy| p.access_log().lines().filter(|l| l.contains("/ws")).count();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ws_requests(&proxy) < SUBSCRIBERS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.stop();
    let report: Value = out
        .lines()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no report from ringcast load ({status}):\n{out}\n{err}"));
    assert!(
        status.success(),
        "ringcast load failed ({status}):\n{out}\n{err}"
    );
    check_report(&report, on_a, on_b);

    // The token never reached a log; the connections did.
    let logs = proxy.logs();
    let signature = tok.rsplit('.').next().unwrap();
    assert!(
        !logs.contains(signature),
        "{kind:?} logged a token:\n{logs}"
    );
    let requests = ws_requests(&proxy);
    assert!(
        requests >= SUBSCRIBERS,
        "{kind:?} logged {requests} WebSocket requests"
    );
    eprintln!(
        "{kind:?}: {SUBSCRIBERS} subscribers ({on_a} drained from a), {} messages each, \
         in {elapsed:.1?}\n{out}",
        report["published"]
    );
    Some(elapsed)
}

/// From the load tool's report: every subscriber has every message once,
/// in order; a's got `drain` then 1001, waited `reconnect_in_ms` and came
/// back through the proxy to b, recovering what they missed; b's were
/// never disturbed; the reconnects were spread over the window.
fn check_report(r: &Value, on_a: usize, on_b: usize) {
    let n = |key: &str| r[key].as_u64().unwrap_or_else(|| panic!("{key} in {r}"));
    let (on_a, on_b) = (on_a as u64, on_b as u64);
    let published = n("published");
    assert_eq!(n("subscribers"), SUBSCRIBERS as u64, "{r}");
    assert!(published >= BEFORE_DRAIN * 6, "{r}");
    // Each subscriber takes a message only if its number is above the last
    // one it took: received == expected with nothing out of order and no
    // gap is every message once, in order, for every subscriber.
    assert_eq!(n("expected"), published * SUBSCRIBERS as u64, "{r}");
    assert_eq!(
        n("received"),
        n("expected"),
        "every message to every subscriber: {r}"
    );
    for key in ["out_of_order", "missing", "unrecovered", "publisher_errors"] {
        assert_eq!(n(key), 0, "{key}: {r}");
    }
    assert_eq!(r["errors"], json!({}), "{r}");
    // a's subscribers, and only they, followed a drain and came back once.
    for key in ["drains", "drains_followed", "reconnects"] {
        assert_eq!(n(key), on_a, "{key}: every subscriber of a, once: {r}");
    }
    assert_eq!(
        r["closes"],
        json!({"1001": on_a}),
        "a drain, then 1001: {r}"
    );
    assert_eq!(
        r["ended_on"],
        json!({"b": SUBSCRIBERS}),
        "back through the proxy to b: {r}"
    );
    let failed = r["failed_connects"].as_object().unwrap();
    let timeouts: u64 = failed
        .iter()
        .filter(|(why, _)| why.starts_with("timed out"))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    let all: u64 = failed.values().map(|n| n.as_u64().unwrap()).sum();
    assert!(
        all == timeouts && timeouts <= TIMEOUTS_TOLERATED,
        "connects through the proxy failed: {failed:#?}"
    );
    if all == 0 {
        assert_eq!(r["landed"], json!({"a": on_a, "b": on_b + on_a}), "{r}");
    } else {
        eprintln!("{all} attempts timed out and were retried (machine saturated)");
    }
    // Spread uniformly over the window: both ends reached, the middle
    // near half of it.
    let window = DRAIN_WINDOW.as_millis() as u64;
    let wait = &r["drain_wait_ms"];
    let (min, mean, max) = (
        wait["min"].as_u64().unwrap(),
        wait["mean"].as_f64().unwrap() as u64,
        wait["max"].as_u64().unwrap(),
    );
    assert!(
        max < window,
        "reconnect_in_ms {max} within the {window} ms window"
    );
    assert!(
        min < window / 10 && max > window * 9 / 10,
        "spread: {min}..{max}"
    );
    assert!(
        (window * 4 / 10..window * 6 / 10).contains(&mean),
        "spread uniformly: mean {mean} of {window}"
    );
}
