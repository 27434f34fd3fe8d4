//! A partition stream that loses entries before the node reads them (trimmed
//! by `MAXLEN` while the reader is behind): the node notices before it
//! delivers anything read after the gap, counts it, closes that partition's
//! subscribers with 4009, refuses recoveries that span the gap, and leaves
//! the other partitions alone. Gaps are forced deterministically: by
//! holding the reader (the debug-build fault hook
//! `RINGCAST_DEBUG_READER_HOLD_KEY`) while writing past the retention, and
//! by one `MULTI` that appends and trims a burst while the reader waits.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::{xadd, TestRedis};
use common::TestServer;
use ringcast::broker::redis::{partition, stream_key};
use ringcast::client::{Client, ClientError, Event};

/// Two topics of different partitions (16, as the node runs).
fn two_partitions() -> (&'static str, &'static str) {
    let (hit, other) = ("gap:hit", "gap:other");
    assert_ne!(partition(hit, 16), partition(other, 16));
    (hit, other)
}

fn recv_ids(c: &mut Client, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Msg { id, .. }) => got.push(id),
            Ok(Event::Frame(_)) => {}
            other => panic!("after {} of {n} messages: {other:?}", got.len()),
        }
    }
    got
}

/// Waits for the server to close `c`, which must receive no message first.
fn expect_closed(c: &mut Client) -> (u16, String) {
    match c.recv(Duration::from_secs(10)) {
        Ok(Event::Close(code, reason)) | Err(ClientError::Closed(code, reason)) => (code, reason),
        other => panic!("expected a close, got {other:?}"),
    }
}

/// `n` entries of `topic` appended with `MAXLEN ~ maxlen`, pipelined (or in
/// one `MULTI` when `atomic`), as a producer with a short retention writes.
fn burst(redis: &TestRedis, topic: &str, n: usize, maxlen: u64, atomic: bool) {
    let mut pipe = redis::pipe();
    if atomic {
        pipe.atomic();
    }
    for i in 0..n {
        pipe.cmd("XADD")
            .arg(stream_key("ringcast", partition(topic, 16)))
            .arg("MAXLEN")
            .arg("~")
            .arg(maxlen)
            .arg("*")
            .arg("topic")
            .arg(topic)
            .arg("data")
            .arg(i)
            .ignore();
    }
    let () = pipe.query(&mut redis.conn()).unwrap();
}

/// The ids now in `topic`'s partition stream, oldest first.
fn retained(redis: &TestRedis, topic: &str) -> Vec<String> {
    let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream_key("ringcast", partition(topic, 16)))
        .arg("-")
        .arg("+")
        .query(&mut redis.conn())
        .unwrap();
    v.into_iter().map(|(id, _)| id).collect()
}

