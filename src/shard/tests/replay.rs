//! A `sub` with recovery: replay, `ok` with `last`, then live, with no gap
//! and no duplicate; a replay over the outbound queue answered
//! `recovered:false` without a frame.

use super::*;
use crate::ws::frame::encode_text;

#[test]
fn replay_then_ok_with_last_then_live_without_a_gap_or_a_duplicate() {
    on_both_drivers(|| async {
        use crate::broker::Broker as _;
        let h = Harness::new(config());
        let mut c = h.open(A);
        let t = TopicName::new("t").expect("a valid topic");
        h.broker.publish(None, t.clone(), "1");
        h.broker.publish(None, t.clone(), "2");
        // The client recovers from before both, while they are still in
        // the shard's inbox: by the broker contract they come before the
        // `Subscribed` that replays them, and must not reach the client
        // twice.
        let sub = format!(
            r#"{{"op":"sub","id":1,"topic":"t","since":"0-0","epoch":"{}"}}"#,
            h.broker.epoch()
        );
        c.send_text(&sub);
        h.poll();
        h.broker.publish(None, t.clone(), "3");
        h.broker.publish(None, t.clone(), "4");
        // The broker's order: the two it replays, its answer, the two after.
        let batch = h.take(5).await;
        let ids: Vec<MsgId> = batch
            .iter()
            .filter_map(|m| match m {
                ShardMsg::Deliver { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        let Some(ShardMsg::Subscribed { replay, last, .. }) = batch.get(2) else {
            panic!("{batch:?}");
        };
        assert_eq!((ids.len(), replay.len(), *last), (4, 2, ids[1]));
        h.handle(batch);
        let want = [
            "msg 1",
            "msg 2",
            &format!("ok t last={} recovered=true", ids[1]),
            "msg 3",
            "msg 4",
        ];
        assert_eq!(c.read(), want);
        assert_eq!(h.shard.metrics.subscriptions_active.load(Relaxed), 1);
    });
}

#[test]
fn a_replay_over_the_outbound_queue_is_answered_recovered_false_without_a_frame() {
    on_both_drivers(|| async {
        use crate::broker::Broker as _;
        let h = Harness::new(Config {
            outbound_queue: 4096,
            ..config()
        });
        let mut c = h.open(A);
        let t = TopicName::new("t").expect("a valid topic");
        let data = format!("\"{}\"", "x".repeat(500));
        for _ in 0..10 {
            h.broker.publish(None, t.clone(), &data);
        }
        let published = h.take(10).await;
        h.handle(published);
        let sub = format!(
            r#"{{"op":"sub","id":1,"topic":"t","since":"0-0","epoch":"{}"}}"#,
            h.broker.epoch()
        );
        c.send_text(&sub);
        h.poll();
        let answer = h.take(1).await;
        let Some(ShardMsg::Subscribed { replay, last, .. }) = answer.first() else {
            panic!("{answer:?}");
        };
        assert_eq!(replay.len(), 10, "the broker replays all ten");
        let last = *last;
        h.handle(answer);
        // No replay frame, no 4009: the client refetches, and stays subscribed.
        assert_eq!(c.read(), [format!("ok t last={last} recovered=false")]);
        assert_eq!(h.dropped(Undelivered::ReplayTooLarge), 10);
        assert_eq!(h.dropped(Undelivered::SlowConsumer), 0);
        h.broker.publish(None, t.clone(), "11");
        let live = h.take(1).await;
        h.handle(live);
        assert_eq!(c.read(), ["msg 11"]);
    });
}

#[test]
fn a_replay_is_sent_when_it_fits_the_queue_with_its_ok_to_the_byte() {
    on_both_drivers(|| async {
        let bound = 4096;
        let h = Harness::new(Config {
            outbound_queue: bound,
            ..config()
        });
        let mut c = h.open(A);
        for (topic, over) in [("a", 0), ("b", 1)] {
            c.send_text(&format!(r#"{{"op":"sub","id":1,"topic":"{topic}"}}"#));
            h.poll();
            let answer = h.take(1).await.pop();
            let Some(ShardMsg::Subscribed {
                reply,
                topic,
                epoch,
                last,
                ..
            }) = answer
            else {
                panic!("{answer:?}");
            };
            // What the shard will answer, so the replay can be sized to
            // fill the queue exactly, or one byte more.
            let extra = crate::protocol::OkExtra {
                epoch: Some(&epoch),
                last: Some(last),
                recovered: Some(true),
                mid: None,
            };
            let ok_len = crate::protocol::encode_ok(reply.req, Some(&topic), extra).len();
            // Two `msg` frames, the second padded to the byte (its header
            // is 4 bytes: a payload of 126 to 65535 bytes).
            let msg = |data: &str| format!(r#"{{"op":"msg","topic":"{topic}","data":"{data}"}}"#);
            let first = encode_text(msg("first").as_bytes());
            let second_len = bound - ok_len - first.len() + over;
            let pad = second_len - 4 - msg("").len();
            let second = encode_text(msg(&"y".repeat(pad)).as_bytes());
            assert_eq!(first.len() + second.len() + ok_len, bound + over);
            h.handle(vec![ShardMsg::Subscribed {
                reply,
                topic: topic.clone(),
                replay: vec![first, second],
                recovered: Some(true),
                epoch,
                last,
            }]);
            let got = c.read();
            let ok = format!("ok {topic} last={last}");
            if over == 0 {
                let pad = format!("msg \"{}\"", "y".repeat(pad));
                let want = ["msg \"first\"", &pad, &format!("{ok} recovered=true")];
                assert_eq!(got, want);
            } else {
                assert_eq!(got, [format!("{ok} recovered=false")]);
            }
        }
        assert_eq!(h.dropped(Undelivered::ReplayTooLarge), 2);
        assert_eq!(h.conn(&c).phase(), Phase::Open);
    });
}
