//! Presence (docs/PROTOCOL.md sections 2, 3, 6): the `presence` request,
//! `join` and `leave`, on the embedded broker and across nodes sharing a
//! real Redis, including a node killed with SIGKILL.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::TestRedis;
use common::{config_file, TestServer};
use ringcast::auth::{mint_hmac, now_secs, Claims};
use ringcast::client::{Client, ClientError, Event};
use serde_json::{json, Value};

const SECRET: &str = "presence-secret-0123456789abcdef012345";

/// `chat` has presence; `room` has presence with small caps; `quiet` lists
/// users but sends no join/leave; `news` has none.
const POLICY: &str = r#"
[[namespaces]]
name = "chat"
presence = true
anonymous = true

[[namespaces]]
name = "room"
presence = true
presence_max_users = 2
join_leave_max_users = 2

[[namespaces]]
name = "quiet"
presence = true
join_leave = false

[[namespaces]]
name = "news"
"#;

fn token_with(sub: &str, subs: &[&str]) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: now_secs() + 600,
        subs: subs.iter().map(|s| s.to_string()).collect(),
        pubs: vec!["#".into()],
    };
    mint_hmac(SECRET.as_bytes(), &claims)
}

struct Node {
    server: TestServer,
    _file: Cleanup,
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn node(extra: &[&str]) -> Node {
    let file = config_file(POLICY);
    let mut args = vec![
        "--config",
        file.to_str().unwrap(),
        "--auth-hmac-secret",
        SECRET,
    ];
    args.extend_from_slice(extra);
    Node {
        server: TestServer::start(&args),
        _file: Cleanup(file),
    }
}

fn connect(n: &Node, user: &str) -> Client {
    let url = format!("{}?token={}", n.server.url(), token_with(user, &["#"]));
    Client::connect(&url).unwrap()
}

/// The next `join`/`leave` frame, skipping anything else; `None` when none
/// comes within `within`.
fn next_event(c: &mut Client, within: Duration) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Frame(v)) if v["op"] == "join" || v["op"] == "leave" => return Some(v),
            Ok(Event::Close(code, reason)) => panic!("closed {code} {reason}"),
            Ok(_) => {}
            Err(ClientError::Timeout) => return None,
            Err(e) => panic!("{e}"),
        }
    }
}

fn expect_event(c: &mut Client, op: &str, topic: &str, user: &str) {
    let v = next_event(c, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no {op} of {user} on {topic}"));
    assert_eq!(v, json!({"op": op, "topic": topic, "user": user}));
}

/// Takes the `join`s a client that just subscribed may get of users that
/// joined just before it (an event reaches whoever is subscribed when it
/// arrives); anything else fails.
fn settle(c: &mut Client, earlier: &[&str]) {
    while let Some(v) = next_event(c, Duration::from_millis(400)) {
        let user = v["user"].as_str().unwrap_or_default();
        assert!(
            v["op"] == "join" && earlier.contains(&user),
            "unexpected {v}"
        );
    }
}

fn expect_none(c: &mut Client, within: Duration) {
    if let Some(v) = next_event(c, within) {
        panic!("expected no presence event, got {v}");
    }
}

/// Users (sorted), count and truncated of a `presence` reply.
fn presence(c: &mut Client, topic: &str) -> (Vec<String>, u64, bool) {
    let (v, _) = c
        .request(json!({"op": "presence", "topic": topic}))
        .unwrap();
    assert_eq!(v["op"], "presence", "{v}");
    assert_eq!(v["topic"], topic, "{v}");
    let mut users: Vec<String> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    users.sort();
    (
        users,
        v["count"].as_u64().unwrap(),
        v["truncated"].as_bool().unwrap(),
    )
}

fn code(r: Result<impl Sized, ClientError>) -> u16 {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        Ok(_) => panic!("accepted"),
        Err(e) => panic!("{e}"),
    }
}

fn list(users: &[&str]) -> Vec<String> {
    users.iter().map(|u| u.to_string()).collect()
}

