//! How a worker's subscribers come back: after a churn drop at once, after
//! a `drain` when its `reconnect_in_ms` says, after any other close or a
//! failed attempt after a jittered backoff (docs/PROTOCOL.md §4: 1001
//! "reconnect after `reconnect_in_ms`", the others "with backoff"). A
//! subscriber between two connections is `Waiting` on a timer; an attempt
//! that has no `ok` by [`ATTEMPT_TIMEOUT`] failed. Either way it keeps its
//! position, its next expected sequence number and its tallies, so the
//! in-order check spans its connections.
//!
//! Invariant: `open` counts the `Open` clients and `in_flight` the
//! attempting ones; every move between states goes through [`Worker::leave`]
//! and [`Worker::reconnect`], which keep both.

use std::cmp::Reverse;
use std::os::fd::AsRawFd;

use anyhow::Context as _;

use super::super::client::State;
use super::Worker;
use crate::client::new_key;
use crate::sys;
use crate::ws::frame::{encode_masked, OpCode};

/// A connection attempt (connect, upgrade, `welcome`, `sub` to its `ok`)
/// longer than this failed and is retried: what `ringcast::client` gives
/// an upgrade. Followed subscribers only; without following, the worker's
/// stall check applies.
const ATTEMPT_TIMEOUT_US: u64 = 5_000_000;
/// The first backoff after a close without `drain` or a failed attempt;
/// it doubles with each failure in a row, up to [`BACKOFF_MAX_US`].
const BACKOFF_MIN_US: u64 = 50_000;
/// The longest backoff: a subscriber keeps trying at least this often.
const BACKOFF_MAX_US: u64 = 2_000_000;

/// The wait before attempt number `failures + 1` (µs): the base doubles
/// per failure, and the wait is drawn from its upper half, so clients
/// closed together do not come back together.
pub(super) fn backoff_us(failures: u8, rng: &mut fastrand::Rng) -> u64 {
    let base = BACKOFF_MIN_US
        .checked_shl(u32::from(failures))
        .unwrap_or(u64::MAX)
        .min(BACKOFF_MAX_US);
    base / 2 + rng.u64(..=base / 2)
}

