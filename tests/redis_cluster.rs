//! Redis Cluster as the backbone (`--redis redis+cluster://...`): a real
//! 3-master cluster on loopback ports, two ringcast nodes, subscribers on
//! both, producers through both nodes and by plain XADD to the node that
//! owns the key's slot. Every subscriber gets every message exactly once,
//! in the stream's order per topic; recovery with `since` works through the
//! cluster from the cache and from XRANGE.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::spawn_redis;
use common::TestServer;
use ringcast::broker::redis::{key_slot, partition, stream_key, KeyLayout, Keys};
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

/// A 3-master Redis Cluster on free loopback ports; every server is checked
/// to be our own child before use (`common::redis::spawn_redis`) and killed
/// by its PID on drop.
struct TestCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
    dir: PathBuf,
}

fn free_port() -> u16 {
    // Cluster nodes also listen on port + 10000: keep both free and valid.
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

impl TestCluster {
    fn start() -> TestCluster {
        let dir = std::env::temp_dir().join(format!(
            "ringcast-cluster-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = TestCluster {
            children: Vec::new(),
            ports: Vec::new(),
            dir,
        };
        for _ in 0..3 {
            // The port may be taken between checking and binding: try others.
            for attempt in 1.. {
                let port = free_port();
                let args: Vec<String> = [
                    "--port".to_string(),
                    port.to_string(),
                    "--bind".into(),
                    "127.0.0.1".into(),
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    c.dir
                        .join(format!("nodes-{port}.conf"))
                        .to_string_lossy()
                        .into(),
                    "--save".into(),
                    "".into(),
                    "--appendonly".into(),
                    "no".into(),
                    "--dir".into(),
                    c.dir.to_string_lossy().into(),
                ]
                .to_vec();
                let log = c.dir.join(format!("redis-{port}.log"));
                match spawn_redis(&args, port, &log) {
                    Ok(child) => {
                        c.children.push(child);
                        c.ports.push(port);
                        break;
                    }
                    Err(e) if e.port_taken() && attempt < 5 => {}
                    Err(e) => panic!("{}", e.describe()),
                }
            }
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (child, port) in c.children.iter_mut().zip(&c.ports) {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("cluster node {port} exited ({status}) before the cluster was ok");
                }
            }
            if c.ports.iter().all(|&p| c.state_ok(p)) {
                break;
            }
            assert!(Instant::now() < deadline, "cluster_state never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn state_ok(&self, port: u16) -> bool {
        let info: redis::RedisResult<String> =
            redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c));
        info.is_ok_and(|i| i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384"))
    }

    fn node(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn url(&self) -> String {
        let seeds: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Runs `cmd` for `key` on the node that owns its slot, as a producer
    /// with a plain (non-cluster) client does: try a node, follow MOVED.
    fn query_owner<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut port = self.ports[0];
        for _ in 0..5 {
            match cmd.query::<T>(&mut self.node(port)) {
                Ok(v) => return v,
                Err(e) => {
                    let (addr, _) = e
                        .redirect_node()
                        .unwrap_or_else(|| panic!("{e}: not a redirect"));
                    port = addr.rsplit(':').next().unwrap().parse().unwrap();
                }
            }
        }
        panic!("too many redirects");
    }

    /// The master that owns `key`'s slot.
    fn owner(&self, key: &str) -> u16 {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.node(self.ports[0]))
            .unwrap();
        let slots: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<redis::Value>>(&mut self.node(self.ports[0]))
            .unwrap()
            .into_iter()
            .map(|v| {
                let redis::Value::Array(a) = v else { panic!() };
                let master = match &a[2] {
                    redis::Value::Array(m) => (
                        redis::from_redis_value::<String>(m[0].clone()).unwrap(),
                        redis::from_redis_value::<u16>(m[1].clone()).unwrap(),
                    ),
                    _ => panic!(),
                };
                (
                    redis::from_redis_value(a[0].clone()).unwrap(),
                    redis::from_redis_value(a[1].clone()).unwrap(),
                    master,
                )
            })
            .collect();
        slots
            .into_iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .unwrap()
            .2
             .1
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn key(topic: &str) -> String {
    stream_key("ringcast", partition(topic, 16))
}

fn xadd(cluster: &TestCluster, topic: &str, data: &str) -> String {
    cluster.query_owner(
        redis::cmd("XADD")
            .arg(key(topic))
            .arg("*")
            .arg("topic")
            .arg(topic)
            .arg("data")
            .arg(data),
    )
}

fn stream_ids(cluster: &TestCluster, topic: &str) -> Vec<String> {
    let entries: Vec<(String, HashMap<String, String>)> =
        cluster.query_owner(redis::cmd("XRANGE").arg(key(topic)).arg("-").arg("+"));
    entries
        .into_iter()
        .filter(|(_, f)| f.get("topic").map(String::as_str) == Some(topic))
        .map(|(id, _)| id)
        .collect()
}

/// Receives `n` messages and groups their ids by topic, in arrival order.
fn recv_by_topic(c: &mut Client, n: usize) -> HashMap<String, Vec<String>> {
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for k in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        loop {
            match c.recv(left) {
                Ok(Event::Msg { topic, id, .. }) => {
                    got.entry(topic).or_default().push(id);
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("after {k} of {n} messages: {e}"),
            }
        }
    }
    got
}

fn assert_quiet(c: &mut Client) {
    match c.recv(Duration::from_millis(300)) {
        Err(ClientError::Timeout) => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
}

const TOPICS: [&str; 3] = ["room", "news", "alerts"];

#[test]
fn two_nodes_on_a_cluster_deliver_every_message_once_in_one_order_per_topic() {
    let cluster = TestCluster::start();
    let owners: Vec<u16> = TOPICS.iter().map(|t| cluster.owner(&key(t))).collect();
    assert!(
        owners.iter().any(|o| *o != owners[0]),
        "the test topics should live on different masters: {owners:?}"
    );
    let a = TestServer::start(&["--redis", &cluster.url()]);
    let b = TestServer::start(&["--redis", &cluster.url()]);
    let mut subs: Vec<Client> = [&a, &a, &b, &b]
        .iter()
        .map(|s| Client::connect(&s.url()).unwrap())
        .collect();
    for t in TOPICS {
        let epochs: Vec<String> = subs
            .iter_mut()
            .map(|c| c.subscribe(t, None).unwrap().epoch)
            .collect();
        assert!(epochs.windows(2).all(|w| w[0] == w[1]), "{t}: {epochs:?}");
    }
    // Three producers at once: a client of each node and a plain XADD.
    const EACH: usize = 60;
    let producers: Vec<_> = [a.url(), b.url()]
        .into_iter()
        .enumerate()
        .map(|(n, url)| {
            std::thread::spawn(move || {
                let mut p = Client::connect(&url).unwrap();
                for i in 0..EACH {
                    let t = TOPICS[i % TOPICS.len()];
                    p.publish(t, &json!({"node": n, "i": i})).unwrap();
                }
            })
        })
        .collect();
    for i in 0..EACH {
        let t = TOPICS[i % TOPICS.len()];
        xadd(&cluster, t, &json!({"node": "redis", "i": i}).to_string());
    }
    for p in producers {
        p.join().unwrap();
    }
    let expected: HashMap<String, Vec<String>> = TOPICS
        .iter()
        .map(|t| (t.to_string(), stream_ids(&cluster, t)))
        .collect();
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(total, 3 * EACH);
    for s in &mut subs {
        assert_eq!(recv_by_topic(s, total), expected);
        assert_quiet(s);
    }
    assert_eq!(a.metric("ringcast_broker_up"), 1.0);
}

#[test]
fn recovery_with_since_works_through_the_cluster_from_cache_and_xrange() {
    let cluster = TestCluster::start();
    let a = TestServer::start(&["--redis", &cluster.url()]);
    // No cache: every recovery on this node reads XRANGE from the cluster.
    let b = TestServer::start(&["--redis", &cluster.url(), "--redis-cache-size", "0"]);
    let mut p = Client::connect(&a.url()).unwrap();
    let mut live = Client::connect(&b.url()).unwrap();
    for t in TOPICS {
        live.subscribe(t, None).unwrap();
    }
    let mut ids: HashMap<&str, Vec<String>> = HashMap::new();
    for i in 0..30 {
        let t = TOPICS[i % TOPICS.len()];
        ids.entry(t)
            .or_default()
            .push(p.publish(t, &json!(i)).unwrap());
    }
    // Both nodes have read everything once the live subscriber has it.
    let seen = recv_by_topic(&mut live, 30);
    for t in TOPICS {
        assert_eq!(seen[t], ids[t]);
    }
    for (server, path) in [(&a, "cache"), (&b, "xrange")] {
        for t in TOPICS {
            let mut c = Client::connect(&server.url()).unwrap();
            let epoch = Client::connect(&server.url())
                .unwrap()
                .subscribe(t, None)
                .unwrap()
                .epoch;
            let since = &ids[t][3];
            let sub = c.subscribe(t, Some((since, &epoch))).unwrap();
            assert_eq!(sub.recovered, Some(true), "{path} {t}");
            let replayed: Vec<String> = sub
                .replayed
                .iter()
                .map(|e| match e {
                    Event::Msg { id, .. } => id.clone(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(replayed, ids[t][4..], "{path} {t}");
            // Live carries on after the replay, with no duplicate.
            let next = p.publish(t, &json!("after")).unwrap();
            ids.get_mut(t).unwrap().push(next.clone());
            let got = recv_by_topic(&mut c, 1);
            assert_eq!(got[t], vec![next], "{path} {t}");
            recv_by_topic(&mut live, 1);
        }
    }
    assert!(a.metric("ringcast_broker_recoveries_cached_total") >= 3.0);
    assert!(b.metric("ringcast_broker_recoveries_redis_total") >= 3.0);
}

impl TestCluster {
    fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node(port))
            .unwrap()
    }

    /// Moves `key`'s slot, with its keys, from its master to another one,
    /// the way `redis-cli --cluster reshard` does: IMPORTING / MIGRATING,
    /// MIGRATE the keys, then SETSLOT NODE everywhere.
    fn move_slot_of(&self, key: &str) -> (u16, u16) {
        let from = self.owner(key);
        let to = *self.ports.iter().find(|&&p| p != from).unwrap();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.node(from))
            .unwrap();
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let setslot = |port: u16, how: &str, id: &str| {
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(how)
                .arg(id)
                .query(&mut self.node(port))
                .unwrap();
        };
        setslot(to, "IMPORTING", &from_id);
        setslot(from, "MIGRATING", &to_id);
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut self.node(from))
            .unwrap();
        assert!(!keys.is_empty());
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut self.node(from))
            .unwrap();
        for port in [to, from] {
            setslot(port, "NODE", &to_id);
        }
        for &port in &self.ports {
            if port != to && port != from {
                setslot(port, "NODE", &to_id);
            }
        }
        (from, to)
    }
}

#[test]
fn a_partition_moved_to_another_master_mid_stream_loses_and_repeats_nothing() {
    let cluster = TestCluster::start();
    let server = TestServer::start(&["--redis", &cluster.url()]);
    let mut sub = Client::connect(&server.url()).unwrap();
    sub.subscribe("moving", None).unwrap();
    let url = server.url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut p = Client::connect(&url).unwrap();
            let mut acked = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                if p.publish("moving", &json!(acked)).is_ok() {
                    acked += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (from, to) = cluster.move_slot_of(&key("moving"));
    assert_eq!(cluster.owner(&key("moving")), to, "moved from {from}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let acked = producer.join().unwrap();
    let expected = stream_ids(&cluster, "moving");
    assert!(expected.len() >= acked && acked > 100, "{acked} acked");
    assert_eq!(recv_by_topic(&mut sub, expected.len())["moving"], expected);
    assert_quiet(&mut sub);
    // Subscribing (through the waker, which must find the reader's new
    // connection on the new master) still answers promptly afterwards.
    let t = Instant::now();
    Client::connect(&server.url())
        .unwrap()
        .subscribe("moving", None)
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn a_burst_trimmed_past_a_cluster_reader_closes_only_that_partition() {
    let cluster = TestCluster::start();
    // A small MAXLEN: every read of every partition's reader is looked at.
    let server = TestServer::start(&["--redis", &cluster.url(), "--redis-maxlen", "10"]);
    let (hit, other) = ("gap:hit", "gap:other");
    assert_ne!(partition(hit, 16), partition(other, 16));
    let mut a = Client::connect(&server.url()).unwrap();
    let epoch = a.subscribe(hit, None).unwrap().epoch;
    let mut b = Client::connect(&server.url()).unwrap();
    b.subscribe(other, None).unwrap();
    let seen = xadd(&cluster, hit, "0");
    assert_eq!(recv_by_topic(&mut a, 1)[hit], std::slice::from_ref(&seen));
    let first = xadd(&cluster, other, "0");
    assert_eq!(recv_by_topic(&mut b, 1)[other], [first]);
    // One MULTI on the owning master appends 300 and trims 200 before the
    // partition's reader is woken.
    let k = key(hit);
    let mut pipe = redis::pipe();
    pipe.atomic();
    for i in 0..300 {
        pipe.cmd("XADD")
            .arg(&k)
            .arg("MAXLEN")
            .arg("~")
            .arg(10)
            .arg("*")
            .arg("topic")
            .arg(hit)
            .arg("data")
            .arg(i)
            .ignore();
    }
    let () = pipe.query(&mut cluster.node(cluster.owner(&k))).unwrap();
    let next = xadd(&cluster, other, "1");
    match a.recv(Duration::from_secs(10)) {
        Ok(Event::Close(code, _)) | Err(ClientError::Closed(code, _)) => assert_eq!(code, 4009),
        other => panic!("expected a 4009 close, got {other:?}"),
    }
    assert_eq!(recv_by_topic(&mut b, 1)[other], [next]);
    assert_eq!(server.metric("ringcast_broker_gaps_total"), 1.0);
    let mut r = Client::connect(&server.url()).unwrap();
    let sub = r.subscribe(hit, Some((&seen, &epoch))).unwrap();
    assert_eq!((sub.recovered, sub.replayed.len()), (Some(false), 0));
    assert_quiet(&mut b);
    // Looking at streams that do not exist yet (most partitions here) must
    // not cost a reader its connection.
    assert!(
        !server.log().contains("connection failed"),
        "{}",
        server.log()
    );
}

#[test]
fn keyed_publishes_on_a_cluster_are_appended_once_whatever_the_master() {
    // The idempotency key follows its stream's key, hash tag included, so
    // the script that checks it and appends runs on the stream's master
    // (one slot), under either key layout (each its own prefix here).
    let cluster = TestCluster::start();
    for (layout, name, prefix) in [
        (KeyLayout::Legacy, "legacy", "ringcast"),
        (KeyLayout::Even, "even", "ev"),
    ] {
        let args = [
            "--redis",
            &cluster.url(),
            "--redis-key-layout",
            name,
            "--redis-key-prefix",
            prefix,
        ];
        let a = TestServer::start(&args);
        let b = TestServer::start(&args);
        let keys = Keys::new(prefix, 16, layout);
        let mut sub = Client::connect(&b.url()).unwrap();
        for t in TOPICS {
            sub.subscribe(t, None).unwrap();
        }
        let mut on_a = Client::connect(&a.url()).unwrap();
        let mut on_b = Client::connect(&b.url()).unwrap();
        for t in TOPICS {
            let first = on_a.publish_keyed(t, &json!(1), Some("k")).unwrap();
            assert_eq!(
                on_b.publish_keyed(t, &json!(1), Some("k")).unwrap(),
                first,
                "{name} {t}"
            );
            assert_eq!(
                on_a.publish_keyed(t, &json!(1), Some("k")).unwrap(),
                first,
                "{name} {t}"
            );
            let stream = keys.stream(partition(t, 16));
            let entries: Vec<(String, HashMap<String, String>)> =
                cluster.query_owner(redis::cmd("XRANGE").arg(stream).arg("-").arg("+"));
            let ids: Vec<&String> = entries
                .iter()
                .filter(|(_, f)| f.get("topic").map(String::as_str) == Some(t))
                .map(|(id, _)| id)
                .collect();
            assert_eq!(ids, [&first], "{name} {t}: one entry");
        }
        let got = recv_by_topic(&mut sub, TOPICS.len());
        for t in TOPICS {
            assert_eq!(got[t].len(), 1, "{name} {t}");
        }
        assert_quiet(&mut sub);
    }
}

/// How many of the 16 partitions' streams each master holds, under `keys`;
/// the slot of every key is also asked of the cluster, so our CRC16 is
/// checked against Redis's own.
fn partitions_per_master(cluster: &TestCluster, keys: &Keys) -> Vec<usize> {
    let mut per: HashMap<u16, usize> = cluster.ports.iter().map(|&p| (p, 0)).collect();
    for p in 0..keys.partitions() {
        let (stream, epoch) = (keys.stream(p), keys.epoch(p));
        for key in [stream, epoch] {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query(&mut cluster.node(cluster.ports[0]))
                .unwrap();
            assert_eq!(slot, key_slot(key.as_bytes()), "{key}");
        }
        assert_eq!(cluster.owner(stream), cluster.owner(epoch));
        *per.get_mut(&cluster.owner(stream)).unwrap() += 1;
    }
    let mut counts: Vec<usize> = per.into_values().collect();
    counts.sort_unstable();
    counts
}

#[test]
fn the_even_key_layout_spreads_partitions_over_every_master_and_delivers() {
    let cluster = TestCluster::start();
    let legacy = Keys::new("ringcast", 16, KeyLayout::Legacy);
    let even = Keys::new("ringcast", 16, KeyLayout::Even);
    // Today's `{P}` tags: 6/6/4 on three masters. Even tags: 5/6/5.
    assert_eq!(partitions_per_master(&cluster, &legacy), [4, 6, 6]);
    assert_eq!(partitions_per_master(&cluster, &even), [5, 5, 6]);

    let url = cluster.url();
    let a = TestServer::start(&["--redis", &url, "--redis-key-layout", "even"]);
    let mut sub = Client::connect(&a.url()).unwrap();
    let mut p = Client::connect(&a.url()).unwrap();
    for t in TOPICS {
        sub.subscribe(t, None).unwrap();
    }
    // A producer's XADD to the key `ringcast keys` prints, and a client
    // `pub` (which the node writes to the same key), both arrive.
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for t in TOPICS {
        let k = even.stream(partition(t, 16));
        let id: String = cluster.query_owner(
            redis::cmd("XADD")
                .arg(k)
                .arg("*")
                .arg("topic")
                .arg(t)
                .arg("data")
                .arg("1"),
        );
        let mid = p.publish(t, &json!(2)).unwrap();
        let stored: Vec<(String, HashMap<String, String>)> =
            cluster.query_owner(redis::cmd("XRANGE").arg(k).arg("-").arg("+"));
        assert!(stored.iter().any(|(i, _)| *i == mid), "{t}: pub not in {k}");
        sent.insert(t.to_string(), vec![id, mid]);
        // The node keeps the partition's epoch beside its stream.
        let epoch: Option<String> =
            cluster.query_owner(redis::cmd("GET").arg(even.epoch(partition(t, 16))));
        assert!(
            epoch.is_some(),
            "{t}: no epoch at {}",
            even.epoch(partition(t, 16))
        );
    }
    assert_eq!(recv_by_topic(&mut sub, 2 * TOPICS.len()), sent);
    assert_quiet(&mut sub);
    // Nothing was written under the legacy keys.
    for t in TOPICS {
        let n: usize = cluster.query_owner(redis::cmd("XLEN").arg(legacy.stream(partition(t, 16))));
        assert_eq!(n, 0, "{t}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["keys", "--redis-key-layout", "even"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for p in 0..16 {
        let line = format!(
            "{p}\t{}\t{}\t{}",
            key_slot(even.stream(p).as_bytes()),
            even.stream(p),
            even.epoch(p)
        );
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }
}

/// Presence on a cluster: the scripts' keys share each partition's hash
/// tag, so they run on whichever master owns the partition. Users on two
/// nodes, topics on two masters; a node killed, its users leave.
#[test]
fn presence_works_across_masters_and_a_killed_node_users_leave() {
    use ringcast::auth::{mint_hmac, now_secs, Claims};
    const SECRET: &str = "cluster-presence-secret-0123456789abcdef";
    let cluster = TestCluster::start();
    // Two presence topics whose partitions live on different masters.
    let topics: Vec<String> = {
        let first = "chat:0".to_string();
        let owner = cluster.owner(&key(&first));
        let other = (1..200)
            .map(|i| format!("chat:{i}"))
            .find(|t| cluster.owner(&key(t)) != owner)
            .unwrap();
        vec![first, other]
    };
    let file = std::env::temp_dir().join(format!(
        "ringcast-cluster-presence-{}.toml",
        std::process::id()
    ));
    std::fs::write(&file, "[[namespaces]]\nname = \"chat\"\npresence = true\n").unwrap();
    let args = [
        "--redis",
        &cluster.url(),
        "--config",
        file.to_str().unwrap(),
        "--auth-hmac-secret",
        SECRET,
        "--presence-ttl",
        "3s",
        "--presence-leave-delay",
        "0s",
    ];
    let a = TestServer::start(&args);
    let mut b = TestServer::start(&args);
    std::fs::remove_file(&file).unwrap();
    let connect = |s: &TestServer, user: &str| {
        let claims = Claims {
            sub: user.into(),
            exp: now_secs() + 600,
            subs: vec!["#".into()],
            pubs: vec![],
        };
        let url = format!(
            "{}?token={}",
            s.url(),
            mint_hmac(SECRET.as_bytes(), &claims)
        );
        Client::connect(&url).unwrap()
    };
    let next = |c: &mut Client| loop {
        match c.recv(Duration::from_secs(10)) {
            Ok(Event::Frame(v)) if v["op"] == "join" || v["op"] == "leave" => {
                return (
                    v["op"].as_str().unwrap().to_string(),
                    v["topic"].as_str().unwrap().to_string(),
                    v["user"].as_str().unwrap().to_string(),
                )
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    };
    let mut w = connect(&a, "watcher");
    for t in &topics {
        w.subscribe(t, None).unwrap();
    }
    let mut on_b = connect(&b, "bea");
    for t in &topics {
        on_b.subscribe(t, None).unwrap();
    }
    let mut seen: Vec<_> = (0..2).map(|_| next(&mut w)).collect();
    seen.sort();
    let want: Vec<_> = topics
        .iter()
        .map(|t| ("join".to_string(), t.clone(), "bea".to_string()))
        .collect();
    assert_eq!(seen, want);
    for t in &topics {
        let (v, _) = w.request(json!({"op": "presence", "topic": t})).unwrap();
        assert_eq!(v["count"], 2, "{v}");
    }
    // Node B dies: a survivor (A) takes its members out.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let mut seen: Vec<_> = (0..2).map(|_| next(&mut w)).collect();
    seen.sort();
    let want: Vec<_> = topics
        .iter()
        .map(|t| ("leave".to_string(), t.clone(), "bea".to_string()))
        .collect();
    assert_eq!(seen, want);
    assert_eq!(a.metric("ringcast_presence_ghosts_total"), 2.0);
    drop(on_b);
}
