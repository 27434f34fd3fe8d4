//! Where the Redis broker's connections go: one server (`redis://...`) or a
//! Redis Cluster (`redis+cluster://HOST:PORT,HOST:PORT`, any reachable
//! nodes as seeds).
//!
//! [`Conn`] hides the difference from the reader and the publisher. On a
//! cluster it is the redis crate's `ClusterConnection`: one connection per
//! node, commands routed by their key's slot, `MOVED`/`ASK` followed and the
//! slot map refreshed when the topology changes. Two things it cannot route
//! by key are routed here: keyless commands that must reach one node
//! ([`Conn::query_at`]: `CLIENT ID`, `CLIENT UNBLOCK` for the reader of a
//! partition), and pipelines, which a `ClusterConnection` sends whole to the
//! node of their first key — so a pipeline through [`Conn`] must stay within
//! one slot (the reader's do: a partition's stream and epoch share a hash
//! tag), and the publisher's cross-partition batches use a cluster pipeline.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ::redis::cluster::{ClusterClientBuilder, ClusterConnection};
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Cmd, Connection, ConnectionLike, FromRedisValue, RedisError, RedisResult, Value};

/// Connect timeout of every connection.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Write timeout of every connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The URL scheme that selects Redis Cluster.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// The seed nodes of a `redis+cluster://` URL as `redis://` URLs, or `None`
/// for a single-server URL. Each seed may carry `user:password@`; a
/// trailing `/` or `/0` is dropped (a cluster has only database 0).
pub fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix(CLUSTER_SCHEME)?;
    let rest = rest
        .strip_suffix("/0")
        .or_else(|| rest.strip_suffix('/'))
        .unwrap_or(rest);
    Some(
        rest.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| format!("redis://{s}"))
            .collect(),
    )
}

/// Checks a `--redis` value without connecting: a Redis URL, or a cluster
/// URL whose every seed is one.
pub fn check_url(url: &str) -> Result<(), RedisError> {
    match cluster_seeds(url) {
        None => ::redis::Client::open(url).map(drop),
        Some(seeds) if seeds.is_empty() => Err(RedisError::from((
            ::redis::ErrorKind::InvalidClientConfig,
            "a redis+cluster:// URL needs at least one HOST:PORT",
        ))),
        Some(seeds) => seeds
            .iter()
            .try_for_each(|s| ::redis::Client::open(s.as_str()).map(drop)),
    }
}

/// Where a reader blocks in `XREAD`, for the waker: the connection's client
/// id and, on a cluster, the node's address. Client ids are per server, so
/// on a cluster `CLIENT UNBLOCK` must go to that node and not to whatever
/// the waker's slot map says owns the partition (after a slot moves it may
/// unblock another reader with the same id there).
///
/// A lock rather than atomics so id and node change together; it is taken
/// once per wake-up and per id check, never per message.
#[derive(Debug, Default)]
pub(crate) struct Blocker(Mutex<Option<ReaderConn>>);

/// A reader's client id and, on a cluster, its node (host, port).
pub(crate) type ReaderConn = (i64, Option<(String, u16)>);

impl Blocker {
    /// Publishes the reader's connection, or `None` while it has none.
    pub(crate) fn set(&self, to: Option<ReaderConn>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = to;
    }

