//! Presence: who is subscribed to the topics of namespaces with
//! `presence = true`, and `join`/`leave` when that changes
//! (docs/PROTOCOL.md sections 2, 3 and 6).
//!
//! Counting goes up in three steps, so each step sees few changes:
//!
//! - a shard counts its connections per (topic, user) in its topic index
//!   (`shard/topics.rs`): only a user's first connection to the topic on
//!   the shard, or its last one leaving, is news for the node;
//! - the node (this module, one thread) counts shards per (topic, user):
//!   only the first shard, or the last one leaving, is news for the world.
//!   A last leave waits `--presence-leave-delay` and is forgotten if the
//!   user comes back meanwhile (a page reload, a drain and reconnect);
//! - the world: with the embedded broker the node is all of it, and its
//!   events go to the topic's subscribers through the broker, in order
//!   with the topic's messages. With Redis, `redis.rs` keeps the members of
//!   every node in Redis and writes the events as stream entries, in Lua
//!   scripts so two nodes joining one user at once give one `join`.
//!
//! The thread takes the shards' news through an unbounded channel: a
//! message is one subscription's change, which the client's inbound rate
//! limits bound; a shard never waits for Redis.

mod redis;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{info, warn};

use crate::broker::Broker;
use crate::bus::{Bus, ShardMsg};
use crate::id::ReplyTo;
use crate::metrics::BrokerMetrics;
use crate::namespace::Namespaces;
use crate::protocol::{code, encode_error, encode_presence};
use crate::topic::TopicName;

/// What a shard tells the presence thread.
#[derive(Debug)]
enum Cmd {
    /// `user`'s first connection on the shard subscribed to `topic`.
    Join(TopicName, Arc<str>),
    /// `user`'s last connection on the shard left `topic`.
    Leave(TopicName, Arc<str>),
    /// A `presence` request: answer `reply` with at most `cap` users.
    Query {
        reply: ReplyTo,
        topic: TopicName,
        cap: u32,
    },
    /// The node is stopping: its members leave after `hold`.
    Stop(Duration),
}

/// The node's presence, as its shards see it.
#[derive(Debug)]
pub struct Presence {
    tx: Sender<Cmd>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Where the world's view of presence lives.
#[derive(Debug)]
pub enum World {
    /// The embedded broker: this node is everything.
    Embedded(Arc<dyn Broker>),
    /// Redis: every node's members, in keys of the partitions.
    Redis(crate::broker::redis::Settings),
}

/// What the presence thread needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--node-name`: the node id is it plus a random suffix.
    pub node_name: String,
    /// `--presence-ttl`.
    pub ttl: Duration,
    /// `--presence-leave-delay`.
    pub leave_delay: Duration,
}

/// A node id unique per boot: the name and 8 random hex digits, so a node
/// that restarts (or two nodes given one name) is never taken for another.
pub fn node_id(name: &str) -> Arc<str> {
    Arc::from(format!("{name}-{:08x}", fastrand::u32(..)))
}

