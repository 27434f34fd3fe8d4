//! Settings. Raw input comes from clap ([`crate::cli::ServeArgs`], which also
//! reads `RINGCAST_*` environment variables) and an optional TOML file;
//! [`Config::from_sources`] merges them (flags > environment > file >
//! defaults), validates every field and reports every problem at once. The
//! server only ever sees a valid [`Config`]. Defaults live in `impl Default`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// Longest duration any setting accepts. Shards turn durations into u64
/// millisecond deadlines (`now + 2 * heartbeat`); a year is far past any
/// sensible value and far from overflowing them.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration written as `500ms`, `25s`, `10m`, `1h`, or bare seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// A size written as `512`, `64KiB`, `1MiB`, `1GiB` (also `KB`/`MB`/`GB`/`k`/`m`, all powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

/// Why a setting's value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

fn split_unit(s: &str) -> (&str, &str) {
    let at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (&s[..at], s[at..].trim())
}

impl FromStr for HumanDuration {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (num, unit) = split_unit(s.trim());
        let n: u64 = num.parse().map_err(|_| {
            ValueError(format!(
                "{s:?} is not a duration (e.g. 500ms, 25s, 10m, 1h)"
            ))
        })?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => {
                return Err(ValueError(format!(
                    "{s:?}: unknown unit {unit:?} (use ms, s, m or h)"
                )))
            }
        };
        Ok(HumanDuration(d))
    }
}

impl FromStr for ByteSize {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (num, unit) = split_unit(s.trim());
        let n: usize = num
            .parse()
            .map_err(|_| ValueError(format!("{s:?} is not a size (e.g. 65536, 64KiB, 1MiB)")))?;
        let mult: usize = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => {
                return Err(ValueError(format!(
                    "{s:?}: unknown unit {unit:?} (use KiB, MiB or GiB)"
                )))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| ValueError(format!("{s:?} is too large")))
    }
}