#[test]
fn one_node_lists_users_once_and_announces_first_joins_and_last_leaves() {
    let n = node(&["--presence-leave-delay", "0s"]);
    let mut watcher = connect(&n, "w");
    watcher.subscribe("chat:1", None).unwrap();
    let mut a1 = connect(&n, "alice");
    a1.subscribe("chat:1", None).unwrap();
    expect_event(&mut watcher, "join", "chat:1", "alice");
    settle(&mut a1, &["w"]);
    // alice never hears of herself; a second tab of hers is no news.
    let mut a2 = connect(&n, "alice");
    a2.subscribe("chat:1", None).unwrap();
    let mut b = connect(&n, "bob");
    b.subscribe("chat:1", None).unwrap();
    expect_event(&mut watcher, "join", "chat:1", "bob");
    expect_event(&mut a1, "join", "chat:1", "bob");
    expect_none(&mut a1, Duration::from_millis(300));
    assert_eq!(
        presence(&mut b, "chat:1"),
        (list(&["alice", "bob", "w"]), 3, false)
    );
    // Anonymous connections are neither listed nor announced.
    let mut guest = Client::connect(&n.server.url()).unwrap();
    guest.subscribe("chat:1", None).unwrap();
    expect_none(&mut watcher, Duration::from_millis(300));
    assert_eq!(presence(&mut watcher, "chat:1").1, 3);
    // One tab of alice goes: she is still here.
    a1.close();
    expect_none(&mut watcher, Duration::from_millis(500));
    assert_eq!(presence(&mut watcher, "chat:1").1, 3);
    // The last one goes: everyone else hears it.
    a2.unsubscribe("chat:1").unwrap();
    expect_event(&mut watcher, "leave", "chat:1", "alice");
    expect_event(&mut b, "leave", "chat:1", "alice");
    assert_eq!(
        presence(&mut watcher, "chat:1"),
        (list(&["bob", "w"]), 2, false)
    );
    // Events come in order with messages.
    b.publish("chat:1", &json!("m1")).unwrap();
    drop(b);
    match watcher.recv(Duration::from_secs(5)).unwrap() {
        Event::Msg { data, .. } => assert_eq!(data, json!("m1")),
        other => panic!("{other:?}"),
    }
    expect_event(&mut watcher, "leave", "chat:1", "bob");
    let m = n.server.metrics();
    assert_eq!(
        m.get("ringcast_presence_events_total{kind=\"join\"}"),
        Some(&3.0)
    );
    assert_eq!(
        m.get("ringcast_presence_events_total{kind=\"leave\"}"),
        Some(&2.0)
    );
    assert_eq!(m.get("ringcast_presence_users"), Some(&1.0));
}

#[test]
fn presence_requests_are_refused_clearly() {
    let n = node(&[]);
    let mut c = connect(&n, "u");
    // Presence off in the namespace, unknown namespace.
    assert_eq!(
        code(c.request(json!({"op": "presence", "topic": "news:1"}))),
        4403
    );
    assert_eq!(
        code(c.request(json!({"op": "presence", "topic": "billing:1"}))),
        4004
    );
    // The token's `subs` must allow the topic.
    let url = format!(
        "{}?token={}",
        n.server.url(),
        token_with("v", &["chat.other"])
    );
    let mut narrow = Client::connect(&url).unwrap();
    let err = narrow
        .request(json!({"op": "presence", "topic": "chat:1"}))
        .unwrap_err();
    match err {
        ClientError::Server { code, reason } => {
            assert_eq!(code, 4403);
            assert!(reason.contains("not allowed by token"), "{reason}");
        }
        e => panic!("{e}"),
    }
    // A malformed request names the field.
    assert_eq!(code(c.request(json!({"op": "presence"}))), 4000);
    assert_eq!(
        code(c.request(json!({"op": "presence", "topic": "bad topic"}))),
        4000
    );
}

#[test]
fn caps_truncate_the_list_and_suppress_events() {
    let n = node(&["--presence-leave-delay", "0s"]);
    let mut w = connect(&n, "w");
    w.subscribe("room:1", None).unwrap();
    let mut u1 = connect(&n, "u1");
    u1.subscribe("room:1", None).unwrap();
    expect_event(&mut w, "join", "room:1", "u1");
    settle(&mut u1, &["w"]);
    // A third user: over join_leave_max_users, so no join; the reply is
    // cut at presence_max_users and says so.
    let mut u2 = connect(&n, "u2");
    u2.subscribe("room:1", None).unwrap();
    expect_none(&mut w, Duration::from_millis(500));
    let (users, count, truncated) = presence(&mut w, "room:1");
    assert_eq!((users.len(), count, truncated), (2, 3, true));
    // join_leave = false: listed, never announced.
    u1.subscribe("quiet:1", None).unwrap();
    let mut q = connect(&n, "q");
    q.subscribe("quiet:1", None).unwrap();
    expect_none(&mut u1, Duration::from_millis(500));
    assert_eq!(presence(&mut q, "quiet:1"), (list(&["q", "u1"]), 2, false));
}

