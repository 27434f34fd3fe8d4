//! The queue's policies on their own: no shard, no socket. Frames are real
//! `msg` frames; "written" is [`OutQueue::consume`], as after a write.

use super::*;
use crate::protocol::encode_msg;

fn id(n: u64) -> MsgId {
    MsgId { ms: n, seq: 0 }
}

fn topic(name: &str) -> TopicName {
    TopicName::new(name).expect("a valid topic")
}

fn msg(t: &str, n: u64) -> Bytes {
    encode_msg(&topic(t), id(n), None, &format!("\"{}\"", "x".repeat(90)))
}

/// What the queue holds, as `topic#id` for messages and
/// `lost topic from..to` for notices.
fn shown(q: &OutQueue) -> Vec<String> {
    q.frames()
        .map(|f| {
            let v: serde_json::Value =
                serde_json::from_slice(crate::ws::frame::server_payload(f).expect("a frame"))
                    .expect("JSON");
            match v["op"].as_str() {
                Some("msg") => format!(
                    "{}#{}",
                    v["topic"].as_str().unwrap(),
                    v["id"].as_str().unwrap()
                ),
                Some("lost") => format!(
                    "lost {} {}..{}",
                    v["topic"].as_str().unwrap(),
                    v["from"].as_str().unwrap(),
                    v["to"].as_str().unwrap()
                ),
                _ => v["op"].as_str().unwrap_or("?").to_string(),
            }
        })
        .collect()
}

fn real_bytes(q: &OutQueue) -> usize {
    q.frames().map(Bytes::len).sum::<usize>() - q.offset as usize
}

/// What a queued frame costs beside its shared bytes: the `Bytes` handle,
/// the tag and the id. (Before the policies it was the handle alone, 32 B;
/// an idle connection's queue holds no storage either way.)
#[test]
fn a_queued_frame_costs_56_bytes() {
    assert_eq!(std::mem::size_of::<Queued>(), 56);
}

#[test]
fn close_policy_appends_within_the_bound_and_refuses_past_it() {
    let mut q = OutQueue::default();
    let one = msg("a", 1).len();
    let bound = 3 * one;
    for n in 1..=3 {
        assert_eq!(q.push_msg(msg("a", n), None, id(n), bound), Pushed::Queued);
    }
    assert_eq!(q.push_msg(msg("a", 4), None, id(4), bound), Pushed::Full);
    assert_eq!(shown(&q), ["a#1-0", "a#2-0", "a#3-0"], "nothing changed");
    assert_eq!(q.bytes(), bound);
}

#[test]
fn conflate_keeps_the_newest_per_topic_in_place() {
    let mut q = OutQueue::default();
    let a = Tag::new(&topic("p:a"), SlowConsumer::Conflate);
    let b = Tag::new(&topic("p:b"), SlowConsumer::Conflate);
    let bound = 1 << 20;
    q.push(crate::protocol::encode_pong(Some(1)));
    assert_eq!(
        q.push_msg(msg("p:a", 1), a.as_ref(), id(1), bound),
        Pushed::Queued
    );
    assert_eq!(
        q.push_msg(msg("p:b", 2), b.as_ref(), id(2), bound),
        Pushed::Queued
    );
    assert_eq!(q.push_msg(msg("c", 3), None, id(3), bound), Pushed::Queued);
    assert_eq!(
        q.push_msg(msg("p:a", 4), a.as_ref(), id(4), bound),
        Pushed::Conflated
    );
    assert_eq!(
        q.push_msg(msg("p:a", 5), a.as_ref(), id(5), bound),
        Pushed::Conflated
    );
    assert_eq!(
        q.push_msg(msg("p:b", 6), b.as_ref(), id(6), bound),
        Pushed::Conflated
    );
    assert_eq!(shown(&q), ["pong", "p:a#5-0", "p:b#6-0", "c#3-0"]);
    assert_eq!(q.bytes(), real_bytes(&q));
}

