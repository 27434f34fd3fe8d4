//! Connection and process lifecycle: slow consumers, heartbeats, graceful
//! drain, settings from flags/env/file, and the reconnecting client.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{raw, ringcast, serve_help, TestServer};
use ringcast::client::{Client, Event, Reconnecting};
use serde_json::json;

#[test]
fn a_slow_consumer_is_closed_with_4009_and_nobody_else_waits() {
    // Default 1 MiB bound: the slow one passes it once the kernel buffers
    // (a few MiB) are full; the fast one has ample slack even on a busy machine.
    // The close handshake waits a minute for it (default 5 s): the test reads
    // its 4009 only after the fast one is done, which on a loaded machine
    // took longer, and a server that gives up resets the socket, taking the
    // buffered close frame with it.
    let server = TestServer::start(&["--close-timeout", "60s"]);
    let mut slow = raw::open(server.addr);
    slow.write_all(&raw::frame(
        true,
        1,
        br#"{"op":"sub","id":1,"topic":"firehose"}"#,
    ))
    .unwrap();
    raw::read_op(&mut slow, "ok");
    let mut fast = Client::connect(&server.url()).unwrap();
    fast.subscribe("firehose", None).unwrap();
    let reader = std::thread::spawn(move || {
        let mut received = 0;
        while received < 1500 {
            match fast.recv(Duration::from_secs(10)) {
                Ok(Event::Msg { .. }) => received += 1,
                Ok(Event::Close(code, reason)) => {
                    panic!("fast subscriber closed after {received}: {code} {reason}")
                }
                Ok(_) => {}
                Err(e) => panic!("fast subscriber failed after {received}: {e}"),
            }
        }
    });
    let mut publisher = Client::connect(&server.url()).unwrap();
    let big = json!("x".repeat(8000));
    let started = Instant::now();
    // `slow` never reads: kernel buffers fill, then its queue passes 1 MiB.
    for _ in 0..1500 {
        if let Err(e) = publisher.publish("firehose", &big) {
            panic!("publish failed: {e}\n{}", server.log());
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "publishing stalled"
    );
    server.wait_for("slow consumer dropped", Duration::from_secs(5), |s| {
        s.metric("ringcast_client_disconnects_total{reason=\"slow\"}") >= 1.0
    });
    assert!(server.metric("ringcast_messages_dropped_total{reason=\"slow_consumer\"}") >= 1.0);
    // The fast subscriber got everything.
    if reader.join().is_err() {
        panic!("fast subscriber failed; server log:\n{}", server.log());
    }
    // The slow one finds 4009 after what the kernel had buffered.
    assert_eq!(raw::read_close_code(&mut slow), Some(4009));
}

#[test]
fn server_pings_and_closes_silent_connections() {
    let server = TestServer::start(&["--heartbeat", "1s"]);
    let mut silent = raw::open(server.addr);
    let started = Instant::now();
    let (op, _) = raw::read_frame(&mut silent).expect("a ping");
    assert_eq!(op, 9, "expected a ping frame");
    // Never answering: closed after 2 x heartbeat (sweep granularity 1 s).
    while raw::read_frame(&mut silent).is_some() {}
    let gone = started.elapsed();
    assert!(
        gone >= Duration::from_millis(1500) && gone < Duration::from_secs(5),
        "{gone:?}"
    );
    server.wait_for("heartbeat disconnect", Duration::from_secs(3), |s| {
        s.metric("ringcast_client_disconnects_total{reason=\"heartbeat\"}") >= 1.0
    });
    // A client that answers pings stays.
    let mut alive = Client::connect(&server.url()).unwrap();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let _ = alive.recv(Duration::from_millis(200));
    }
    let (pong, _) = alive
        .request(json!({"op": "ping"}))
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert_eq!(pong["op"], "pong");
}