    /// The reader's connection, if it has one.
    pub(crate) fn get(&self) -> Option<ReaderConn> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The `id` and `laddr` (the server address this connection reached) of a
/// `CLIENT INFO` line; `laddr` is missing before Redis 6.2.
pub(crate) fn parse_client_info(info: &str) -> Option<ReaderConn> {
    let field = |name: &str| {
        info.split_ascii_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let id = field("id")?.parse().ok()?;
    let node = field("laddr").and_then(|a| {
        let (host, port) = a.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some((host.to_owned(), port.parse().ok()?))
    });
    Some((id, node))
}

/// One blocking connection to a server or to a cluster.
pub(crate) enum Conn {
    /// A single Redis server.
    Node(Connection),
    /// A Redis Cluster (boxed: it is much larger than a connection).
    Cluster(Box<ClusterConnection>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Node(_) => "Conn::Node",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

/// Opens one blocking connection with a read timeout.
pub(crate) fn open(url: &str, read_timeout: Option<Duration>) -> RedisResult<Conn> {
    match cluster_seeds(url) {
        None => {
            let client = ::redis::Client::open(url)?;
            let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
            conn.set_read_timeout(read_timeout)?;
            conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
            Ok(Conn::Node(conn))
        }
        Some(seeds) => {
            let mut builder = ClusterClientBuilder::new(seeds).connection_timeout(CONNECT_TIMEOUT);
            if let Some(t) = read_timeout {
                builder = builder.response_timeout(t);
            }
            let conn = builder.build()?.get_connection()?;
            conn.set_read_timeout(read_timeout)?;
            conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
            Ok(Conn::Cluster(Box::new(conn)))
        }
    }
}

impl Conn {
    /// Whether this is a cluster connection.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Sends a keyless command to the node that serves `key` (on a single
    /// server, to the server): `CLIENT ID` and `CLIENT UNBLOCK` must reach
    /// the very connection that reads `key`.
    pub(crate) fn query_at<T: FromRedisValue>(&mut self, key: &str, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Node(c) => cmd.query(c),
            Conn::Cluster(c) => {
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                let v = c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )?;
                Ok(T::from_redis_value(v)?)
            }
        }
    }

    /// The client id (and on a cluster the node) of the connection that
    /// serves `key`, for [`Blocker::set`].
    pub(crate) fn whoami(&mut self, key: &str) -> RedisResult<ReaderConn> {
        match self {
            Conn::Node(c) => Ok((::redis::cmd("CLIENT").arg("ID").query(c)?, None)),
            Conn::Cluster(_) => {
                let info: String = self.query_at(key, ::redis::cmd("CLIENT").arg("INFO"))?;
                parse_client_info(&info).ok_or_else(|| {
                    RedisError::from((
                        ::redis::ErrorKind::UnexpectedReturnType,
                        "CLIENT INFO without an id",
                    ))
                })
            }
        }
    }

    /// `CLIENT UNBLOCK id` on the node `node` (as published in a
    /// [`Blocker`]), or the node serving `key` when the node is unknown.
    pub(crate) fn unblock(
        &mut self,
        id: i64,
        node: Option<&(String, u16)>,
        key: &str,
    ) -> RedisResult<bool> {
        let cmd = ::redis::cmd("CLIENT").arg("UNBLOCK").arg(id).clone();
        let n: i64 = match (self, node) {
            (Conn::Cluster(c), Some((host, port))) => {
                let v = c.route_command(
                    &cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    }),
                )?;
                i64::from_redis_value(v)?
            }
            (conn, _) => conn.query_at(key, &cmd)?,
        };
        Ok(n == 1)
    }

    /// Sends `cmds` in one pipeline per node. On one server a refused
    /// command is answered in place (`Value::ServerError`); the crate's
    /// cluster pipeline has no such mode, so there a refusal fails the
    /// batch (each publisher is told and may retry).
    pub(crate) fn pipeline_each(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Node(c) => {
                let mut pipe = ::redis::pipe();
                pipe.ignore_errors();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(c)
            }
            Conn::Cluster(c) => {
                let mut pipe = ::redis::cluster::cluster_pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(c)
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(cmd, offset, count),
            // Routed whole by the first command's key: one slot only (see
            // the module docs).
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Node(c) => c.req_command(cmd),
            Conn::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }

    fn supports_pipelining(&self) -> bool {
        // Single-slot pipelines only on a cluster; see the module docs.
        true
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Conn::Node(c) => c.check_connection(),
            Conn::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Conn::Node(c) => c.is_open(),
            Conn::Cluster(c) => c.is_open(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_list_their_seeds() {
        assert_eq!(cluster_seeds("redis://127.0.0.1:6379/0"), None);
        assert_eq!(
            cluster_seeds("redis+cluster://10.0.0.1:7000, 10.0.0.2:7001/").unwrap(),
            vec!["redis://10.0.0.1:7000", "redis://10.0.0.2:7001"]
        );
        assert_eq!(
            cluster_seeds("redis+cluster://u:p@h:1/0").unwrap(),
            vec!["redis://u:p@h:1"]
        );
        assert!(check_url("redis+cluster://h:1,h:2").is_ok());
        assert!(check_url("redis+cluster://").is_err());
        assert!(check_url("http://nope").is_err());
    }

    #[test]
    fn client_info_gives_the_id_and_the_node() {
        let line = "id=12 addr=127.0.0.1:54830 laddr=127.0.0.1:42271 fd=24 name= cmd=client|info";
        assert_eq!(
            parse_client_info(line),
            Some((12, Some(("127.0.0.1".into(), 42271))))
        );
        assert_eq!(parse_client_info("id=3 addr=x:1 fd=5"), Some((3, None)));
        assert_eq!(parse_client_info("addr=x:1"), None);
    }
}
