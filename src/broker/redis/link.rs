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
}
