//! Settings whose value is one of a closed list: the names they take in
//! flags, variables and the config file, and how `--help` shows them.

use std::fmt;

use serde::Deserialize;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// How shards watch and write their connections' sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum DataPath {
    /// Each shard's own io_uring: one standing poll per connection, a
    /// flush round's sends submitted together. Falls back to epoll where
    /// the kernel lacks it (or `MONOIO_FORCE_LEGACY_DRIVER` is set).
    #[serde(rename = "io_uring")]
    #[value(name = "io_uring")]
    IoUring,
    /// An epoll set per shard; one `recv` / `sendmsg` call per socket.
    #[serde(rename = "epoll")]
    Epoll,
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataPath::IoUring => "io_uring",
            DataPath::Epoll => "epoll",
        })
    }
}