#[test]
fn a_leave_waits_for_the_delay_and_a_quick_return_is_no_news() {
    let n = node(&["--presence-leave-delay", "1500ms"]);
    let mut w = connect(&n, "w");
    w.subscribe("chat:r", None).unwrap();
    let mut a = connect(&n, "alice");
    a.subscribe("chat:r", None).unwrap();
    expect_event(&mut w, "join", "chat:r", "alice");
    // A page reload: gone and back within the delay.
    a.close();
    let mut a = connect(&n, "alice");
    a.subscribe("chat:r", None).unwrap();
    expect_none(&mut w, Duration::from_millis(2500));
    // A real departure: the leave comes after the delay.
    let left = Instant::now();
    a.close();
    expect_event(&mut w, "leave", "chat:r", "alice");
    let waited = left.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "leave after {waited:?}"
    );
}

fn redis_node(redis: &TestRedis, extra: &[&str]) -> Node {
    let mut args = vec!["--redis", &*Box::leak(redis.url().into_boxed_str())];
    args.extend_from_slice(extra);
    node(&args)
}

#[test]
fn two_nodes_share_presence_and_a_user_on_both_joins_once() {
    let redis = TestRedis::start();
    let a = redis_node(&redis, &["--presence-leave-delay", "0s"]);
    let b = redis_node(&redis, &["--presence-leave-delay", "0s"]);
    let mut wa = connect(&a, "wa");
    let first = wa.subscribe("chat:x", None).unwrap();
    let mut wb = connect(&b, "wb");
    wb.subscribe("chat:x", None).unwrap();
    expect_event(&mut wa, "join", "chat:x", "wb");
    settle(&mut wb, &["wa"]);
    // alice on both nodes at once: one join, seen on both nodes.
    let mut on_a = connect(&a, "alice");
    let mut on_b = connect(&b, "alice");
    let ta = std::thread::spawn(move || {
        on_a.subscribe("chat:x", None).unwrap();
        on_a
    });
    on_b.subscribe("chat:x", None).unwrap();
    let on_a = ta.join().unwrap();
    expect_event(&mut wa, "join", "chat:x", "alice");
    expect_event(&mut wb, "join", "chat:x", "alice");
    expect_none(&mut wa, Duration::from_millis(500));
    expect_none(&mut wb, Duration::from_millis(100));
    for w in [&mut wa, &mut wb] {
        assert_eq!(
            presence(w, "chat:x"),
            (list(&["alice", "wa", "wb"]), 3, false)
        );
    }
    // Her node A connection goes: she is still on B.
    on_a.close();
    expect_none(&mut wb, Duration::from_millis(500));
    drop(on_b);
    expect_event(&mut wa, "leave", "chat:x", "alice");
    expect_event(&mut wb, "leave", "chat:x", "alice");
    // Presence entries are never replayed by recovery: only the message is.
    wa.publish("chat:x", &json!("m")).unwrap();
    let mut late = connect(&a, "late");
    let sub = late
        .subscribe("chat:x", Some((&first.last, &first.epoch)))
        .unwrap();
    assert_eq!(sub.recovered, Some(true));
    assert_eq!(sub.replayed.len(), 1, "{:?}", sub.replayed);
    // The node cost: one round trip per node-level change.
    let calls = a.server.metric("ringcast_presence_redis_calls_total");
    assert!(calls >= 3.0, "{calls}");
}

#[test]
fn a_drained_node_users_who_reconnect_elsewhere_never_leave() {
    let redis = TestRedis::start();
    let flags = [
        "--presence-ttl",
        "3s",
        "--presence-leave-delay",
        "1s",
        "--drain-window",
        "1s",
    ];
    let survivor = redis_node(&redis, &flags);
    let mut drained = redis_node(&redis, &flags);
    let mut w = connect(&survivor, "w");
    w.subscribe("chat:d", None).unwrap();
    let mut mover = connect(&drained, "mover");
    mover.subscribe("chat:d", None).unwrap();
    let mut goer = connect(&drained, "goer");
    goer.subscribe("chat:d", None).unwrap();
    expect_event(&mut w, "join", "chat:d", "mover");
    expect_event(&mut w, "join", "chat:d", "goer");
    let drain = Instant::now();
    drained.server.signal_term();
    // "mover" reconnects to the survivor as its `drain` frame says;
    // "goer" does not come back.
    let _ = mover.recv(Duration::from_secs(5));
    let mut mover = connect(&survivor, "mover");
    mover.subscribe("chat:d", None).unwrap();
    assert!(drained.server.wait_exit(Duration::from_secs(10)).is_some());
    drop(goer);
    expect_event(&mut w, "leave", "chat:d", "goer");
    let after = drain.elapsed();
    // Held for the drain window plus the delay (2 s), then found by the
    // survivor within half a second.
    assert!(
        after >= Duration::from_millis(1800),
        "leave after {after:?}"
    );
    expect_none(&mut w, Duration::from_millis(1500));
    assert_eq!(
        presence(&mut w, "chat:d"),
        (list(&["mover", "w"]), 2, false)
    );
}