/// Reads a number (seconds or bytes) or a string with a unit from TOML.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(HumanDuration(Duration::from_secs(n))),
            NumOrStr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => usize::try_from(n)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
            NumOrStr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated settings of `ringcast serve`. Field docs give the default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client WebSocket address. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Admin HTTP address (`/metrics`, `/healthz`); `None` turns it off. Default `127.0.0.1:9090`.
    pub admin_listen: Option<SocketAddr>,
    /// Shard threads, one runtime each. Default: the number of cores.
    pub shards: usize,
    /// Pin shard N to core N. Default off (on shared hosts pinning hurts).
    pub pin_cores: bool,
    /// Let the heap use transparent huge pages. Default off: the allocator
    /// asks for them, and then every shard's heap grows in 2 MiB steps
    /// (at 19,000 idle connections on 2 shards: ~450 B per connection with
    /// them, ~330 B without; benches/RESULTS.md).
    pub huge_pages: bool,
    /// Name in `welcome`. Default: the host name.
    pub node_name: String,
    /// Seconds between server pings; a connection silent for twice this is closed. Default 25 s.
    pub heartbeat: Duration,
    /// Time for a client to complete the upgrade request. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time a closing connection gets to answer our close frame before the
    /// socket is shut. Default 5 s.
    pub close_timeout: Duration,
    /// Largest request head (request line + headers). Default 8 KiB.
    pub max_handshake_size: usize,
    /// Largest inbound message after reassembly; past it close 1009. Default 64 KiB.
    pub max_message_size: usize,
    /// Largest `data` of a `pub`; past it error 4029. Default 64 KiB.
    pub max_publish_size: usize,
    /// Subscriptions per connection; past it error 4013. Default 1024.
    pub max_subscriptions: usize,
    /// Frames per second one connection may send, refilling a token bucket
    /// of `inbound_burst`; past it each frame gets error 4008, and a client
    /// still over it after 5 s is closed with 4008. 0 = unlimited (trusted
    /// publishers, benchmarks). Default 100.
    pub inbound_rate: u32,
    /// Size of the inbound token bucket (frames). Default 200.
    pub inbound_burst: u32,
    /// Inbound bytes per second one connection may send (message payloads,
    /// pings included), refilling a second token bucket of
    /// `inbound_bytes_burst`; past it the same policy as `inbound_rate`
    /// (error 4008, close 4008 after 5 s over it). The frame rate alone lets
    /// a client push `inbound_rate` x `max_message_size` (6.4 MB/s with the
    /// defaults) of JSON to parse and publish; this bounds that, while
    /// ordinary traffic (subscriptions, pings, small publishes) never comes
    /// near it. Raise it for clients that publish large documents; 0 =
    /// unlimited (trusted publishers, benchmarks). Default 64 KiB/s.
    pub inbound_bytes_rate: usize,
    /// Size of the inbound bytes bucket. It must hold at least one
    /// `max_message_size` message, or such a message could never pass.
    /// Default 256 KiB (four default-size messages at once).
    pub inbound_bytes_burst: usize,
    /// Connections per node, counted from the moment they are accepted (a
    /// socket still sending its upgrade request counts); past it a new
    /// connection gets 503 at once. Default 1000000.
    pub max_connections: usize,
    /// Connections per shard (one thread, one core), counted like
    /// `max_connections`; past it 503. SO_REUSEPORT spreads connections
    /// over the shards by address hash and never rebalances, so this keeps
    /// one core from holding far more than its share: every connection of
    /// a shard is visited by its once-a-second sweep and its clients share
    /// that one core. Clients refused here reconnect and usually land on
    /// another shard. Default 250000.
    pub max_connections_per_shard: usize,
    /// Connections per client address, counted from the moment they are
    /// accepted, so sockets that never finish their upgrade request count
    /// too (they would otherwise be bounded only by `handshake_timeout`);
    /// past it a new connection gets 429 at once. Counted per shard (each
    /// shard admits its share), so the limit is approximate. Behind a proxy
    /// every client has the proxy's address: raise it there. Default 10000.
    pub max_connections_per_ip: usize,
    /// Upgrades per second per client address (each shard admits its
    /// share, with a burst of one second's worth); past it 429. 0 =
    /// unlimited. Default 100.
    pub max_handshakes_per_ip: u32,
    /// Bytes that may wait in one connection's outbound queue. Past it the
    /// client is too slow to keep up: it is closed with 4009 and recovers
    /// with `since`, so one slow phone never holds memory for everyone. Default 1 MiB.
    pub outbound_queue: usize,
    /// Window over which `drain` spreads reconnect delays. Default 10 s.
    pub drain_window: Duration,
    /// Messages the embedded broker keeps per topic. Default 1000.
    pub history_size: usize,
    /// How long the embedded broker keeps a message. Default 10 min.
    pub history_ttl: Duration,
    /// Origins allowed to connect (exact match on the Origin header, else
    /// 403); empty allows any. Requests without an Origin always pass: only
    /// browsers send one, and the list is there to keep other sites' pages
    /// from connecting with a user's credentials (cross-site WebSocket
    /// hijacking); a non-browser client could send any Origin anyway. Default empty.
    pub allowed_origins: Vec<String>,
    /// Accept connections without a token, and let them subscribe and
    /// publish to every topic: development only. Default off.
    pub allow_anonymous: bool,
    /// Shared secret for HS256 tokens. With no secret and no public key
    /// (and not anonymous), the server makes an ephemeral secret at start
    /// and prints a development token. Default none.
    pub auth_hmac_secret: Option<String>,
    /// PEM public key file for RS256/ES256 tokens. Default none.
    pub auth_public_key: Option<PathBuf>,
    /// JWKS file (`{"keys":[...]}`) of RS/ES/EdDSA public keys; tokens
    /// name their key with `kid`. Default none.
    pub auth_jwks: Option<PathBuf>,
    /// Algorithm of `auth_public_key`: RS256 or ES256. Default RS256.
    pub auth_algorithm: String,
    /// Required `iss` claim, when set. Default none.
    pub auth_issuer: Option<String>,
    /// Required `aud` claim, when set. Default none.
    pub auth_audience: Option<String>,
    /// Time a client without `?token=` has to send its `auth` frame; past
    /// it the connection closes with 4001. Default 5 s.
    pub auth_timeout: Duration,
    /// `[[namespaces]]` tables (config file only): policy per namespace.
    /// Default none: every topic is in one implicit namespace.
    pub namespaces: Vec<crate::namespace::NamespaceConfig>,
    /// Conformance mode: echo every data message back, serve any path. Default off.
    pub echo: bool,
    /// Log format. Default text.
    pub log_format: LogFormat,
    /// Redis URL (`redis://HOST:PORT/DB`) of the Redis Streams backbone, or
    /// `redis+cluster://HOST:PORT,HOST:PORT` (seed nodes) for a Redis
    /// Cluster; `None` runs the embedded single-node broker. Default `None`.
    pub redis: Option<String>,
    /// Partition streams `{prefix}:stream:{P}`, P = crc32(topic) mod this.
    /// Producers must use the same number. Default 16.
    pub redis_partitions: u32,
    /// Prefix of every Redis key ringcast reads or writes. Default `ringcast`.
    pub redis_key_prefix: String,
    /// Approximate `MAXLEN ~` of each partition stream on `pub`: how far back
    /// `since` recovery reaches, against Redis memory. Default 100000.
    pub redis_maxlen: u64,
    /// Memory budget of the recent-entry cache that answers most `since`
    /// recoveries without touching Redis (split evenly over partitions,
    /// filled from each stream's tail at start so a reconnect storm after a
    /// restart stays off Redis); 0 sends every recovery to Redis. Default 64 MiB.
    pub redis_cache_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_cores: false,
            huge_pages: false,
            node_name: default_node_name(),
            heartbeat: Duration::from_secs(25),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            max_handshake_size: 8 << 10,
            max_message_size: 64 << 10,
            max_publish_size: 64 << 10,
            max_subscriptions: 1024,
            inbound_rate: 100,
            inbound_burst: 200,
            inbound_bytes_rate: 64 << 10,
            inbound_bytes_burst: 256 << 10,
            max_connections: 1_000_000,
            max_connections_per_shard: 250_000,
            max_connections_per_ip: 10_000,
            max_handshakes_per_ip: 100,
            outbound_queue: 1 << 20,
            drain_window: Duration::from_secs(10),
            history_size: 1000,
            history_ttl: Duration::from_secs(600),
            allowed_origins: Vec::new(),
            allow_anonymous: false,
            auth_hmac_secret: None,
            auth_public_key: None,
            auth_jwks: None,
            auth_algorithm: "RS256".into(),
            auth_issuer: None,
            auth_audience: None,
            auth_timeout: Duration::from_secs(5),
            namespaces: Vec::new(),
            echo: false,
            log_format: LogFormat::Text,
            redis: None,
            redis_partitions: 16,
            redis_key_prefix: "ringcast".into(),
            redis_maxlen: 100_000,
            redis_cache_size: 64 << 20,
        }
    }
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ringcast".into())
}

