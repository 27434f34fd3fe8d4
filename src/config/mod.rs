//! Settings of `ringcast serve`, each declared once, in the `settings!` list
//! below: its doc (the why), its flag and `RINGCAST_*` variable, its line of
//! `--help`, the type it is read as, the type the server uses, and its
//! default. From that one entry come
//!
//! - [`Layer`]: the settings of one source, every field optional so that
//!   "not given" is `None`. It is both the clap arguments of `ringcast
//!   serve` (flags, and the environment behind them) and the `--config`
//!   TOML file's schema;
//! - [`Config`]: the validated settings, with `impl Default` (the only place
//!   a default is written) and the `[default: …]` that `--help` prints,
//!   rendered from that same default.
//!
//! [`Config::from_sources`] merges flags > environment > file > defaults and
//! checks the result, reporting every problem at once, each naming its
//! setting. The server only ever sees a valid [`Config`].
//!
//! A new setting is one entry in the list, plus its bound in `check.rs` if
//! it has one. Values in units (durations, sizes) are in [`units`]; a
//! duration is bounded by [`MAX_DURATION`] without asking.

mod check;
mod choices;
pub mod units;
mod value;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::broker::redis::KeyLayout;
use crate::namespace::NamespaceConfig;
use value::Value;

pub use choices::{DataPath, LogFormat};
pub use units::{ByteSize, Cidr, HumanDuration, ValueError, MAX_DURATION};

/// Declares every setting once; see the module doc and the list below.
///
/// An entry is the setting's doc, its `#[arg(...)]` (clap), its `#[help =
/// "..."]` line (to which `[default: …]` is added; `default = "..."` names
/// a default computed at start, such as the number of cores), an optional
/// `#[resolve = f]` for a value that needs more than `Into` to become what
/// `Config` holds, and `name: ReadAs => Held = default;`.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        #[arg($($arg:tt)*)]
        $(#[help = $help:literal $(, default = $shown:literal)?])?
        $(#[resolve = $resolve:path])?
        $name:ident: $raw:ty => $ty:ty = $default:expr;
    )*) => {
        /// The validated settings of `ringcast serve`. `--help` shows the
        /// default each field's doc ends with.
        #[derive(Debug, Clone)]
        pub struct Config {
            $(
                $(#[doc = $doc])*
                #[doc = ""]
                #[doc = concat!("Default: `", stringify!($default), "`.")]
                pub $name: $ty,
            )*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $($name: $default,)* }
            }
        }

        /// The settings as read from one source, every field optional: the
        /// clap arguments of `ringcast serve` (flags, and `RINGCAST_*`
        /// variables behind them) and the schema of the `--config` TOML file
        /// (same names in snake_case).
        #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Layer {
            $(
                #[doc = concat!("See [`Config::", stringify!($name), "`].")]
                #[arg($($arg)*)]
                $(#[arg(help = help_line($help, default_text!($ty, $raw, $default $(, $shown)?)))])?
                pub $name: Option<$raw>,
            )*
        }

        impl Layer {
            /// Fields set in `self` win over those in `lower`.
            pub fn over(self, lower: Layer) -> Layer {
                Layer { $($name: self.$name.or(lower.$name),)* }
            }
        }

        impl Config {
            /// Each setting of `l` as `Config` holds it, or its default.
            fn resolve(l: Layer, errs: &mut Vec<String>) -> Config {
                let d = Config::default();
                Config { $($name: resolve!(l.$name, d.$name, errs $(, $resolve)?),)* }
            }

            /// The bounds every setting of a type has (a duration's
            /// [`MAX_DURATION`]), in the order of the list.
            fn check_types(&self, errs: &mut Vec<String>) {
                $(<$ty as Value<$raw>>::bound(&self.$name, stringify!($name), errs);)*
            }
        }
    };
}

/// The text after `[default: ` in `--help`: the default as it would be
/// written, or what a default computed at start is.
macro_rules! default_text {
    ($ty:ty, $raw:ty, $default:expr) => {{
        let default: $ty = $default;
        <$ty as Value<$raw>>::show(&default)
    }};
    ($ty:ty, $raw:ty, $default:expr, $shown:literal) => {
        String::from($shown)
    };
}