#[test]
fn sigterm_drains_with_spread_delays_then_exits_zero() {
    let mut server = TestServer::start(&["--drain-window", "2s"]);
    let mut clients: Vec<Client> = (0..6)
        .map(|_| Client::connect(&server.url()).unwrap())
        .collect();
    // One client is still sending its upgrade request when the drain starts.
    let mut upgrading = raw::connect(server.addr, &raw::UPGRADE.as_bytes()[..30]);
    server.wait_for(
        "the upgrading connection accepted",
        Duration::from_secs(5),
        |s| s.metric("ringcast_registry_connections") == 7.0,
    );
    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    let mut delays = Vec::new();
    for c in &mut clients {
        let drain = loop {
            match c.recv(Duration::from_secs(5)).unwrap() {
                Event::Frame(v) if v["op"] == "drain" => break v,
                _ => {}
            }
        };
        let ms = drain["reconnect_in_ms"].as_u64().unwrap();
        assert!(ms < 2000, "{ms}");
        delays.push(ms);
        match c.recv(Duration::from_secs(5)).unwrap() {
            Event::Close(code, _) => assert_eq!(code, 1001),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        delays.iter().any(|d| *d != delays[0]),
        "delays not spread: {delays:?}"
    );
    let answer = String::from_utf8(raw::read_to_end(&mut upgrading)).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503 ")
            && answer.ends_with("service unavailable: server is draining\n"),
        "{answer:?}"
    );
    for c in clients {
        c.close();
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("server did not exit");
    assert!(status.success(), "{status:?}\n{}", server.log());
}

/// Supervision: a shard that dies (here by the debug build's fault
/// injection, `RINGCAST_DEBUG_PANIC_SHARD`) is logged and the process exits
/// 1 at once, instead of serving on with a shard gone or hanging.
#[cfg(debug_assertions)]
#[test]
fn a_dead_shard_is_logged_and_the_process_exits_1() {
    for shard in ["0", "1"] {
        let mut server = TestServer::start_with_env(&[], &[("RINGCAST_DEBUG_PANIC_SHARD", shard)]);
        let status = server.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
            panic!(
                "shard {shard} panicked: the process still runs\n{}",
                server.log()
            )
        });
        let log = server.log();
        assert_eq!(status.code(), Some(1), "{status:?}\n{log}");
        assert!(
            log.contains("injected panic"),
            "the panic is in the log:\n{log}"
        );
        assert!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains("shard panicked")
                && l.contains(&format!("shard={shard}"))),
            "the supervisor names the dead shard:\n{log}"
        );
        assert!(
            log.contains(&format!("shard {shard} panicked; stopping the node")),
            "{log}"
        );
    }
}