/// What both scenarios check once the gap happened: `hit`'s subscriber
/// `a` is closed with 4009 without receiving anything read after the gap,
/// `other`'s subscriber `b` gets everything of its own partition and stays,
/// one gap is counted, recovery from before the gap is refused and from
/// after it works.
#[allow(clippy::too_many_arguments)]
fn check_after_gap(
    server: &TestServer,
    redis: &TestRedis,
    (hit, other): (&str, &str),
    a: &mut Client,
    b: &mut Client,
    (seen, epoch): (&str, &str),
    others: &[String],
) {
    let (code, reason) = expect_closed(a);
    assert_eq!(code, 4009, "{reason}");
    assert!(reason.contains("since"), "{reason}");
    assert_eq!(recv_ids(b, others.len()), others);
    assert_eq!(server.metric("ringcast_broker_gaps_total"), 1.0);
    assert_eq!(
        server.metric("ringcast_client_disconnects_total{reason=\"slow\"}"),
        1.0
    );
    assert!(server.metric("ringcast_broker_gap_checks_total") >= 1.0);
    assert!(server.log().contains("before this node read them"));

    // The client resubscribes with what it last saw: refused, not a hole.
    let mut r = Client::connect(&server.url()).unwrap();
    let sub = r.subscribe(hit, Some((seen, epoch))).unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(false), 0));
    // From after the gap, recovery is exact (from the cache).
    let kept = retained(redis, hit);
    assert!(kept.len() > 60, "{} entries kept", kept.len());
    r.unsubscribe(hit).unwrap();
    let sub = r.subscribe(hit, Some((&kept[49], epoch))).unwrap();
    assert_eq!(sub.recovered, Some(true));
    let replayed: Vec<&str> = sub
        .replayed
        .iter()
        .map(|e| match e {
            Event::Msg { id, .. } => id.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(replayed, kept[50..]);

    // Live goes on in both partitions, and b was never closed.
    let mut producer = redis.conn();
    let next = xadd(&mut producer, hit, &[("topic", hit), ("data", "1")]);
    assert_eq!(recv_ids(&mut r, 1), [next]);
    let next = xadd(&mut producer, other, &[("topic", other), ("data", "1")]);
    assert_eq!(recv_ids(b, 1), [next]);
    assert_eq!(server.metric("ringcast_broker_gaps_total"), 1.0);
}

#[test]
fn a_reader_held_past_the_retention_closes_that_partition_and_refuses_recovery() {
    let redis = TestRedis::start();
    let hold = "ringcast:test:resume";
    let server = TestServer::start_with_env(
        &["--redis", &redis.url()],
        &[("RINGCAST_DEBUG_READER_HOLD_KEY", hold)],
    );
    let topics @ (hit, other) = two_partitions();
    let mut a = Client::connect(&server.url()).unwrap();
    let epoch = a.subscribe(hit, None).unwrap().epoch;
    let mut b = Client::connect(&server.url()).unwrap();
    b.subscribe(other, None).unwrap();
    let mut producer = redis.conn();
    let seen = xadd(&mut producer, hit, &[("topic", hit), ("data", "0")]);
    // Delivered: the reader now holds, as if descheduled.
    assert_eq!(recv_ids(&mut a, 1), std::slice::from_ref(&seen));
    // Meanwhile a producer with a short retention outruns it: MAXLEN ~ 10
    // trims whole stream nodes of 100, so of 301 entries 101 are kept.
    burst(&redis, hit, 300, 10, false);
    let others: Vec<String> = (0..5)
        .map(|i| {
            xadd(
                &mut producer,
                other,
                &[("topic", other), ("data", &i.to_string())],
            )
        })
        .collect();
    assert!(
        !retained(&redis, hit).contains(&seen),
        "trimmed past the reader"
    );
    // A stall shorter than the node's window (100 ms for MAXLEN 100 000:
    // more cannot be appended meanwhile) needs no look; this one is longer.
    std::thread::sleep(Duration::from_millis(200));
    let () = redis::cmd("SET")
        .arg(hold)
        .arg(1)
        .query(&mut producer)
        .unwrap();
    check_after_gap(
        &server,
        &redis,
        topics,
        &mut a,
        &mut b,
        (&seen, &epoch),
        &others,
    );
}

#[test]
fn a_burst_trimmed_inside_one_transaction_is_caught_before_delivery() {
    let redis = TestRedis::start();
    // A small MAXLEN: every read is looked at, the blocked one included.
    let server = TestServer::start(&["--redis", &redis.url(), "--redis-maxlen", "10"]);
    let topics @ (hit, other) = two_partitions();
    let mut a = Client::connect(&server.url()).unwrap();
    let epoch = a.subscribe(hit, None).unwrap().epoch;
    let mut b = Client::connect(&server.url()).unwrap();
    b.subscribe(other, None).unwrap();
    let mut producer = redis.conn();
    let seen = xadd(&mut producer, hit, &[("topic", hit), ("data", "0")]);
    assert_eq!(recv_ids(&mut a, 1), std::slice::from_ref(&seen));
    let others: Vec<String> = (0..5)
        .map(|i| {
            xadd(
                &mut producer,
                other,
                &[("topic", other), ("data", &i.to_string())],
            )
        })
        .collect();
    assert_eq!(recv_ids(&mut b, 5), others);
    // One MULTI appends 300 and trims 200 of them before the waiting
    // reader is woken: its XREAD returns only the 101 kept.
    burst(&redis, hit, 300, 10, true);
    let others: Vec<String> = (5..8)
        .map(|i| {
            xadd(
                &mut producer,
                other,
                &[("topic", other), ("data", &i.to_string())],
            )
        })
        .collect();
    check_after_gap(
        &server,
        &redis,
        topics,
        &mut a,
        &mut b,
        (&seen, &epoch),
        &others,
    );
}

#[test]
fn a_reader_in_step_with_a_tiny_maxlen_reports_no_gap() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url(), "--redis-maxlen", "10"]);
    let mut c = Client::connect(&server.url()).unwrap();
    c.subscribe("steady", None).unwrap();
    let mut p = Client::connect(&server.url()).unwrap();
    // Trimmed over and over, but never past the reader (it gets each
    // chunk before the next is written).
    for chunk in 0..30 {
        let ids: Vec<String> = (0..10)
            .map(|i| {
                p.publish("steady", &serde_json::json!(chunk * 10 + i))
                    .unwrap()
            })
            .collect();
        assert_eq!(recv_ids(&mut c, 10), ids);
    }
    assert!(
        retained(&redis, "steady").len() < 300,
        "the stream was trimmed"
    );
    assert_eq!(server.metric("ringcast_broker_gaps_total"), 0.0);
    assert!(server.metric("ringcast_broker_gap_checks_total") > 0.0);
}

#[test]
fn a_gap_closes_the_pattern_subscribers_too() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url(), "--redis-maxlen", "10"]);
    let (hit, other) = two_partitions();
    // `gap:*` matches topics of both partitions: any of them may have lost
    // an entry it matched, so it recovers like a subscriber of `hit`.
    let mut w = Client::connect(&server.url()).unwrap();
    w.subscribe("gap:*", None).unwrap();
    let mut b = Client::connect(&server.url()).unwrap();
    b.subscribe(other, None).unwrap();
    let mut producer = redis.conn();
    let seen = xadd(&mut producer, hit, &[("topic", hit), ("data", "0")]);
    assert_eq!(recv_ids(&mut w, 1), [seen]);
    burst(&redis, hit, 300, 10, true);
    let (code, reason) = expect_closed(&mut w);
    assert_eq!(code, 4009, "{reason}");
    // The other partition's plain subscriber stays.
    let next = xadd(&mut producer, other, &[("topic", other), ("data", "1")]);
    assert_eq!(recv_ids(&mut b, 1), [next]);
    assert_eq!(server.metric("ringcast_broker_gaps_total"), 1.0);
    // Nothing read after the gap was queued to the closing connection
    // (the 101 kept entries matched `gap:*`), and once it is gone so is
    // its pattern.
    assert!(
        server.metric("ringcast_messages_dropped_total{reason=\"connection_closed\"}") >= 101.0
    );
    drop(w);
    server.wait_for("the closed pattern gone", Duration::from_secs(5), |s| {
        s.metric("ringcast_wildcard_subscriptions_active") == 0.0
    });
}