#[test]
fn a_killed_node_users_leave_within_the_ttl() {
    let redis = TestRedis::start();
    let ttl = ["--presence-ttl", "3s", "--presence-leave-delay", "0s"];
    let survivor = redis_node(&redis, &ttl);
    let mut doomed = redis_node(&redis, &ttl);
    let mut w = connect(&survivor, "w");
    w.subscribe("chat:k", None).unwrap();
    let mut ghost = connect(&doomed, "ghost");
    ghost.subscribe("chat:k", None).unwrap();
    // "both" is on both nodes: it stays.
    let mut both_s = connect(&survivor, "both");
    both_s.subscribe("chat:k", None).unwrap();
    let mut both_d = connect(&doomed, "both");
    both_d.subscribe("chat:k", None).unwrap();
    expect_event(&mut w, "join", "chat:k", "ghost");
    expect_event(&mut w, "join", "chat:k", "both");
    expect_none(&mut w, Duration::from_millis(300));
    let killed = Instant::now();
    doomed.server.child.kill().unwrap();
    doomed.server.child.wait().unwrap();
    expect_event(&mut w, "leave", "chat:k", "ghost");
    let after = killed.elapsed();
    // TTL 3 s plus a second, and slack for a loaded test machine.
    assert!(after <= Duration::from_secs(6), "leave after {after:?}");
    expect_none(&mut w, Duration::from_millis(1000));
    assert_eq!(presence(&mut w, "chat:k"), (list(&["both", "w"]), 2, false));
    assert_eq!(
        survivor.server.metric("ringcast_presence_ghosts_total"),
        2.0
    );
    drop((ghost, both_d, both_s));
}

#[test]
fn token_refreshes_join_a_guest_and_leave_a_narrowed_user() {
    let n = node(&["--presence-leave-delay", "0s"]);
    let mut w = connect(&n, "w");
    w.subscribe("chat:t", None).unwrap();
    // A guest (anonymous namespace) is nobody until its `auth` names a user.
    let mut guest = Client::connect(&n.server.url()).unwrap();
    guest.subscribe("chat:t", None).unwrap();
    settle(&mut guest, &["w"]);
    expect_none(&mut w, Duration::from_millis(300));
    let (ok, _) = guest
        .request(json!({"op": "auth", "token": token_with("gina", &["#"])}))
        .unwrap();
    assert_eq!(ok["op"], "ok");
    expect_event(&mut w, "join", "chat:t", "gina");
    // A refresh whose `subs` no longer allow a topic (of a namespace that
    // admits no guests) ends the subscription: the user leaves.
    w.subscribe("room:t", None).unwrap();
    let mut u = connect(&n, "ursula");
    u.subscribe("room:t", None).unwrap();
    expect_event(&mut w, "join", "room:t", "ursula");
    let (ok, _) = u
        .request(json!({"op": "auth", "token": token_with("ursula", &["news"])}))
        .unwrap();
    assert_eq!(ok["op"], "ok");
    expect_event(&mut w, "leave", "room:t", "ursula");
    assert_eq!(presence(&mut w, "room:t"), (list(&["w"]), 1, false));
}

/// With `--redis-key-layout even`, presence keeps its keys beside the
/// partition's even stream key (so in its slot on a cluster), and works
/// across nodes as with the legacy keys.
#[test]
fn presence_follows_the_even_key_layout() {
    use ringcast::broker::redis::{partition, KeyLayout, Keys};
    let redis = TestRedis::start();
    let even = ["--redis-key-layout", "even", "--presence-leave-delay", "0s"];
    let a = redis_node(&redis, &even);
    let b = redis_node(&redis, &even);
    let mut wa = connect(&a, "wa");
    wa.subscribe("chat:e", None).unwrap();
    let mut wb = connect(&b, "wb");
    wb.subscribe("chat:e", None).unwrap();
    expect_event(&mut wa, "join", "chat:e", "wb");
    assert_eq!(presence(&mut wb, "chat:e"), (list(&["wa", "wb"]), 2, false));
    let keys = Keys::new("ringcast", 16, KeyLayout::Even);
    let stream = keys.stream(partition("chat:e", 16));
    let users: usize = redis::cmd("HLEN")
        .arg(format!("{stream}:presence:chat:e"))
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(users, 2, "presence hash beside {stream}");
    drop(wb);
    expect_event(&mut wa, "leave", "chat:e", "wb");
}
