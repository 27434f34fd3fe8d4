//! The command line: `serve`, `publish`, `load`. Doc comments here are the
//! `--help` text. Flags and `RINGCAST_*` variables are raw input turned into
//! a [`Layer`] and validated by [`crate::config`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config::{ByteSize, Config, HumanDuration, Layer, LogFormat};

/// ringcast: real-time notifications over WebSocket.
#[derive(Debug, Parser)]
#[command(name = "ringcast", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (embedded broker: no Redis needed).
    Serve(Box<ServeArgs>),
    /// Publish one message through a running server, as a WebSocket client.
    Publish(PublishArgs),
    /// Subscribe to topics and print each message as a JSON line; reconnects
    /// and recovers missed messages on its own.
    Subscribe(SubscribeArgs),
    /// Mint an HS256 token (development and tests).
    Token(TokenArgs),
    /// Generate load against a server and report deliveries and latency.
    Load(crate::load::LoadArgs),
}

/// `ringcast serve`. Every flag also reads `RINGCAST_<FLAG>` and the
/// `--config` TOML file (same names in snake_case); flags win over the
/// environment, which wins over the file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML settings file.
    #[arg(long, env = "RINGCAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Client WebSocket address [default: 127.0.0.1:8080].
    #[arg(long, env = "RINGCAST_LISTEN")]
    pub listen: Option<String>,
    /// Admin HTTP address for /metrics and /healthz, or "off" [default: 127.0.0.1:9090].
    #[arg(long, env = "RINGCAST_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Shard threads (one io_uring runtime each) [default: number of cores].
    #[arg(long, env = "RINGCAST_SHARDS")]
    pub shards: Option<usize>,
    /// Pin shard N to core N [default: false].
    #[arg(long, env = "RINGCAST_PIN_CORES", num_args = 0..=1, default_missing_value = "true")]
    pub pin_cores: Option<bool>,
    /// Let the heap use transparent huge pages [default: false].
    #[arg(long, env = "RINGCAST_HUGE_PAGES", num_args = 0..=1, default_missing_value = "true")]
    pub huge_pages: Option<bool>,
    /// Node name sent in `welcome` [default: host name].
    #[arg(long, env = "RINGCAST_NODE_NAME")]
    pub node_name: Option<String>,
    /// Interval between server pings; silent for twice this = closed [default: 25s].
    #[arg(long, env = "RINGCAST_HEARTBEAT")]
    pub heartbeat: Option<HumanDuration>,
    /// Time allowed for the upgrade request [default: 10s].
    #[arg(long, env = "RINGCAST_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<HumanDuration>,
    /// Time a closing client gets to answer our close frame [default: 5s].
    #[arg(long, env = "RINGCAST_CLOSE_TIMEOUT")]
    pub close_timeout: Option<HumanDuration>,
    /// Largest upgrade request head [default: 8KiB].
    #[arg(long, env = "RINGCAST_MAX_HANDSHAKE_SIZE")]
    pub max_handshake_size: Option<ByteSize>,
    /// Largest inbound message; past it close 1009 [default: 64KiB].
    #[arg(long, env = "RINGCAST_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<ByteSize>,
    /// Largest `data` of a `pub`; past it error 4029 [default: 64KiB].
    #[arg(long, env = "RINGCAST_MAX_PUBLISH_SIZE")]
    pub max_publish_size: Option<ByteSize>,
    /// Subscriptions per connection; past it error 4013 [default: 1024].
    #[arg(long, env = "RINGCAST_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Frames per second per connection, 0 = unlimited; past it error 4008,
    /// for 5 s: close 4008 [default: 100].
    #[arg(long, env = "RINGCAST_INBOUND_RATE")]
    pub inbound_rate: Option<u32>,
    /// Burst of the inbound rate limit, in frames [default: 200].
    #[arg(long, env = "RINGCAST_INBOUND_BURST")]
    pub inbound_burst: Option<u32>,
    /// Inbound bytes per second per connection (message payloads, pings
    /// included), 0 = unlimited; past it error 4008, for 5 s: close 4008
    /// [default: 64KiB].
    #[arg(long, env = "RINGCAST_INBOUND_BYTES_RATE")]
    pub inbound_bytes_rate: Option<ByteSize>,
    /// Burst of the inbound bytes limit; at least --max-message-size
    /// [default: 256KiB].
    #[arg(long, env = "RINGCAST_INBOUND_BYTES_BURST")]
    pub inbound_bytes_burst: Option<ByteSize>,
    /// Connections per node, counted from accept (unfinished upgrades
    /// too); past it 503 [default: 1000000].
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections per shard, counted from accept; past it 503 [default: 250000].
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS_PER_SHARD")]
    pub max_connections_per_shard: Option<usize>,
    /// Connections per client address, counted from accept (unfinished
    /// upgrades too); past it 429 [default: 10000].
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Upgrades per second per client address, 0 = unlimited; past it 429
    /// [default: 100].
    #[arg(long, env = "RINGCAST_MAX_HANDSHAKES_PER_IP")]
    pub max_handshakes_per_ip: Option<u32>,
    /// Outbound queue bound per connection; past it close 4009 [default: 1MiB].
    #[arg(long, env = "RINGCAST_OUTBOUND_QUEUE")]
    pub outbound_queue: Option<ByteSize>,
    /// Window over which `drain` spreads reconnects on shutdown [default: 10s].
    #[arg(long, env = "RINGCAST_DRAIN_WINDOW")]
    pub drain_window: Option<HumanDuration>,
    /// Messages kept per topic for recovery (embedded broker) [default: 1000].
    #[arg(long, env = "RINGCAST_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    /// How long messages are kept for recovery (embedded broker) [default: 10m].
    #[arg(long, env = "RINGCAST_HISTORY_TTL")]
    pub history_ttl: Option<HumanDuration>,
    /// Comma-separated Origin allowlist (403 otherwise); empty allows any.
    /// Requests without an Origin header (not browsers) always pass
    /// [default: empty].
    #[arg(long, env = "RINGCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Accept clients without a token, allowed every topic: development
    /// only [default: false].
    #[arg(long, env = "RINGCAST_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_anonymous: Option<bool>,
    /// Shared secret for HS256 tokens (at least 32 characters). Without a
    /// secret or key, an ephemeral secret is made and a development token
    /// printed [default: none].
    #[arg(long, env = "RINGCAST_AUTH_HMAC_SECRET", hide_env_values = true)]
    pub auth_hmac_secret: Option<String>,
    /// PEM public key file for RS256/ES256 tokens [default: none].
    #[arg(long, env = "RINGCAST_AUTH_PUBLIC_KEY")]
    pub auth_public_key: Option<PathBuf>,
    /// JWKS file of public keys; tokens name their key by `kid` [default: none].
    #[arg(long, env = "RINGCAST_AUTH_JWKS")]
    pub auth_jwks: Option<PathBuf>,
    /// Algorithm of --auth-public-key: RS256 or ES256 [default: RS256].
    #[arg(long, env = "RINGCAST_AUTH_ALGORITHM")]
    pub auth_algorithm: Option<String>,
    /// Required `iss` claim [default: none].
    #[arg(long, env = "RINGCAST_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// Required `aud` claim [default: none].
    #[arg(long, env = "RINGCAST_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// Time to send the `auth` frame when no ?token= was given [default: 5s].
    #[arg(long, env = "RINGCAST_AUTH_TIMEOUT")]
    pub auth_timeout: Option<HumanDuration>,
    /// Conformance mode: echo data messages back, on any path [default: false].
    #[arg(long, env = "RINGCAST_ECHO", num_args = 0..=1, default_missing_value = "true")]
    pub echo: Option<bool>,
    /// Log format [default: text].
    #[arg(long, env = "RINGCAST_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Redis Streams backbone, e.g. redis://127.0.0.1:6379/0, or a Redis
    /// Cluster by any of its nodes, e.g.
    /// redis+cluster://10.0.0.1:7000,10.0.0.2:7000; unset or empty runs the
    /// embedded single-node broker [default: unset].
    #[arg(long, env = "RINGCAST_REDIS")]
    pub redis: Option<String>,
    /// Partition streams; producers must hash with the same number [default: 16].
    #[arg(long, env = "RINGCAST_REDIS_PARTITIONS")]
    pub redis_partitions: Option<u32>,
    /// Prefix of every Redis key ringcast uses [default: ringcast].
    #[arg(long, env = "RINGCAST_REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// Approximate MAXLEN of each partition stream: the recovery horizon [default: 100000].
    #[arg(long, env = "RINGCAST_REDIS_MAXLEN")]
    pub redis_maxlen: Option<u64>,
    /// Memory for recent entries that answer recoveries without Redis [default: 64MiB].
    #[arg(long, env = "RINGCAST_REDIS_CACHE_SIZE")]
    pub redis_cache_size: Option<ByteSize>,
}