impl Presence {
    /// Starts the presence thread; with Redis, after the node registered
    /// its liveness (so no member of it is ever written without a way to
    /// remove it if the node dies).
    pub fn start(
        settings: Settings,
        world: World,
        namespaces: Namespaces,
        bus: Bus,
        metrics: Arc<BrokerMetrics>,
    ) -> anyhow::Result<Arc<Presence>> {
        let node = node_id(&settings.node_name);
        let backend = match world {
            World::Embedded(broker) => Backend::Embedded(broker),
            World::Redis(redis) => Backend::Redis(Box::new(redis::Remote::start(
                redis,
                node.clone(),
                settings.ttl,
                (metrics.clone(), namespaces.clone()),
            )?)),
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut state = Node {
            leave_delay: settings.leave_delay,
            namespaces,
            bus,
            metrics,
            topics: HashMap::new(),
            leaving: VecDeque::new(),
            backend,
        };
        let thread = std::thread::Builder::new()
            .name("presence".into())
            .spawn(move || state.run(&rx))?;
        info!(node = %node, "presence started");
        Ok(Arc::new(Presence {
            tx,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// `user`'s first connection on a shard subscribed to `topic`.
    pub fn join(&self, topic: TopicName, user: Arc<str>) {
        let _ = self.tx.send(Cmd::Join(topic, user));
    }

    /// `user`'s last connection on a shard left `topic`.
    pub fn leave(&self, topic: TopicName, user: Arc<str>) {
        let _ = self.tx.send(Cmd::Leave(topic, user));
    }

    /// Asks who is on `topic`; the answer (a `presence` frame, or error
    /// 4503) goes to `reply`'s shard as [`ShardMsg::Answer`].
    pub fn query(&self, reply: ReplyTo, topic: TopicName, cap: u32) {
        let _ = self.tx.send(Cmd::Query { reply, topic, cap });
    }

    /// The node is stopping: its members leave `hold` from now (with
    /// Redis, a surviving node sends their `leave`s then, so a user who
    /// reconnects elsewhere meanwhile never leaves). Waits for the thread
    /// at most `within`.
    pub fn stop(&self, hold: Duration, within: Duration) {
        let _ = self.tx.send(Cmd::Stop(hold));
        let Some(thread) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let deadline = Instant::now() + within;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            warn!("presence: members not taken out before exit; a surviving node will");
        }
    }
}

/// One user of one topic on this node.
#[derive(Debug, Default)]
struct Member {
    /// Shards with a connection of the user subscribed to the topic.
    shards: u32,
    /// Set while its `leave` waits for the delay: when it is due.
    leaving: Option<Instant>,
}

enum Backend {
    Embedded(Arc<dyn Broker>),
    Redis(Box<redis::Remote>),
}

/// The presence thread's state.
struct Node {
    leave_delay: Duration,
    namespaces: Namespaces,
    bus: Bus,
    metrics: Arc<BrokerMetrics>,
    /// The node's members, by topic and user (leaving ones included:
    /// they are listed until their `leave` goes).
    topics: HashMap<TopicName, HashMap<Arc<str>, Member>>,
    /// Leaves waiting for the delay, oldest first (the delay is one
    /// setting, so deadlines come in the order they were set).
    leaving: VecDeque<(Instant, TopicName, Arc<str>)>,
    backend: Backend,
}

/// How long the thread waits at most between looks at its timers.
const TICK: Duration = Duration::from_millis(250);

impl Node {
    fn run(&mut self, rx: &Receiver<Cmd>) {
        loop {
            let now = Instant::now();
            self.due_leaves(now);
            if let Backend::Redis(remote) = &mut self.backend {
                remote.tick(now, &self.topics);
            }
            let wait = self
                .leaving
                .front()
                .map_or(TICK, |(at, ..)| at.saturating_duration_since(now).min(TICK));
            match rx.recv_timeout(wait) {
                Ok(Cmd::Stop(hold)) => return self.stop(hold),
                Err(RecvTimeoutError::Disconnected) => return self.stop(self.leave_delay),
                Ok(cmd) => self.take(cmd),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // What else waits, without a timer look per message.
            while let Ok(cmd) = rx.try_recv() {
                if let Cmd::Stop(hold) = cmd {
                    return self.stop(hold);
                }
                self.take(cmd);
            }
        }
    }

    fn take(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join(topic, user) => self.join(topic, user),
            Cmd::Leave(topic, user) => self.leave(topic, user),
            Cmd::Query { reply, topic, cap } => self.query(reply, &topic, cap),
            Cmd::Stop(_) => {}
        }
    }

    fn join(&mut self, topic: TopicName, user: Arc<str>) {
        let users = self.topics.entry(topic.clone()).or_default();
        let member = users.entry(user.clone()).or_default();
        member.shards += 1;
        if member.shards > 1 {
            return;
        }
        if member.leaving.take().is_some() {
            // Back before its `leave` went: nobody was told it left.
            return;
        }
        let count = users.len();
        self.metrics.presence_users.fetch_add(1, Relaxed);
        let emits = self.emits(&topic, count);
        match &mut self.backend {
            Backend::Embedded(broker) => {
                if emits {
                    self.metrics.presence_joins.fetch_add(1, Relaxed);
                    broker.presence_event(topic, user, true);
                }
            }
            Backend::Redis(remote) => remote.join(&topic, &user),
        }
    }

    fn leave(&mut self, topic: TopicName, user: Arc<str>) {
        let Some(member) = self.topics.get_mut(&topic).and_then(|u| u.get_mut(&user)) else {
            warn!(topic = %topic, user = %user, "presence: leave of a user that never joined");
            return;
        };
        member.shards = member.shards.saturating_sub(1);
        if member.shards > 0 {
            return;
        }
        if self.leave_delay.is_zero() {
            return self.gone(&topic, &user);
        }
        let at = Instant::now() + self.leave_delay;
        member.leaving = Some(at);
        self.leaving.push_back((at, topic, user));
    }

    /// Sends the leaves whose delay is over (unless the user came back).
    fn due_leaves(&mut self, now: Instant) {
        while let Some((at, ..)) = self.leaving.front() {
            if *at > now {
                break;
            }
            let Some((at, topic, user)) = self.leaving.pop_front() else {
                break;
            };
            let still = self
                .topics
                .get(&topic)
                .and_then(|u| u.get(&user))
                .is_some_and(|m| m.shards == 0 && m.leaving == Some(at));
            if still {
                self.gone(&topic, &user);
            }
        }
    }

    /// `user` is no longer on `topic` on this node.
    fn gone(&mut self, topic: &TopicName, user: &Arc<str>) {
        let Some(users) = self.topics.get_mut(topic) else {
            return;
        };
        let count = users.len();
        users.remove(user);
        if users.is_empty() {
            self.topics.remove(topic);
        }
        self.metrics.presence_users.fetch_sub(1, Relaxed);
        let emits = self.emits(topic, count);
        match &mut self.backend {
            Backend::Embedded(broker) => {
                if emits {
                    self.metrics.presence_leaves.fetch_add(1, Relaxed);
                    broker.presence_event(topic.clone(), user.clone(), false);
                }
            }
            Backend::Redis(remote) => remote.leave(topic, user),
        }
    }

    /// Whether a topic with `count` users gets `join`/`leave` (embedded).
    fn emits(&self, topic: &TopicName, count: usize) -> bool {
        self.namespaces
            .of(topic.as_str())
            .is_some_and(|ns| ns.join_leave && count <= ns.join_leave_max_users as usize)
    }

    fn query(&mut self, reply: ReplyTo, topic: &TopicName, cap: u32) {
        let answer = match &mut self.backend {
            Backend::Embedded(_) => {
                let users = self.topics.get(topic);
                let count = users.map_or(0, HashMap::len) as u64;
                let listed = users
                    .into_iter()
                    .flat_map(|u| u.keys())
                    .take(cap as usize)
                    .map(|u| u.to_string())
                    .collect();
                Ok((listed, count))
            }
            Backend::Redis(remote) => remote.query(topic, cap),
        };
        let frame = match answer {
            Ok((users, count)) => encode_presence(reply.req, topic, &users, count),
            Err(reason) => encode_error(reply.req, code::UNAVAILABLE, &reason),
        };
        self.bus
            .send_to(reply.shard, ShardMsg::Answer { reply, frame });
    }

    fn stop(&mut self, hold: Duration) {
        if let Backend::Redis(remote) = &mut self.backend {
            remote.stop(self.topics.is_empty(), hold);
        }
    }
}
