//! The command line: `serve`, `publish`, `subscribe`, `token`, `keys`,
//! `load`, `doctor`. Doc comments here are the `--help` text, except `serve`'s
//! settings: those are [`Layer`], declared with their defaults in
//! [`crate::config`], which also validates them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, HumanDuration, Layer, LogFormat};

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
    /// Print the Redis stream and epoch key of every partition, as `serve`
    /// with the same settings (flags, environment, --config) names them:
    /// what producers XADD to, one line per partition.
    Keys(Box<KeysArgs>),
    /// Generate load against a server and report deliveries and latency.
    Load(crate::load::LoadArgs),
    /// Check this host for N connections: one line per check (ok, warn,
    /// info), each warn with the command or file line that fixes it; exit 1
    /// on any warn.
    Doctor(crate::doctor::DoctorArgs),
}

/// `ringcast serve`. Every flag also reads `RINGCAST_<FLAG>` and the
/// `--config` TOML file (same names in snake_case); flags win over the
/// environment, which wins over the file. The settings themselves, with
/// their defaults, are declared once in [`crate::config`].
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML settings file.
    #[arg(long, env = "RINGCAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Every setting, as given by flags and the environment.
    #[command(flatten)]
    pub settings: Layer,
}

/// `ringcast keys`: the settings of `serve`, of which it reads
/// `redis_partitions`, `redis_key_prefix` and `redis_key_layout`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Print a JSON array of `{partition, slot, stream, epoch}` instead of
    /// tab-separated lines.
    #[arg(long)]
    pub json: bool,
    /// The server's settings.
    #[command(flatten)]
    pub serve: ServeArgs,
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
    /// Hash tags of the partition keys, as the servers use [default:
    /// legacy].
    #[arg(long, env = "RINGCAST_REDIS_KEY_LAYOUT", default_value = "legacy")]
    pub redis_key_layout: crate::broker::redis::KeyLayout,
    /// Approximate MAXLEN of the partition stream [default: 100000].
    #[arg(long, env = "RINGCAST_REDIS_MAXLEN", default_value_t = 100_000)]
    pub redis_maxlen: u64,
    /// POST to a node's admin endpoint (http://HOST:PORT) instead of
    /// publishing over WebSocket; needs --api-key.
    #[arg(long, conflicts_with = "redis")]
    pub http: Option<String>,
    /// The node's --admin-api-key, for --http.
    #[arg(long, env = "RINGCAST_ADMIN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// An event name copied into the `msg` frame (--http and --redis).
    #[arg(long)]
    pub event: Option<String>,
    /// An idempotency key (1 to 128 bytes): publishing again with the same
    /// topic and key within the servers' --idempotency-window delivers
    /// nothing new and prints the first publish's id, so a retry is safe.
    #[arg(long)]
    pub key: Option<String>,
    /// With --redis and --key: how long Redis remembers the key, as the
    /// servers' --idempotency-window [default: 2m].
    #[arg(long, env = "RINGCAST_IDEMPOTENCY_WINDOW", default_value = "2m")]
    pub idempotency_window: crate::config::units::HumanDuration,
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
    /// A JWT for a server that checks tokens, sent in the first `auth`
    /// frame of every connection (not in the URL, which proxies log). The
    /// command stops with an error when it expires [default: none:
    /// anonymous].
    #[arg(long, env = "RINGCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
            let ServeArgs { config, settings } = *args;
            let config = Config::from_sources(settings, config.as_deref())
                .map_err(|e| Failure::Usage(e.into()))?;
            init_tracing(config.log_format);
            crate::server::run(Arc::new(config)).map_err(Failure::Runtime)
        }
        Command::Publish(args) => publish(&args).map_err(Failure::Runtime),
        Command::Subscribe(args) => subscribe(&args).map_err(Failure::Runtime),
        Command::Token(args) => token(&args).map_err(Failure::Usage),
        Command::Keys(args) => {
            let KeysArgs { json, serve } = *args;
            let config = Config::from_sources(serve.settings, serve.config.as_deref())
                .map_err(|e| Failure::Usage(e.into()))?;
            print_keys(&config, json);
            Ok(())
        }
        Command::Load(args) => {
            init_tracing(LogFormat::Text);
            crate::load::run(&args).map_err(Failure::Runtime)
        }
        Command::Doctor(args) => match crate::doctor::run(&args) {
            0 => Ok(()),
            n => Err(Failure::Runtime(anyhow::anyhow!(
                "{n} check(s) warn; each says what fixes it (tuning/README.md)"
            ))),
        },
    }
}