impl ServeArgs {
    /// The flags and environment as one settings layer.
    pub fn layer(&self) -> Layer {
        Layer {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            shards: self.shards,
            pin_cores: self.pin_cores,
            huge_pages: self.huge_pages,
            node_name: self.node_name.clone(),
            heartbeat: self.heartbeat,
            handshake_timeout: self.handshake_timeout,
            close_timeout: self.close_timeout,
            max_handshake_size: self.max_handshake_size,
            max_message_size: self.max_message_size,
            max_publish_size: self.max_publish_size,
            max_subscriptions: self.max_subscriptions,
            inbound_rate: self.inbound_rate,
            inbound_burst: self.inbound_burst,
            inbound_bytes_rate: self.inbound_bytes_rate,
            inbound_bytes_burst: self.inbound_bytes_burst,
            max_connections: self.max_connections,
            max_connections_per_shard: self.max_connections_per_shard,
            max_connections_per_ip: self.max_connections_per_ip,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            outbound_queue: self.outbound_queue,
            drain_window: self.drain_window,
            history_size: self.history_size,
            history_ttl: self.history_ttl,
            allowed_origins: self.allowed_origins.clone(),
            allow_anonymous: self.allow_anonymous,
            auth_hmac_secret: self.auth_hmac_secret.clone(),
            auth_public_key: self.auth_public_key.clone(),
            auth_jwks: self.auth_jwks.clone(),
            auth_algorithm: self.auth_algorithm.clone(),
            auth_issuer: self.auth_issuer.clone(),
            auth_audience: self.auth_audience.clone(),
            auth_timeout: self.auth_timeout,
            namespaces: None,
            echo: self.echo,
            log_format: self.log_format,
            redis: self.redis.clone(),
            redis_partitions: self.redis_partitions,
            redis_key_prefix: self.redis_key_prefix.clone(),
            redis_maxlen: self.redis_maxlen,
            redis_cache_size: self.redis_cache_size,
        }
    }
}

