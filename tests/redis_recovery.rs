//! Recovery with `since` through Redis Streams: from the node's recent-entry
//! cache and from XRANGE, with concurrent publishing (no gap, no duplicate
//! between replay and live), after a node restart, and refused (all or
//! nothing) past MAXLEN, with a wrong epoch, or past anything the stream had.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::TestRedis;
use common::TestServer;
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

fn recv_msgs(c: &mut Client, n: usize) -> Vec<(String, serde_json::Value)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Event::Msg { id, data, .. }) => got.push((id, data)),
            Ok(_) => {}
            Err(e) => panic!("after {} of {n} messages: {e}", got.len()),
        }
    }
    got
}

/// Subscribes with `since` while another thread publishes 10..200, and
/// checks the client sees exactly 5..200 (it last saw message 4).
fn replay_joins_live_exactly(server: &TestServer) {
    let mut p = Client::connect(&server.url()).unwrap();
    let mut s = Client::connect(&server.url()).unwrap();
    let first = s.subscribe("feed", None).unwrap();
    for i in 0..10 {
        p.publish("feed", &json!(i)).unwrap();
    }
    let got = recv_msgs(&mut s, 10);
    let last_seen = got[4].0.clone();
    drop(s);
    let url = server.url();
    let publisher = std::thread::spawn(move || {
        let mut p = Client::connect(&url).unwrap();
        for i in 10..200 {
            p.publish("feed", &json!(i)).unwrap();
        }
    });
    let mut s = Client::connect(&server.url()).unwrap();
    let sub = s
        .subscribe("feed", Some((&last_seen, &first.epoch)))
        .unwrap();
    assert_eq!(sub.recovered, Some(true));
    assert_eq!(sub.epoch, first.epoch);
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
            .map(|(_, d)| d.as_i64().unwrap()),
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
fn recovery_from_the_cache_joins_live_without_gap_or_duplicate() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    replay_joins_live_exactly(&server);
    assert_eq!(
        server.metric("ringcast_broker_recoveries_cached_total"),
        1.0
    );
    assert_eq!(server.metric("ringcast_broker_recoveries_redis_total"), 0.0);
}

#[test]
fn recovery_from_xrange_joins_live_without_gap_or_duplicate() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url(), "--redis-cache-size", "0"]);
    replay_joins_live_exactly(&server);
    assert_eq!(server.metric("ringcast_broker_recoveries_redis_total"), 1.0);
}

#[test]
fn a_restarted_node_recovers_from_redis() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("t", None).unwrap().epoch;
    let mids: Vec<String> = (0..50)
        .map(|i| c.publish("t", &json!(i)).unwrap())
        .collect();
    // Another topic in between must not leak into the replay.
    for i in 0..20 {
        c.publish("other", &json!(i)).unwrap();
    }
    drop(c);
    drop(server);
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    let r = c.subscribe("t", Some((&mids[19], &epoch))).unwrap();
    assert_eq!(r.recovered, Some(true));
    assert_eq!(r.epoch, epoch, "the epoch lives in Redis, not in the node");
    let data: Vec<i64> = r
        .replayed
        .iter()
        .map(|e| match e {
            Event::Msg { topic, data, .. } => {
                assert_eq!(topic, "t");
                data.as_i64().unwrap()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(data, (20..50).collect::<Vec<_>>());
}

#[test]
fn recovery_is_refused_past_maxlen_with_a_wrong_epoch_or_past_the_stream() {
    let redis = TestRedis::start();
    let server = TestServer::start(&[
        "--redis",
        &redis.url(),
        "--redis-maxlen",
        "10",
        "--redis-cache-size",
        "0",
    ]);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("h", None).unwrap().epoch;
    let mut p = Client::connect(&server.url()).unwrap();
    // MAXLEN ~ trims whole stream nodes (100 entries): publish well past it,
    // but never past the reader. In chunks of MAXLEN (`~` always keeps at
    // least that many), each received before the next is written: 400 at
    // once could outrun a descheduled reader, which then (rightly) drops
    // the subscriber for the gap instead of delivering all 400.
    let mut mids = Vec::new();
    for chunk in (0..400).collect::<Vec<i32>>().chunks(10) {
        let ids: Vec<String> = chunk
            .iter()
            .map(|i| p.publish("h", &json!(i)).unwrap())
            .collect();
        let got: Vec<String> = recv_msgs(&mut c, ids.len())
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(got, ids);
        mids.extend(ids);
    }
    assert_eq!(server.metric("ringcast_broker_gaps_total"), 0.0);
    let mut r = Client::connect(&server.url()).unwrap();
    let sub = r.subscribe("h", Some((&mids[1], &epoch))).unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(false), 0));
    r.unsubscribe("h").unwrap();
    // Recent enough: still in the stream.
    let sub = r.subscribe("h", Some((&mids[395], &epoch))).unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(true), 4));
    r.unsubscribe("h").unwrap();
    let sub = r
        .subscribe("h", Some((&mids[395], "not-the-epoch")))
        .unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(false), 0));
    r.unsubscribe("h").unwrap();
    let sub = r
        .subscribe("h", Some(("99999999999999-0", &epoch)))
        .unwrap();
    assert_eq!(sub.recovered, Some(false));
}