/// The settings as read from one source, every field optional. Used for
/// the TOML file and (via clap) for flags and environment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// See [`Config::listen`].
    pub listen: Option<String>,
    /// See [`Config::admin_listen`]; `"off"` disables.
    pub admin_listen: Option<String>,
    /// See [`Config::shards`].
    pub shards: Option<usize>,
    /// See [`Config::pin_cores`].
    pub pin_cores: Option<bool>,
    /// See [`Config::huge_pages`].
    pub huge_pages: Option<bool>,
    /// See [`Config::node_name`].
    pub node_name: Option<String>,
    /// See [`Config::heartbeat`].
    pub heartbeat: Option<HumanDuration>,
    /// See [`Config::handshake_timeout`].
    pub handshake_timeout: Option<HumanDuration>,
    /// See [`Config::close_timeout`].
    pub close_timeout: Option<HumanDuration>,
    /// See [`Config::max_handshake_size`].
    pub max_handshake_size: Option<ByteSize>,
    /// See [`Config::max_message_size`].
    pub max_message_size: Option<ByteSize>,
    /// See [`Config::max_publish_size`].
    pub max_publish_size: Option<ByteSize>,
    /// See [`Config::max_subscriptions`].
    pub max_subscriptions: Option<usize>,
    /// See [`Config::inbound_rate`].
    pub inbound_rate: Option<u32>,
    /// See [`Config::inbound_burst`].
    pub inbound_burst: Option<u32>,
    /// See [`Config::inbound_bytes_rate`].
    pub inbound_bytes_rate: Option<ByteSize>,
    /// See [`Config::inbound_bytes_burst`].
    pub inbound_bytes_burst: Option<ByteSize>,
    /// See [`Config::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`Config::max_connections_per_shard`].
    pub max_connections_per_shard: Option<usize>,
    /// See [`Config::max_connections_per_ip`].
    pub max_connections_per_ip: Option<usize>,
    /// See [`Config::max_handshakes_per_ip`].
    pub max_handshakes_per_ip: Option<u32>,
    /// See [`Config::outbound_queue`].
    pub outbound_queue: Option<ByteSize>,
    /// See [`Config::drain_window`].
    pub drain_window: Option<HumanDuration>,
    /// See [`Config::history_size`].
    pub history_size: Option<usize>,
    /// See [`Config::history_ttl`].
    pub history_ttl: Option<HumanDuration>,
    /// See [`Config::allowed_origins`] (comma-separated on the command line).
    pub allowed_origins: Option<Vec<String>>,
    /// See [`Config::allow_anonymous`].
    pub allow_anonymous: Option<bool>,
    /// See [`Config::auth_hmac_secret`].
    pub auth_hmac_secret: Option<String>,
    /// See [`Config::auth_public_key`].
    pub auth_public_key: Option<PathBuf>,
    /// See [`Config::auth_jwks`].
    pub auth_jwks: Option<PathBuf>,
    /// See [`Config::auth_algorithm`].
    pub auth_algorithm: Option<String>,
    /// See [`Config::auth_issuer`].
    pub auth_issuer: Option<String>,
    /// See [`Config::auth_audience`].
    pub auth_audience: Option<String>,
    /// See [`Config::auth_timeout`].
    pub auth_timeout: Option<HumanDuration>,
    /// See [`Config::namespaces`].
    pub namespaces: Option<Vec<crate::namespace::NamespaceConfig>>,
    /// See [`Config::echo`].
    pub echo: Option<bool>,
    /// See [`Config::log_format`].
    pub log_format: Option<LogFormat>,
    /// See [`Config::redis`]; `""` means the embedded broker.
    pub redis: Option<String>,
    /// See [`Config::redis_partitions`].
    pub redis_partitions: Option<u32>,
    /// See [`Config::redis_key_prefix`].
    pub redis_key_prefix: Option<String>,
    /// See [`Config::redis_maxlen`].
    pub redis_maxlen: Option<u64>,
    /// See [`Config::redis_cache_size`].
    pub redis_cache_size: Option<ByteSize>,
}