/// `ringcast publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Server WebSocket URL.
    #[arg(long, env = "RINGCAST_URL", default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Topic to publish to.
    #[arg(long)]
    pub topic: String,
    /// The message: a JSON document.
    #[arg(long)]
    pub data: String,
    /// XADD straight to this Redis (redis://HOST:PORT/DB) instead of going
    /// through a server; the partition settings must match the servers'.
    #[arg(long, env = "RINGCAST_REDIS")]
    pub redis: Option<String>,
    /// Partition streams, as the servers use [default: 16].
    #[arg(long, env = "RINGCAST_REDIS_PARTITIONS", default_value_t = 16)]
    pub redis_partitions: u32,
    /// Redis key prefix, as the servers use [default: ringcast].
    #[arg(long, env = "RINGCAST_REDIS_KEY_PREFIX", default_value = "ringcast")]
    pub redis_key_prefix: String,
    /// Approximate MAXLEN of the partition stream [default: 100000].
    #[arg(long, env = "RINGCAST_REDIS_MAXLEN", default_value_t = 100_000)]
    pub redis_maxlen: u64,
}

/// `ringcast subscribe`.
#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// Server WebSocket URL.
    #[arg(long, env = "RINGCAST_URL", default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Topics to subscribe to (repeat the flag for several).
    #[arg(long = "topic", required = true)]
    pub topics: Vec<String>,
    /// Stop after this many messages (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

/// `ringcast token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The HS256 secret the server verifies with (at least 32 characters,
    /// as `serve` requires).
    #[arg(long, env = "RINGCAST_AUTH_HMAC_SECRET", hide_env_values = true)]
    pub secret: String,
    /// The `iss` claim, for servers started with --auth-issuer [default: none].
    #[arg(long, env = "RINGCAST_AUTH_ISSUER")]
    pub issuer: Option<String>,
    /// The `aud` claim, for servers started with --auth-audience [default: none].
    #[arg(long, env = "RINGCAST_AUTH_AUDIENCE")]
    pub audience: Option<String>,
    /// The user id (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Comma-separated topic patterns the token may subscribe to.
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub subs: Vec<String>,
    /// Comma-separated topic patterns the token may publish to.
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub pubs: Vec<String>,
    /// Lifetime.
    #[arg(long, default_value = "1h")]
    pub ttl: HumanDuration,
}

