//! What other threads send a shard ([`crate::bus::ShardMsg`]): messages to
//! deliver, answers to `sub` and `pub`, and news that subscribers must
//! recover (an overflowed inbox, a Redis partition gap).

use std::rc::Rc;

use bytes::Bytes;
use tracing::{debug, warn};

use super::conn::{Conn, Phase};
use super::Shard;
use crate::bus::ShardMsg;
use crate::metrics::Undelivered;
use crate::protocol::{code, encode_error, encode_ok, encode_topic_error, Close, OkExtra};
use crate::topic::TopicName;
use crate::ws::frame::OpCode;

impl Shard {
    pub(super) fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Deliver { topic, id, frame } => {
                if self.deliver(&topic, id, &frame) {
                    self.metrics.delivered_after(id.ms);
                }
            }
            ShardMsg::Subscribed {
                reply,
                topic,
                replay,
                recovered,
                epoch,
                last,
            } => self.on_subscribed(reply, topic, replay, recovered, (&epoch, last)),
            ShardMsg::SubscribeFailed {
                reply,
                topic,
                reason,
            } => {
                let Some(conn) = self.conn(reply.conn) else {
                    return;
                };
                if conn.take_pending(&topic) {
                    self.end_pending(&topic);
                }
                let frame = encode_topic_error(reply.req, code::UNAVAILABLE, &topic, reason);
                self.queue(&conn, frame);
            }
            ShardMsg::PartitionGap {
                partition,
                partitions,
            } => self.on_partition_gap(partition, partitions),
            ShardMsg::Run { job, run } => run(job),
            ShardMsg::Presence { topic, user, frame } => self.on_presence(&topic, &user, &frame),
            ShardMsg::Answer { reply, frame } => {
                if let Some(conn) = self.conn(reply.conn) {
                    self.queue(&conn, frame);
                }
            }
            ShardMsg::Published {
                reply,
                topic,
                result,
            } => {
                if result.is_ok() {
                    // Counted once the broker took it, as HTTP publishes
                    // are, whether or not the publisher is still here.
                    self.metrics
                        .messages_published
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let Some(conn) = self.conn(reply.conn) else {
                    return;
                };
                match result {
                    Ok(mid) if reply.req.is_some() => {
                        let extra = OkExtra {
                            mid: Some(mid),
                            ..OkExtra::default()
                        };
                        self.queue(&conn, encode_ok(reply.req, Some(&topic), extra));
                    }
                    Ok(_) => {}
                    Err(reason) => {
                        self.queue(&conn, encode_error(reply.req, code::UNAVAILABLE, &reason))
                    }
                }
            }
        }
    }

    /// The broker's answer to a `sub`: the replay, the `ok`, then the
    /// subscription goes live. A replay that would not fit the outbound
    /// queue beside what is queued already is not sent at all: the `ok`
    /// says `recovered:false` at once (the client refetches its state)
    /// and the frames are counted as dropped, so a recovery never gets its
    /// own connection closed with 4009 and never loops.
    pub(super) fn on_subscribed(
        &self,
        reply: crate::id::ReplyTo,
        topic: TopicName,
        replay: Vec<Bytes>,
        recovered: Option<bool>,
        (epoch, last): (&str, crate::id::MsgId),
    ) {
        let Some(conn) = self.conn(reply.conn) else {
            return;
        };
        let wanted = conn.take_pending(&topic);
        if wanted && !super::ops::may_subscribe(self, &conn, &topic) {
            self.end_pending(&topic);
            // A refreshed token narrowed `subs` while the broker
            // answered: the `sub` ends refused, nothing replayed.
            let reason = "topic not allowed by the refreshed token";
            let frame = encode_topic_error(reply.req, code::FORBIDDEN_TOPIC, &topic, reason);
            return self.queue(&conn, frame);
        }
        let ok = |recovered| {
            let extra = OkExtra {
                epoch: Some(epoch),
                last: Some(last),
                recovered,
                mid: None,
            };
            encode_ok(reply.req, Some(&topic), extra)
        };
        let mut answer = ok(recovered);
        let replay_bytes: usize = replay.iter().map(Bytes::len).sum();
        if conn.queued_bytes() + replay_bytes + answer.len() > self.config.outbound_queue {
            debug!(
                conn = conn.id.0,
                topic = %topic,
                frames = replay.len(),
                bytes = replay_bytes,
                "replay over the outbound queue: answering recovered:false"
            );
            self.metrics
                .dropped_n(Undelivered::ReplayTooLarge, replay.len() as u64);
            answer = ok(Some(false));
        } else {
            for frame in replay {
                self.queue_msg(&conn, frame);
            }
        }
        self.queue(&conn, answer);
        if wanted && conn.phase() == Phase::Open {
            // Pending becomes live: the entry (and the announcement) stays.
            let user = self.presence_user(&conn, &topic);
            let mut topics = self.topics.borrow_mut();
            let (shared, local) =
                super::topics::entry(&mut topics, &topic, super::topics::Local::default);
            local.pending = local.pending.saturating_sub(1);
            conn.add_live(shared, local.live.len() as u32);
            local.live.push(conn);
            self.count_in(local, &topic, user);
            drop(topics);
            self.metrics
                .subscriptions_active
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if wanted {
            // Closing meanwhile: it never becomes live.
            self.end_pending(&topic);
        }
    }

    /// Queues one shared `msg` frame to every local subscriber of `topic`;
    /// returns whether the topic had any here. Subscribers past their queue
    /// bound are closed after the topic index is released: closing never
    /// runs under its borrow. The namespace's `slow_consumer` policy comes
    /// with the index entry ([`super::topics::Local::tag`]), looked up once
    /// per topic, not per message.
    ///
    /// A shard holding patterns takes the wildcard path (`patterns.rs`),
    /// which also reaches each connection once.
    pub(super) fn deliver(&self, topic: &TopicName, id: crate::id::MsgId, frame: &Bytes) -> bool {
        if !self.wild.borrow().trie.is_empty() {
            return self.deliver_wild(topic, id, frame);
        }
        let slow = {
            let topics = self.topics.borrow();
            let Some(local) = topics.get(topic).filter(|l| !l.live.is_empty()) else {
                return false;
            };
            self.queue_each(local.live.iter(), frame, local.tag.as_ref(), id)
        };
        for conn in &slow {
            self.overflow(conn);
        }
        true
    }

    /// Queues `frame` to each of `conns` (a subscriber list the caller
    /// keeps borrowed, or a copy of one), closing those past their bound
    /// afterwards.
    pub(super) fn deliver_to<'a>(
        &self,
        conns: impl Iterator<Item = &'a Rc<Conn>>,
        frame: &Bytes,
        (tag, id): (Option<&Rc<super::queue::Tag>>, crate::id::MsgId),
    ) {
        for conn in &self.queue_each(conns, frame, tag, id) {
            self.overflow(conn);
        }
    }

    /// A `join`/`leave` of `user` for every local subscriber of `topic`
    /// but `user`'s own connections. Past its queue bound a subscriber is
    /// closed (4009) like for a `msg`.
    fn on_presence(&self, topic: &TopicName, user: &str, frame: &Bytes) {
        let mut slow = Vec::new();
        {
            let topics = self.topics.borrow();
            let Some(local) = topics.get(topic) else {
                return;
            };
            for conn in &local.live {
                let own =
                    conn.read_identity(|i| i.is_some_and(|i| !i.is_guest() && &*i.user == user));
                if own || conn.phase() != Phase::Open {
                    continue;
                }
                if self.fits(conn, frame) {
                    self.queue_unbounded(conn, frame.clone());
                } else {
                    slow.push(conn.clone());
                }
            }
        }
        for conn in &slow {
            self.overflow(conn);
        }
    }

    /// Queues `frame` to each of `conns`; returns those past their queue
    /// bound, for the caller to close once no index is borrowed.
    fn queue_each<'a>(
        &self,
        conns: impl Iterator<Item = &'a Rc<Conn>>,
        frame: &Bytes,
        tag: Option<&Rc<super::queue::Tag>>,
        id: crate::id::MsgId,
    ) -> Vec<Rc<Conn>> {
        let mut slow = Vec::new();
        // The compressed variant, made by the first subscriber that
        // takes it and shared by every other: once per shard.
        let mut compressed: Option<Option<Bytes>> = None;
        for conn in conns {
            let bits = conn.deflate.get();
            let chosen = match bits {
                0 => frame,
                bits => match compressed.get_or_insert_with(|| self.compress(frame)) {
                    Some(z) if fits_window(frame, bits) => &*z,
                    _ => frame,
                },
            };
            if !self.queue_msg_or_defer(conn, chosen, tag, id) {
                slow.push(conn.clone());
            }
        }
        slow
    }

    /// The permessage-deflate variant of a `msg` frame (RSV1 set), or
    /// `None` when its payload is under `--compression-min-size` or does
    /// not shrink. The shard's one compressor is reset per message, so the
    /// bytes are the same on every shard.
    fn compress(&self, frame: &Bytes) -> Option<Bytes> {
        use std::sync::atomic::Ordering::Relaxed;
        let payload = crate::ws::frame::server_payload(frame)?;
        if payload.len() < self.config.compression_min_size {
            return None;
        }
        let z = self.deflater.borrow_mut().compress(payload);
        self.metrics.messages_compressed.fetch_add(1, Relaxed);
        self.metrics
            .compression_bytes_in
            .fetch_add(payload.len() as u64, Relaxed);
        self.metrics
            .compression_bytes_out
            .fetch_add(z.len() as u64, Relaxed);
        (z.len() < payload.len()).then(|| crate::ws::frame::encode_compressed(OpCode::Text, &z))
    }

    /// The inbox overflowed: some message never reached this shard, so every
    /// subscriber here may have a gap. Close them with 4009 so they recover.
    pub(super) fn on_lagged(&self) {
        warn!("shard inbox overflowed; closing subscribers so they recover");
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        for conn in conns.iter().filter(|c| c.phase() == Phase::Open) {
            self.close(conn, Close::FellBehind);
        }
    }

    /// A Redis partition lost entries before the node read them: every
    /// subscriber of a topic in it has a hole. Close them with 4009, like
    /// a lagged shard; their `since` is from before the gap, so recovery
    /// answers `recovered:false` (the reader refuses it) and they refetch.
    /// Every holder of a pattern too: any topic of the partition may have
    /// matched it. A scan of this shard's topics, once per gap (rare),
    /// never per message.
    pub(super) fn on_partition_gap(&self, partition: u32, partitions: u32) {
        let mut conns: Vec<Rc<Conn>> = self
            .topics
            .borrow()
            .iter()
            .filter(|(t, _)| t.partition(partitions) == partition)
            .flat_map(|(_, local)| local.live.iter().cloned())
            .collect();
        // Any topic of the partition may have matched a pattern.
        conns.extend(self.pattern_holders());
        let mut closed = 0usize;
        // A connection with several topics in the partition is listed once
        // per topic; `close` leaves one already closing alone.
        for conn in conns.iter().filter(|c| c.phase() == Phase::Open) {
            self.close(conn, Close::FellBehind);
            closed += 1;
        }
        if closed > 0 {
            warn!(
                partition,
                closed, "partition lost entries before they were read; closing its subscribers so they recover"
            );
        }
    }
}

/// Whether a compressed `frame` is valid for a client that takes windows
/// of `bits`: no back-reference reaches further than the payload's length.
fn fits_window(frame: &Bytes, bits: u8) -> bool {
    crate::ws::frame::server_payload(frame).is_some_and(|p| p.len() <= 1 << bits)
}