/// A value as given (`Some`) or the default, through `Into` or the entry's
/// `#[resolve = f]`.
macro_rules! resolve {
    ($given:expr, $default:expr, $errs:expr) => {
        $given.map_or($default, Into::into)
    };
    ($given:expr, $default:expr, $errs:expr, $resolve:path) => {
        $resolve($given, $default, $errs)
    };
}

settings! {
    /// Client WebSocket address.
    #[arg(long, env = "RINGCAST_LISTEN")]
    #[help = "Client WebSocket address"]
    #[resolve = check::listen]
    listen: String => SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080));

    /// Admin HTTP address (`/metrics`, `/healthz`); `None` (written `off`)
    /// turns it off.
    #[arg(long, env = "RINGCAST_ADMIN_LISTEN")]
    #[help = "Admin HTTP address for /metrics and /healthz, or \"off\""]
    #[resolve = check::admin_listen]
    admin_listen: String => Option<SocketAddr> = Some(SocketAddr::from(([127, 0, 0, 1], 9090)));

    /// Bearer key of the admin endpoint's `POST /publish` (producers that
    /// speak HTTP). Unset: every HTTP publish is refused with 403, so the
    /// admin port never takes publishes by accident.
    #[arg(long, env = "RINGCAST_ADMIN_API_KEY", hide_env_values = true)]
    #[help = "Bearer key for POST /publish on the admin address (at least 16 characters); \
              unset: HTTP publishing is refused (403)"]
    #[resolve = check::unless_empty]
    admin_api_key: String => Option<String> = None;

    /// Shard threads, one runtime each.
    #[arg(long, env = "RINGCAST_SHARDS")]
    #[help = "Shard threads (one io_uring runtime each)", default = "number of cores"]
    shards: usize => usize = cores();

    /// Pin shard N to core N. On shared hosts pinning hurts.
    #[arg(long, env = "RINGCAST_PIN_CORES", num_args = 0..=1, default_missing_value = "true")]
    #[help = "Pin shard N to core N"]
    pin_cores: bool => bool = false;

    /// How connections' sockets are watched and written: `io_uring` (each
    /// shard's own ring; epoll where the kernel lacks it) or `epoll`.
    #[arg(long, env = "RINGCAST_DATA_PATH")]
    #[help = "Socket readiness and writes: io_uring (a ring per shard, sends of a round \
              submitted together; epoll where unavailable) or epoll"]
    data_path: DataPath => DataPath = DataPath::IoUring;

    /// Let the heap use transparent huge pages. The allocator then asks for
    /// them, and every shard's heap grows in 2 MiB steps (at 19,000 idle
    /// connections on 2 shards: ~450 B per connection with them, ~330 B
    /// without; benches/RESULTS.md).
    #[arg(long, env = "RINGCAST_HUGE_PAGES", num_args = 0..=1, default_missing_value = "true")]
    #[help = "Let the heap use transparent huge pages"]
    huge_pages: bool => bool = false;

    /// Name in `welcome`.
    #[arg(long, env = "RINGCAST_NODE_NAME")]
    #[help = "Node name sent in `welcome`", default = "host name"]
    node_name: String => String = host_name();

    /// Time between server pings; a connection silent for twice this is closed.
    #[arg(long, env = "RINGCAST_HEARTBEAT")]
    #[help = "Interval between server pings; silent for twice this = closed"]
    heartbeat: HumanDuration => Duration = Duration::from_secs(25);

    /// Time for a client to complete the upgrade request.
    #[arg(long, env = "RINGCAST_HANDSHAKE_TIMEOUT")]
    #[help = "Time allowed for the upgrade request"]
    handshake_timeout: HumanDuration => Duration = Duration::from_secs(10);

    /// Time a closing connection gets to answer our close frame before the
    /// socket is shut.
    #[arg(long, env = "RINGCAST_CLOSE_TIMEOUT")]
    #[help = "Time a closing client gets to answer our close frame"]
    close_timeout: HumanDuration => Duration = Duration::from_secs(5);

    /// Largest request head (request line + headers).
    #[arg(long, env = "RINGCAST_MAX_HANDSHAKE_SIZE")]
    #[help = "Largest upgrade request head"]
    max_handshake_size: ByteSize => usize = 8 << 10;

    /// Largest inbound message after reassembly; past it close 1009.
    #[arg(long, env = "RINGCAST_MAX_MESSAGE_SIZE")]
    #[help = "Largest inbound message; past it close 1009"]
    max_message_size: ByteSize => usize = 64 << 10;

    /// Largest `data` of a `pub`; past it error 4029.
    #[arg(long, env = "RINGCAST_MAX_PUBLISH_SIZE")]
    #[help = "Largest `data` of a `pub`; past it error 4029"]
    max_publish_size: ByteSize => usize = 64 << 10;

    /// permessage-deflate (RFC 7692) for clients that offer it (every
    /// browser does): a `msg` is compressed at most once per shard and the
    /// bytes shared, and no connection keeps compressor state. Off: every
    /// offer is declined and the upgrade goes on uncompressed.
    #[arg(long, env = "RINGCAST_COMPRESSION", num_args = 0..=1, default_missing_value = "true")]
    #[help = "Accept permessage-deflate from clients that offer it"]
    compression: bool => bool = true;

    /// `msg` payloads smaller than this always go uncompressed: below a
    /// few hundred bytes deflate saves little and costs a call.
    #[arg(long, env = "RINGCAST_COMPRESSION_MIN_SIZE")]
    #[help = "Smallest `msg` payload sent compressed"]
    compression_min_size: ByteSize => usize = 256;

    /// Deflate level, 1 (fastest, ~5.7 us per KiB here) to 9 (smallest).
    #[arg(long, env = "RINGCAST_COMPRESSION_LEVEL")]
    #[help = "Deflate level, 1 (fastest) to 9 (smallest)"]
    compression_level: u32 => u32 = 1;

    /// Subscriptions per connection, topics and patterns alike; past it
    /// error 4013.
    #[arg(long, env = "RINGCAST_MAX_SUBSCRIPTIONS")]
    #[help = "Subscriptions (topics and patterns) per connection; past it error 4013"]
    max_subscriptions: usize => usize = 1024;

    /// Frames per second one connection may send, refilling a token bucket
    /// of `inbound_burst`; past it each frame gets error 4008, and a client
    /// still over it after 5 s is closed with 4008. 0 = unlimited (trusted
    /// publishers, benchmarks).
    #[arg(long, env = "RINGCAST_INBOUND_RATE")]
    #[help = "Frames per second per connection, 0 = unlimited; past it error 4008, \
              for 5 s: close 4008"]
    inbound_rate: u32 => u32 = 100;

    /// Size of the inbound token bucket (frames).
    #[arg(long, env = "RINGCAST_INBOUND_BURST")]
    #[help = "Burst of the inbound rate limit, in frames"]
    inbound_burst: u32 => u32 = 200;

    /// Inbound bytes per second one connection may send (message payloads,
    /// pings included), refilling a second token bucket of
    /// `inbound_bytes_burst`; past it the same policy as `inbound_rate`
    /// (error 4008, close 4008 after 5 s over it). The frame rate alone lets
    /// a client push `inbound_rate` x `max_message_size` (6.4 MB/s with the
    /// defaults) of JSON to parse and publish; this bounds that, while
    /// ordinary traffic (subscriptions, pings, small publishes) never comes
    /// near it. Raise it for clients that publish large documents; 0 =
    /// unlimited (trusted publishers, benchmarks).
    #[arg(long, env = "RINGCAST_INBOUND_BYTES_RATE")]
    #[help = "Inbound bytes per second per connection (message payloads, pings included), \
              0 = unlimited; past it error 4008, for 5 s: close 4008"]
    inbound_bytes_rate: ByteSize => usize = 64 << 10;

    /// Size of the inbound bytes bucket. It must hold at least one
    /// `max_message_size` message, or such a message could never pass; the
    /// default holds four default-size messages at once.
    #[arg(long, env = "RINGCAST_INBOUND_BYTES_BURST")]
    #[help = "Burst of the inbound bytes limit; at least --max-message-size"]
    inbound_bytes_burst: ByteSize => usize = 256 << 10;

    /// Connections per node, counted from the moment they are accepted (a
    /// socket still sending its upgrade request counts); past it a new
    /// connection gets 503 at once.
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS")]
    #[help = "Connections per node, counted from accept (unfinished upgrades too); past it 503"]
    max_connections: usize => usize = 1_000_000;

    /// Connections per shard (one thread, one core), counted like
    /// `max_connections`; past it 503. SO_REUSEPORT spreads connections
    /// over the shards by address hash and never rebalances, so this keeps
    /// one core from holding far more than its share: every connection of
    /// a shard is visited by its once-a-second sweep and its clients share
    /// that one core. Clients refused here reconnect and usually land on
    /// another shard.
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS_PER_SHARD")]
    #[help = "Connections per shard, counted from accept; past it 503"]
    max_connections_per_shard: usize => usize = 250_000;

    /// Connections per client address, counted from the moment they are
    /// accepted, so sockets that never finish their upgrade request count
    /// too (they would otherwise be bounded only by `handshake_timeout`);
    /// past it a new connection gets 429 at once. Counted per shard (each
    /// shard admits its share), so the limit is approximate. Behind a proxy
    /// every client has the proxy's address: raise it there.
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS_PER_IP")]
    #[help = "Connections per client address, counted from accept (unfinished upgrades too); \
              past it 429"]
    max_connections_per_ip: usize => usize = 10_000;

    /// Upgrades per second per client address (each shard admits its
    /// share, with a burst of one second's worth); past it 429. 0 =
    /// unlimited.
    #[arg(long, env = "RINGCAST_MAX_HANDSHAKES_PER_IP")]
    #[help = "Upgrades per second per client address, 0 = unlimited; past it 429"]
    max_handshakes_per_ip: u32 => u32 = 100;

    /// Bytes that may wait in one connection's outbound queue. Past it the
    /// client is too slow to keep up: it is closed with 4009 and recovers
    /// with `since`, so one slow phone never holds memory for everyone.
    #[arg(long, env = "RINGCAST_OUTBOUND_QUEUE")]
    #[help = "Outbound queue bound per connection; past it close 4009"]
    outbound_queue: ByteSize => usize = 1 << 20;

    /// Window over which `drain` spreads reconnect delays.
    #[arg(long, env = "RINGCAST_DRAIN_WINDOW")]
    #[help = "Window over which `drain` spreads reconnects on shutdown"]
    drain_window: HumanDuration => Duration = Duration::from_secs(10);

    /// Presence: how long a node's users stay listed after it stops
    /// renewing its liveness (it renews every third of this); a node killed
    /// without a drain has its users' `leave`s sent by a survivor within
    /// this plus a second.
    #[arg(long, env = "RINGCAST_PRESENCE_TTL")]
    #[help = "Presence: a dead node's users leave within this plus 1s"]
    presence_ttl: HumanDuration => Duration = Duration::from_secs(30);

    /// Presence: a user's `leave` after a clean departure (its last
    /// connection to the topic on this node went) waits this long, and is
    /// not sent if the user comes back meanwhile: a page reload or a
    /// reconnect after a drain does not flap. 0 sends it at once.
    #[arg(long, env = "RINGCAST_PRESENCE_LEAVE_DELAY")]
    #[help = "Presence: hold a clean departure's `leave` this long"]
    presence_leave_delay: HumanDuration => Duration = Duration::from_secs(5);

    /// Messages the embedded broker keeps per topic.
    #[arg(long, env = "RINGCAST_HISTORY_SIZE")]
    #[help = "Messages kept per topic for recovery (embedded broker)"]
    history_size: usize => usize = 1000;

    /// How long the embedded broker keeps a message.
    #[arg(long, env = "RINGCAST_HISTORY_TTL")]
    #[help = "How long messages are kept for recovery (embedded broker)"]
    history_ttl: HumanDuration => Duration = Duration::from_secs(600);

    /// How long a publish's idempotency `key` is remembered per topic: a
    /// second publish with the same topic and key within it is not
    /// delivered again and is answered with the first one's id. Longer
    /// covers slower producer retries and costs a table entry per keyed
    /// publish for that long (the embedded broker keeps at most
    /// 10,000 keys per topic; with Redis every node keeps those it read).
    #[arg(long, env = "RINGCAST_IDEMPOTENCY_WINDOW")]
    #[help = "How long a publish key is remembered: a repeat within it is not delivered again"]
    idempotency_window: HumanDuration => Duration = Duration::from_secs(120);

    /// Origins allowed to connect (exact match on the Origin header, else
    /// 403); empty allows any. Requests without an Origin always pass: only
    /// browsers send one, and the list is there to keep other sites' pages
    /// from connecting with a user's credentials (cross-site WebSocket
    /// hijacking); a non-browser client could send any Origin anyway.
    #[arg(long, env = "RINGCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    #[help = "Comma-separated Origin allowlist (403 otherwise); empty allows any. \
              Requests without an Origin header (not browsers) always pass"]
    allowed_origins: Vec<String> => Vec<String> = Vec::new();

    /// Proxies whose word is taken for the client's address: from these
    /// peers, a PROXY protocol header (v2 or v1) before the request, else
    /// the `X-Forwarded-For` header, names the client, and every
    /// per-address limit and log line uses that address. From any other
    /// peer both are ignored, so clients cannot pick their own address.
    /// Empty (the default) trusts no one.
    #[arg(long, env = "RINGCAST_TRUSTED_PROXIES", value_delimiter = ',')]
    #[help = "Comma-separated address ranges of proxies (10.0.0.0/8, 192.0.2.7) whose PROXY \
              header or X-Forwarded-For names the client for per-address limits; empty trusts none"]
    trusted_proxies: Vec<Cidr> => Vec<Cidr> = Vec::new();

    /// Accept connections without a token, and let them subscribe and
    /// publish to every topic: development only.
    #[arg(long, env = "RINGCAST_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true")]
    #[help = "Accept clients without a token, allowed every topic: development only"]
    allow_anonymous: bool => bool = false;

    /// Shared secret for HS256 tokens; empty means none. With no secret and
    /// no public key (and not anonymous), the server makes an ephemeral
    /// secret at start and prints a development token.
    #[arg(long, env = "RINGCAST_AUTH_HMAC_SECRET", hide_env_values = true)]
    #[help = "Shared secret for HS256 tokens (at least 32 characters). Without a secret or \
              key, an ephemeral secret is made and a development token printed"]
    #[resolve = check::unless_empty]
    auth_hmac_secret: String => Option<String> = None;

    /// PEM public key file for RS256/ES256 tokens.
    #[arg(long, env = "RINGCAST_AUTH_PUBLIC_KEY")]
    #[help = "PEM public key file for RS256/ES256 tokens"]
    auth_public_key: PathBuf => Option<PathBuf> = None;

    /// JWKS file (`{"keys":[...]}`) of RS/ES/EdDSA public keys; tokens
    /// name their key with `kid`.
    #[arg(long, env = "RINGCAST_AUTH_JWKS")]
    #[help = "JWKS file of public keys; tokens name their key by `kid`"]
    auth_jwks: PathBuf => Option<PathBuf> = None;

    /// Algorithm of `auth_public_key`: RS256 or ES256.
    #[arg(long, env = "RINGCAST_AUTH_ALGORITHM")]
    #[help = "Algorithm of --auth-public-key: RS256 or ES256"]
    auth_algorithm: String => String = "RS256".into();

    /// Required `iss` claim, when set.
    #[arg(long, env = "RINGCAST_AUTH_ISSUER")]
    #[help = "Required `iss` claim"]
    auth_issuer: String => Option<String> = None;

    /// Required `aud` claim, when set.
    #[arg(long, env = "RINGCAST_AUTH_AUDIENCE")]
    #[help = "Required `aud` claim"]
    auth_audience: String => Option<String> = None;

    /// Time a client without `?token=` has to send its `auth` frame; past
    /// it the connection closes with 4001.
    #[arg(long, env = "RINGCAST_AUTH_TIMEOUT")]
    #[help = "Time to send the `auth` frame when no ?token= was given"]
    auth_timeout: HumanDuration => Duration = Duration::from_secs(5);

    /// `[[namespaces]]` tables (config file only): policy per namespace.
    /// With none, every topic is in one implicit namespace.
    #[arg(skip)]
    namespaces: Vec<NamespaceConfig> => Vec<NamespaceConfig> = Vec::new();

    /// Conformance mode: echo every data message back, serve any path.
    #[arg(long, env = "RINGCAST_ECHO", num_args = 0..=1, default_missing_value = "true")]
    #[help = "Conformance mode: echo data messages back, on any path"]
    echo: bool => bool = false;

    /// Log format.
    #[arg(long, env = "RINGCAST_LOG_FORMAT")]
    #[help = "Log format"]
    log_format: LogFormat => LogFormat = LogFormat::Text;

    /// Time between two `stats` log lines (info): open connections,
    /// subscriptions, deliveries per second, drops and errors over the
    /// interval, the same counters `/metrics` reads. 0 turns it off.
    #[arg(long, env = "RINGCAST_STATS_LOG_INTERVAL")]
    #[help = "Interval of the `stats` info log line (connections, deliveries/s, drops, \
              errors); 0 = off"]
    stats_log_interval: HumanDuration => Duration = Duration::from_secs(60);

    /// Redis URL (`redis://HOST:PORT/DB`) of the Redis Streams backbone, or
    /// `redis+cluster://HOST:PORT,HOST:PORT` (seed nodes) for a Redis
    /// Cluster; `None` (or empty) runs the embedded single-node broker.
    #[arg(long, env = "RINGCAST_REDIS")]
    #[help = "Redis Streams backbone, e.g. redis://127.0.0.1:6379/0, or a Redis Cluster by any \
              of its nodes, e.g. redis+cluster://10.0.0.1:7000,10.0.0.2:7000; unset or empty \
              runs the embedded single-node broker", default = "unset"]
    #[resolve = check::unless_empty]
    redis: String => Option<String> = None;

    /// Partition streams `{prefix}:stream:{P}`, P = crc32(topic) mod this.
    /// Producers must use the same number.
    #[arg(long, env = "RINGCAST_REDIS_PARTITIONS")]
    #[help = "Partition streams; producers must hash with the same number"]
    redis_partitions: u32 => u32 = 16;

    /// Prefix of every Redis key ringcast reads or writes.
    #[arg(long, env = "RINGCAST_REDIS_KEY_PREFIX")]
    #[help = "Prefix of every Redis key ringcast uses"]
    redis_key_prefix: String => String = "ringcast".into();

    /// Hash tags of the partition keys. `legacy` is `{P}` (the partition
    /// number), what producers have always written to; on a Redis Cluster
    /// those tags land on slots unrelated to each other, so 16 partitions
    /// spread 6/6/4 over three masters and leave some of eight empty.
    /// `even` gives partition P of N the tag whose slot is P * 16384 / N,
    /// so masters with even slot ranges get even shares; producers must
    /// then take the keys `ringcast keys` prints. Switching moves every
    /// partition to new keys: what the old streams hold is not recovered.
    #[arg(long, env = "RINGCAST_REDIS_KEY_LAYOUT")]
    #[help = "Hash tags of partition keys: legacy ({P}) or even (evenly spaced cluster slots; \
              see `ringcast keys`)"]
    redis_key_layout: KeyLayout => KeyLayout = KeyLayout::Legacy;

    /// Approximate `MAXLEN ~` of each partition stream on `pub`: how far back
    /// `since` recovery reaches, against Redis memory.
    #[arg(long, env = "RINGCAST_REDIS_MAXLEN")]
    #[help = "Approximate MAXLEN of each partition stream: the recovery horizon"]
    redis_maxlen: u64 => u64 = 100_000;

    /// Memory budget of the recent-entry cache that answers most `since`
    /// recoveries without touching Redis (split evenly over partitions,
    /// filled from each stream's tail at start so a reconnect storm after a
    /// restart stays off Redis); 0 sends every recovery to Redis.
    #[arg(long, env = "RINGCAST_REDIS_CACHE_SIZE")]
    #[help = "Memory for recent entries that answer recoveries without Redis"]
    redis_cache_size: ByteSize => usize = 64 << 20;
}

