//! Namespace policy from the config file (docs/PROTOCOL.md section 5): unknown
//! namespaces (4004), publishing off (4403), anonymous subscribers, presence
//! off, and per-namespace history for recovery.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{config_file, TestServer};
use ringcast::auth::{mint_hmac, now_secs, Claims};
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

const SECRET: &str = "namespace-secret-0123456789abcdef0123";

const POLICY: &str = r#"
[[namespaces]]
name = "chat"
allow_publish = true
history_size = 3

[[namespaces]]
name = "alerts"
allow_publish = false
anonymous = true

[[namespaces]]
name = ""
presence = false
"#;

fn token(sub: &str) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: now_secs() + 60,
        subs: vec!["#".into()],
        pubs: vec!["#".into()],
    };
    mint_hmac(SECRET.as_bytes(), &claims)
}

fn code(r: Result<impl Sized, ClientError>) -> u16 {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        Ok(_) => panic!("accepted"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn namespace_policy_applies_on_top_of_the_token() {
    let file = config_file(POLICY);
    let server = TestServer::start(&[
        "--config",
        file.to_str().unwrap(),
        "--auth-hmac-secret",
        SECRET,
    ]);
    let url = format!("{}?token={}", server.url(), token("u1"));
    let mut c = Client::connect(&url).unwrap();
    // Unknown namespace: 4004, for sub and pub alike.
    assert_eq!(code(c.subscribe("billing:7", None)), 4004);
    assert_eq!(code(c.publish("billing:7", &json!(1))), 4004);
    // Publishing off in "alerts", even with a token that grants it.
    assert_eq!(code(c.publish("alerts:fire", &json!(1))), 4403);
    // Presence off in the default namespace.
    assert_eq!(
        code(c.request(json!({"op": "presence", "topic": "news"}))),
        4403
    );
    // Allowed ones work.
    c.subscribe("chat:1", None).unwrap();
    c.publish("chat:1", &json!("hi")).unwrap();
    c.subscribe("news", None).unwrap();
    std::fs::remove_file(file).unwrap();
}

#[test]
fn clients_without_a_token_may_subscribe_to_anonymous_namespaces_only() {
    let file = config_file(POLICY);
    let server = TestServer::start(&[
        "--config",
        file.to_str().unwrap(),
        "--auth-hmac-secret",
        SECRET,
    ]);
    // No token: welcomed at once because "alerts" admits anonymous subscribers.
    let mut guest = Client::connect(&server.url()).unwrap();
    guest.subscribe("alerts:fire", None).unwrap();
    assert_eq!(code(guest.subscribe("chat:1", None)), 4403);
    assert_eq!(code(guest.publish("chat:1", &json!(1))), 4403);
    // An `auth` frame turns the guest into a user with the token's rights.
    let (ok, _) = guest
        .request(json!({"op": "auth", "token": token("u2")}))
        .unwrap();
    assert_eq!(ok["op"], "ok");
    guest.subscribe("chat:1", None).unwrap();
    let mut other = Client::connect(&format!("{}?token={}", server.url(), token("u3"))).unwrap();
    other
        .publish("chat:1", &json!("to the upgraded guest"))
        .unwrap();
    match guest.recv(Duration::from_secs(5)).unwrap() {
        Event::Msg { data, .. } => assert_eq!(data, json!("to the upgraded guest")),
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(file).unwrap();
}

#[test]
fn history_size_is_per_namespace() {
    let file = config_file(POLICY);
    let server = TestServer::start(&[
        "--config",
        file.to_str().unwrap(),
        "--auth-hmac-secret",
        SECRET,
    ]);
    let url = format!("{}?token={}", server.url(), token("u1"));
    let mut p = Client::connect(&url).unwrap();
    let epoch_chat = p.subscribe("chat:h", None).unwrap().epoch;
    let mut chat_ids = Vec::new();
    let mut news_ids = Vec::new();
    for i in 0..6 {
        chat_ids.push(p.publish("chat:h", &json!(i)).unwrap());
        news_ids.push(p.publish("news", &json!(i)).unwrap());
    }
    let mut c = Client::connect(&url).unwrap();
    // chat keeps 3: recovering from the 2nd message needs 4 of them.
    let r = c
        .subscribe("chat:h", Some((&chat_ids[1], &epoch_chat)))
        .unwrap();
    assert_eq!(r.recovered, Some(false));
    // The default namespace keeps the global 1000.
    let r = c
        .subscribe("news", Some((&news_ids[1], &epoch_chat)))
        .unwrap();
    assert_eq!((r.recovered, r.replayed.len()), (Some(true), 4));
    std::fs::remove_file(file).unwrap();
}

#[test]
fn bad_namespace_tables_stop_the_server_naming_the_problem() {
    let file =
        config_file("[[namespaces]]\nname = \"a:b\"\n[[namespaces]]\nname = \"x\"\nflavour = 1\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args([
            "serve",
            "--allow-anonymous",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    std::fs::remove_file(file).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("flavour"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `serve` with `table` as its config file and `extra` flags; returns
/// its exit code and standard error.
fn serve_with(table: &str, extra: &[&str]) -> (Option<i32>, String) {
    let file = config_file(table);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["serve", "--allow-anonymous", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "off", "--config", file.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    std::fs::remove_file(file).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

/// Each kind of invalid `[[namespaces]]` table, and the words that must
/// name it in the error.
const INVALID_TABLES: [(&str, &str); 5] = [
    (
        "[[namespaces]]\nname = \"chat\"\n[[namespaces]]\nname = \"chat\"\nallow_publish = false\n",
        "\"chat\" is configured twice",
    ),
    ("[[namespaces]]\nname = \"a:b\"\n", "name \"a:b\""),
    ("[[namespaces]]\nname = \"bad name\"\n", "name \"bad name\""),
    (
        "[[namespaces]]\nname = \"chat\"\nhistory_ttl = \"9000h\"\n",
        "namespaces.chat: history_ttl must be at most 8760h",
    ),
    (
        "[[namespaces]]\nname = \"chat\"\nhistory_size = 10000001\n",
        "namespaces.chat: history_size must be at most 10000000",
    ),
];

#[test]
fn an_invalid_namespace_table_stops_the_embedded_node_with_exit_2() {
    for (table, named) in INVALID_TABLES {
        let (status, stderr) = serve_with(table, &[]);
        assert_eq!(status, Some(2), "{table}: {stderr}");
        assert!(
            stderr.contains(named),
            "{table}: wanted {named:?} in {stderr}"
        );
    }
}

#[test]
fn an_invalid_namespace_table_stops_a_redis_node_before_it_binds() {
    // With --redis the namespaces were once replaced by the implicit one
    // (every publish ban and anonymous rule gone): now the same check runs
    // before the node touches Redis or binds a port.
    let redis = common::redis::TestRedis::start();
    let url = redis.url();
    for (table, named) in INVALID_TABLES {
        let (status, stderr) = serve_with(table, &["--redis", &url]);
        assert_eq!(status, Some(2), "{table}: {stderr}");
        assert!(
            stderr.contains(named),
            "{table}: wanted {named:?} in {stderr}"
        );
    }
    // Every problem at once, each named.
    let both =
        "[[namespaces]]\nname = \"x\"\n[[namespaces]]\nname = \"x\"\nhistory_size = 10000001\n";
    let (status, stderr) = serve_with(both, &["--redis", &url]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("\"x\" is configured twice"), "{stderr}");
    assert!(stderr.contains("history_size must be at most"), "{stderr}");
    // The same table, valid, starts a node on that Redis.
    let server = TestServer::start(&[
        "--redis",
        &url,
        "--config",
        config_file("[[namespaces]]\nname = \"chat\"\nallow_publish = false\n")
            .to_str()
            .unwrap(),
    ]);
    let mut c = Client::connect(&server.url()).unwrap();
    assert_eq!(code(c.publish("chat:1", &json!(1))), 4403);
    assert_eq!(code(c.subscribe("billing:1", None)), 4004);
}
