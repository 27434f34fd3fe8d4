//! Publish/subscribe through the real server: broadcast across shards,
//! order, exactly-once, recovery with `since`, and request errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::TestServer;
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

/// Connects until at least `per_shard` clients sit on each of the 2 shards.
fn clients_on_every_shard(server: &TestServer, per_shard: usize) -> Vec<Client> {
    let mut counts = [0usize; 2];
    let mut out = Vec::new();
    for _ in 0..200 {
        let c = Client::connect(&server.url()).unwrap();
        let conn = c.welcome["conn"].as_str().unwrap().to_string();
        let shard: usize = conn.split('-').nth(1).unwrap().parse().unwrap();
        if counts[shard] < per_shard {
            counts[shard] += 1;
            out.push(c);
        }
        if counts.iter().all(|n| *n >= per_shard) {
            return out;
        }
    }
    panic!("could not place clients on both shards: {counts:?}");
}

fn recv_msgs(c: &mut Client, n: usize) -> Vec<(String, String, serde_json::Value)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Msg { topic, id, data }) => got.push((topic, id, data)),
            Ok(_) => {}
            Err(e) => panic!("after {} of {n} messages: {e}", got.len()),
        }
    }
    got
}

fn id_key(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn every_subscriber_on_every_shard_gets_every_message_once_in_order() {
    let server = TestServer::start(&[]);
    let mut subs = clients_on_every_shard(&server, 3);
    for s in &mut subs {
        s.subscribe("news", None).unwrap();
    }
    let mut publisher = Client::connect(&server.url()).unwrap();
    let mut mids = Vec::new();
    for i in 0..300 {
        mids.push(publisher.publish("news", &json!({ "n": i })).unwrap());
    }
    for s in &mut subs {
        let got = recv_msgs(s, 300);
        let ids: Vec<&str> = got.iter().map(|(_, id, _)| id.as_str()).collect();
        assert_eq!(ids, mids, "ids differ from publish acks");
        for (i, (topic, _, data)) in got.iter().enumerate() {
            assert_eq!(topic, "news");
            assert_eq!(data["n"], i, "out of order");
        }
        // Nothing more: exactly once.
        assert!(matches!(
            s.recv(Duration::from_millis(200)),
            Err(ClientError::Timeout)
        ));
    }
    assert!(server.metric("ringcast_messages_delivered_total") >= 300.0 * subs.len() as f64);
}

#[test]
fn ids_strictly_increase_per_topic_and_topics_stay_apart() {
    let server = TestServer::start(&[]);
    let mut a = Client::connect(&server.url()).unwrap();
    let mut b = Client::connect(&server.url()).unwrap();
    a.subscribe("chat:1", None).unwrap();
    b.subscribe("chat:2", None).unwrap();
    let mut p = Client::connect(&server.url()).unwrap();
    for i in 0..50 {
        p.publish("chat:1", &json!(i)).unwrap();
        p.publish("chat:2", &json!(-i)).unwrap();
    }
    for (c, topic) in [(&mut a, "chat:1"), (&mut b, "chat:2")] {
        let got = recv_msgs(c, 50);
        assert!(got.iter().all(|(t, _, _)| t == topic));
        let keys: Vec<_> = got.iter().map(|(_, id, _)| id_key(id)).collect();
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "ids not increasing: {keys:?}"
        );
    }
}

#[test]
fn unsubscribe_stops_delivery() {
    let server = TestServer::start(&[]);
    let mut s = Client::connect(&server.url()).unwrap();
    s.subscribe("t", None).unwrap();
    let mut p = Client::connect(&server.url()).unwrap();
    p.publish("t", &json!(1)).unwrap();
    assert_eq!(recv_msgs(&mut s, 1)[0].2, json!(1));
    s.unsubscribe("t").unwrap();
    p.publish("t", &json!(2)).unwrap();
    assert!(matches!(
        s.recv(Duration::from_millis(300)),
        Err(ClientError::Timeout)
    ));
    assert_eq!(server.metric("ringcast_subscriptions_active"), 0.0);
}

