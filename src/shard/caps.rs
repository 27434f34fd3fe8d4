//! Connection caps, counted from accept: per node, per shard and per client
//! address, and the upgrade budget per address (docs/PROTOCOL.md section 1
//! gives the order they answer in).

use super::Shard;
use crate::ws::handshake::HandshakeError;

impl Shard {
    /// Counts a just-accepted connection from `ip` toward the caps, or
    /// names the first one it is over, in docs/PROTOCOL.md order (429 before
    /// 503): this shard's share of `max_connections_per_ip`, an upgrade
    /// budget already spent (`max_handshakes_per_ip`, not taken here), then
    /// `max_connections_per_shard` and `max_connections`. A connection
    /// counted here is uncounted by [`Shard::release`].
    pub(crate) fn admit(&self, ip: std::net::IpAddr) -> Result<(), HandshakeError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.per_ip.borrow().get(&ip).copied().unwrap_or(0) >= self.per_ip_limit {
            return Err(HandshakeError::TooManyConnections {
                reason: "max_connections_per_ip reached for this address",
            });
        }
        if !self.handshake_budget_left(ip) {
            return Err(HandshakeError::TooManyConnections {
                reason: "max_handshakes_per_ip: too many upgrades per second from this address",
            });
        }
        if self.shard_connections.get() >= self.config.max_connections_per_shard {
            return Err(HandshakeError::Unavailable {
                reason: "shard is full (max_connections_per_shard)",
            });
        }
        // Taken first, then checked: shards admit concurrently.
        if self.node_connections.fetch_add(1, Relaxed) >= self.config.max_connections {
            self.node_connections.fetch_sub(1, Relaxed);
            return Err(HandshakeError::Unavailable {
                reason: "server is full (max_connections)",
            });
        }
        self.shard_connections.set(self.shard_connections.get() + 1);
        *self.per_ip.borrow_mut().entry(ip).or_insert(0) += 1;
        Ok(())
    }

    /// Whether `ip` has an upgrade left in its budget, without taking it.
    pub(super) fn handshake_budget_left(&self, ip: std::net::IpAddr) -> bool {
        let per_sec = self.config.max_handshakes_per_ip;
        if per_sec == 0 {
            return true;
        }
        let rate = (per_sec as f32 / self.config.shards as f32).max(1.0);
        let now = self.now_ms();
        self.handshakes
            .borrow()
            .get(&ip)
            .is_none_or(|(tokens, at)| {
                *tokens + now.saturating_sub(*at) as f32 / 1000.0 * rate >= 1.0
            })
    }

    /// Takes one upgrade from `ip`'s budget (`max_handshakes_per_ip`, this
    /// shard's share, refilled continuously); false when it is spent.
    pub(crate) fn handshake_allowed(&self, ip: std::net::IpAddr) -> bool {
        let per_sec = self.config.max_handshakes_per_ip;
        if per_sec == 0 {
            return true;
        }
        let rate = (per_sec as f32 / self.config.shards as f32).max(1.0);
        let now = self.now_ms();
        let mut budgets = self.handshakes.borrow_mut();
        let (tokens, at) = budgets.entry(ip).or_insert((rate, now));
        *tokens = (*tokens + now.saturating_sub(*at) as f32 / 1000.0 * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets upgrade budgets that have refilled (bounded memory).
    pub(super) fn forget_full_budgets(&self) {
        let rate = (self.config.max_handshakes_per_ip as f32 / self.config.shards as f32).max(1.0);
        let now = self.now_ms();
        self.handshakes.borrow_mut().retain(|_, (tokens, at)| {
            *tokens + now.saturating_sub(*at) as f32 / 1000.0 * rate < rate
        });
    }

    /// Uncounts a connection counted by [`Shard::admit`].
    pub(crate) fn release(&self, ip: std::net::IpAddr) {
        self.node_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.shard_connections
            .set(self.shard_connections.get().saturating_sub(1));
        let mut per_ip = self.per_ip.borrow_mut();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}