#[test]
fn subscribing_does_not_wait_for_the_blocked_read() {
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let mut c = Client::connect(&server.url()).unwrap();
    let mut times = Vec::new();
    for i in 0..40 {
        let t = format!("lat{i}");
        let start = Instant::now();
        c.subscribe(&t, None).unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    let (p50, max) = (times[times.len() / 2], times[times.len() - 1]);
    eprintln!("sub round trip on an idle node: p50 {p50:?} max {max:?}");
    // The reader blocks 2 s per XREAD: without the waker a sub would take ~1 s on average.
    assert!(p50 < Duration::from_millis(100), "p50 {p50:?}");
    assert!(max < Duration::from_millis(1000), "max {max:?}");
}

/// Milliseconds since the Unix epoch, as a float: send and arrival times of
/// one process.
fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// Appends `n` entries of another topic to `topic`'s partition stream, in
/// pipelined batches, as a busy producer would.
fn fill_partition_of(redis: &TestRedis, topic: &str, n: usize) {
    use ringcast::broker::redis::{partition, stream_key};
    let p = partition(topic, 16);
    let filler = (0..)
        .map(|i| format!("filler{i}"))
        .find(|t| partition(t, 16) == p && t != topic)
        .unwrap();
    let mut conn = redis.conn();
    let data = json!({"pad": "x".repeat(60)}).to_string();
    for _ in 0..n / 1000 {
        let mut pipe = redis::pipe();
        for _ in 0..1000 {
            pipe.cmd("XADD")
                .arg(stream_key("ringcast", p))
                .arg("*")
                .arg("topic")
                .arg(&filler)
                .arg("data")
                .arg(&data)
                .ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
    }
}

#[test]
fn live_delivery_keeps_flowing_while_a_large_xrange_recovery_runs() {
    let redis = TestRedis::start();
    // No cache, so the recovery pages through Redis; no trimming.
    let server = TestServer::start(&[
        "--redis",
        &redis.url(),
        "--redis-cache-size",
        "0",
        "--redis-maxlen",
        "1000000",
    ]);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("big", None).unwrap().epoch;
    let since = c.publish("big", &json!(0)).unwrap();
    fill_partition_of(&redis, "big", 100_000);
    let missed = c.publish("big", &json!(1)).unwrap();
    // Once this arrives the node has read every filler entry.
    c.timeout = Duration::from_secs(60);
    let got = recv_msgs(&mut c, 2);
    assert_eq!(got[1].0, missed);

    // A busy topic (another partition) flows all along: every 5 ms a plain
    // XADD carrying its send time; the subscriber notes each arrival.
    let mut live = Client::connect(&server.url()).unwrap();
    live.subscribe("busy", None).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (stop, mut conn) = (stop.clone(), redis.conn());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let data = json!({ "sent": now_ms() }).to_string();
                common::redis::xadd(&mut conn, "busy", &[("topic", "busy"), ("data", &data)]);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    let receiver = std::thread::spawn(move || {
        let mut arrivals = Vec::new();
        while let Ok(Event::Msg { data, .. }) = live.recv(Duration::from_secs(3)) {
            arrivals.push((data["sent"].as_f64().unwrap(), now_ms()));
        }
        arrivals
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut r = Client::connect(&server.url()).unwrap();
    r.timeout = Duration::from_secs(60);
    let t0 = now_ms();
    let sub = r.subscribe("big", Some((&since, &epoch))).unwrap();
    let t1 = now_ms();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let sent = producer.join().unwrap();
    let arrivals = receiver.join().unwrap();

    assert_eq!(sub.recovered, Some(true));
    let replayed: Vec<&str> = sub
        .replayed
        .iter()
        .map(|e| match e {
            Event::Msg { id, .. } => id.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(replayed, [missed.as_str()]);
    assert_eq!(server.metric("ringcast_broker_recoveries_redis_total"), 1.0);
    assert_eq!(arrivals.len(), sent, "the busy subscriber lost messages");
    let during: Vec<f64> = arrivals
        .iter()
        .filter(|(s, _)| *s >= t0 && *s <= t1)
        .map(|(s, a)| a - s)
        .collect();
    let worst = arrivals.iter().map(|(s, a)| a - s).fold(0.0, f64::max);
    eprintln!(
        "recovery of 100k entries took {:.0} ms; {} busy messages sent meanwhile; worst latency {worst:.0} ms",
        t1 - t0,
        during.len()
    );
    assert!(
        worst < 250.0,
        "live delivery stalled for {worst:.0} ms during a {:.0} ms recovery",
        t1 - t0
    );
}

#[test]
fn a_reconnect_storm_after_a_node_restart_is_served_from_the_warmed_cache() {
    const TOPICS: usize = 20;
    const CLIENTS: usize = 200;
    const THREADS: usize = 8;
    let redis = TestRedis::start();
    let server = TestServer::start(&["--redis", &redis.url()]);
    let topics: Vec<String> = (0..TOPICS).map(|t| format!("storm:{t}")).collect();
    let mut p = Client::connect(&server.url()).unwrap();
    let mut e = Client::connect(&server.url()).unwrap();
    let epochs: Vec<String> = topics
        .iter()
        .map(|t| e.subscribe(t, None).unwrap().epoch)
        .collect();
    drop(e);
    let mut ids: Vec<Vec<String>> = topics
        .iter()
        .map(|t| (0..10).map(|i| p.publish(t, &json!(i)).unwrap()).collect())
        .collect();
    drop(p);
    drop(server);
    // Written while no node runs.
    let mut producer = redis.conn();
    for (t, topic) in topics.iter().enumerate() {
        for i in 10..15 {
            let data = i.to_string();
            ids[t].push(common::redis::xadd(
                &mut producer,
                topic,
                &[("topic", topic), ("data", &data)],
            ));
        }
    }
    let server = TestServer::start(&["--redis", &redis.url()]);
    let shared = std::sync::Arc::new((topics, epochs, ids));
    let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
    // Client c last saw message c % 10 of topic c % 20; all resubscribe at
    // once, and each must get exactly what it missed.
    let storm: Vec<_> = (0..THREADS)
        .map(|w| {
            let (shared, start, url) = (shared.clone(), start.clone(), server.url());
            std::thread::spawn(move || {
                let (topics, epochs, ids) = &*shared;
                let mut clients: Vec<(usize, Client)> = (w..CLIENTS)
                    .step_by(THREADS)
                    .map(|c| (c, Client::connect(&url).unwrap()))
                    .collect();
                start.wait();
                for (c, client) in &mut clients {
                    let (t, seen) = (*c % TOPICS, *c % 10);
                    let sub = client
                        .subscribe(&topics[t], Some((&ids[t][seen], &epochs[t])))
                        .unwrap();
                    assert_eq!(sub.recovered, Some(true), "client {c}");
                    let replayed: Vec<&str> = sub
                        .replayed
                        .iter()
                        .map(|e| match e {
                            Event::Msg { id, .. } => id.as_str(),
                            other => panic!("{other:?}"),
                        })
                        .collect();
                    assert_eq!(replayed, ids[t][seen + 1..], "client {c}");
                }
                clients
            })
        })
        .collect();
    let mut clients: Vec<(usize, Client)> =
        storm.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert_eq!(
        server.metric("ringcast_broker_recoveries_cached_total"),
        CLIENTS as f64
    );
    assert_eq!(server.metric("ringcast_broker_recoveries_redis_total"), 0.0);
    // Live carries on after the replay, with no duplicate.
    let (topics, _, _) = &*shared;
    let mut p = Client::connect(&server.url()).unwrap();
    let next: Vec<String> = topics
        .iter()
        .map(|t| p.publish(t, &json!("live")).unwrap())
        .collect();
    for (c, client) in &mut clients {
        let got = recv_msgs(client, 1);
        assert_eq!(got[0].0, next[*c % TOPICS], "client {c}");
    }
}

#[test]
fn identical_recoveries_in_flight_share_one_xrange() {
    const CLIENTS: usize = 40;
    let redis = TestRedis::start();
    let server = TestServer::start(&[
        "--redis",
        &redis.url(),
        "--redis-cache-size",
        "0",
        "--redis-maxlen",
        "1000000",
    ]);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("same", None).unwrap().epoch;
    let since = c.publish("same", &json!(0)).unwrap();
    // A long range to read, so the clients' recoveries overlap.
    fill_partition_of(&redis, "same", 30_000);
    let missed = c.publish("same", &json!(1)).unwrap();
    c.timeout = Duration::from_secs(60);
    recv_msgs(&mut c, 2);
    let start = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let storm: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (start, url) = (start.clone(), server.url());
            let (since, epoch, missed) = (since.clone(), epoch.clone(), missed.clone());
            std::thread::spawn(move || {
                let mut r = Client::connect(&url).unwrap();
                r.timeout = Duration::from_secs(60);
                start.wait();
                let sub = r.subscribe("same", Some((&since, &epoch))).unwrap();
                assert_eq!(sub.recovered, Some(true));
                assert!(
                    matches!(&sub.replayed[..], [Event::Msg { id, .. }] if *id == missed),
                    "{:?}",
                    sub.replayed
                );
            })
        })
        .collect();
    for h in storm {
        h.join().unwrap();
    }
    let m = server.metrics();
    let (asked, ranges) = (
        m["ringcast_broker_recoveries_redis_total"],
        m["ringcast_broker_recovery_ranges_total"],
    );
    eprintln!("{asked} recoveries from Redis, {ranges} XRANGE reads");
    assert_eq!(asked, CLIENTS as f64);
    assert!(
        ranges * 4.0 <= asked,
        "{ranges} reads for {asked} recoveries"
    );
}

#[test]
fn the_cache_warms_page_by_page_from_the_tail_within_its_budget() {
    let redis = TestRedis::start();
    let mut producer = redis.conn();
    let mut add =
        |data: &str| common::redis::xadd(&mut producer, "w", &[("topic", "w"), ("data", data)]);
    let old = add("0");
    fill_partition_of(&redis, "w", 5000);
    let recent = add("1");
    fill_partition_of(&redis, "w", 1000);
    let last = add("2");
    // 5 MiB over 16 partitions: about 1900 entries of this size each, so
    // the warm-up reads two pages and stops short of `old`.
    let server = TestServer::start(&["--redis", &redis.url(), "--redis-cache-size", "5MiB"]);
    let mut c = Client::connect(&server.url()).unwrap();
    let epoch = c.subscribe("w", None).unwrap().epoch;
    c.unsubscribe("w").unwrap();
    let ids = |sub: &ringcast::client::Subscribed| -> Vec<String> {
        sub.replayed
            .iter()
            .map(|e| match e {
                Event::Msg { id, .. } => id.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let sub = c.subscribe("w", Some((&recent, &epoch))).unwrap();
    assert_eq!((sub.recovered, ids(&sub)), (Some(true), vec![last.clone()]));
    assert_eq!(
        server.metric("ringcast_broker_recoveries_cached_total"),
        1.0
    );
    c.unsubscribe("w").unwrap();
    let sub = c.subscribe("w", Some((&old, &epoch))).unwrap();
    assert_eq!((sub.recovered, ids(&sub)), (Some(true), vec![recent, last]));
    assert_eq!(server.metric("ringcast_broker_recoveries_redis_total"), 1.0);
    assert!(server.log().contains("recent-entry cache warmed"));
    // Nothing written before the node booted is delivered live.
    assert!(matches!(
        c.recv(Duration::from_millis(300)),
        Err(ClientError::Timeout)
    ));
}
