//! The once-a-second pass over a shard's connections (deadlines, token
//! expiry, silence, pings) and the drain. No connection has a timer of its
//! own.

use std::rc::Rc;

use tracing::{debug, info};

use super::conn::{Conn, Phase};
use super::Shard;
use crate::metrics::Disconnect;
use crate::protocol::{encode_drain, Close};
use crate::ws::handshake::HandshakeError;

/// Interval of the per-shard sweep (heartbeats, handshake and close deadlines).
pub(super) const SWEEP_MS: u64 = 1000;

impl Shard {
    /// The once-a-second pass over every connection: deadlines, token
    /// expiry, silence, and pings. Pings need no per-connection timestamp:
    /// a heartbeat spans `k` sweeps and a connection is pinged on the sweeps
    /// where `(sweep + id) % k == 0`, so each one gets a ping every
    /// heartbeat and each sweep pings only 1/k of the shard, not all at once.
    pub(super) fn sweep(&self) {
        let now = self.now_ms();
        let hb = self.config.heartbeat.as_millis() as u64;
        let slots = (hb / SWEEP_MS).max(1);
        let round = self.sweeps.get();
        self.sweeps.set(round.wrapping_add(1));
        let wall = crate::auth::now_secs();
        // Decide under one borrow of the registry, then act on the few that
        // need it (acting may touch the registry).
        let due: Vec<(Rc<Conn>, Due)> = self
            .conns
            .borrow()
            .values()
            .filter_map(|conn| {
                let due = match conn.phase() {
                    Phase::Handshake if conn.deadline_passed(now) => Due::HandshakeTimeout,
                    Phase::Open => {
                        let expires = conn.read_identity(|i| i.map(|i| i.expires_at));
                        match expires {
                            None if conn.deadline_passed(now) => Due::AuthTimeout,
                            Some(at) if at <= wall => Due::TokenExpired,
                            _ if conn.silent_ms(now) >= hb.saturating_mul(2) => Due::Silent,
                            _ if (round.wrapping_add(conn.id.0)) % slots == 0 => Due::Ping,
                            _ => return None,
                        }
                    }
                    Phase::Closing if conn.deadline_passed(now) => Due::CloseTimeout,
                    _ => return None,
                };
                Some((conn.clone(), due))
            })
            .collect();
        for (conn, due) in due {
            match due {
                // Like every handshake error: an HTTP answer, then close.
                Due::HandshakeTimeout => {
                    super::upgrade::refuse(self, &conn, &HandshakeError::Timeout)
                }
                Due::AuthTimeout => self.close(&conn, Close::AuthTimeout),
                Due::TokenExpired => self.close(&conn, Close::TokenExpired),
                Due::Silent => {
                    debug!(
                        conn = conn.id.0,
                        silent_ms = conn.silent_ms(now),
                        "heartbeat timeout"
                    );
                    self.metrics.disconnect(Disconnect::Heartbeat);
                    conn.shut();
                }
                Due::Ping if !self.config.echo => self.queue(&conn, self.ping.clone()),
                Due::Ping => {}
                Due::CloseTimeout => conn.shut(),
            }
        }
        self.refusing.borrow_mut().sweep(now);
        // Freed pages go back once a second: an idle server's RSS is its
        // connections, not what a burst of messages left in the allocator
        // or in the data ring's send slots. Forced: a normal collection
        // leaves pages whose purge is delayed until the heap is used again,
        // which an idle shard's is not (0.2-0.9 ms a second under fan-out).
        self.trim_io();
        crate::sys::heap_collect();
    }

    pub(super) fn start_drain(&self, window_ms: u64) {
        if self.draining.replace(true) {
            return;
        }
        crate::sys::shutdown(self.listener_fd.get());
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        info!(connections = conns.len(), window_ms, "draining");
        for conn in conns {
            match conn.phase() {
                Phase::Open => {
                    let delay = if window_ms == 0 {
                        0
                    } else {
                        fastrand::u64(0..window_ms)
                    };
                    if !self.config.echo {
                        self.queue(&conn, encode_drain(delay));
                    }
                    self.close(&conn, Close::GoingAway);
                }
                // Mid-upgrade: an HTTP answer too, like every refusal.
                Phase::Handshake => {
                    let draining = HandshakeError::Unavailable {
                        reason: "server is draining",
                    };
                    super::upgrade::refuse(self, &conn, &draining);
                }
                Phase::Closing | Phase::Closed => {}
            }
        }
    }
}

/// What the sweep found due for a connection.
#[derive(Debug, Clone, Copy)]
pub(super) enum Due {
    HandshakeTimeout,
    AuthTimeout,
    TokenExpired,
    Silent,
    Ping,
    CloseTimeout,
}