/// `ringcast keys`: one line per partition, `partition slot stream epoch`
/// separated by tabs after a `#` header, or one JSON array.
fn print_keys(config: &Config, json: bool) {
    use crate::broker::redis::{key_slot, Keys};
    let keys = Keys::new(
        &config.redis_key_prefix,
        config.redis_partitions,
        config.redis_key_layout,
    );
    let rows = (0..keys.partitions()).map(|p| {
        let (stream, epoch) = (keys.stream(p), keys.epoch(p));
        (p, key_slot(stream.as_bytes()), stream, epoch)
    });
    if json {
        let list: Vec<serde_json::Value> = rows
            .map(|(p, slot, stream, epoch)| {
                serde_json::json!({"partition": p, "slot": slot, "stream": stream, "epoch": epoch})
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return;
    }
    println!(
        "# prefix {} partitions {} layout {}; partition = crc32(topic) mod partitions",
        keys.prefix(),
        keys.partitions(),
        keys.layout()
    );
    println!("# partition\tslot\tstream\tepoch");
    for (p, slot, stream, epoch) in rows {
        println!("{p}\t{slot}\t{stream}\t{epoch}");
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
    if let Some(k) = &args.key {
        crate::protocol::check_key(k).map_err(|e| anyhow::anyhow!("--key: {e}"))?;
    }
    let key = args.key.as_deref();
    if let Some(url) = &args.redis {
        crate::topic::TopicName::new(&args.topic).context("--topic")?;
        let settings = crate::broker::redis::Settings {
            url: url.clone(),
            keys: crate::broker::redis::Keys::new(
                &args.redis_key_prefix,
                args.redis_partitions,
                args.redis_key_layout,
            ),
            maxlen: args.redis_maxlen,
            cache_size: 0,
            idempotency_window: args.idempotency_window.0,
        };
        let mid = crate::broker::redis::publish_once(
            &settings,
            &args.topic,
            args.event.as_deref(),
            &data.to_string(),
            key,
        )
        .context("publishing to Redis")?;
        println!("{mid}");
        return Ok(());
    }
    if let Some(base) = &args.http {
        let api_key = args
            .api_key
            .as_deref()
            .context("--http needs --api-key (or RINGCAST_ADMIN_API_KEY)")?;
        let mid = crate::client::http_publish(
            base,
            api_key,
            &args.topic,
            args.event.as_deref(),
            &data,
            key,
        )
        .context("publishing over HTTP")?;
        println!("{mid}");
        return Ok(());
    }
    if args.event.is_some() {
        anyhow::bail!("--event needs --http or --redis: a client pub carries no event");
    }
    let mut client = crate::client::Client::connect(&args.url).context("connecting")?;
    let mid = client
        .publish_keyed(&args.topic, &data, key)
        .context("publishing")?;
    println!("{mid}");
    client.close();
    Ok(())
}

/// How often `ringcast subscribe` wakes without a message, to report a
/// recovery that brought nothing as soon as it happens.
const SUBSCRIBE_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A [`crate::client::Reconnecting`] that authenticates with one fixed
/// token: its provider hands out `token` until its `exp`, then fails, so
/// the command ends at `exp` with a clear error instead of reconnecting
/// with a token the server refuses. No refresh before `exp`: there is no
/// newer token to send.
fn subscriber_with_token(url: &str, token: String) -> anyhow::Result<crate::client::Reconnecting> {
    let exp = crate::client::token_expiry(&token);
    let provider = move || match exp {
        Some(exp) if crate::auth::now_secs() >= exp => Err(format!(
            "the --token expired (exp {exp}): mint a new one with `ringcast token`"
        )),
        _ => Ok(token.clone()),
    };
    let mut client =
        crate::client::Reconnecting::with_token(url, provider).context("connecting")?;
    client.refresh_margin = std::time::Duration::ZERO;
    Ok(client)
}

/// Prints each message as a JSON line on stdout; on stderr, each topic that
/// could not be recovered after a reconnect (`recovered:false`: what was
/// published meanwhile is lost, refetch it) and each subscription the
/// server refused or ended. Exits 1 when no subscription is left.
fn subscribe(args: &SubscribeArgs) -> anyhow::Result<()> {
    use crate::client::{ClientError, Event, Reconnecting};
    use std::io::Write as _;
    let mut client = match &args.token {
        Some(token) => subscriber_with_token(&args.url, token.clone())?,
        None => Reconnecting::connect(&args.url).context("connecting")?,
    };
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
