//! WebSocket (RFC 6455) server side, with no IO: the upgrade request parser
//! and response writer (`handshake`), and the frame codec (`frame`).
//!
//! Nothing here knows about topics, shards or sockets; the shard
//! (`shard/input.rs`, `shard/upgrade.rs`) feeds bytes in and writes what
//! comes out.

pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod proxy;
