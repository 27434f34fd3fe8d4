//! Presence across nodes, kept in Redis (docs/PROTOCOL.md section 6).
//!
//! Per partition P, in keys that share the partition stream's hash tag (so
//! every script stays in one slot of a Redis Cluster, whatever the key
//! layout):
//!
//! - `{stream}:presence:{topic}`: a hash, user → how many nodes have it on
//!   the topic; its length is the topic's user count;
//! - `{stream}:members:{node}`: a set of `topic\nuser`, what one node
//!   holds in the partition: how a survivor finds a dead node's members.
//!
//! A node's first member of a (topic, user) runs [`JOIN`], its last one
//! [`LEAVE`]: each adds or removes the node's member, counts nodes, and
//! only at 0 → 1 and 1 → 0 writes the `join`/`leave` entry into the
//! partition stream, in the same script, so two nodes joining one user at
//! once give one `join`. One round trip per node-level change; nothing per
//! subscription.
//!
//! Liveness: `{prefix}:presence:nodes` is a sorted set of node → expiry,
//! written every `ttl / 3` ([`BEAT`], one write per node) with Redis's
//! clock (`TIME`), never the nodes'. Every node looks for expired nodes
//! every [`REAP_EVERY`]; one takes `{prefix}:presence:reaping:{node}` with
//! `SET NX PX` and runs [`LEAVE`] for each member of the dead node, which
//! sends the `leave`s of users no other node has. A dead node's users
//! leave within the TTL plus [`REAP_EVERY`] and a few round trips.
//!
//! Failure: while Redis is unreachable the node keeps counting; when it
//! is back (or when the node finds it was taken for dead, its liveness
//! entry gone) it compares its members in Redis with its own and runs
//! [`JOIN`]/[`LEAVE`] for the difference.
//!
//! Scripts go as `EVAL` (Redis caches each by its hash): no `SCRIPT LOAD`
//! on every master of a cluster, no `NOSCRIPT` retry.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::{RedisError, Value};
use tracing::{info, warn};

use super::Member;
use crate::broker::redis::{connect, Conn, Settings};
use crate::metrics::BrokerMetrics;
use crate::namespace::Namespaces;
use crate::topic::TopicName;

/// How often every node looks for dead nodes (a read).
const REAP_EVERY: Duration = Duration::from_millis(500);
/// Members taken per round trip when a node's members are removed.
const REAP_BATCH: usize = 256;
/// After a failed connect, wait this long before the next try.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// KEYS: topic hash, node set, stream. ARGV: member, user, topic, node,
/// maxlen, emit (1/0), join_leave_max_users. Returns 0 (the node had it),
/// 1 (another node has the user), 2 (first, no event), 3 (first, `join`).
const JOIN: &str = r"
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[2], 1) > 1 then return 1 end
if ARGV[6] == '1' and redis.call('HLEN', KEYS[1]) <= tonumber(ARGV[7]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'topic', ARGV[3],
    'presence', 'join', 'user', ARGV[2], 'node', ARGV[4])
  return 3
end
return 2
";

/// [`JOIN`]'s reverse, same keys and arguments: 0 (the node did not have
/// it), 1 (another node still has the user), 2 (gone, no event), 3 (gone,
/// `leave`).
const LEAVE: &str = r"
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[2], -1) > 0 then return 1 end
local users = redis.call('HLEN', KEYS[1])
redis.call('HDEL', KEYS[1], ARGV[2])
if ARGV[6] == '1' and users <= tonumber(ARGV[7]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'topic', ARGV[3],
    'presence', 'leave', 'user', ARGV[2], 'node', ARGV[4])
  return 3
end
return 2
";

