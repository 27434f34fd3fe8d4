//! Wildcard subscriptions (docs/PROTOCOL.md sections 2 and 5): `sub` with
//! a topic pattern delivers every matching topic, published on any shard,
//! once per connection even when several of its subscriptions match; a
//! token's `subs` must cover the whole pattern; a namespace can forbid
//! patterns and a pattern never reaches into another namespace; `since`
//! answers `recovered:false`; patterns count against
//! `--max-subscriptions` and in `ringcast_wildcard_subscriptions_active`.
//! Real server processes (2 shards), real clients, the embedded broker and
//! a real redis-server.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::redis::TestRedis;
use common::TestServer;
use ringcast::auth::{mint_hmac, now_secs, Claims};
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

const SECRET: &str = "wildcard-secret-0123456789abcdef0123";

fn token(subs: &[&str]) -> String {
    let claims = Claims {
        sub: "u1".into(),
        exp: now_secs() + 60,
        subs: subs.iter().map(|s| s.to_string()).collect(),
        pubs: vec!["#".into()],
    };
    mint_hmac(SECRET.as_bytes(), &claims)
}

fn code(r: Result<impl Sized, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Server { code, reason }) => (code, reason),
        Ok(_) => panic!("accepted"),
        Err(e) => panic!("{e}"),
    }
}

/// The shard a client landed on, from its `welcome` (`c-SHARD-N`).
fn shard_of(c: &Client) -> String {
    let conn = c.welcome["conn"].as_str().unwrap();
    conn.split('-').nth(1).unwrap().to_string()
}

/// One client on each of the server's two shards.
fn one_per_shard(url: &str) -> Vec<Client> {
    let mut by_shard: HashMap<String, Client> = HashMap::new();
    for _ in 0..64 {
        let c = Client::connect(url).unwrap();
        by_shard.entry(shard_of(&c)).or_insert(c);
        if by_shard.len() == 2 {
            let mut v: Vec<(String, Client)> = by_shard.into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            return v.into_iter().map(|(_, c)| c).collect();
        }
    }
    panic!("64 connections all landed on one shard");
}

