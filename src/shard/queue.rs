//! One connection's outbound queue and what it does when it is full: the
//! namespace's `slow_consumer` policy (docs/PROTOCOL.md section 3, v1.2).
//!
//! Every queued frame is an entry: the shared frame bytes, and for a `msg`
//! of a `conflate` or `drop_oldest` namespace a [`Tag`] naming its topic
//! and policy (one `Rc` per topic per shard, so tagging is a non-atomic
//! increment) and the message id. Replies, control frames, replays and the
//! messages of `close` namespaces carry no tag and are never replaced or
//! dropped here. An idle connection's queue holds no storage at all.
//!
//! Invariants: the unwritten bytes never exceed the bound the caller
//! passes, except for what [`OutQueue::push`] adds (close frames, HTTP
//! answers); the front entry, once partly written, is never touched, so the
//! stream stays valid; ids of one topic leave the queue in order.
//!
//! Public (not re-exported) so `benches/conflate.rs` measures this code.

use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;

use crate::id::MsgId;
use crate::namespace::SlowConsumer;
use crate::protocol::{encode_lost, lost_frame_max, MAX_ID_TEXT};
use crate::topic::TopicName;

/// The topic and policy of queued `msg` frames: one per topic per shard,
/// shared by every queue that holds its messages.
#[derive(Debug)]
pub struct Tag {
    topic: TopicName,
    policy: SlowConsumer,
    /// A `lost` notice, not a `msg`: never dropped, updated while unwritten.
    notice: bool,
}

impl Tag {
    /// The tag for `topic`'s messages; `None` under `close`, whose
    /// messages need none.
    pub fn new(topic: &TopicName, policy: SlowConsumer) -> Option<Rc<Tag>> {
        (policy != SlowConsumer::Close).then(|| {
            Rc::new(Tag {
                topic: topic.clone(),
                policy,
                notice: false,
            })
        })
    }

    /// The topic.
    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// Whether `self` and `other` tag messages of one topic: the same tag
    /// (the usual case, a pointer comparison), or two made for one topic
    /// (a topic only patterns match gets a tag per message).
    fn same_topic(&self, other: &Tag) -> bool {
        std::ptr::eq(self, other) || (!self.notice && !other.notice && self.topic == other.topic)
    }

    /// Whether a message tagged `self` may be dropped to make room for one
    /// tagged `newer`: both `drop_oldest`, in the same namespace.
    fn yields_to(&self, newer: &Tag) -> bool {
        !self.notice
            && self.policy == SlowConsumer::DropOldest
            && self.topic.namespace() == newer.topic.namespace()
    }
}

/// One queued frame.
#[derive(Debug)]
pub struct Queued {
    /// The frame as written (plain or compressed).
    pub(crate) frame: Bytes,
    /// Set on `msg` frames of `conflate` / `drop_oldest` topics and on
    /// `lost` notices.
    tag: Option<Rc<Tag>>,
    /// The message id (tagged `msg`), or the first lost id (a notice).
    id: MsgId,
}

impl Queued {
    fn plain(frame: Bytes) -> Queued {
        Queued {
            frame,
            tag: None,
            id: MsgId { ms: 0, seq: 0 },
        }
    }
}

/// What [`OutQueue::push_msg`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Appended within the bound.
    Queued,
    /// An older unwritten `msg` of the topic was replaced in place (`conflate`).
    Conflated,
    /// Appended after dropping this many older `msg` frames of the namespace (`drop_oldest`).
    DroppedOldest(u32),
    /// Nothing was changed: it does not fit, and the policy allows nothing
    /// else. The connection is a slow consumer (closed with 4009).
    Full,
}

/// The outbound queue: shared frames waiting for the socket. The counts
/// are 32-bit (`outbound_queue` is at most 1 GiB; a frame is far smaller).
#[derive(Debug, Default)]
pub struct OutQueue {
    pub(crate) frames: VecDeque<Queued>,
    /// Bytes of the front frame already written.
    pub(crate) offset: u32,
    /// Unwritten bytes in the queue, and in its send in flight: the frames
    /// the data ring holds in a send not yet completed (`super::io`) are
    /// out of `frames`, so never replaced, dropped or sent twice, but
    /// still within the bound (the send's slot knows how many bytes).
    pub(crate) bytes: u32,
}

/// A topic's drops in one [`OutQueue::push_msg`] under `drop_oldest`.
struct Episode {
    tag: Rc<Tag>,
    /// Index of its first dropped frame: where a new notice goes.
    first: usize,
    from: MsgId,
    to: MsgId,
    /// Index of its unwritten notice of an earlier push, if any.
    notice: Option<usize>,
}