/// Every problem found in the settings, one per line, each naming its setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid settings:")?;
        for p in &self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Layer {
    /// Reads a TOML settings file.
    pub fn from_file(path: &Path) -> Result<Layer, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(vec![format!("config: cannot read {}: {e}", path.display())])
        })?;
        Self::from_toml(&text)
            .map_err(|e| ConfigError(vec![format!("config: {}: {e}", path.display())]))
    }

    /// Parses TOML text (the file format).
    pub fn from_toml(text: &str) -> Result<Layer, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// Fields set in `self` win over those in `lower`.
    pub fn over(self, lower: Layer) -> Layer {
        macro_rules! pick { ($($f:ident),*) => { Layer { $($f: self.$f.or(lower.$f)),* } } }
        pick!(
            listen,
            admin_listen,
            shards,
            pin_cores,
            huge_pages,
            node_name,
            heartbeat,
            handshake_timeout,
            close_timeout,
            max_handshake_size,
            max_message_size,
            max_publish_size,
            max_subscriptions,
            inbound_rate,
            inbound_burst,
            inbound_bytes_rate,
            inbound_bytes_burst,
            max_connections,
            max_connections_per_shard,
            max_connections_per_ip,
            max_handshakes_per_ip,
            outbound_queue,
            drain_window,
            history_size,
            history_ttl,
            allowed_origins,
            allow_anonymous,
            auth_hmac_secret,
            auth_public_key,
            auth_jwks,
            auth_algorithm,
            auth_issuer,
            auth_audience,
            auth_timeout,
            namespaces,
            echo,
            log_format,
            redis,
            redis_partitions,
            redis_key_prefix,
            redis_maxlen,
            redis_cache_size
        )
    }
}

