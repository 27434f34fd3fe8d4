//! The real-proxy scenario: two nodes on one Redis behind nginx or
//! HAProxy (started from the deploy/ file); least connections and
//! cross-node delivery checked with a few clients, then a crowd through
//! the proxy while one node drains, every subscriber checked message by
//! message.
#![allow(unreachable_pub)]

use std::time::{Duration, Instant};

use serde_json::json;

use super::crowd;
use super::proxy::{Kind, Node, Proxy};
use crate::common::redis::{xadd, TestRedis};
use crate::common::TestServer;
use crate::EXIT_GRACE;
use ringcast::client::{Client, Event};

/// Subscribers of the drain test (the goal is a few thousand). Each is a
/// thread with a blocking client, on a 2-core machine shared with the
/// proxy, two debug-build nodes and Redis. 2,000 (about 1,000 of them on
/// the drained node) runs in about 10-15 s per proxy with every subscriber
/// checked message by message. At 3,000-4,000 the machine saturates (load
/// ~26, no idle CPU): hundreds of upgrades pass the client's 5 s timeout
/// and are retried, and the run measures the machine, not the recipe. The
/// open-file limit here (20,000) would allow about 9,000: the proxy holds
/// two descriptors per client. The scenario runs in the suite's first pass
/// only ([`drain_through`]), so it can take 2,000.
const SUBSCRIBERS: usize = 2_000;

/// Subscribers connected (and subscribed) before the next batch starts:
/// a burst of this many upgrades at once through the proxy.
const BATCH: usize = 200;

/// The drained node's `--drain-window`: 1,000 reconnects over it, about
/// 200 per second, each a connect through the proxy and a recovery.
const DRAIN_WINDOW: Duration = Duration::from_secs(5);

/// One message every this often, before, during and after the drain:
/// 2,000 subscribers make it 20,000 deliveries a second through the proxy.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Published before SIGTERM, so that every subscriber is live first.
const BEFORE_DRAIN: u64 = 10;

/// Reconnect attempts that may time out (`Client::connect` gives the
/// upgrade 5 s) and be retried, out of the drained node's ~1,000: on this
/// shared 2-core machine, with the other tests of this file running too,
/// a few do when the machine is saturated. Every other failure (a refusal,
/// a 502 or 503 from the proxy) fails the test, and so does any client
/// that does not come back.
const TIMEOUTS_TOLERATED: usize = 10;

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
        // Every client of the crowd is 127.0.0.1 as well.
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

/// A message id's (ms, seq), for ordering.
fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// The whole scenario in front of `kind`; returns how long it took. Not in
/// tests/run's second pass (`MONOIO_FORCE_LEGACY_DRIVER`): what it checks
/// is the proxies and the recipes, which the shards' driver does not
/// change, and twice the crowd would only load the machine (`None`).
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

    // A crowd through the proxy, spread over both nodes.
    let topic = "drain-test";
    let tok = token();
    let deadline = started + Duration::from_secs(55);
    let crowd = crowd::start(
        SUBSCRIBERS,
        BATCH,
        &proxy.url(&format!("?token={tok}")),
        topic,
        deadline,
    );
    let on_a = a.metric("ringcast_subscriptions_active") as usize;
    let on_b = b.metric("ringcast_subscriptions_active") as usize;
    assert_eq!(on_a + on_b, SUBSCRIBERS, "every subscriber is on a node");
    assert!(
        on_a.abs_diff(on_b) <= SUBSCRIBERS / 10,
        "least connections spreads them: a {on_a}, b {on_b}"
    );

    // Publish as a producer (XADD) before, during and after a's drain.
    let mut conn = redis.conn();
    let mut seq = 0;
    let mut drained_at = None;
    let mut next = Instant::now();
    while drained_at
        .is_none_or(|t: Instant| t.elapsed() < DRAIN_WINDOW + Duration::from_millis(1500))
    {
        let data = json!({"seq": seq}).to_string();
        xadd(&mut conn, topic, &[("topic", topic), ("data", &data)]);
        seq += 1;
        if seq == BEFORE_DRAIN {
            a.signal_term();
            drained_at = Some(Instant::now());
        }
        next += PUBLISH_EVERY;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let exit = a.wait_exit(DRAIN_WINDOW + EXIT_GRACE + Duration::from_secs(1));
    assert!(
        exit.is_some_and(|s| s.success()),
        "a drained and exited 0: {exit:?}\n{}",
        a.log()
    );
    let seen = crowd.finish(seq);
    let elapsed = started.elapsed();
    proxy.stop();
    check_crowd(&seen, seq, on_a);

    // The token never reached a log; the connections did.
    let logs = proxy.logs();
    let signature = tok.rsplit('.').next().unwrap();
    assert!(
        !logs.contains(signature),
        "{kind:?} logged a token:\n{logs}"
    );
    let requests = proxy
        .access_log()
        .lines()
        .filter(|l| l.contains("/ws"))
        .count();
    assert!(
        requests >= SUBSCRIBERS,
        "{kind:?} logged {requests} WebSocket requests"
    );
    eprintln!(
        "{kind:?}: {SUBSCRIBERS} subscribers ({on_a} drained from a), {seq} messages each, \
         in {elapsed:.1?}"
    );
    Some(elapsed)
}