/// A shard that cannot go on (here the debug build's
/// `RINGCAST_DEBUG_FAIL_SHARD`, standing for a failed `epoll_wait`) never
/// exits the process itself: it reports to the supervisor, which logs it,
/// tells the other shards to close their clients (drain, close 1001), and
/// exits 1.
#[cfg(debug_assertions)]
#[test]
fn a_failed_shard_is_reported_and_the_others_close_their_clients() {
    for shard in ["0", "1"] {
        let mut server = TestServer::start_with_env(&[], &[("RINGCAST_DEBUG_FAIL_SHARD", shard)]);
        // Enough clients that some land on the shard that stays up.
        let clients: Vec<Client> = (0..16)
            .map(|_| Client::connect(&server.url()).unwrap())
            .collect();
        let status = server.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
            panic!(
                "shard {shard} failed: the process still runs\n{}",
                server.log()
            )
        });
        let log = server.log();
        assert_eq!(status.code(), Some(1), "{status:?}\n{log}");
        assert!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains(&format!("shard={shard}"))
                && l.contains("shard failed: injected failure")),
            "the supervisor names the failed shard and why:\n{log}"
        );
        let mut drained = 0;
        for mut c in clients {
            loop {
                match c.recv(Duration::from_secs(2)) {
                    Ok(Event::Frame(v)) if v["op"] == "drain" => drained += 1,
                    Ok(Event::Close(code, _)) => {
                        assert_eq!(code, 1001, "closed as going away");
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        assert!(
            drained > 0,
            "no client of the other shard was drained\n{log}"
        );
    }
}

#[test]
fn invalid_settings_exit_2_naming_the_setting() {
    let out = ringcast(&["serve", "--allow-anonymous", "--heartbeat", "soon"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeat"));
    let out = ringcast(&["serve", "--allow-anonymous"], &[("RINGCAST_SHARDS", "0")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shards: must be between"));
    // A closed list names what it takes: the flag, and the file's key.
    let out = ringcast(&["serve", "--allow-anonymous", "--data-path", "uring"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data-path") && err.contains("io_uring") && err.contains("epoll"),
        "{err}"
    );
    let file = std::env::temp_dir().join(format!("ringcast-dp-{}.toml", std::process::id()));
    std::fs::write(&file, "allow_anonymous = true\ndata_path = \"uring\"\n").unwrap();
    let out = ringcast(&["serve", "--config", file.to_str().unwrap()], &[]);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data_path") && err.contains("io_uring"),
        "{err}"
    );
    let out = ringcast(&["serve", "--auth-hmac-secret", "short"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth_hmac_secret: must be at least 32"));
    let file = std::env::temp_dir().join(format!("ringcast-bad-{}.toml", std::process::id()));
    std::fs::write(&file, "allow_anonymous = true\nheartbeet = 5\n").unwrap();
    let out = ringcast(&["serve", "--config", file.to_str().unwrap()], &[]);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeet"));
}

/// `ringcast serve --help` documents every setting: each flag of the
/// README's configuration table is in it, and each flag in it has a
/// description with its default and its `RINGCAST_*` variable, and is in
/// the README.
#[test]
fn serve_help_documents_every_flag() {
    let (help, blocks) = serve_help();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .flat_map(|row| row.split('|').nth(1).unwrap().split('`'))
        .filter_map(|w| w.strip_prefix("--"))
        .collect();
    assert!(
        table.len() >= 30,
        "the README's configuration table: {table:?}"
    );
    for flag in &table {
        assert!(
            blocks.iter().any(|(f, _)| f == flag),
            "README flag --{flag} is not in `ringcast serve --help`:\n{help}"
        );
    }
    for (flag, text) in blocks.iter().filter(|(f, _)| f != "help") {
        // `[env: RINGCAST_X=]`, or `[env: RINGCAST_X]` for a hidden value.
        let env = format!("[env: RINGCAST_{}", flag.to_uppercase().replace('-', "_"));
        assert!(
            [format!("{env}=]"), format!("{env}]")]
                .iter()
                .any(|e| text.contains(e)),
            "--{flag} does not name {env}:\n{text}"
        );
        let description = text.lines().next().unwrap_or_default();
        assert!(
            !description.starts_with('['),
            "--{flag} has no description:\n{text}"
        );
        if flag != "config" {
            assert!(
                text.contains("[default: "),
                "--{flag} gives no default:\n{text}"
            );
        }
        assert!(
            readme.contains(&format!("`--{flag}`")),
            "--{flag} is not in the README"
        );
    }
}

#[test]
fn a_port_held_by_another_process_is_refused() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let out = ringcast(
        &[
            "serve",
            "--allow-anonymous",
            "--listen",
            &addr,
            "--admin-listen",
            "off",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process"));
}

#[test]
fn flags_beat_environment_beat_file() {
    let file = std::env::temp_dir().join(format!("ringcast-{}.toml", std::process::id()));
    std::fs::write(&file, "heartbeat = \"9s\"\nnode_name = \"from-file\"\n").unwrap();
    let path = file.to_str().unwrap().to_string();
    let hb = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["--config", path.as_str()];
        args.extend_from_slice(extra);
        let server = TestServer::start_with_env(&args, env);
        let c = Client::connect(&server.url()).unwrap();
        (
            c.welcome["heartbeat"].as_u64().unwrap(),
            c.welcome["node"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(hb(&[], &[]), (9, "from-file".into()));
    assert_eq!(hb(&[], &[("RINGCAST_HEARTBEAT", "7s")]).0, 7);
    assert_eq!(
        hb(&["--heartbeat", "5"], &[("RINGCAST_HEARTBEAT", "7s")]).0,
        5
    );
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn the_reconnecting_client_comes_back_and_resubscribes() {
    let first = TestServer::start(&[]);
    let addr = first.addr.to_string();
    let mut client = Reconnecting::connect(&first.url()).unwrap();
    client.backoff = (Duration::from_millis(20), Duration::from_millis(200));
    client.subscribe("news").unwrap();
    let mut p = Client::connect(&first.url()).unwrap();
    p.publish("news", &json!("before")).unwrap();
    match client
        .recv(Instant::now() + Duration::from_secs(5))
        .unwrap()
    {
        Event::Msg { data, .. } => assert_eq!(data, json!("before")),
        other => panic!("{other:?}"),
    }
    drop(p);
    drop(first); // killed: the client sees the socket end
                 // The freed port can briefly be taken as another socket's ephemeral
                 // source port; retry the restart for a while.
    let mut second = None;
    for _ in 0..50 {
        match TestServer::try_start(&["--listen", &addr], &[]) {
            Ok(s) => {
                second = Some(s);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let second = second.expect("could not restart on the same port");
    let url = second.url();
    let publisher = std::thread::spawn(move || {
        let mut p = Client::connect(&url).unwrap();
        // Keep publishing until the client is back and subscribed.
        for i in 0..200 {
            p.publish("news", &json!(i)).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    match client
        .recv(Instant::now() + Duration::from_secs(10))
        .unwrap()
    {
        Event::Msg { topic, .. } => assert_eq!(topic, "news"),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.reconnects, 1);
    // A new server process has a new epoch: recovery is refused, not faked.
    assert_eq!(client.unrecovered, vec!["news".to_string()]);
    publisher.join().unwrap();
}

#[test]
fn a_hundred_thousand_connect_close_cycles_leave_nothing_behind() {
    let server = TestServer::start(&[]);
    let target = server.addr.to_string();
    // Meanwhile, connections that subscribe then leave (close frame, FIN or
    // reset), so the topic index churns with the registry.
    let addr = server.addr;
    let subscribers = std::thread::spawn(move || {
        for i in 0..SUBSCRIBING_CYCLES {
            let mut s = raw::open(addr);
            let sub = format!(r#"{{"op":"sub","id":{i},"topic":"churn.{}"}}"#, i % 8);
            s.write_all(&raw::frame(true, 1, sub.as_bytes())).unwrap();
            assert_eq!(raw::read_op(&mut s, "ok")["id"], i);
            match i % 3 {
                0 => s
                    .write_all(&raw::frame(true, 8, &1000u16.to_be_bytes()))
                    .unwrap(),
                1 => {}
                _ => socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap(),
            }
        }
    });
    let args = [
        "load",
        "connect",
        "--target",
        &target,
        "--connections",
        "5000",
        "--rounds",
        "20",
    ];
    let out = ringcast(
        &[&args[..], &["--source-ips", "4", "--timeout", "240s"]].concat(),
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    subscribers.join().unwrap();
    assert_registry_empty(&server);
    assert_eq!(
        server.metric("ringcast_connections_accepted_total"),
        100_000.0 + f64::from(SUBSCRIBING_CYCLES)
    );
}

/// Subscribing connections made during the 100k connect/close cycles.
const SUBSCRIBING_CYCLES: u32 = 600;

/// Waits until the shards hold no connection (in any phase: the registry
/// itself, not only upgraded ones), no subscription and no topic.
fn assert_registry_empty(server: &TestServer) {
    server.wait_for(
        "registry and topic index empty",
        Duration::from_secs(10),
        |s| {
            let m = s.metrics();
            let get = |name: &str| m.get(name).copied();
            get("ringcast_registry_connections") == Some(0.0)
                && get("ringcast_topic_index_entries") == Some(0.0)
                && get("ringcast_topics_announced") == Some(0.0)
                && get("ringcast_connections_active") == Some(0.0)
                && get("ringcast_subscriptions_active") == Some(0.0)
        },
    );
}

/// `THP_enabled` of a process, from /proc/PID/status (`None` on a kernel
/// without transparent huge pages).
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"))?;
    Some(line.split_whitespace().nth(1)? == "1")
}

#[test]
fn transparent_huge_pages_are_off_unless_asked_for() {
    // This test process has them (the flag is inherited): the server turns
    // them off itself.
    let Some(true) = thp_enabled(std::process::id()) else {
        eprintln!("skipped: this kernel or process has no transparent huge pages");
        return;
    };
    let off = TestServer::start(&[]);
    assert_eq!(thp_enabled(off.child.id()), Some(false));
    let on = TestServer::start(&["--huge-pages"]);
    assert_eq!(thp_enabled(on.child.id()), Some(true));
    let env = TestServer::start_with_env(&[], &[("RINGCAST_HUGE_PAGES", "true")]);
    assert_eq!(thp_enabled(env.child.id()), Some(true));
}

/// `ringcast keys` reads the settings as `serve` does (flags, environment,
/// `--config`) and prints every partition's keys; bad settings exit 2
/// naming the setting, as `serve` does.
#[test]
fn keys_prints_every_partitions_keys_from_the_servers_settings() {
    let out = common::ringcast(
        &["keys", "--json", "--redis-key-prefix", "app"],
        &[("RINGCAST_REDIS_PARTITIONS", "3")],
    );
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["stream"], "app:stream:{2}");
    assert_eq!(rows[2]["epoch"], "app:epoch:{2}");
    let even = common::ringcast(&["keys", "--redis-key-layout", "even"], &[]);
    let text = String::from_utf8(even.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 16, "{text}");
    assert!(text.contains("layout even"), "{text}");
    // Partition 0 of 16 sits on slot 512, the middle of the first sixteenth.
    assert!(lines[0].starts_with("0\t512\tringcast:stream:{"), "{text}");
    let bad = common::ringcast(&["keys", "--redis-partitions", "0"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("redis_partitions: must be between 1 and 1024"),
        "{err}"
    );
}