#[test]
fn conflate_never_touches_a_partly_written_front_frame() {
    let mut q = OutQueue::default();
    let a = Tag::new(&topic("p:a"), SlowConsumer::Conflate);
    let bound = 1 << 20;
    q.push_msg(msg("p:a", 1), a.as_ref(), id(1), bound);
    q.consume(10);
    assert_eq!(
        q.push_msg(msg("p:a", 2), a.as_ref(), id(2), bound),
        Pushed::Queued
    );
    assert_eq!(
        q.push_msg(msg("p:a", 3), a.as_ref(), id(3), bound),
        Pushed::Conflated
    );
    assert_eq!(shown(&q), ["p:a#1-0", "p:a#3-0"]);
    assert_eq!(q.bytes(), real_bytes(&q));
    // Not started at all, the front frame is still the topic's to replace.
    let mut q = OutQueue::default();
    q.push_msg(msg("p:a", 1), a.as_ref(), id(1), bound);
    assert_eq!(
        q.push_msg(msg("p:a", 2), a.as_ref(), id(2), bound),
        Pushed::Conflated
    );
    assert_eq!(shown(&q), ["p:a#2-0"]);
}

#[test]
fn conflate_replaces_a_compressed_frame_like_a_plain_one_and_keeps_the_bound() {
    let mut q = OutQueue::default();
    let a = Tag::new(&topic("p:a"), SlowConsumer::Conflate);
    let small = crate::ws::frame::encode_compressed(crate::ws::frame::OpCode::Text, b"zzzz");
    let bound = small.len() + 10;
    assert_eq!(
        q.push_msg(small.clone(), a.as_ref(), id(1), bound),
        Pushed::Queued
    );
    assert_eq!(
        q.push_msg(small.clone(), a.as_ref(), id(2), bound),
        Pushed::Conflated
    );
    assert_eq!(q.bytes(), small.len());
    // A newer one too large for the bound leaves the queue as it was.
    assert_eq!(
        q.push_msg(msg("p:a", 3), a.as_ref(), id(3), bound),
        Pushed::Full
    );
    assert_eq!(q.bytes(), small.len());
    assert_eq!(q.len(), 1);
}

#[test]
fn drop_oldest_makes_room_and_leaves_one_notice_per_topic_and_episode() {
    let mut q = OutQueue::default();
    let a = Tag::new(&topic("d:a"), SlowConsumer::DropOldest);
    let b = Tag::new(&topic("d:b"), SlowConsumer::DropOldest);
    let other = Tag::new(&topic("e:x"), SlowConsumer::DropOldest);
    let one = msg("d:a", 1).len();
    let bound = 8 * one;
    q.push(crate::protocol::encode_pong(None));
    q.push_msg(msg("e:x", 1), other.as_ref(), id(1), bound);
    for n in 2..=7 {
        let tag = if n % 2 == 0 { &a } else { &b };
        let t = if n % 2 == 0 { "d:a" } else { "d:b" };
        assert_eq!(
            q.push_msg(msg(t, n), tag.as_ref(), id(n), bound),
            Pushed::Queued
        );
    }
    // Full: the next one drops the oldest of its namespace (d:a#2 and,
    // for the notice's room, d:b#3), never the pong or e:x's message.
    let pushed = q.push_msg(msg("d:a", 8), a.as_ref(), id(8), bound);
    assert!(
        matches!(pushed, Pushed::DroppedOldest(n) if n >= 1),
        "{pushed:?}"
    );
    let now = shown(&q);
    assert_eq!(&now[..2], ["pong", "e:x#1-0"]);
    assert!(now[2].starts_with("lost d:a 2-0..2-0"), "{now:?}");
    assert_eq!(now.last().unwrap(), "d:a#8-0");
    assert!(q.bytes() <= bound && q.bytes() == real_bytes(&q));
    // More in the same episode: the notice's range grows, no second notice.
    for n in 9..=20 {
        let tag = if n % 2 == 0 { &a } else { &b };
        let t = if n % 2 == 0 { "d:a" } else { "d:b" };
        assert!(matches!(
            q.push_msg(msg(t, n), tag.as_ref(), id(n), bound),
            Pushed::Queued | Pushed::DroppedOldest(_)
        ));
        assert!(q.bytes() <= bound && q.bytes() == real_bytes(&q));
    }
    let now = shown(&q);
    let notices: Vec<_> = now.iter().filter(|s| s.starts_with("lost")).collect();
    assert_eq!(notices.len(), 2, "one per topic: {now:?}");
    // Every id is either still queued or inside its topic's lost range.
    for (t, first) in [("d:a", 2u64), ("d:b", 3)] {
        let lost = now
            .iter()
            .find(|s| s.starts_with(&format!("lost {t} ")))
            .expect("a notice");
        let range = lost.rsplit(' ').next().unwrap();
        let (from, to) = range.split_once("..").unwrap();
        assert_eq!(from, format!("{first}-0"));
        let to: u64 = to.trim_end_matches("-0").parse().unwrap();
        let queued: Vec<u64> = now
            .iter()
            .filter_map(|s| s.strip_prefix(&format!("{t}#")))
            .map(|s| s.trim_end_matches("-0").parse().unwrap())
            .collect();
        assert_eq!(queued.first().copied(), Some(to + 2), "{t}: {now:?}");
    }
}