impl OutQueue {
    /// Unwritten bytes.
    pub fn bytes(&self) -> usize {
        self.bytes as usize
    }

    /// Frames queued (the front one may be partly written).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The queued frames, front first.
    pub fn frames(&self) -> impl Iterator<Item = &Bytes> {
        self.frames.iter().map(|q| &q.frame)
    }

    /// Appends a frame whatever the bound (replies and control frames are
    /// bounded by the caller, close frames and HTTP answers need none).
    pub fn push(&mut self, frame: Bytes) {
        self.add(frame.len());
        self.frames.push_back(Queued::plain(frame));
    }

    /// Queues a `msg` frame of a topic tagged `tag` (`None`: a `close`
    /// namespace, or a replay) within `bound` bytes, as its policy says.
    pub fn push_msg(
        &mut self,
        frame: Bytes,
        tag: Option<&Rc<Tag>>,
        id: MsgId,
        bound: usize,
    ) -> Pushed {
        match tag {
            Some(t) if t.policy == SlowConsumer::Conflate => self.conflate(frame, t, id, bound),
            Some(t) if !self.fits(&frame, bound) => self.drop_oldest(frame, t, id, bound),
            _ if !self.fits(&frame, bound) => Pushed::Full,
            _ => self.append(frame, tag, id),
        }
    }

    fn append(&mut self, frame: Bytes, tag: Option<&Rc<Tag>>, id: MsgId) -> Pushed {
        self.add(frame.len());
        self.frames.push_back(Queued {
            frame,
            tag: tag.cloned(),
            id,
        });
        Pushed::Queued
    }

    fn fits(&self, frame: &Bytes, bound: usize) -> bool {
        self.bytes as usize + frame.len() <= bound
    }