impl Config {
    /// Merges `high` (flags and environment) over the file named in
    /// `config_file` over the defaults, and validates the result.
    pub fn from_sources(high: Layer, config_file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match config_file {
            Some(p) => Layer::from_file(p)?,
            None => Layer::default(),
        };
        Config::from_layer(high.over(file))
    }

    /// Applies one merged layer over the defaults and validates.
    pub fn from_layer(l: Layer) -> Result<Config, ConfigError> {
        let d = Config::default();
        let mut errs = Vec::new();
        let listen = match l.listen {
            Some(s) => s.parse().unwrap_or_else(|e| {
                errs.push(format!(
                    "listen: {s:?} is not an address like 127.0.0.1:8080 ({e})"
                ));
                d.listen
            }),
            None => d.listen,
        };
        let admin_listen = match l.admin_listen.as_deref() {
            Some("off") | Some("") => None,
            Some(s) => Some(s.parse().unwrap_or_else(|e| {
                errs.push(format!(
                    "admin_listen: {s:?} is not an address like 127.0.0.1:9090 or \"off\" ({e})"
                ));
                SocketAddr::from(([127, 0, 0, 1], 0))
            })),
            None => d.admin_listen,
        };
        let dur = |v: Option<HumanDuration>, def: Duration| v.map_or(def, |h| h.0);
        let size = |v: Option<ByteSize>, def: usize| v.map_or(def, |b| b.0);
        let c = Config {
            listen,
            admin_listen,
            shards: l.shards.unwrap_or(d.shards),
            pin_cores: l.pin_cores.unwrap_or(d.pin_cores),
            huge_pages: l.huge_pages.unwrap_or(d.huge_pages),
            node_name: l.node_name.unwrap_or(d.node_name),
            heartbeat: dur(l.heartbeat, d.heartbeat),
            handshake_timeout: dur(l.handshake_timeout, d.handshake_timeout),
            close_timeout: dur(l.close_timeout, d.close_timeout),
            max_handshake_size: size(l.max_handshake_size, d.max_handshake_size),
            max_message_size: size(l.max_message_size, d.max_message_size),
            max_publish_size: size(l.max_publish_size, d.max_publish_size),
            max_subscriptions: l.max_subscriptions.unwrap_or(d.max_subscriptions),
            inbound_rate: l.inbound_rate.unwrap_or(d.inbound_rate),
            inbound_burst: l.inbound_burst.unwrap_or(d.inbound_burst),
            inbound_bytes_rate: size(l.inbound_bytes_rate, d.inbound_bytes_rate),
            inbound_bytes_burst: size(l.inbound_bytes_burst, d.inbound_bytes_burst),
            max_connections: l.max_connections.unwrap_or(d.max_connections),
            max_connections_per_shard: l
                .max_connections_per_shard
                .unwrap_or(d.max_connections_per_shard),
            max_connections_per_ip: l.max_connections_per_ip.unwrap_or(d.max_connections_per_ip),
            max_handshakes_per_ip: l.max_handshakes_per_ip.unwrap_or(d.max_handshakes_per_ip),
            outbound_queue: size(l.outbound_queue, d.outbound_queue),
            drain_window: dur(l.drain_window, d.drain_window),
            history_size: l.history_size.unwrap_or(d.history_size),
            history_ttl: dur(l.history_ttl, d.history_ttl),
            allowed_origins: l.allowed_origins.unwrap_or(d.allowed_origins),
            allow_anonymous: l.allow_anonymous.unwrap_or(d.allow_anonymous),
            auth_hmac_secret: l.auth_hmac_secret.filter(|s| !s.is_empty()),
            auth_public_key: l.auth_public_key,
            auth_jwks: l.auth_jwks,
            auth_algorithm: l.auth_algorithm.unwrap_or(d.auth_algorithm),
            auth_issuer: l.auth_issuer,
            auth_audience: l.auth_audience,
            auth_timeout: dur(l.auth_timeout, d.auth_timeout),
            namespaces: l.namespaces.unwrap_or(d.namespaces),
            echo: l.echo.unwrap_or(d.echo),
            log_format: l.log_format.unwrap_or(d.log_format),
            redis: l.redis.filter(|u| !u.is_empty()).or(d.redis),
            redis_partitions: l.redis_partitions.unwrap_or(d.redis_partitions),
            redis_key_prefix: l.redis_key_prefix.unwrap_or(d.redis_key_prefix),
            redis_maxlen: l.redis_maxlen.unwrap_or(d.redis_maxlen),
            redis_cache_size: size(l.redis_cache_size, d.redis_cache_size),
        };
        c.check(&mut errs);
        if errs.is_empty() {
            Ok(c)
        } else {
            Err(ConfigError(errs))
        }
    }

