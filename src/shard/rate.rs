//! Inbound rate limits: two token buckets per connection (frames/s and
//! payload bytes/s), charged for every data frame, ping and pong before
//! any work is done for it, and the 4008 policy for a client over them.

use std::collections::HashMap;
use std::rc::Rc;

use super::conn::Conn;
use super::Shard;
use crate::id::ConnId;
use crate::protocol::{code, encode_error, request_id, Close};
use crate::ws::frame::Message;

/// Shard time in hundredths of a second, plus one so that 0 can mean
/// "none": for timestamps compared only over short spans, in half the
/// space. Wraps every 497 days (and is 0 for 10 ms then, read as "none").
pub(super) fn centis(now_ms: u64) -> u32 {
    ((now_ms / 10) as u32).wrapping_add(1)
}

/// Milliseconds from centisecond stamp `then` to `now` (wrapping).
pub(super) fn centis_since(now_ms: u64, then: u32) -> u64 {
    u64::from(centis(now_ms).wrapping_sub(then)) * 10
}

/// How long a client may stay over its inbound rate before it is closed.
const RATE_GRACE_MS: u64 = 5_000;
/// A run of refused messages ends after this long without one.
const RATE_QUIET_MS: u64 = 1_000;

/// The clients of a shard in a run of refused frames: when each run
/// began and when its last frame was refused (in [`centis`]). A run ends
/// after [`RATE_QUIET_MS`] without a refusal; the sweep forgets it then,
/// and the shard when the connection ends, so only a client refused in
/// the last second or two has an entry (not a field every connection
/// carries).
#[derive(Debug, Default)]
pub(super) struct Runs(HashMap<ConnId, (u32, u32)>);

impl Runs {
    /// A frame of `id` refused at `now`: how long (ms) its run has lasted,
    /// 0 for the first refusal of a new run.
    pub(super) fn refused(&mut self, id: ConnId, now: u64) -> u64 {
        let stamp = centis(now);
        let run = self.0.entry(id).or_insert((stamp, stamp));
        if centis_since(now, run.1) >= RATE_QUIET_MS {
            run.0 = stamp;
        }
        run.1 = stamp;
        centis_since(now, run.0)
    }

    /// Forgets the runs that ended before `now`.
    pub(super) fn sweep(&mut self, now: u64) {
        self.0
            .retain(|_, run| centis_since(now, run.1) < RATE_QUIET_MS);
    }

    /// Forgets a finished connection's run.
    pub(super) fn forget(&mut self, id: ConnId) {
        self.0.remove(&id);
    }

    /// Clients with a run.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Which inbound bucket is empty.
#[derive(Debug, Clone, Copy)]
pub(super) enum Over {
    /// `inbound_rate` (frames/s).
    Frames,
    /// `inbound_bytes_rate` (bytes/s).
    Bytes,
}

/// Charges one inbound message of `len` payload bytes: one token from the
/// frame bucket (`inbound_rate`/s up to `inbound_burst`) and `len` from
/// the bytes bucket (`inbound_bytes_rate`/s up to `inbound_bytes_burst`).
/// Nothing is taken when either is short; a limit of 0 is off.
pub(super) fn charge(shard: &Shard, conn: &Conn, len: usize) -> Result<(), Over> {
    let cfg = &shard.config;
    if cfg.echo || (cfg.inbound_rate == 0 && cfg.inbound_bytes_rate == 0) {
        return Ok(());
    }
    let now = shard.now_ms();
    // Centiseconds, wrapping: a silence of 497 days (heartbeats off) would
    // refill short once.
    let elapsed = centis_since(now, conn.refilled.replace(centis(now))) as f32 / 1000.0;
    let frames =
        (conn.tokens.get() + elapsed * cfg.inbound_rate as f32).min(cfg.inbound_burst as f32);
    let bytes = (conn.byte_tokens.get() + elapsed * cfg.inbound_bytes_rate as f32)
        .min(cfg.inbound_bytes_burst as f32);
    let cost = len as f32;
    let result = if cfg.inbound_rate > 0 && frames < 1.0 {
        Err(Over::Frames)
    } else if cfg.inbound_bytes_rate > 0 && bytes < cost {
        Err(Over::Bytes)
    } else {
        Ok(())
    };
    let (frames, bytes) = match result {
        Ok(()) => (frames - 1.0, bytes - cost),
        Err(_) => (frames, bytes),
    };
    conn.tokens.set(frames);
    conn.byte_tokens.set(bytes);
    result
}

/// A message over an inbound limit: error 4008 (with the request's `id`
/// when it has one; a pong gets no answer), or close 4008 once the client
/// has been over a limit for [`RATE_GRACE_MS`].
pub(super) fn over_rate(shard: &Rc<Shard>, conn: &Rc<Conn>, msg: &Message, over: Over) {
    let lasted = shard.refusing.borrow_mut().refused(conn.id, shard.now_ms());
    let cfg = &shard.config;
    if lasted >= RATE_GRACE_MS {
        let why = match over {
            Over::Frames => Close::FramesRateLimited,
            Over::Bytes => Close::BytesRateLimited,
        };
        return shard.close(conn, why);
    }
    let id = match msg {
        Message::Pong(_) => return,
        // Only the id is read: the request itself is not served.
        Message::Text(t) => std::str::from_utf8(t).ok().and_then(request_id),
        _ => None,
    };
    let reason = match over {
        Over::Frames => format!(
            "rate limited: over inbound_rate {} frames/s (burst {})",
            cfg.inbound_rate, cfg.inbound_burst
        ),
        Over::Bytes => format!(
            "rate limited: over inbound_bytes_rate {} bytes/s (burst {})",
            cfg.inbound_bytes_rate, cfg.inbound_bytes_burst
        ),
    };
    shard.queue(conn, encode_error(id, code::RATE_LIMITED, &reason));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centisecond_stamps_measure_spans_from_the_first_millisecond() {
        assert_ne!(centis(0), 0, "0 means no stamp");
        assert_eq!(centis_since(0, centis(0)), 0);
        assert_eq!(centis_since(5_000, centis(0)), 5_000);
        assert_eq!(centis_since(1_234, centis(1_200)), 30);
        // Across the wrap, spans stay right.
        let wrap = u64::from(u32::MAX) * 10;
        assert_eq!(centis_since(wrap + 2_000, centis(wrap - 1_000)), 3_000);
    }

    /// A run lasts while refusals come less than a quiet second apart,
    /// starts again after one, and is forgotten by the sweep once quiet.
    #[test]
    fn refusal_runs_begin_last_and_end() {
        let mut runs = Runs::default();
        let (a, b) = (ConnId(1), ConnId(2));
        assert_eq!(runs.refused(a, 10_000), 0);
        assert_eq!(runs.refused(a, 10_900), 900);
        assert_eq!(runs.refused(a, 15_000), 0, "4.1 s quiet: a new run");
        for t in (15_500..=20_000).step_by(500) {
            assert_eq!(runs.refused(a, t), t - 15_000);
        }
        assert_eq!(runs.refused(b, 20_000), 0);
        runs.sweep(20_990);
        assert_eq!(runs.len(), 2, "both refused within the second");
        runs.forget(b);
        assert_eq!(runs.len(), 1);
        runs.sweep(21_000);
        assert_eq!(runs.len(), 0, "a quiet second ends the run");
        assert_eq!(runs.refused(a, 21_000), 0);
    }
}
