//! Every problem a setting can have. First, the `#[resolve = ...]`
//! functions of the settings list, for values that need more than `Into` to
//! become what [`Config`] holds: an address (reported when it does not
//! parse), or a string where empty means unset. Then [`Config::check`]: the
//! bounds of each setting and those between settings. [`Config::from_layer`]
//! runs them all and reports every problem at once, each starting with the
//! name of its setting (tests/fuzz_config.rs holds every message to that).
//! The bound every duration has ([`super::MAX_DURATION`]) comes with the
//! type, in mod.rs.

use std::net::SocketAddr;
use std::time::Duration;

use super::Config;

/// `listen`: an address. A bad one is reported and the default kept, so
/// that every other setting is still checked.
pub(super) fn listen(
    given: Option<String>,
    default: SocketAddr,
    errs: &mut Vec<String>,
) -> SocketAddr {
    let Some(s) = given else { return default };
    s.parse().unwrap_or_else(|e| {
        errs.push(format!(
            "listen: {s:?} is not an address like 127.0.0.1:8080 ({e})"
        ));
        default
    })
}

/// `admin_listen`: an address, or `off` (or empty) for none.
pub(super) fn admin_listen(
    given: Option<String>,
    default: Option<SocketAddr>,
    errs: &mut Vec<String>,
) -> Option<SocketAddr> {
    match given.as_deref() {
        None => default,
        Some("off") | Some("") => None,
        Some(s) => Some(s.parse().unwrap_or_else(|e| {
            errs.push(format!(
                "admin_listen: {s:?} is not an address like 127.0.0.1:9090 or \"off\" ({e})"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })),
    }
}

/// A string setting where empty means not set (`RINGCAST_REDIS=`).
pub(super) fn unless_empty(
    given: Option<String>,
    default: Option<String>,
    _: &mut Vec<String>,
) -> Option<String> {
    given.filter(|s| !s.is_empty()).or(default)
}

impl Config {
    /// The bounds of each setting and between settings.
    pub(super) fn check(&self, errs: &mut Vec<String>) {
        let mut need = |ok: bool, msg: &str| {
            if !ok {
                errs.push(msg.to_string());
            }
        };
        need(
            (1..=1024).contains(&self.shards),
            "shards: must be between 1 and 1024",
        );
        need(
            self.heartbeat >= Duration::from_secs(1),
            "heartbeat: must be at least 1s",
        );
        need(
            !self.handshake_timeout.is_zero(),
            "handshake_timeout: must be more than 0",
        );
        need(
            !self.close_timeout.is_zero(),
            "close_timeout: must be more than 0",
        );
        need(
            self.max_handshake_size >= 1024,
            "max_handshake_size: must be at least 1KiB",
        );
        need(
            self.max_message_size >= 125,
            "max_message_size: must be at least 125 bytes",
        );
        // Connections keep these in 32-bit fields (an idle connection's
        // state is kept small); no deployment needs more.
        need(
            self.max_message_size <= 1 << 30,
            "max_message_size: must be at most 1GiB",
        );
        need(
            self.outbound_queue <= 1 << 30,
            "outbound_queue: must be at most 1GiB",
        );
        need(
            self.max_publish_size >= 1,
            "max_publish_size: must be at least 1 byte",
        );
        need(
            self.max_subscriptions >= 1,
            "max_subscriptions: must be at least 1",
        );
        need(
            self.inbound_rate == 0 || self.inbound_burst >= 1,
            "inbound_burst: must be at least 1 when inbound_rate is set",
        );
        need(
            self.max_connections >= 1,
            "max_connections: must be at least 1",
        );
        need(
            self.max_connections_per_shard >= 1,
            "max_connections_per_shard: must be at least 1",
        );
        need(
            self.max_connections_per_ip >= 1,
            "max_connections_per_ip: must be at least 1",
        );
        need(
            self.outbound_queue >= 4096,
            "outbound_queue: must be at least 4KiB",
        );
        need(
            self.history_size <= 10_000_000,
            "history_size: must be at most 10000000",
        );
        need(
            (Duration::from_secs(3)..=Duration::from_secs(3600)).contains(&self.presence_ttl),
            "presence_ttl: must be between 3s and 1h",
        );
        need(
            self.presence_leave_delay <= Duration::from_secs(600),
            "presence_leave_delay: must be at most 10m",
        );
        need(
            !self.node_name.is_empty() && self.node_name.len() <= 64,
            "node_name: must be 1 to 64 characters",
        );
        need(
            (1..=1024).contains(&self.redis_partitions),
            "redis_partitions: must be between 1 and 1024",
        );
        need(
            (1..=9).contains(&self.compression_level),
            "compression_level: must be between 1 and 9",
        );
        need(
            !self.redis_key_prefix.is_empty()
                && self.redis_key_prefix.len() <= 64
                && self
                    .redis_key_prefix
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}'),
            "redis_key_prefix: must be 1 to 64 printable ASCII characters without spaces or braces",
        );
        need(self.redis_maxlen >= 1, "redis_maxlen: must be at least 1");

        let keys = [
            self.auth_hmac_secret.is_some(),
            self.auth_public_key.is_some(),
            self.auth_jwks.is_some(),
        ];
        need(
            keys.iter().filter(|k| **k).count() <= 1,
            "auth_hmac_secret: set at most one of auth_hmac_secret, auth_public_key, auth_jwks",
        );
        need(
            matches!(self.auth_algorithm.as_str(), "RS256" | "ES256"),
            "auth_algorithm: must be RS256 or ES256",
        );
        need(
            self.auth_hmac_secret.as_ref().is_none_or(|s| s.len() >= 32),
            "auth_hmac_secret: must be at least 32 characters",
        );
        need(
            self.admin_api_key.as_ref().is_none_or(|k| k.len() >= 16),
            "admin_api_key: must be at least 16 characters",
        );
        need(
            !self.auth_timeout.is_zero(),
            "auth_timeout: must be more than 0",
        );
        need(
            self.stats_log_interval.is_zero()
                || self.stats_log_interval >= Duration::from_millis(100),
            "stats_log_interval: must be 0 (off) or at least 100ms",
        );
        // Namespaces carry policy (publish bans, anonymous rules, 4004):
        // checked here with everything else, whichever the broker, so an
        // invalid table stops the node instead of falling open.
        if let Err(problems) = crate::namespace::Namespaces::from_config(&self.namespaces) {
            errs.extend(problems);
        }
        if self.inbound_bytes_rate > 0 && self.inbound_bytes_burst < self.max_message_size {
            errs.push(format!(
                "inbound_bytes_burst: must be at least max_message_size ({} bytes) when \
                 inbound_bytes_rate is set, or a message of that size could never pass",
                self.max_message_size
            ));
        }
        if let Some(url) = &self.redis {
            if let Err(e) = crate::broker::redis::check_url(url) {
                errs.push(format!(
                    "redis: {url:?} is not a Redis URL like redis://127.0.0.1:6379/0 \
                     or redis+cluster://10.0.0.1:7000,10.0.0.2:7000 ({e})"
                ));
            }
        }
    }
}