impl Worker<'_> {
    /// Times out attempt `i` if it has no `ok` in [`ATTEMPT_TIMEOUT_US`]
    /// (when following).
    pub(super) fn time_attempt(&mut self, i: usize, now: u64) {
        if let (true, Some(Some(c))) = (self.follow, self.clients.get(i)) {
            self.timers.push(Reverse((
                now.saturating_add(ATTEMPT_TIMEOUT_US),
                i,
                c.attempt,
            )));
        }
    }

    /// The server ended connection `i`, with a close frame (`code`) or
    /// without (EOF, a reset). After a `drain` the subscriber reconnects
    /// when the drain said; an open one after a backoff; during an attempt,
    /// the attempt failed.
    pub(super) fn on_server_close(
        &mut self,
        i: usize,
        code: Option<u16>,
        now: u64,
    ) -> anyhow::Result<()> {
        let Some(Some(c)) = self.clients.get_mut(i) else {
            return Ok(());
        };
        if let Some(code) = code {
            // RFC 6455 §5.5.1: answer a close with a close (1005: the
            // server sent no code, and none may be sent back).
            let body = if code == 1005 {
                Vec::new()
            } else {
                code.to_be_bytes().to_vec()
            };
            let close = encode_masked(OpCode::Close, true, &body, [5, 6, 7, 8]);
            let _ = sys::send(c.fd.as_raw_fd(), &close);
        }
        if let Some((at, ms)) = c.drain {
            return self.leave(i, at.saturating_add(ms * 1000));
        }
        match c.state {
            State::Open => {
                if code.is_none() {
                    // No close frame: what a client sees as 1006.
                    *self.tally.closes.entry("1006".into()).or_default() += 1;
                }
                if c.churned_at == 0 {
                    c.churned_at = now;
                }
                let wait = backoff_us(c.failures, &mut self.rng);
                c.failures = c.failures.saturating_add(1);
                self.leave(i, now.saturating_add(wait))
            }
            s if s.attempting() => {
                let why = match code {
                    Some(code) => format!("closed ({code}) while {s:?}"),
                    None => format!("connection lost while {s:?}"),
                };
                self.attempt_failed(i, why, now)
            }
            _ => Ok(()),
        }
    }

    /// Attempt `i` failed at `now` (`why` is counted, by reason): it is
    /// retried after a backoff that grows with the failures in a row.
    pub(super) fn attempt_failed(&mut self, i: usize, why: String, now: u64) -> anyhow::Result<()> {
        let Some(Some(c)) = self.clients.get_mut(i) else {
            return Ok(());
        };
        *self.tally.failed_connects.entry(why).or_default() += 1;
        c.failures = c.failures.saturating_add(1);
        let wait = backoff_us(c.failures, &mut self.rng);
        self.leave(i, now.saturating_add(wait))
    }

    /// Ends client `i`'s connection (the socket closes, with no close
    /// frame) and makes it wait until `wake_at` (µs) to reconnect.
    pub(super) fn leave(&mut self, i: usize, wake_at: u64) -> anyhow::Result<()> {
        let fresh = self.new_socket(self.args.worker_first + i)?;
        let Some(Some(c)) = self.clients.get_mut(i) else {
            return Ok(());
        };
        if c.state == State::Open {
            self.open -= 1;
        } else if c.state.attempting() {
            self.in_flight -= 1;
        }
        let _ = self.epoll.delete(c.fd.as_raw_fd());
        c.fd = fresh;
        c.state = State::Waiting;
        c.pending.clear();
        c.attempt = c.attempt.wrapping_add(1);
        self.timers.push(Reverse((wake_at, i, c.attempt)));
        Ok(())
    }

    /// Starts client `i`'s next connection (it resubscribes from its
    /// position once welcomed).
    pub(super) fn reconnect(&mut self, i: usize, now: u64) -> anyhow::Result<()> {
        let Some(Some(c)) = self.clients.get_mut(i) else {
            return Ok(());
        };
        if c.drain.take().is_some() {
            self.tally.drains_followed += 1;
            if c.churned_at == 0 {
                // Recovery is timed from the end of the wait the server asked for.
                c.churned_at = now;
            }
        }
        c.key = new_key();
        c.state = State::Connecting;
        c.attempt = c.attempt.wrapping_add(1);
        self.in_flight += 1;
        let fd = c.fd.as_raw_fd();
        if let Err(e) = super::start_connect(&c.fd, self.args.target) {
            return self.attempt_failed(i, format!("connect: {e}"), now);
        }
        // Only now: an unconnected socket reads as writable and hung up.
        self.epoll
            .add(fd, sys::EPOLLOUT, i as u64)
            .context("watching a connection")?;
        self.time_attempt(i, now);
        Ok(())
    }

    /// Acts on the timers due at `now`: a waiting client reconnects, an
    /// attempt with no `ok` yet has timed out. Timers set meanwhile wait
    /// for the next call, so this ends whatever `now` is.
    pub(super) fn fire_timers(&mut self, now: u64) -> anyhow::Result<()> {
        let mut due = Vec::new();
        while let Some(&Reverse((at, i, attempt))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            due.push((i, attempt));
        }
        for (i, attempt) in due {
            let state = match self.clients.get(i) {
                Some(Some(c)) if c.attempt == attempt => c.state,
                _ => continue,
            };
            match state {
                State::Waiting => self.reconnect(i, now)?,
                s if s.attempting() => {
                    self.attempt_failed(i, format!("timed out while {s:?}"), now)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Fills the tally's `ended_on`: the open subscribers by the node of
    /// their connection, now.
    pub(super) fn snapshot_nodes(&mut self) {
        self.tally.ended_on.clear();
        for c in self.clients.iter().flatten() {
            if let (State::Open, Some(node)) = (c.state, &c.node) {
                *self.tally.ended_on.entry(node.to_string()).or_default() += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use clap::Parser as _;

    use super::*;
    use crate::load::LoadArgs;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadArgs,
    }

    /// `load churn` worker arguments against a real listener (its backlog
    /// takes the connects; nothing answers them).
    fn args(listener: &TcpListener, follow: bool) -> LoadArgs {
        let target = listener.local_addr().unwrap().to_string();
        let mut argv = vec!["t", "churn", "--target", &target, "--connections", "1"];
        if follow {
            argv.push("--worker-follow");
        }
        Cli::parse_from(argv).args
    }

    /// A worker with one client, open as after its `ok`.
    fn open_worker(args: &LoadArgs) -> Worker<'_> {
        let mut w = Worker::new(args).unwrap();
        w.start_one().unwrap();
        let c = w.clients[0].as_mut().unwrap();
        assert_eq!(c.state, State::Connecting);
        c.state = State::Open;
        (w.in_flight, w.open) = (0, 1);
        w
    }

    fn state(w: &Worker<'_>) -> State {
        w.clients[0].as_ref().unwrap().state
    }

    #[test]
    fn backoff_doubles_from_50_ms_to_2_s_and_never_overflows() {
        let mut rng = fastrand::Rng::with_seed(7);
        for (failures, base) in [(0, 50_000), (1, 100_000), (5, 1_600_000), (6, 2_000_000)] {
            for _ in 0..100 {
                let wait = backoff_us(failures, &mut rng);
                assert!((base / 2..=base).contains(&wait), "{failures}: {wait}");
            }
        }
        assert!(backoff_us(u8::MAX, &mut rng) <= BACKOFF_MAX_US);
    }

    #[test]
    fn a_drained_subscriber_waits_reconnect_in_ms_then_reconnects() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let args = args(&listener, true);
        let mut w = open_worker(&args);
        let now = sys::monotonic_us();
        w.clients[0].as_mut().unwrap().drain = Some((now, 1_800));
        w.on_server_close(0, Some(1001), now).unwrap();
        assert_eq!((state(&w), w.open, w.in_flight), (State::Waiting, 0, 0));
        // Not a millisecond early.
        w.fire_timers(now + 1_799_999).unwrap();
        assert_eq!(state(&w), State::Waiting);
        w.fire_timers(now + 1_800_000).unwrap();
        let c = w.clients[0].as_ref().unwrap();
        assert_eq!((c.state, w.open, w.in_flight), (State::Connecting, 0, 1));
        assert_eq!((c.drain, c.churned_at), (None, now + 1_800_000));
        assert_eq!(w.tally.drains_followed, 1);
        // Its attempt times out (nothing answers): counted, retried after a
        // backoff; the timer of the attempt before is stale by then.
        w.fire_timers(now + 1_800_000 + ATTEMPT_TIMEOUT_US).unwrap();
        let c = w.clients[0].as_ref().unwrap();
        assert_eq!((c.state, c.failures, w.in_flight), (State::Waiting, 1, 0));
        assert_eq!(w.tally.failed_connects["timed out while Connecting"], 1);
        assert_eq!(w.tally.drains_followed, 1, "followed once");
        // Due timers only: the retry's own timeout waits for a later call.
        w.fire_timers(u64::MAX).unwrap();
        assert_eq!((state(&w), w.in_flight), (State::Connecting, 1));
        // The reconnect's start still times the recovery.
        assert_eq!(w.clients[0].as_ref().unwrap().churned_at, now + 1_800_000);
    }

    #[test]
    fn a_close_without_drain_backs_off_and_an_eof_counts_as_1006() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let args = args(&listener, true);
        let mut w = open_worker(&args);
        let before = sys::monotonic_us();
        w.on_server_close(0, None, before).unwrap();
        assert_eq!((state(&w), w.open), (State::Waiting, 0));
        assert_eq!(w.tally.closes["1006"], 1);
        let c = w.clients[0].as_ref().unwrap();
        assert_eq!(c.churned_at, before, "recovery timed from the loss");
        let Some(Reverse((at, 0, _))) = w.timers.peek().copied() else {
            panic!("no timer")
        };
        assert!((before + BACKOFF_MIN_US / 2..=before + BACKOFF_MIN_US).contains(&at));
        w.fire_timers(at).unwrap();
        assert_eq!((state(&w), w.in_flight), (State::Connecting, 1));
        assert_eq!(w.tally.drains_followed, 0);
    }

    #[test]
    fn open_subscribers_are_counted_by_the_node_they_are_on() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let args = args(&listener, true);
        let mut w = open_worker(&args);
        w.clients[0].as_mut().unwrap().node = Some("b".into());
        w.snapshot_nodes();
        assert_eq!(w.tally.ended_on["b"], 1);
        w.on_server_close(0, Some(4009), sys::monotonic_us())
            .unwrap();
        w.snapshot_nodes();
        assert!(w.tally.ended_on.is_empty(), "a waiting one is on no node");
    }

    #[test]
    fn without_follow_attempts_have_no_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let args = args(&listener, false);
        let mut w = Worker::new(&args).unwrap();
        w.start_one().unwrap();
        assert!(w.timers.is_empty());
    }
}