#[test]
fn a_written_notice_ends_the_episode() {
    let mut q = OutQueue::default();
    let a = Tag::new(&topic("d:a"), SlowConsumer::DropOldest);
    let bound = 4 * msg("d:a", 1).len();
    for n in 1..=6 {
        q.push_msg(msg("d:a", n), a.as_ref(), id(n), bound);
    }
    let notice = shown(&q)[0].clone();
    assert!(notice.starts_with("lost d:a 1-0.."), "{notice}");
    // The notice starts going out: the next drop is a new episode.
    q.consume(5);
    q.push_msg(msg("d:a", 7), a.as_ref(), id(7), bound);
    q.push_msg(msg("d:a", 8), a.as_ref(), id(8), bound);
    let now = shown(&q);
    assert_eq!(now[0], notice, "the started notice is untouched");
    assert_eq!(
        now.iter().filter(|s| s.starts_with("lost")).count(),
        2,
        "{now:?}"
    );
    assert!(q.bytes() <= bound && q.bytes() == real_bytes(&q));
}

#[test]
fn drop_oldest_refuses_when_nothing_of_its_namespace_can_go() {
    let mut q = OutQueue::default();
    let a = Tag::new(&topic("d:a"), SlowConsumer::DropOldest);
    let bound = 2 * msg("d:a", 1).len();
    q.push_msg(msg("x", 1), None, id(1), bound);
    q.push_msg(msg("x", 2), None, id(2), bound);
    assert_eq!(
        q.push_msg(msg("d:a", 3), a.as_ref(), id(3), bound),
        Pushed::Full
    );
    assert_eq!(shown(&q), ["x#1-0", "x#2-0"]);
}

#[test]
fn discard_keeps_a_partly_written_front_frame() {
    let mut q = OutQueue::default();
    q.push(msg("a", 1));
    q.push(msg("a", 2));
    q.consume(3);
    assert_eq!(q.discard_unsent(), 1);
    assert_eq!(q.bytes(), msg("a", 1).len() - 3);
}