/// How the process should end.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or settings: exit 2.
    Usage(anyhow::Error),
    /// Anything else: exit 1.
    Runtime(anyhow::Error),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve(args) => {
            let config = Config::from_sources(args.layer(), args.config.as_deref())
                .map_err(|e| Failure::Usage(e.into()))?;
            init_tracing(config.log_format);
            crate::server::run(Arc::new(config)).map_err(Failure::Runtime)
        }
        Command::Publish(args) => publish(&args).map_err(Failure::Runtime),
        Command::Subscribe(args) => subscribe(&args).map_err(Failure::Runtime),
        Command::Token(args) => token(&args).map_err(Failure::Usage),
        Command::Load(args) => {
            init_tracing(LogFormat::Text);
            crate::load::run(&args).map_err(Failure::Runtime)
        }
    }
}

/// Shortest HS256 secret `ringcast token` signs with: what `serve` accepts
/// as `auth_hmac_secret`.
const MIN_SECRET_LEN: usize = 32;

fn token(args: &TokenArgs) -> anyhow::Result<()> {
    if args.secret.len() < MIN_SECRET_LEN {
        anyhow::bail!(
            "--secret: must be at least {MIN_SECRET_LEN} characters (it is {}), as serve \
             requires of --auth-hmac-secret",
            args.secret.len()
        );
    }
    let patterns = |list: &[String]| -> Vec<String> {
        list.iter().filter(|s| !s.is_empty()).cloned().collect()
    };
    let claims = crate::auth::Claims {
        sub: args.sub.clone(),
        exp: crate::auth::now_secs().saturating_add(args.ttl.0.as_secs()),
        subs: patterns(&args.subs),
        pubs: patterns(&args.pubs),
    };
    for (flag, list) in [("--subs", &claims.subs), ("--pubs", &claims.pubs)] {
        if let Some(p) = list
            .iter()
            .find(|p| crate::auth::Pattern::parse(p).is_none())
        {
            anyhow::bail!("{flag}: invalid topic pattern {p:?}");
        }
    }
    let token = crate::auth::mint_hmac_for(
        args.secret.as_bytes(),
        &claims,
        args.issuer.as_deref(),
        args.audience.as_deref(),
    );
    println!("{token}");
    Ok(())
}

fn publish(args: &PublishArgs) -> anyhow::Result<()> {
    let data: serde_json::Value = serde_json::from_str(&args.data).context("--data is not JSON")?;
    if let Some(url) = &args.redis {
        crate::topic::TopicName::new(&args.topic).context("--topic")?;
        let settings = crate::broker::redis::Settings {
            url: url.clone(),
            partitions: args.redis_partitions.max(1),
            key_prefix: args.redis_key_prefix.clone(),
            maxlen: args.redis_maxlen,
            cache_size: 0,
        };
        let mid = crate::broker::redis::publish_once(&settings, &args.topic, &data.to_string())
            .context("publishing to Redis")?;
        println!("{mid}");
        return Ok(());
    }
    let mut client = crate::client::Client::connect(&args.url).context("connecting")?;
    let mid = client.publish(&args.topic, &data).context("publishing")?;
    println!("{mid}");
    client.close();
    Ok(())
}

/// How often `ringcast subscribe` wakes without a message, to report a
/// recovery that brought nothing as soon as it happens.
const SUBSCRIBE_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Prints each message as a JSON line on stdout; on stderr, each topic that
/// could not be recovered after a reconnect (`recovered:false`: what was
/// published meanwhile is lost, refetch it) and each subscription the
/// server refused or ended. Exits 1 when no subscription is left.
fn subscribe(args: &SubscribeArgs) -> anyhow::Result<()> {
    use crate::client::{ClientError, Event, Reconnecting};
    use std::io::Write as _;
    let mut client = Reconnecting::connect(&args.url).context("connecting")?;
    for t in &args.topics {
        client
            .subscribe(t)
            .with_context(|| format!("subscribing to {t}"))?;
    }
    let mut seen = 0;
    while args.count.is_none_or(|n| seen < n) {
        let event = match client.recv(std::time::Instant::now() + SUBSCRIBE_REPORT_EVERY) {
            Ok(event) => Some(event),
            Err(ClientError::Timeout) => None,
            Err(e) => return Err(e).context("receiving"),
        };
        // Recovered messages come as any other; only a failure is news.
        client.recovered.clear();
        for topic in client.unrecovered.drain(..) {
            eprintln!(
                "ringcast: {topic}: recovered:false after reconnecting; what was published \
                 while disconnected is lost"
            );
        }
        match event {
            Some(Event::Msg { topic, id, data }) => {
                let line = serde_json::json!({"topic": topic, "id": id, "data": data});
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
                seen += 1;
            }
            Some(Event::Frame(v)) if v["op"] == "error" => {
                eprintln!("ringcast: server error: {v}");
                if client.topics().next().is_none() {
                    anyhow::bail!("no subscription left: {v}");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