/// KEYS: topic hash. ARGV: cap. Returns {count, users (at most cap)}.
const QUERY: &str = r"
local count = redis.call('HLEN', KEYS[1])
local cap = tonumber(ARGV[1])
if count <= cap then return {count, redis.call('HKEYS', KEYS[1])} end
local seen, users, cursor = {}, {}, '0'
repeat
  local r = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 256)
  cursor = r[1]
  for i = 1, #r[2], 2 do
    local u = r[2][i]
    if #users < cap and not seen[u] then
      seen[u] = true
      users[#users + 1] = u
    end
  end
until cursor == '0' or #users >= cap
return {count, users}
";

/// Redis's clock in milliseconds, for the liveness scripts.
const NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS: nodes. ARGV: node, ttl ms. 1 when the node was not listed.
const BEAT: &str = "return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])";

/// KEYS: nodes. Up to 16 nodes whose liveness expired.
const EXPIRED: &str = "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 16)";

/// KEYS: nodes. ARGV: node. Unlists it if it is still expired (it may
/// have come back meanwhile).
const UNLIST: &str = r"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= now then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
";

/// `{prefix}:presence:nodes`: every live node and when its liveness expires.
fn nodes_key(prefix: &str) -> String {
    format!("{prefix}:presence:nodes")
}

/// The users of `topic` (a hash in its partition's slot).
fn topic_key(stream: &str, topic: &str) -> String {
    format!("{stream}:presence:{topic}")
}

/// What `node` holds in the partition of `stream`.
fn node_set_key(stream: &str, node: &str) -> String {
    format!("{stream}:members:{node}")
}

fn member(topic: &str, user: &str) -> String {
    format!("{topic}\n{user}")
}

/// The topic and user of a member (topics never hold a newline).
fn split_member(m: &[u8]) -> Option<(TopicName, Arc<str>)> {
    let m = std::str::from_utf8(m).ok()?;
    let (topic, user) = m.split_once('\n')?;
    Some((TopicName::new(topic).ok()?, Arc::from(user)))
}

/// The presence thread's side of Redis.
pub(super) struct Remote {
    settings: Settings,
    node: Arc<str>,
    ttl: Duration,
    metrics: Arc<BrokerMetrics>,
    /// Whether a topic's events go out, and above how many users not.
    namespaces: Namespaces,
    conn: Option<Conn>,
    /// Liveness renewals done.
    beats: u64,
    /// Redis may differ from the node's members (a failed write, the node
    /// taken for dead): compare and mend at the next tick.
    resync: bool,
    retry_at: Instant,
    next_beat: Instant,
    next_reap: Instant,
}

impl Remote {
    /// Connects and registers the node's liveness.
    pub(super) fn start(
        settings: Settings,
        node: Arc<str>,
        ttl: Duration,
        (metrics, namespaces): (Arc<BrokerMetrics>, Namespaces),
    ) -> anyhow::Result<Remote> {
        let now = Instant::now();
        let mut remote = Remote {
            conn: Some(connect(&settings.url, Some(Duration::from_secs(5)))?),
            settings,
            node,
            ttl,
            metrics,
            namespaces,
            beats: 0,
            resync: false,
            retry_at: now,
            next_beat: now,
            next_reap: now,
        };
        remote.beat(now)?;
        Ok(remote)
    }

    fn stream(&self, topic: &str) -> String {
        let p = crate::topic::partition(topic, self.settings.partitions());
        self.settings.keys.stream(p).to_string()
    }

    /// Runs one script (one round trip).
    fn eval(&mut self, script: &str, keys: &[&str], args: &[&str]) -> Result<Value, RedisError> {
        self.metrics.presence_redis_calls.fetch_add(1, Relaxed);
        let conn = self.connection()?;
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
        let v = cmd.query::<Value>(conn);
        if v.is_err() {
            self.conn = None;
        }
        v
    }

    fn failed(&mut self, what: &str, e: &RedisError) {
        warn!(error = %e, "presence: {what} failed; will compare with Redis when it is back");
        self.resync = true;
        self.conn = None;
        self.retry_at = Instant::now() + RETRY_AFTER;
    }

    /// Runs [`JOIN`] or [`LEAVE`] of this node's member; returns the script's answer.
    fn change(
        &mut self,
        script: &str,
        (topic, user): (&TopicName, &str),
        node: &str,
    ) -> Result<i64, RedisError> {
        let stream = self.stream(topic.as_str());
        let (emit, max) = self
            .namespaces
            .of(topic.as_str())
            .map_or((false, 0), |ns| (ns.join_leave, ns.join_leave_max_users));
        let keys = [
            topic_key(&stream, topic.as_str()),
            node_set_key(&stream, node),
            stream,
        ];
        let m = member(topic.as_str(), user);
        let maxlen = self.settings.maxlen.to_string();
        let max = max.to_string();
        let args = [
            m.as_str(),
            user,
            topic.as_str(),
            node,
            &maxlen,
            if emit { "1" } else { "0" },
            &max,
        ];
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let v = self.eval(script, &keys, &args)?;
        let n = int(&v);
        if n == 3 {
            let counter = if script == JOIN {
                &self.metrics.presence_joins
            } else {
                &self.metrics.presence_leaves
            };
            counter.fetch_add(1, Relaxed);
        }
        Ok(n)
    }

    pub(super) fn join(&mut self, topic: &TopicName, user: &Arc<str>) {
        if self.resync {
            return; // the resync adds it
        }
        let node = self.node.clone();
        if let Err(e) = self.change(JOIN, (topic, user), &node) {
            self.failed("join", &e);
        }
    }

    pub(super) fn leave(&mut self, topic: &TopicName, user: &Arc<str>) {
        if self.resync {
            return; // the resync removes it
        }
        let node = self.node.clone();
        if let Err(e) = self.change(LEAVE, (topic, user), &node) {
            self.failed("leave", &e);
        }
    }

    pub(super) fn query(
        &mut self,
        topic: &TopicName,
        cap: u32,
    ) -> Result<(Vec<String>, u64), String> {
        let stream = self.stream(topic.as_str());
        let key = topic_key(&stream, topic.as_str());
        let v = self
            .eval(QUERY, &[&key], &[&cap.to_string()])
            .map_err(|e| format!("presence unavailable: redis: {e}"))?;
        parse_query(v).ok_or_else(|| "presence unavailable: unexpected reply from Redis".into())
    }

    /// Liveness, the look for dead nodes, and mending after a failure.
    pub(super) fn tick(
        &mut self,
        now: Instant,
        members: &HashMap<TopicName, HashMap<Arc<str>, Member>>,
    ) {
        if self.conn.is_none() && now < self.retry_at {
            return;
        }
        if now >= self.next_beat {
            if let Err(e) = self.beat(now) {
                return self.failed("liveness", &e);
            }
        }
        if self.resync {
            match self.resync(members) {
                Ok(()) => self.resync = false,
                Err(e) => return self.failed("resync", &e),
            }
        }
        if now >= self.next_reap {
            self.next_reap = now + REAP_EVERY;
            if let Err(e) = self.reap() {
                self.failed("looking for dead nodes", &e);
            }
        }
    }

    /// Renews this node's liveness; finding itself unlisted (taken for
    /// dead, its members removed) it mends its members.
    fn beat(&mut self, now: Instant) -> Result<(), RedisError> {
        let key = nodes_key(self.settings.keys.prefix());
        let ttl = self.ttl.as_millis().to_string();
        let node = self.node.clone();
        let v = self.eval(&format!("{NOW}{BEAT}"), &[&key], &[&node, &ttl])?;
        let added = int(&v) == 1;
        self.beats += 1;
        if added && self.beats > 1 {
            warn!(node = %self.node, "presence: this node was taken for dead; restoring its members");
            self.resync = true;
        }
        self.next_beat = now + self.ttl / 3;
        Ok(())
    }

    /// Compares this node's members in Redis with `members` and mends the
    /// difference, partition by partition.
    fn resync(
        &mut self,
        members: &HashMap<TopicName, HashMap<Arc<str>, Member>>,
    ) -> Result<(), RedisError> {
        let node = self.node.clone();
        let partitions = self.settings.partitions();
        let mut ours: Vec<HashSet<(TopicName, Arc<str>)>> =
            vec![HashSet::new(); partitions as usize];
        for (topic, users) in members {
            let p = topic.partition(partitions) as usize;
            ours[p].extend(users.keys().map(|u| (topic.clone(), u.clone())));
        }
        let (mut joined, mut left) = (0, 0);
        for (p, want) in ours.iter().enumerate() {
            let stream = self.settings.keys.stream(p as u32).to_string();
            let set = node_set_key(&stream, &node);
            let conn = self.connection()?;
            let have: Vec<Vec<u8>> = ::redis::cmd("SMEMBERS").arg(&set).query(conn)?;
            let have: HashSet<(TopicName, Arc<str>)> =
                have.iter().filter_map(|m| split_member(m)).collect();
            for (topic, user) in have.difference(want) {
                self.change(LEAVE, (topic, user), &node)?;
                left += 1;
            }
            for (topic, user) in want.difference(&have) {
                self.change(JOIN, (topic, user), &node)?;
                joined += 1;
            }
        }
        info!(
            joined,
            left, "presence: members compared with Redis and mended"
        );
        Ok(())
    }

    fn connection(&mut self) -> Result<&mut Conn, RedisError> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.settings.url, Some(Duration::from_secs(5)))?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Looks for dead nodes and removes the members of those whose lock it
    /// gets.
    fn reap(&mut self) -> Result<(), RedisError> {
        let nodes = nodes_key(self.settings.keys.prefix());
        let v = self.eval(&format!("{NOW}{EXPIRED}"), &[&nodes], &[])?;
        let dead: Vec<String> = ::redis::from_redis_value(v).unwrap_or_default();
        let me = self.node.clone();
        for dead in dead.iter().filter(|d| **d != *me) {
            let lock = format!("{}:presence:reaping:{dead}", self.settings.keys.prefix());
            let ttl = self.ttl.as_millis() as u64;
            let me = self.node.to_string();
            let conn = self.connection()?;
            let got: Option<String> = ::redis::cmd("SET")
                .arg(&lock)
                .arg(&me)
                .arg("NX")
                .arg("PX")
                .arg(ttl)
                .query(conn)?;
            if got.is_none() {
                continue; // another node is at it
            }
            let ghosts = self.take_out(dead, true)?;
            self.eval(&format!("{NOW}{UNLIST}"), &[&nodes], &[dead])?;
            warn!(node = %dead, members = ghosts, "presence: a node stopped renewing its liveness; its members were removed");
        }
        Ok(())
    }

    /// Runs [`LEAVE`] for every member `node` has in Redis; returns how
    /// many. `dead`: they are a dead node's, counted as ghosts one by one.
    fn take_out(&mut self, node: &str, dead: bool) -> Result<u64, RedisError> {
        let mut n = 0u64;
        for p in 0..self.settings.partitions() {
            let stream = self.settings.keys.stream(p).to_string();
            let set = node_set_key(&stream, node);
            loop {
                let conn = self.connection()?;
                let batch: Vec<Vec<u8>> = ::redis::cmd("SRANDMEMBER")
                    .arg(&set)
                    .arg(REAP_BATCH)
                    .query(conn)?;
                if batch.is_empty() {
                    break;
                }
                for m in &batch {
                    match split_member(m) {
                        Some((topic, user)) => {
                            if dead {
                                // Before the `leave` can reach anyone.
                                self.metrics.presence_ghosts.fetch_add(1, Relaxed);
                            }
                            self.change(LEAVE, (&topic, &user), node)?;
                            n += 1;
                        }
                        None => {
                            let conn = self.connection()?;
                            let _: i64 = ::redis::cmd("SREM").arg(&set).arg(m).query(conn)?;
                        }
                    }
                }
            }
        }
        Ok(n)
    }

    /// The node stops. Without members it unlists itself; with some (the
    /// `leave`s it was holding for clients that may reconnect elsewhere) it
    /// renews its liveness one last time to expire `hold` from now, and a
    /// surviving node removes them then, writing the `leave`s of users that
    /// did not come back anywhere. Exiting never waits for the hold.
    pub(super) fn stop(&mut self, empty: bool, hold: Duration) {
        let nodes = nodes_key(self.settings.keys.prefix());
        let node = self.node.clone();
        let result = if empty {
            self.connection().and_then(|conn| {
                ::redis::cmd("ZREM")
                    .arg(&nodes)
                    .arg(&*node)
                    .query::<i64>(conn)
                    .map(drop)
            })
        } else {
            let hold = hold.as_millis().to_string();
            self.eval(&format!("{NOW}{BEAT}"), &[&nodes], &[&node, &hold])
                .map(drop)
        };
        match result {
            Ok(()) if empty => info!("presence: node unlisted"),
            Ok(()) => info!(
                ?hold,
                "presence: the node's members leave after the hold, removed by a surviving node"
            ),
            Err(e) => {
                warn!(error = %e, "presence: could not hand over at exit; the node's members leave when its liveness expires")
            }
        }
    }
}

