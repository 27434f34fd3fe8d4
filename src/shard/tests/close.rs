//! The close handshake, started by the server (after what is queued;
//! the socket shut on the answer or at `close_timeout`) or by the client
//! (its code echoed).

use super::*;

#[test]
fn a_server_close_follows_what_is_queued_and_the_socket_shuts_when_the_client_answers() {
    on_both_drivers(|| async {
        let h = Harness::new(config());
        let mut c = h.open(A);
        h.subscribe(&mut c, "t").await;
        // One batch: two messages, then the drain closes every connection.
        h.shard.handle(deliver("t", 1));
        h.shard.handle(deliver("t", 2));
        h.shard.start_drain(0);
        h.shard.flush_dirty();
        assert_eq!(c.read(), ["msg 1", "msg 2", "drain", "close 1001"]);
        // Still open until the client answers: its answer must get through.
        h.poll();
        assert_eq!(c.read(), Vec::<String>::new());
        assert_eq!(h.conn(&c).phase(), Phase::Closing);
        c.send_close(Some(crate::protocol::close::GOING_AWAY));
        h.poll();
        assert_eq!(c.read(), ["eof"]);
        h.poll();
        assert!(h.shard.conns.borrow().is_empty());
        assert_eq!(h.shard.metrics.connections_active.load(Relaxed), 0);
        assert_eq!(
            h.metric(r#"ringcast_client_disconnects_total{reason="drain"}"#),
            1
        );
        assert_eq!(
            h.metric(r#"ringcast_client_disconnects_total{reason="client"}"#),
            0,
            "counted once, for the drain"
        );
    });
}

#[test]
fn a_server_close_the_client_never_answers_is_shut_at_close_timeout() {
    on_both_drivers(|| async {
        let h = Harness::new(config());
        let mut c = h.open(A);
        h.shard.start_drain(0);
        h.shard.flush_dirty();
        assert_eq!(c.read(), ["drain", "close 1001"]);
        let timeout = h.shard.config.close_timeout.as_millis() as u64;
        h.advance(timeout - 1);
        h.shard.sweep();
        assert_eq!(c.read(), Vec::<String>::new(), "shut before the timeout");
        h.advance(1);
        h.shard.sweep();
        assert_eq!(c.read(), ["eof"]);
        h.poll();
        assert!(h.shard.conns.borrow().is_empty());
    });
}

#[test]
fn a_client_close_is_echoed_with_its_code_after_what_was_queued_then_the_socket_shut() {
    on_both_drivers(|| async {
        let h = Harness::new(config());
        let mut c = h.open(A);
        // One read brings a request and the close: the reply goes first.
        c.send_text(r#"{"op":"ping","id":5}"#);
        c.send_close(Some(4321));
        h.poll();
        assert_eq!(c.read(), ["pong", "close 4321", "eof"]);
        h.poll();
        assert!(h.shard.conns.borrow().is_empty());
        // A close without a code is answered without one.
        let mut c = h.open(B);
        c.send_close(None);
        h.poll();
        assert_eq!(c.read(), ["close", "eof"]);
        h.poll();
        assert_eq!(
            h.metric(r#"ringcast_client_disconnects_total{reason="client"}"#),
            2
        );
    });
}