    fn check(&self, errs: &mut Vec<String>) {
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
            !self.node_name.is_empty() && self.node_name.len() <= 64,
            "node_name: must be 1 to 64 characters",
        );
        need(
            (1..=1024).contains(&self.redis_partitions),
            "redis_partitions: must be between 1 and 1024",
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
            !self.auth_timeout.is_zero(),
            "auth_timeout: must be more than 0",
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
        for (name, d) in [
            ("heartbeat", self.heartbeat),
            ("handshake_timeout", self.handshake_timeout),
            ("close_timeout", self.close_timeout),
            ("drain_window", self.drain_window),
            ("history_ttl", self.history_ttl),
            ("auth_timeout", self.auth_timeout),
        ] {
            if d > MAX_DURATION {
                errs.push(format!("{name}: must be at most 8760h (a year)"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon() -> Layer {
        Layer {
            allow_anonymous: Some(true),
            ..Layer::default()
        }
    }

    #[test]
    fn durations_and_sizes_parse_with_units() {
        assert_eq!(
            "25s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(25)
        );
        assert_eq!(
            "25".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(25)
        );
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "10m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(600)
        );
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert!("10x"
            .parse::<HumanDuration>()
            .unwrap_err()
            .0
            .contains("unknown unit"));
        assert!("".parse::<HumanDuration>().is_err());
        assert!("-1s".parse::<HumanDuration>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
        assert!("18446744073709551615GiB"
            .parse::<ByteSize>()
            .unwrap_err()
            .0
            .contains("too large"));
    }

    #[test]
    fn defaults_match_the_protocol_table() {
        let c = Config::from_layer(anon()).unwrap();
        assert_eq!(c.heartbeat, Duration::from_secs(25));
        assert_eq!(c.max_message_size, 64 << 10);
        assert_eq!(c.max_subscriptions, 1024);
        assert_eq!(c.outbound_queue, 1 << 20);
        assert_eq!(c.drain_window, Duration::from_secs(10));
        assert_eq!(c.history_size, 1000);
    }

    #[test]
    fn file_values_lose_to_higher_layers() {
        let file = Layer::from_toml(
            "heartbeat = \"5s\"\nshards = 3\noutbound_queue = \"2MiB\"\nallow_anonymous = true",
        )
        .unwrap();
        let flags = Layer {
            shards: Some(1),
            ..Layer::default()
        };
        let c = Config::from_layer(flags.over(file)).unwrap();
        assert_eq!(c.shards, 1);
        assert_eq!(c.heartbeat, Duration::from_secs(5));
        assert_eq!(c.outbound_queue, 2 << 20);
    }

    #[test]
    fn every_problem_is_reported_by_name() {
        let l = Layer {
            listen: Some("nope".into()),
            shards: Some(0),
            heartbeat: Some(HumanDuration(Duration::ZERO)),
            outbound_queue: Some(ByteSize(10)),
            ..Layer::default()
        };
        let err = Config::from_layer(l).unwrap_err();
        let text = err.to_string();
        for name in ["listen:", "shards:", "heartbeat:", "outbound_queue:"] {
            assert!(text.contains(name), "{name} missing in {text}");
        }
        assert_eq!(err.0.len(), 4);
    }

    #[test]
    fn inbound_bytes_and_per_shard_limits_default_parse_and_validate() {
        let c = Config::from_layer(anon()).unwrap();
        assert_eq!(
            (c.inbound_bytes_rate, c.inbound_bytes_burst),
            (64 << 10, 256 << 10)
        );
        assert_eq!(c.max_connections_per_shard, 250_000);
        assert!(c.inbound_bytes_burst >= c.max_message_size);
        let file = Layer::from_toml(
            "inbound_bytes_rate = \"1MiB\"\ninbound_bytes_burst = \"2MiB\"\n\
             max_connections_per_shard = 7",
        )
        .unwrap();
        let c = Config::from_layer(file.over(anon())).unwrap();
        assert_eq!(
            (c.inbound_bytes_rate, c.inbound_bytes_burst),
            (1 << 20, 2 << 20)
        );
        assert_eq!(c.max_connections_per_shard, 7);
        // A burst that cannot hold one largest message is refused, naming both.
        let small = Layer::from_toml("inbound_bytes_burst = \"1KiB\"").unwrap();
        let err = Config::from_layer(small.over(anon())).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].starts_with("inbound_bytes_burst:") && err.0[0].contains("max_message_size"),
            "{err}"
        );
        // ... unless the bytes limit is off.
        let off = Layer::from_toml("inbound_bytes_rate = 0\ninbound_bytes_burst = 0").unwrap();
        assert!(Config::from_layer(off.over(anon())).is_ok());
        let zero = Layer::from_toml("max_connections_per_shard = 0").unwrap();
        let err = Config::from_layer(zero.over(anon())).unwrap_err();
        assert_eq!(err.0, ["max_connections_per_shard: must be at least 1"]);
    }

    #[test]
    fn durations_past_a_year_are_refused() {
        // Found by tests/fuzz_config.rs: a huge heartbeat overflowed the
        // shard's `2 * heartbeat` in milliseconds (a panic in debug builds).
        let file =
            Layer::from_toml("heartbeat = \"5124095576030h\"\nhistory_ttl = \"8761h\"").unwrap();
        let err = Config::from_layer(file.over(anon())).unwrap_err();
        assert_eq!(
            err.0,
            [
                "heartbeat: must be at most 8760h (a year)",
                "history_ttl: must be at most 8760h (a year)"
            ]
        );
        let file = Layer::from_toml("history_ttl = \"8760h\"").unwrap();
        assert!(Config::from_layer(file.over(anon())).is_ok());
    }

    #[test]
    fn redis_settings_default_parse_and_validate() {
        let c = Config::from_layer(anon()).unwrap();
        assert_eq!(c.redis, None);
        assert_eq!(c.redis_partitions, 16);
        assert_eq!(c.redis_key_prefix, "ringcast");
        assert_eq!(c.redis_maxlen, 100_000);
        assert_eq!(c.redis_cache_size, 64 << 20);
        let file = Layer::from_toml(
            "redis = \"redis://127.0.0.1:6379/0\"\nredis_partitions = 4\n\
             redis_key_prefix = \"rc\"\nredis_maxlen = 50\nredis_cache_size = \"1MiB\"",
        )
        .unwrap();
        let c = Config::from_layer(file.over(anon())).unwrap();
        assert_eq!(c.redis.as_deref(), Some("redis://127.0.0.1:6379/0"));
        assert_eq!(
            (c.redis_partitions, c.redis_maxlen, c.redis_cache_size),
            (4, 50, 1 << 20)
        );
        assert_eq!(c.redis_key_prefix, "rc");
        // An empty URL (e.g. RINGCAST_REDIS=) means the embedded broker.
        let empty = Layer {
            redis: Some(String::new()),
            ..anon()
        };
        assert_eq!(Config::from_layer(empty).unwrap().redis, None);
        let bad = Layer {
            redis: Some("http://nope".into()),
            redis_partitions: Some(0),
            redis_key_prefix: Some("a b".into()),
            redis_maxlen: Some(0),
            ..anon()
        };
        let text = Config::from_layer(bad).unwrap_err().to_string();
        for name in [
            "redis:",
            "redis_partitions:",
            "redis_key_prefix:",
            "redis_maxlen:",
        ] {
            assert!(text.contains(name), "{name} missing in {text}");
        }
    }

    #[test]
    fn bad_files_are_rejected_with_the_reason() {
        assert!(Layer::from_toml("heartbeat = \"soon\"")
            .unwrap_err()
            .contains("not a duration"));
        assert!(Layer::from_toml("no_such_setting = 1")
            .unwrap_err()
            .contains("no_such_setting"));
        assert!(Layer::from_toml("shards = \"two\"").is_err());
        assert!(Layer::from_toml("[[[").is_err());
        let missing = Layer::from_file(Path::new("/nonexistent/ringcast.toml")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"));
    }
}