/// The default of `shards`: one per core.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The default of `node_name`: the kernel's host name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ringcast".into())
}

/// A flag's line of `--help`: what it does, then its default.
fn help_line(what: &str, default: String) -> String {
    format!("{what} [default: {default}]")
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
        let mut errs = Vec::new();
        let c = Config::resolve(l, &mut errs);
        c.check(&mut errs);
        c.check_types(&mut errs);
        if errs.is_empty() {
            Ok(c)
        } else {
            Err(ConfigError(errs))
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
    fn defaults_match_the_protocol_table() {
        let c = Config::from_layer(anon()).unwrap();
        assert_eq!(c.heartbeat, Duration::from_secs(25));
        assert_eq!(c.max_message_size, 64 << 10);
        assert_eq!(c.max_subscriptions, 1024);
        assert_eq!(c.outbound_queue, 1 << 20);
        assert_eq!(c.drain_window, Duration::from_secs(10));
        assert_eq!(c.history_size, 1000);
        assert_eq!(c.stats_log_interval, Duration::from_secs(60));
    }

    #[test]
    fn stats_log_interval_is_off_at_zero_and_not_too_short() {
        let off = Layer::from_toml("stats_log_interval = 0").unwrap();
        let c = Config::from_layer(off.over(anon())).unwrap();
        assert_eq!(c.stats_log_interval, Duration::ZERO);
        let file = Layer::from_toml("stats_log_interval = \"250ms\"").unwrap();
        let c = Config::from_layer(file.over(anon())).unwrap();
        assert_eq!(c.stats_log_interval, Duration::from_millis(250));
        let short = Layer::from_toml("stats_log_interval = \"10ms\"").unwrap();
        let err = Config::from_layer(short.over(anon())).unwrap_err();
        assert_eq!(
            err.0,
            ["stats_log_interval: must be 0 (off) or at least 100ms"]
        );
    }

    #[test]
    fn the_idempotency_window_comes_from_the_file_and_is_bounded() {
        assert_eq!(
            Config::default().idempotency_window,
            Duration::from_secs(120)
        );
        let file = Layer::from_toml("idempotency_window = \"30s\"").unwrap();
        let c = Config::from_layer(file.over(anon())).unwrap();
        assert_eq!(c.idempotency_window, Duration::from_secs(30));
        for bad in ["500ms", "25h"] {
            let file = Layer::from_toml(&format!("idempotency_window = \"{bad}\"")).unwrap();
            let err = Config::from_layer(file.over(anon())).unwrap_err();
            assert_eq!(err.0, ["idempotency_window: must be 1s to 24h"], "{bad}");
        }
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
    fn presence_durations_are_bounded() {
        let file =
            Layer::from_toml("presence_ttl = \"2s\"\npresence_leave_delay = \"11m\"").unwrap();
        let err = Config::from_layer(file.over(anon())).unwrap_err();
        assert_eq!(
            err.0,
            [
                "presence_ttl: must be between 3s and 1h",
                "presence_leave_delay: must be at most 10m"
            ]
        );
        let file =
            Layer::from_toml("presence_ttl = \"1h\"\npresence_leave_delay = \"0s\"").unwrap();
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

    /// The `[default: …]` of every flag in `--help` comes from
    /// `Config::default()`, and given back as the flag's value it is
    /// that default.
    #[test]
    fn help_shows_each_default_as_it_would_be_written() {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = Layer::augment_args(clap::Command::new("serve")).mut_args(|a| a.env(None));
        let help = |id: &str| {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_help().unwrap().to_string()
        };
        assert_eq!(
            help("heartbeat"),
            "Interval between server pings; silent for twice this = closed [default: 25s]"
        );
        assert!(help("history_ttl").ends_with("[default: 10m]"));
        assert!(help("max_message_size").ends_with("[default: 64KiB]"));
        assert!(help("outbound_queue").ends_with("[default: 1MiB]"));
        assert!(help("admin_listen").ends_with("[default: 127.0.0.1:9090]"));
        assert!(help("shards").ends_with("[default: number of cores]"));
        assert!(help("auth_issuer").ends_with("[default: none]"));
        let computed = ["number of cores", "host name", "none", "unset", "empty"];
        let mut argv = vec!["serve".to_string()];
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let (_, shown) = help
                .split_once(" [default: ")
                .unwrap_or_else(|| panic!("{help}"));
            let shown = shown.strip_suffix(']').unwrap();
            if !computed.contains(&shown) {
                argv.push(format!("--{}={shown}", arg.get_long().unwrap()));
            }
        }
        assert!(argv.len() > 30, "{argv:?}");
        let matches = cmd.clone().try_get_matches_from(&argv).unwrap();
        let given = Layer::from_arg_matches(&matches).unwrap();
        let given = Config::from_layer(given).unwrap();
        assert_eq!(format!("{given:?}"), format!("{:?}", Config::default()));
    }
}