/// `{count, users}` from [`QUERY`].
fn parse_query(v: Value) -> Option<(Vec<String>, u64)> {
    let Value::Array(items) = v else { return None };
    let mut it = items.into_iter();
    let count: u64 = ::redis::from_redis_value(it.next()?).ok()?;
    let users: Vec<Vec<u8>> = ::redis::from_redis_value(it.next()?).ok()?;
    let users = users
        .into_iter()
        .map(|u| String::from_utf8_lossy(&u).into_owned())
        .collect();
    Some((users, count))
}

/// A script's integer answer (0 for anything else).
fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::redis::stream_key;

    #[test]
    fn members_split_at_the_first_newline() {
        let (t, u) = split_member(member("chat:1", "a\nb").as_bytes()).unwrap();
        assert_eq!((t.as_str(), &*u), ("chat:1", "a\nb"));
        assert!(split_member(b"no newline").is_none());
        assert!(split_member(b"bad topic\nu").is_none());
        assert!(split_member(b"\xff\nu").is_none());
    }

    #[test]
    fn presence_keys_share_the_partition_hash_tag() {
        let stream = stream_key("rc", 3);
        assert_eq!(
            topic_key(&stream, "chat:1"),
            "rc:stream:{3}:presence:chat:1"
        );
        assert_eq!(node_set_key(&stream, "n-1"), "rc:stream:{3}:members:n-1");
        assert_eq!(nodes_key("rc"), "rc:presence:nodes");
    }

    #[test]
    fn query_replies_parse() {
        let v = Value::Array(vec![
            Value::Int(3),
            Value::Array(vec![Value::BulkString(b"a".to_vec())]),
        ]);
        assert_eq!(parse_query(v), Some((vec!["a".to_string()], 3)));
        assert_eq!(parse_query(Value::Int(1)), None);
        assert_eq!(parse_query(Value::Array(vec![Value::Int(1)])), None);
    }
}