/// Random pushes of every kind and random partial writes, until a push
/// finds the queue full (the shard closes the connection then): the
/// counted bytes are the real ones and within the bound, a partly written
/// frame never changes, and per topic the stream that left the queue is
/// what its policy promises: under `close` every id in order, under
/// `drop_oldest` every id either received or inside the one `lost` range
/// in its place, under `conflate` ids in order ending with the newest.
#[test]
fn random_traffic_keeps_every_invariant() {
    use std::collections::HashMap;
    // How often each outcome came, over all seeds: the test must reach them.
    let mut outcomes: HashMap<&str, usize> = HashMap::new();
    for seed in 0..60 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let topics = ["c:a", "c:b", "d:a", "d:b", "x"];
        let tags: Vec<Option<Rc<Tag>>> = topics
            .iter()
            .map(|t| {
                let policy = match t.as_bytes()[0] {
                    b'c' => SlowConsumer::Conflate,
                    b'd' => SlowConsumer::DropOldest,
                    _ => SlowConsumer::Close,
                };
                Tag::new(&topic(t), policy)
            })
            .collect();
        let bound = 6 * msg("c:a", 1).len();
        let mut q = OutQueue::default();
        let mut written: Vec<u8> = Vec::new();
        let mut published: HashMap<&str, Vec<u64>> = HashMap::new();
        for next in 1..=400u64 {
            let roll = rng.u8(..);
            if roll < 90 {
                // A write of some bytes, as a socket takes them.
                let mut left = rng.usize(0..=q.bytes().min(300));
                q.consume_into(&mut left, &mut written);
            } else if roll < 110 {
                let pong = crate::protocol::encode_pong(None);
                if q.bytes() + pong.len() <= bound {
                    q.push(pong);
                }
            } else {
                let k = rng.usize(..topics.len());
                let front = q.frames.front().map(|f| f.frame.clone());
                let started = q.offset;
                let pushed = q.push_msg(msg(topics[k], next), tags[k].as_ref(), id(next), bound);
                if started > 0 {
                    assert_eq!(q.frames.front().map(|f| f.frame.clone()), front);
                    assert_eq!(q.offset, started, "front untouched");
                }
                *outcomes
                    .entry(match pushed {
                        Pushed::Queued => "queued",
                        Pushed::Conflated => "conflated",
                        Pushed::DroppedOldest(_) => "dropped",
                        Pushed::Full => "full",
                    })
                    .or_default() += 1;
                if pushed == Pushed::Full {
                    break;
                }
                published.entry(topics[k]).or_default().push(next);
            }
            assert_eq!(q.bytes(), real_bytes(&q), "seed {seed}");
            assert!(
                q.bytes() <= bound,
                "seed {seed}: {} over {bound}",
                q.bytes()
            );
        }
        let mut left = q.bytes();
        q.consume_into(&mut left, &mut written);
        // Read the stream back, per topic.
        let mut buf = bytes::BytesMut::from(&written[..]);
        let mut got: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        while let Some(payload) = next_payload(&mut buf) {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            let n = |f: &str| -> u64 {
                v[f].as_str()
                    .unwrap()
                    .trim_end_matches("-0")
                    .parse()
                    .unwrap()
            };
            let t = v["topic"].as_str().unwrap_or_default().to_string();
            match v["op"].as_str() {
                Some("msg") => got.entry(t).or_default().push((n("id"), n("id"))),
                Some("lost") => got.entry(t).or_default().push((n("from"), n("to"))),
                _ => {}
            }
        }
        assert!(
            buf.is_empty(),
            "seed {seed}: the stream ends on a frame boundary"
        );
        for t in topics {
            let all = published.remove(t).unwrap_or_default();
            let seen = got.remove(t).unwrap_or_default();
            match t.as_bytes()[0] {
                b'c' => {
                    let ids: Vec<u64> = seen.iter().map(|r| r.0).collect();
                    let mut rest = all.iter();
                    assert!(ids.iter().all(|i| rest.any(|a| a == i)), "seed {seed} {t}");
                    assert_eq!(ids.last(), all.last(), "seed {seed} {t}: the newest");
                }
                _ => {
                    // Ranges in order cover every published id exactly.
                    let mut covered: Vec<u64> = Vec::new();
                    for (from, to) in seen {
                        covered.extend(all.iter().filter(|&&i| i >= from && i <= to));
                    }
                    assert_eq!(covered, all, "seed {seed} {t}");
                }
            }
        }
    }
    for kind in ["queued", "conflated", "dropped", "full"] {
        assert!(outcomes.get(kind).is_some_and(|&n| n >= 10), "{outcomes:?}");
    }
}

impl OutQueue {
    /// Writes up to `left` bytes into `out`, as a socket would take them.
    fn consume_into(&mut self, left: &mut usize, out: &mut Vec<u8>) {
        let n = *left;
        let mut at = self.offset as usize;
        for f in self.frames() {
            let take = (f.len() - at).min(*left);
            out.extend_from_slice(&f[at..at + take]);
            *left -= take;
            at = 0;
            if *left == 0 {
                break;
            }
        }
        self.consume(n);
    }
}

/// The payload of the next whole server frame in `buf`.
fn next_payload(buf: &mut bytes::BytesMut) -> Option<Vec<u8>> {
    if buf.len() < 2 {
        return None;
    }
    let (len, head) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < head + len {
        return None;
    }
    let frame = buf.split_to(head + len);
    Some(frame[head..].to_vec())
}

#[test]
fn two_tags_made_for_one_topic_conflate_alike() {
    // A topic only patterns match gets a tag per message.
    let mut q = OutQueue::default();
    let bound = 1 << 20;
    for n in 1..=3 {
        let tag = Tag::new(&topic("p:a"), SlowConsumer::Conflate);
        q.push_msg(msg("p:a", n), tag.as_ref(), id(n), bound);
    }
    assert_eq!(shown(&q), ["p:a#3-0"]);
}
