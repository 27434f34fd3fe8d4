//! Abuse limits through the real server: inbound rate (4008), connection
//! caps per node (503) and per address (429); everyone else keeps being served.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{raw, TestServer};
use ringcast::client::{Client, ClientError};
use serde_json::json;

#[test]
fn a_client_over_its_rate_gets_4008_errors_then_is_closed() {
    let server = TestServer::start(&["--inbound-rate", "10", "--inbound-burst", "20"]);
    let mut c = raw::open(server.addr);
    // 50 pings at once: the burst (20) is answered, the rest get 4008.
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend(raw::frame(
            true,
            1,
            format!(r#"{{"op":"ping","id":{i}}}"#).as_bytes(),
        ));
    }
    c.write_all(&batch).unwrap();
    let (mut pongs, mut limited) = (0, 0);
    while pongs + limited < 50 {
        let (op, payload) = raw::read_frame(&mut c).expect("a reply");
        if op != 1 {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        match v["op"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(v["code"], 4008, "{v}");
                assert!(v["id"].is_u64(), "the error keeps the request id: {v}");
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!((20..=22).contains(&pongs), "pongs {pongs}");
    // A polite client on the same server is unaffected.
    let mut polite = Client::connect(&server.url()).unwrap();
    assert_eq!(
        polite.request(json!({"op": "ping"})).unwrap().0["op"],
        "pong"
    );
    // Staying over the rate for 5 s closes the connection with 4008.
    let started = Instant::now();
    let code = loop {
        let _ = c.write_all(&raw::frame(true, 1, br#"{"op":"ping"}"#).repeat(20));
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut closed = None;
        while let Some((op, p)) = raw::read_frame(&mut c) {
            if op == 8 {
                closed = Some(u16::from_be_bytes([p[0], p[1]]));
                break;
            }
        }
        if let Some(code) = closed {
            break code;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
    };
    assert_eq!(code, 4008);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    server.wait_for("rate_limited disconnect", Duration::from_secs(3), |s| {
        s.metric("ringcast_client_disconnects_total{reason=\"rate_limited\"}") >= 1.0
    });
}

fn status_of(server: &TestServer) -> String {
    match Client::connect(&server.url()) {
        Err(ClientError::Refused(why)) => why,
        Ok(_) => "accepted".into(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_node_connection_cap_answers_503_and_frees_up() {
    let server = TestServer::start(&["--max-connections", "3"]);
    let held: Vec<Client> = (0..3)
        .map(|_| Client::connect(&server.url()).unwrap())
        .collect();
    let why = status_of(&server);
    assert!(why.contains("503") && why.contains("full"), "{why}");
    drop(held);
    server.wait_for("connections released", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 0.0
    });
    assert_eq!(status_of(&server), "accepted");
}

#[test]
fn the_per_address_cap_answers_429() {
    // 2 shards: each admits its share, ceil(4 / 2) = 2 per shard.
    let server = TestServer::start(&["--max-connections-per-ip", "4"]);
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..12 {
        match Client::connect(&server.url()) {
            Ok(c) => held.push(c),
            Err(ClientError::Refused(why)) => {
                refused = Some(why);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let why = refused.expect("the cap never applied");
    assert!(why.contains("429"), "{why}");
    assert!(
        held.len() >= 2 && held.len() <= 4,
        "{} admitted",
        held.len()
    );
    assert!(server.metric("ringcast_handshake_failures_total{status=\"429\"}") >= 1.0);
}

#[test]
fn upgrades_per_address_are_rate_limited_with_429() {
    // 2 shards: each admits 5 per second.
    let server = TestServer::start(&["--max-handshakes-per-ip", "10"]);
    let mut admitted = 0;
    let mut refused = None;
    for _ in 0..40 {
        match Client::connect(&server.url()) {
            Ok(c) => {
                admitted += 1;
                drop(c);
            }
            Err(ClientError::Refused(why)) => {
                refused = Some(why);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let why = refused.expect("never limited");
    assert!(why.contains("429"), "{why}");
    assert!((5..=12).contains(&admitted), "{admitted} admitted");
    // The budget refills: a second later, upgrades pass again.
    std::thread::sleep(Duration::from_millis(1200));
    Client::connect(&server.url()).unwrap();
}