/// Every `msg` until `quiet` passes without one: (topic, data) in order.
fn drain(c: &mut Client, quiet: Duration) -> Vec<(String, serde_json::Value)> {
    let mut got = Vec::new();
    loop {
        match c.recv(quiet) {
            Ok(Event::Msg { topic, data, .. }) => got.push((topic, data)),
            Ok(_) => {}
            Err(ClientError::Timeout) => return got,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Publishes to each topic once (data = the topic) and returns what each
/// subscriber then received, in order.
fn publish_all(
    publisher: &mut Client,
    topics: &[&str],
    subs: &mut [Client],
) -> Vec<Vec<(String, serde_json::Value)>> {
    for t in topics {
        publisher.publish(t, &json!(t)).unwrap();
    }
    subs.iter_mut()
        .map(|s| drain(s, Duration::from_millis(500)))
        .collect()
}

fn received(topics: &[&str]) -> Vec<(String, serde_json::Value)> {
    topics.iter().map(|t| (t.to_string(), json!(t))).collect()
}

const TOPICS: [&str; 7] = [
    "user.42.a",
    "user.42.b",
    "user.43.a",
    "user.42",
    "user.42.a.deep",
    "chat:user.42.a",
    "news",
];

#[test]
fn a_pattern_gets_every_matching_topic_from_every_shard_once() {
    let server = TestServer::start(&[]);
    let url = server.url();
    // A subscriber on each shard; the publisher's topics are owned by
    // either shard, and nobody subscribes to most of them by name.
    let mut subs = one_per_shard(&url);
    for s in &mut subs {
        let ok = s.subscribe("user.42.*", None).unwrap();
        assert_eq!((ok.epoch.as_str(), ok.recovered), ("", None));
    }
    let mut publisher = Client::connect(&url).unwrap();
    for got in publish_all(&mut publisher, &TOPICS, &mut subs) {
        assert_eq!(got, received(&["user.42.a", "user.42.b"]));
    }
    // Overlapping subscriptions on one connection: a topic by name, a
    // pattern and a wider one all match user.42.a; it still comes once.
    for s in &mut subs {
        s.subscribe("user.42.a", None).unwrap();
        s.subscribe("user.#", None).unwrap();
    }
    for got in publish_all(&mut publisher, &TOPICS, &mut subs) {
        assert_eq!(
            got,
            received(&[
                "user.42.a",
                "user.42.b",
                "user.43.a",
                "user.42",
                "user.42.a.deep"
            ])
        );
    }
    assert_eq!(server.metric("ringcast_wildcard_subscriptions_active"), 4.0);
    assert_eq!(server.metric("ringcast_subscriptions_active"), 6.0);
    // Unsubscribing a pattern stops exactly what only it matched.
    for s in &mut subs {
        let (ok, _) = s
            .request(json!({"op": "unsub", "topic": "user.#"}))
            .unwrap();
        assert_eq!(ok["op"], "ok");
    }
    for got in publish_all(&mut publisher, &TOPICS, &mut subs) {
        assert_eq!(got, received(&["user.42.a", "user.42.b"]));
    }
    assert_eq!(server.metric("ringcast_wildcard_subscriptions_active"), 2.0);
    // Closing a connection forgets its patterns; the shard stops asking
    // for every topic once its last pattern is gone.
    drop(subs);
    server.wait_for(
        "the closed connections' patterns to go",
        Duration::from_secs(5),
        |s| {
            s.metric("ringcast_wildcard_subscriptions_active") == 0.0
                && s.metric("ringcast_subscriptions_active") == 0.0
        },
    );
}

#[test]
fn a_pattern_never_reaches_into_another_namespace() {
    let server = TestServer::start(&[]);
    let url = server.url();
    let mut subs = vec![
        Client::connect(&url).unwrap(),
        Client::connect(&url).unwrap(),
    ];
    subs[0].subscribe("#", None).unwrap();
    subs[1].subscribe("chat:#", None).unwrap();
    let mut publisher = Client::connect(&url).unwrap();
    let got = publish_all(
        &mut publisher,
        &["news", "chat:1", "chat:1.x", "other:1"],
        &mut subs,
    );
    assert_eq!(got[0], received(&["news"]));
    assert_eq!(got[1], received(&["chat:1", "chat:1.x"]));
    // A pattern's namespace must be written out.
    let (c, reason) = code(subs[0].subscribe("*:1", None));
    assert_eq!(c, 4000);
    assert!(reason.contains("namespace"), "{reason}");
    let (c, reason) = code(subs[0].subscribe("user.4*", None));
    assert_eq!(c, 4000);
    assert!(reason.contains("malformed"), "{reason}");
}

#[test]
fn the_token_must_cover_the_whole_pattern() {
    let server = TestServer::start(&["--auth-hmac-secret", SECRET]);
    let url = format!(
        "{}?token={}",
        server.url(),
        token(&["user.42.#", "room.*.public"])
    );
    let mut c = Client::connect(&url).unwrap();
    c.subscribe("user.42.*", None).unwrap();
    c.subscribe("user.42.#", None).unwrap();
    c.subscribe("room.*.public", None).unwrap();
    for wider in ["user.*.a", "user.#", "room.*.*", "#", "room.#"] {
        let (code, reason) = code(c.subscribe(wider, None));
        assert_eq!(code, 4403, "{wider}");
        assert!(reason.contains("not allowed by token"), "{wider}: {reason}");
    }
    // A refreshed token that no longer covers a pattern ends it.
    // The ends come before the refresh's `ok`.
    let (ok, before) = c
        .request(json!({"op": "auth", "token": token(&["user.42.x"])}))
        .unwrap();
    assert_eq!(ok["op"], "ok");
    let mut ended = Vec::new();
    for e in before {
        let Event::Frame(v) = e else { panic!("{e:?}") };
        assert_eq!(v["code"], 4403, "{v}");
        ended.push(v["topic"].as_str().unwrap().to_string());
    }
    ended.sort();
    assert_eq!(ended, ["room.*.public", "user.42.#", "user.42.*"]);
    server.wait_for("the ended patterns to go", Duration::from_secs(5), |s| {
        s.metric("ringcast_wildcard_subscriptions_active") == 0.0
    });
}

#[test]
fn a_namespace_can_forbid_wildcards_and_patterns_count_as_subscriptions() {
    let file = std::env::temp_dir().join(format!(
        "ringcast-wild-{}-{}.toml",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(
        &file,
        "[[namespaces]]\nname = \"chat\"\nwildcards = false\n\n[[namespaces]]\nname = \"\"\n",
    )
    .unwrap();
    let server = TestServer::start(&[
        "--config",
        file.to_str().unwrap(),
        "--max-subscriptions",
        "2",
    ]);
    let mut c = Client::connect(&server.url()).unwrap();
    let (code_, reason) = code(c.subscribe("chat:*", None));
    assert_eq!(code_, 4403);
    assert!(reason.contains("does not allow wildcard"), "{reason}");
    c.subscribe("chat:1", None).unwrap();
    c.subscribe("news.*", None).unwrap();
    let (code_, reason) = code(c.subscribe("sport.#", None));
    assert_eq!(code_, 4013);
    assert!(reason.contains("max_subscriptions is 2"), "{reason}");
    std::fs::remove_file(file).unwrap();
}

#[test]
fn a_pattern_with_since_is_answered_recovered_false_and_goes_live() {
    let server = TestServer::start(&[]);
    let mut p = Client::connect(&server.url()).unwrap();
    let first = p.publish("user.1.a", &json!(0)).unwrap();
    let epoch = p.subscribe("user.1.a", None).unwrap().epoch;
    p.publish("user.1.a", &json!(1)).unwrap();
    let mut c = Client::connect(&server.url()).unwrap();
    let ok = c.subscribe("user.1.*", Some((&first, &epoch))).unwrap();
    assert_eq!(ok.recovered, Some(false));
    assert!(ok.replayed.is_empty(), "{:?}", ok.replayed);
    let (again, _) = code(c.subscribe("user.1.*", None));
    assert_eq!(again, 4000);
    p.publish("user.1.b", &json!(2)).unwrap();
    assert_eq!(
        drain(&mut c, Duration::from_millis(500)),
        [("user.1.b".to_string(), json!(2))]
    );
}

#[test]
fn with_redis_a_pattern_gets_what_producers_write_to_any_partition() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut subs = one_per_shard(&server.url());
    for s in &mut subs {
        s.subscribe("user.*", None).unwrap();
    }
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let topics: Vec<String> = (0..40).map(|i| format!("user.{i}")).collect();
    let partitions: std::collections::HashSet<u32> = topics
        .iter()
        .map(|t| ringcast::broker::redis::partition(t, 16))
        .collect();
    assert!(partitions.len() >= 10, "{partitions:?}");
    for t in &topics {
        let key = ringcast::broker::redis::stream_key(
            "ringcast",
            ringcast::broker::redis::partition(t, 16),
        );
        let _: String = redis::cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("topic")
            .arg(t)
            .arg("data")
            .arg(json!(t).to_string())
            .query(&mut conn)
            .unwrap();
    }
    let want: Vec<&str> = topics.iter().map(String::as_str).collect();
    for s in &mut subs {
        // One order per partition, not across: compare as sets.
        let mut got = drain(s, Duration::from_millis(800));
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let mut expected = received(&want);
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, expected);
    }
}