    fn add(&mut self, n: usize) {
        self.bytes = self
            .bytes
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// The first entry nothing of which is written: a partly written front
    /// frame is never replaced or dropped.
    fn first_unstarted(&self) -> usize {
        usize::from(self.offset > 0)
    }

    /// `conflate`: the topic's unwritten `msg`, if any, becomes this one in
    /// place (order across topics kept); else it is appended. A queue holds
    /// at most one per topic, so the scan is as long as the queue's other
    /// frames.
    fn conflate(&mut self, frame: Bytes, tag: &Rc<Tag>, id: MsgId, bound: usize) -> Pushed {
        let start = self.first_unstarted();
        let older = (start..self.frames.len()).rev().find(|&i| {
            self.frames[i]
                .tag
                .as_ref()
                .is_some_and(|t| t.same_topic(tag))
        });
        let Some(i) = older else {
            if !self.fits(&frame, bound) {
                return Pushed::Full;
            }
            return self.append(frame, Some(tag), id);
        };
        let bytes = self.bytes as usize - self.frames[i].frame.len() + frame.len();
        if bytes > bound {
            return Pushed::Full;
        }
        self.bytes = bytes as u32;
        let entry = &mut self.frames[i];
        entry.frame = frame;
        entry.id = id;
        Pushed::Conflated
    }

    /// `drop_oldest`: drops the oldest unwritten `msg` frames of the
    /// namespace until this one fits, with room for one `lost` notice per
    /// topic that lost any. A topic's notice takes the place of its first
    /// dropped frame, or, when an unwritten one is queued already (the same
    /// episode), that one's `to` moves on. When dropping every such frame
    /// would not make room, nothing is changed ([`Pushed::Full`]).
    fn drop_oldest(&mut self, frame: Bytes, tag: &Rc<Tag>, id: MsgId, bound: usize) -> Pushed {
        let start = self.first_unstarted();
        // What must go: the excess, plus what notices may add (reserved at
        // their largest, so the bound holds whatever the ids' lengths).
        let mut excess = self.bytes as usize + frame.len() - bound;
        let mut freed = 0;
        let mut drops = Vec::new();
        let mut episodes: Vec<Episode> = Vec::new();
        for i in start..self.frames.len() {
            if freed >= excess {
                break;
            }
            let entry = &self.frames[i];
            let Some(t) = entry.tag.as_ref().filter(|t| t.yields_to(tag)) else {
                continue;
            };
            if let Some(ep) = episodes.iter_mut().find(|e| e.tag.same_topic(t)) {
                ep.to = entry.id;
            } else {
                let notice = self.open_notice(&t.topic, start);
                excess += match notice {
                    // Only its `to` changes, and perhaps its header's length.
                    Some(_) => MAX_ID_TEXT + 2,
                    None => lost_frame_max(&t.topic),
                };
                episodes.push(Episode {
                    tag: t.clone(),
                    first: i,
                    from: entry.id,
                    to: entry.id,
                    notice,
                });
            }
            freed += entry.frame.len();
            drops.push(i);
        }
        if freed < excess {
            return Pushed::Full;
        }
        for &i in &drops {
            self.frames[i] = Queued::plain(Bytes::new());
        }
        self.bytes -= freed as u32;
        let dropped = drops.len() as u32;
        for ep in episodes {
            if let Some(n) = ep.notice {
                // The same episode: only its `to` moves.
                let notice = encode_lost(&ep.tag.topic, self.frames[n].id, ep.to);
                self.bytes -= self.frames[n].frame.len() as u32;
                self.add(notice.len());
                self.frames[n].frame = notice;
                continue;
            }
            let notice = encode_lost(&ep.tag.topic, ep.from, ep.to);
            self.add(notice.len());
            self.frames[ep.first] = Queued {
                frame: notice,
                tag: Some(Rc::new(Tag {
                    topic: ep.tag.topic.clone(),
                    policy: SlowConsumer::DropOldest,
                    notice: true,
                })),
                id: ep.from,
            };
        }
        // Dropped entries are the only empty frames (no frame is empty).
        // The usual push drops one or two near the front: removing them
        // one by one moves only what is before them.
        if drops.len() <= 4 {
            for &i in drops.iter().rev() {
                if self.frames[i].frame.is_empty() {
                    self.frames.remove(i);
                }
            }
        } else {
            self.frames.retain(|q| !q.frame.is_empty());
        }
        self.add(frame.len());
        self.frames.push_back(Queued {
            frame,
            tag: Some(tag.clone()),
            id,
        });
        Pushed::DroppedOldest(dropped)
    }

    /// Where `topic`'s `lost` notice waits unwritten, if it does.
    fn open_notice(&self, topic: &TopicName, start: usize) -> Option<usize> {
        (start..self.frames.len()).find(|&i| {
            self.frames[i]
                .tag
                .as_ref()
                .is_some_and(|t| t.notice && t.topic == *topic)
        })
    }

    /// Drops every frame not yet started (a slow consumer about to be
    /// closed); a half-written front frame stays so the stream stays valid
    /// (a send in flight is the data ring's). Returns how many were dropped.
    pub fn discard_unsent(&mut self) -> u64 {
        let keep = self.first_unstarted();
        let dropped = self.frames.len().saturating_sub(keep);
        let gone: usize = self.frames.drain(keep..).map(|q| q.frame.len()).sum();
        self.bytes = self.bytes.saturating_sub(gone as u32);
        dropped as u64
    }

    /// Takes up to `max` front frames out for a send of the data ring:
    /// the front one's written offset, and the frames.
    pub(crate) fn take_for_send(
        &mut self,
        max: usize,
    ) -> (usize, impl Iterator<Item = Bytes> + '_) {
        let offset = std::mem::take(&mut self.offset) as usize;
        let n = self.frames.len().min(max);
        (offset, self.frames.drain(..n).map(|q| q.frame))
    }

    /// The send in flight (`sent` bytes handed to the ring) completed:
    /// they leave the count (what it did not write comes back through
    /// [`OutQueue::put_back`]).
    pub(crate) fn send_done(&mut self, sent: usize) {
        self.bytes = self.bytes.saturating_sub(sent as u32);
    }

    /// A frame of a completed send that was not written whole goes back to
    /// the front, `sent` bytes of it already written (call last first).
    pub(crate) fn put_back(&mut self, frame: Bytes, sent: usize) {
        self.add(frame.len() - sent);
        self.offset = sent as u32;
        self.frames.push_front(Queued::plain(frame));
    }

    /// Forgets `n` written bytes from the front.
    pub fn consume(&mut self, mut n: usize) {
        // The kernel wrote at most what was queued, which fits 32 bits.
        self.bytes = self.bytes.saturating_sub(n as u32);
        while n > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let left = front.frame.len() - self.offset as usize;
            if n < left {
                self.offset += n as u32;
                return;
            }
            n -= left;
            self.offset = 0;
            self.frames.pop_front();
        }
    }
}

#[cfg(test)]
mod tests;