/// Every subscriber has every message once, in order; a's got `drain` then
/// 1001 and came back through the proxy to b, recovering what they missed;
/// b's were never disturbed; the reconnects were spread over the window.
fn check_crowd(seen: &[crowd::Seen], messages: u64, on_a: usize) {
    let all: Vec<u64> = (0..messages).collect();
    let mut drain_ms = Vec::new();
    let mut failed = 0;
    for (i, s) in seen.iter().enumerate() {
        assert!(s.error.is_none(), "subscriber {i}: {:?}\n{s:?}", s.error);
        assert_eq!(
            s.seqs, all,
            "subscriber {i}: every message once, in order\n{s:?}"
        );
        assert!(
            s.ids.windows(2).all(|w| id_key(&w[0]) < id_key(&w[1])),
            "subscriber {i}: ids in order"
        );
        failed += s.failed_connects.len();
        match s.nodes[0].as_str() {
            "a" => {
                assert_eq!(s.events, ["drain", "close 1001"], "subscriber {i}");
                assert_eq!(
                    s.nodes,
                    ["a", "b"],
                    "subscriber {i}: back through the proxy to b"
                );
                assert_eq!(
                    s.recovered,
                    [Some(true)],
                    "subscriber {i}: recovered with since"
                );
                assert!(s.waited[0] >= Duration::from_millis(s.drain_ms[0]));
                drain_ms.push(s.drain_ms[0]);
            }
            "b" => {
                assert!(s.events.is_empty(), "subscriber {i}: {:?}", s.events);
                assert_eq!(s.nodes, ["b"], "subscriber {i}");
            }
            other => panic!("subscriber {i} on node {other:?}"),
        }
    }
    assert_eq!(drain_ms.len(), on_a, "every client of a was drained");
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for f in seen.iter().flat_map(|s| &s.failed_connects) {
        *kinds
            .entry(f.split(" (after").next().unwrap().to_string())
            .or_default() += 1;
    }
    let timeouts = kinds
        .get("reconnect: connect: timed out")
        .copied()
        .unwrap_or(0);
    assert!(
        failed == timeouts && timeouts <= TIMEOUTS_TOLERATED,
        "{failed} connects through the proxy failed: {kinds:#?}"
    );
    if failed > 0 {
        eprintln!("{failed} reconnects timed out once and were retried (machine saturated)");
    }
    // Spread uniformly over the window: both ends reached, the middle
    // near half of it.
    let window = DRAIN_WINDOW.as_millis() as u64;
    let (min, max) = (
        drain_ms.iter().min().unwrap(),
        drain_ms.iter().max().unwrap(),
    );
    let mean = drain_ms.iter().sum::<u64>() / drain_ms.len() as u64;
    assert!(
        *max < window,
        "reconnect_in_ms {max} within the {window} ms window"
    );
    assert!(
        *min < window / 10 && *max > window * 9 / 10,
        "spread: {min}..{max}"
    );
    assert!(
        (window * 4 / 10..window * 6 / 10).contains(&mean),
        "spread uniformly: mean {mean} of {window}"
    );
}
