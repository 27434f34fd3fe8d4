//! Dead-link detection with the `ping` op (docs/PROTOCOL.md sections 1
//! and 2), for one connection of [`Reconnecting`](super::Reconnecting).
//!
//! After `heartbeat` (from `welcome`) with no frame from the server, the
//! client sends `{"op":"ping"}`; when nothing at all arrives within another
//! heartbeat, the link is dead (a server stopped or a network path gone:
//! TCP alone may take minutes to notice) and the client reconnects. Any
//! frame answers the ping, the server's WebSocket pings included. This is
//! the JS client's rule; a browser cannot send ping frames, hence the op.
//! Pure: the caller reads the clock and sends the op.

use std::time::{Duration, Instant};

/// The server's heartbeat when `welcome` does not say (its default).
pub(super) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(25);

/// The `ping` op, sent without `id`: its `pong` carries none either.
pub(super) const PING_OP: &str = r#"{"op":"ping"}"#;

/// What the heartbeat asks for at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Beat {
    /// Nothing until then: look again at that instant.
    Wait(Instant),
    /// Send the `ping` op now (counted as sent).
    Ping,
    /// A ping went unanswered for a whole heartbeat: the link is dead.
    Dead,
}

/// One connection's heartbeat state.
#[derive(Debug)]
pub(super) struct Heartbeat {
    interval: Duration,
    /// When the unanswered `ping` op was sent.
    ping_sent: Option<Instant>,
}

impl Heartbeat {
    /// The heartbeat of a connection whose `welcome` said `interval`.
    pub(super) fn new(interval: Duration) -> Heartbeat {
        Heartbeat {
            interval,
            ping_sent: None,
        }
    }

    /// The heartbeat interval.
    pub(super) fn interval(&self) -> Duration {
        self.interval
    }

    /// What to do at `now`, when the last bytes from the server came at
    /// `last_rx`. A `Ping` answer counts the op as sent at `now`.
    pub(super) fn check(&mut self, now: Instant, last_rx: Instant) -> Beat {
        if self.ping_sent.is_some_and(|sent| last_rx > sent) {
            self.ping_sent = None;
        }
        match self.ping_sent {
            Some(sent) if now >= sent + self.interval => Beat::Dead,
            Some(sent) => Beat::Wait(sent + self.interval),
            None if now >= last_rx + self.interval => {
                self.ping_sent = Some(now);
                Beat::Ping
            }
            None => Beat::Wait(last_rx + self.interval),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_sends_a_ping_and_a_second_silence_is_a_dead_link() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(1);
        let ms = Duration::from_millis;
        let mut h = Heartbeat::new(hb);
        // Frames keep coming: wait a heartbeat after the last one.
        assert_eq!(h.check(t0 + ms(300), t0), Beat::Wait(t0 + hb));
        assert_eq!(
            h.check(t0 + ms(900), t0 + ms(800)),
            Beat::Wait(t0 + ms(1800))
        );
        // A heartbeat of silence: ping, once.
        assert_eq!(h.check(t0 + ms(1800), t0 + ms(800)), Beat::Ping);
        assert_eq!(
            h.check(t0 + ms(1900), t0 + ms(800)),
            Beat::Wait(t0 + ms(2800))
        );
        // Another heartbeat with nothing: dead (and it stays dead).
        assert_eq!(h.check(t0 + ms(2800), t0 + ms(800)), Beat::Dead);
        assert_eq!(h.check(t0 + ms(5000), t0 + ms(800)), Beat::Dead);
    }

    #[test]
    fn anything_received_after_the_ping_answers_it() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(2);
        let ms = Duration::from_millis;
        let mut h = Heartbeat::new(hb);
        assert_eq!(h.check(t0 + hb, t0), Beat::Ping);
        // The pong (or any frame) at +2.5 s: the next ping is due 2 s later.
        assert_eq!(
            h.check(t0 + ms(2600), t0 + ms(2500)),
            Beat::Wait(t0 + ms(4500))
        );
        assert_eq!(h.check(t0 + ms(4500), t0 + ms(2500)), Beat::Ping);
        assert_eq!(
            h.check(t0 + ms(6400), t0 + ms(4400)),
            Beat::Wait(t0 + ms(6500))
        );
        // Bytes that came before the ping do not answer it.
        assert_eq!(h.check(t0 + ms(6500), t0 + ms(4400)), Beat::Dead);
        assert_eq!(h.interval(), hb);
    }
}
