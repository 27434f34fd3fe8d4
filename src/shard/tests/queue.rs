//! The outbound queue's bound: a queue over `outbound_queue` closes with
//! 4009, and what it could not send is dropped and counted.

use super::*;

#[test]
fn the_queue_takes_exactly_its_bound_and_the_next_frame_closes_4009() {
    on_both_drivers(|| async {
        // The smallest bound a configuration may set: four 1 KiB frames.
        let h = Harness::new(Config {
            outbound_queue: 4096,
            ..config()
        });
        let mut c = h.open(A);
        h.subscribe(&mut c, "t").await;
        let conn = h.conn(&c);
        // One inbox batch, nothing written in between: four fill the
        // queue to its bound exactly and stay queued.
        for n in 1..=4 {
            h.shard.handle(deliver_sized("t", n, 1024));
        }
        assert_eq!(conn.queued_bytes(), 4096);
        assert_eq!(
            conn.phase(),
            Phase::Open,
            "a queue at its bound is not over it"
        );
        // The fifth goes over: closed 4009, what was unsent dropped and
        // counted, and what comes after counted too.
        h.handle(vec![deliver_sized("t", 5, 1024), deliver("t", 6)]);
        assert_eq!(c.read(), ["close 4009"]);
        assert_eq!(h.shard.metrics.messages_delivered.load(Relaxed), 4);
        assert_eq!(h.dropped(Undelivered::SlowConsumer), 1, "the fifth");
        assert_eq!(h.dropped(Undelivered::ConnectionClosed), 4 + 1);
        assert_eq!(
            h.metric(r#"ringcast_client_disconnects_total{reason="slow"}"#),
            1
        );
        // The close handshake ends it as any other.
        c.send_close(Some(crate::protocol::close::SLOW));
        h.poll();
        assert_eq!(c.read(), ["eof"]);
        h.poll();
        assert!(h.shard.conns.borrow().is_empty());
    });
}

/// A subscriber of `t` whose socket holds a few KiB.
async fn small_socket_subscriber(h: &Harness) -> (Client, Rc<Conn>) {
    let mut c = h.accept_with(A, Some(4096));
    c.write(UPGRADE.as_bytes());
    h.poll();
    assert_eq!(c.read(), ["http 101", "welcome"]);
    h.subscribe(&mut c, "t").await;
    let conn = h.conn(&c);
    (c, conn)
}

#[test]
fn a_client_that_stops_reading_gets_whole_frames_then_4009_and_every_message_is_counted() {
    on_both_drivers(|| async {
        let h = Harness::new(Config {
            outbound_queue: 64 << 10,
            ..config()
        });
        // Each 20 KiB message fills the socket part of the way through.
        let (mut c, conn) = small_socket_subscriber(&h).await;
        let topic = TopicName::new("t").expect("a valid topic");
        let data = format!("\"{}\"", "x".repeat(20 << 10));
        let mut sent = 0u64;
        while conn.phase() == Phase::Open {
            sent += 1;
            assert!(sent < 100, "never closed");
            let id = MsgId { ms: sent, seq: 0 };
            let frame = encode_msg(&topic, id, None, &data);
            let fits = conn.queued_bytes() + frame.len() <= h.shard.config.outbound_queue;
            // On epoll the queue's front frame is cut; on the data ring the
            // send in flight holds it (its frames are out of the queue).
            let front_started = {
                let out = conn.out.borrow();
                let on_ring = matches!(h.shard.io, super::super::io::Io::Ring(_));
                let in_flight = conn.write_blocked.get() && on_ring;
                out.offset > 0 || in_flight
            };
            h.handle(vec![ShardMsg::Deliver {
                topic: topic.clone(),
                id,
                frame,
            }]);
            assert_eq!(conn.phase() == Phase::Open, fits, "message {sent}");
            if !fits {
                // The case that matters: the socket took part of a frame.
                assert!(front_started, "the socket was not full mid-frame");
            }
        }
        // The client reads again: the rest of the half-written frame, then
        // the close frame right behind it (the socket drains through EPOLLOUT).
        let mut got = Vec::new();
        for _ in 0..1000 {
            got.extend(c.read());
            if got.last().is_some_and(|l| l.starts_with("close")) {
                break;
            }
            h.poll();
        }
        let close = got.pop();
        assert_eq!(close.as_deref(), Some("close 4009"), "{got:?}");
        let received = got.len() as u64;
        assert!(received >= 1, "no message got through");
        assert!(got.iter().all(|l| l.starts_with("msg \"x")), "{got:?}");
        // Every message is accounted for: received, or dropped with its reason.
        let m = &h.shard.metrics;
        let discarded = h.dropped(Undelivered::ConnectionClosed);
        assert!(discarded >= 1, "nothing queued was dropped");
        assert_eq!(m.messages_delivered.load(Relaxed), received + discarded);
        assert_eq!(h.dropped(Undelivered::SlowConsumer), 1);
        assert_eq!(received + discarded + 1, sent);
        assert_eq!(m.bytes_sent.load(Relaxed), c.received as u64);
        // The client answers; the shard shuts the socket and forgets it.
        c.send_close(Some(crate::protocol::close::SLOW));
        h.poll();
        assert_eq!(c.read(), ["eof"]);
        h.poll();
        assert!(h.shard.conns.borrow().is_empty());
    });
}

/// Sends cut by a full socket (the ring hands the unwritten part back,
/// epoll keeps an offset) leave the queue's byte count exact: once the
/// client has read everything, the connection counts nothing queued.
#[test]
fn the_queue_count_returns_to_zero_after_sends_cut_mid_frame() {
    on_both_drivers(|| async {
        let h = Harness::new(Config {
            outbound_queue: 1 << 20,
            ..config()
        });
        let (mut c, conn) = small_socket_subscriber(&h).await;
        for round in 0..3u64 {
            let batch = (1..=8)
                .map(|n| deliver_sized("t", round * 8 + n, 20 << 10))
                .collect();
            h.handle(batch);
            assert!(conn.queued_bytes() > 0, "round {round}: nothing waits");
            let mut got = Vec::new();
            for _ in 0..1000 {
                got.extend(c.read());
                if got.len() == 8 {
                    break;
                }
                h.poll();
            }
            assert_eq!(got.len(), 8, "round {round}: {got:?}");
            h.poll();
            assert_eq!(conn.queued_bytes(), 0, "round {round}");
            assert_eq!(conn.phase(), Phase::Open);
        }
    });
}