#[test]
fn recovery_replays_the_gap_then_live_without_duplicates() {
    let server = TestServer::start(&[]);
    let mut p = Client::connect(&server.url()).unwrap();
    let mut s = Client::connect(&server.url()).unwrap();
    let sub = s.subscribe("feed", None).unwrap();
    assert!(!sub.epoch.is_empty());
    assert_eq!(sub.recovered, None, "recovered only appears with since");
    for i in 0..10 {
        p.publish("feed", &json!(i)).unwrap();
    }
    let got = recv_msgs(&mut s, 10);
    let last_seen = got[4].1.clone(); // pretend the client only saw 0..=4
    drop(s);
    // Publish concurrently with the resubscribe: replay + live must join exactly.
    let url = server.url();
    let publisher = std::thread::spawn(move || {
        let mut p = Client::connect(&url).unwrap();
        for i in 10..200 {
            p.publish("feed", &json!(i)).unwrap();
        }
    });
    let mut s = Client::connect(&server.url()).unwrap();
    let sub = s.subscribe("feed", Some((&last_seen, &sub.epoch))).unwrap();
    assert_eq!(sub.recovered, Some(true));
    let mut seen: Vec<i64> = sub
        .replayed
        .iter()
        .map(|e| match e {
            Event::Msg { data, .. } => data.as_i64().unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seen.first(), Some(&5), "replay starts right after since");
    publisher.join().unwrap();
    let rest = 200 - 5 - seen.len();
    seen.extend(
        recv_msgs(&mut s, rest)
            .iter()
            .map(|(_, _, d)| d.as_i64().unwrap()),
    );
    assert_eq!(
        seen,
        (5..200).collect::<Vec<_>>(),
        "gap or duplicate between replay and live"
    );
    assert!(matches!(
        s.recv(Duration::from_millis(200)),
        Err(ClientError::Timeout)
    ));
}

#[test]
fn recovery_is_all_or_nothing() {
    let server = TestServer::start(&["--history-size", "5"]);
    let mut p = Client::connect(&server.url()).unwrap();
    let mut s = Client::connect(&server.url()).unwrap();
    let epoch = s.subscribe("h", None).unwrap().epoch;
    let mut mids = Vec::new();
    for i in 0..10 {
        mids.push(p.publish("h", &json!(i)).unwrap());
    }
    let mut c = Client::connect(&server.url()).unwrap();
    // Older than the 5 kept: nothing replayed.
    let r = c.subscribe("h", Some((&mids[1], &epoch))).unwrap();
    assert_eq!((r.recovered, r.replayed.len()), (Some(false), 0));
    c.unsubscribe("h").unwrap();
    // Exactly at the edge: the 5 kept are all after mids[4].
    let r = c.subscribe("h", Some((&mids[4], &epoch))).unwrap();
    assert_eq!((r.recovered, r.replayed.len()), (Some(true), 5));
    c.unsubscribe("h").unwrap();
    // Wrong epoch, or an id newer than anything the topic had.
    let r = c.subscribe("h", Some((&mids[8], "not-the-epoch"))).unwrap();
    assert_eq!((r.recovered, r.replayed.len()), (Some(false), 0));
    c.unsubscribe("h").unwrap();
    let r = c
        .subscribe("h", Some(("99999999999999-0", &epoch)))
        .unwrap();
    assert_eq!(r.recovered, Some(false));
    c.unsubscribe("h").unwrap();
    // since without epoch is never recovered.
    c.send_text(r#"{"op":"sub","id":77,"topic":"h","since":"1-0"}"#)
        .unwrap();
    let ok = loop {
        match c.recv(Duration::from_secs(5)).unwrap() {
            Event::Frame(v) if v["id"] == 77 => break v,
            _ => {}
        }
    };
    assert_eq!(ok["recovered"], false);
}

#[test]
fn request_errors_are_replies_and_the_connection_stays_open() {
    let server = TestServer::start(&["--max-publish-size", "100", "--max-subscriptions", "3"]);
    let mut c = Client::connect(&server.url()).unwrap();
    let code = |r: Result<_, ClientError>| match r {
        Err(ClientError::Server { code, reason }) => (code, reason),
        other => panic!("{other:?}"),
    };
    let (c1, reason) = code(
        c.request(json!({"op": "sub", "topic": "bad topic"}))
            .map(|_| ()),
    );
    assert_eq!(c1, 4000);
    assert!(reason.contains("topic"), "{reason}");
    let (c2, reason) = code(c.publish("t", &json!("x".repeat(200))).map(|_| ()));
    assert_eq!(c2, 4029);
    assert!(reason.contains("max_publish_size"), "{reason}");
    for t in ["a", "b", "c"] {
        c.subscribe(t, None).unwrap();
    }
    let (c3, _) = code(c.subscribe("d", None).map(|_| ()));
    assert_eq!(c3, 4013);
    let (c4, reason) = code(c.subscribe("a", None).map(|_| ()));
    assert_eq!(c4, 4000);
    assert!(reason.contains("already subscribed"), "{reason}");
    let (c5, reason) = code(c.request(json!({"op": "teleport"})).map(|_| ()));
    assert_eq!(c5, 4000);
    assert!(reason.contains("unknown op"), "{reason}");
    // A pub without id is fire-and-forget: no reply; ping still answers.
    c.send_text(r#"{"op":"pub","topic":"a","data":1}"#).unwrap();
    let (pong, before) = c.request(json!({"op": "ping"})).unwrap();
    assert_eq!(pong["op"], "pong");
    // The only thing before the pong is our own message on "a".
    let ops: HashSet<String> = before
        .iter()
        .map(|e| match e {
            Event::Msg { .. } => "msg".to_string(),
            Event::Frame(v) => v["op"].as_str().unwrap_or("?").to_string(),
            Event::Close(..) => "close".into(),
        })
        .collect();
    assert!(
        ops.is_subset(&HashSet::from(["msg".to_string()])),
        "{ops:?}"
    );
}

/// A shard hears of a topic only while it has a subscriber for it: the
/// only subscriber leaves (unsubscribes, or disconnects and comes back on
/// whichever shard) and returns with `since`, over and over, while a
/// publisher keeps going. Every return must recover exactly what it missed
/// and then get everything live: a shard that announced the topic too late
/// would lose messages published after the subscription began, a gap here.
#[test]
fn a_topics_only_subscriber_leaving_and_returning_misses_nothing() {
    let server = TestServer::start(&["--history-size", "100000"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (url, stop) = (server.url(), stop.clone());
        std::thread::spawn(move || {
            let mut p = Client::connect(&url).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                p.publish("user.42", &json!({ "n": n })).unwrap();
                n += 1;
            }
            n
        })
    };
    // (id, n) of the last message seen; every next one must be n + 1.
    let mut last: Option<(String, u64)> = None;
    let mut seen = 0u64;
    let mut take = |id: &str, data: &serde_json::Value, last: &mut Option<(String, u64)>| {
        let n = data["n"].as_u64().unwrap();
        if let Some((_, prev)) = last {
            assert_eq!(n, *prev + 1, "gap or duplicate after message {prev}");
        }
        *last = Some((id.to_string(), n));
        seen += 1;
    };
    let mut c = Client::connect(&server.url()).unwrap();
    let mut epoch = c.subscribe("user.42", None).unwrap().epoch;
    let mut shards = HashSet::new();
    for round in 0..40 {
        // A few live messages first.
        for _ in 0..5 {
            match c.recv(Duration::from_secs(10)).unwrap() {
                Event::Msg { id, data, .. } => take(&id, &data, &mut last),
                other => panic!("unexpected {other:?}"),
            }
        }
        if round % 2 == 0 {
            c.unsubscribe("user.42").unwrap();
        } else {
            c.close();
            c = Client::connect(&server.url()).unwrap();
        }
        shards.insert(
            c.welcome["conn"]
                .as_str()
                .unwrap()
                .split('-')
                .nth(1)
                .unwrap()
                .to_string(),
        );
        // Whatever was queued before the unsubscribe took effect.
        while let Ok(Event::Msg { id, data, .. }) = c.recv(Duration::from_millis(20)) {
            take(&id, &data, &mut last);
        }
        let (id, _) = last.clone().unwrap();
        let sub = c.subscribe("user.42", Some((&id, &epoch))).unwrap();
        assert_eq!(sub.recovered, Some(true), "round {round}");
        epoch = sub.epoch;
        for e in sub.replayed {
            let Event::Msg { id, data, .. } = e else {
                unreachable!()
            };
            take(&id, &data, &mut last);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = publisher.join().unwrap();
    assert!(
        seen >= 200 && published >= seen,
        "seen {seen} of {published}"
    );
    assert_eq!(
        shards.len(),
        2,
        "the subscriber never moved shards: {shards:?}"
    );
    drop(c);
    server.wait_for("no topic announced", Duration::from_secs(5), |s| {
        s.metric("ringcast_topics_announced") == 0.0
    });
}
