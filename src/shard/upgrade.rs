//! The upgrade: caps at accept, then the HTTP request parsed and checked
//! in docs/PROTOCOL.md order, answered with 101 and `welcome`, or refused
//! with a plain HTTP error.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Buf, Bytes, BytesMut};
use tracing::debug;

use super::conn::{AfterFlush, Conn, Phase};
use super::Shard;
use crate::auth::Identity;
use crate::metrics::Disconnect;
use crate::protocol::encode_welcome;
use crate::ws::handshake::{self, HandshakeError, UpgradeRequest};
use crate::ws::proxy::{self, Preamble};

/// Counts a just-accepted connection toward the connection caps, or refuses
/// it at once with 429/503 (before its request is read: a socket that never
/// sends one would otherwise escape every cap until `handshake_timeout`).
pub(crate) fn admit(shard: &Rc<Shard>, conn: &Rc<Conn>) -> bool {
    match shard.admit(conn.peer.get()) {
        Ok(()) => conn.counted.set(true),
        Err(e) => refuse(shard, conn, &e),
    }
    conn.counted.get()
}

/// Parses the upgrade request once it is complete, and answers it. From a
/// trusted proxy, the connection is not counted yet: its client's address
/// comes first, from a PROXY header or from `X-Forwarded-For`.
pub(super) fn handshake(shard: &Rc<Shard>, conn: &Rc<Conn>, buf: &mut BytesMut) {
    let via_proxy = !conn.counted.get();
    if via_proxy {
        match proxy::parse_preamble(buf, shard.config.max_handshake_size) {
            Ok(Preamble::Absent) => {}
            Ok(Preamble::Incomplete) => return,
            Ok(Preamble::Found { client, len }) => {
                buf.advance(len);
                if let Some(ip) = client {
                    set_client(conn, ip);
                }
                // A client that is not itself a proxy is known: count it now,
                // so it cannot idle past the caps until its request arrives.
                if !shard.trusts(conn.peer.get()) && !admit(shard, conn) {
                    return;
                }
            }
            Err(e) => return refuse(shard, conn, &HandshakeError::Proxy(e)),
        }
    }
    let parsed = handshake::parse_request(buf, shard.config.max_handshake_size);
    match parsed {
        Ok(None) => {}
        Ok(Some((req, used))) => {
            buf.advance(used);
            if !conn.counted.get() {
                let trusts = |ip| shard.trusts(ip);
                match proxy::forwarded_client(conn.peer.get(), &req.forwarded_for, trusts) {
                    Ok(ip) => set_client(conn, ip),
                    Err(e) => return refuse(shard, conn, &HandshakeError::Proxy(e)),
                }
                if !admit(shard, conn) {
                    return;
                }
            }
            match accept(shard, &req, conn.peer.get()) {
                Ok((protocol, identity)) => {
                    let extension = negotiate_deflate(shard, conn, &req);
                    let resp = handshake::accept_response(&req.key, protocol, extension.as_deref());
                    shard.queue_unbounded(conn, Bytes::from(resp));
                    conn.set_identity(identity);
                    open(shard, conn);
                }
                Err(e) => refuse(shard, conn, &e),
            }
        }
        Err(e) => refuse(shard, conn, &e),
    }
}

/// Takes `ip` as the client's address of a connection from a trusted proxy.
fn set_client(conn: &Conn, ip: IpAddr) {
    let proxy = conn.peer.replace(ip);
    if proxy != ip {
        debug!(conn = conn.id.0, %proxy, client = %ip, "client address from a trusted proxy");
    }
}

/// permessage-deflate (docs/PROTOCOL.md section 1): takes the first
/// acceptable offer, counts every declined one by reason, and returns the
/// `Sec-WebSocket-Extensions` answer (echo mode too: the conformance
/// runner's compression cases run against it).
fn negotiate_deflate(shard: &Shard, conn: &Conn, req: &UpgradeRequest) -> Option<String> {
    if req.extensions.is_empty() {
        return None;
    }
    let offers: Vec<&str> = req.extensions.iter().map(String::as_str).collect();
    let n =
        crate::ws::deflate::negotiate(&offers, req.user_agent.as_deref(), shard.config.compression);
    for why in n.declined {
        shard.metrics.deflate_declined(why);
    }
    let agreed = n.agreed?;
    conn.deflate.set(agreed.server_window_bits);
    Some(agreed.response())
}

/// The checks after parsing, in docs/PROTOCOL.md order: path (404), origin
/// (403), the upgrade budget of the address (429), draining (503),
/// subprotocol, then the token (401). The connection caps were applied at
/// accept ([`admit`]). Returns the subprotocol to echo and the identity,
/// when the client is authenticated already.
type Accepted = (Option<&'static str>, Option<Rc<Identity>>);

pub(super) fn accept(
    shard: &Shard,
    req: &UpgradeRequest,
    peer: IpAddr,
) -> Result<Accepted, HandshakeError> {
    let cfg = &shard.config;
    if !cfg.echo && req.path != "/ws" {
        return Err(HandshakeError::NotFound {
            path: req.path.chars().take(64).collect(),
        });
    }
    // No Origin: not a browser, so nothing for the allowlist to protect
    // (see Config::allowed_origins).
    if let (Some(origin), false) = (&req.origin, cfg.allowed_origins.is_empty()) {
        if !cfg.allowed_origins.iter().any(|o| o == origin) {
            return Err(HandshakeError::OriginNotAllowed {
                origin: origin.chars().take(handshake::ECHO_MAX).collect(),
            });
        }
    }
    if !shard.handshake_allowed(peer) {
        return Err(HandshakeError::TooManyConnections {
            reason: "max_handshakes_per_ip: too many upgrades per second from this address",
        });
    }
    if shard.draining() {
        return Err(HandshakeError::Unavailable {
            reason: "server is draining",
        });
    }
    if cfg.echo {
        return Ok((None, Some(shard.anonymous.clone())));
    }
    let protocol = handshake::choose_protocol(&req.protocols)?;
    let Some(verifier) = &shard.auth else {
        return Ok((protocol, Some(shard.anonymous.clone())));
    };
    match query_token(req.query.as_deref()) {
        // Checked before the upgrade: a bad token never gets a WebSocket.
        Some(token) => match verifier.verify_shared(token, &shard.grants) {
            Ok(id) => Ok((protocol, Some(Rc::new(id)))),
            Err(e) => Err(HandshakeError::Unauthorized { reason: e.reason() }),
        },
        None => Ok((protocol, None)),
    }
}

/// The `token` parameter of a query string (JWTs need no URL decoding).
pub(super) fn query_token(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

/// Refuses the upgrade (or ends a handshake that took too long, with 408):
/// the plain HTTP answer with its one-line reason, then the socket is shut
/// once it is written, or at the close timeout if the client never reads it.
pub(crate) fn refuse(shard: &Shard, conn: &Rc<Conn>, err: &HandshakeError) {
    debug!(status = err.status(), reason = %err, "upgrade refused");
    shard.metrics.handshake_failed(err.status());
    shard.metrics.disconnect(Disconnect::Handshake);
    conn.set_closing(shard.now_ms(), shard.config.close_timeout);
    conn.after_flush
        .set(conn.after_flush.get().then(AfterFlush::Shut));
    conn.drop_carry();
    shard.queue_unbounded(conn, Bytes::from(handshake::error_response(err)));
}

pub(super) fn open(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    conn.phase.set(Phase::Open);
    conn.opened.set(true);
    conn.refilled.set(super::rate::centis(shard.now_ms()));
    shard.metrics.connections_active.fetch_add(1, Relaxed);
    let known = conn.read_identity(|i| i.is_some());
    if !known && shard.namespaces.any_anonymous() {
        // Some namespace admits clients without a token: serve it now; an
        // `auth` frame may still come later.
        conn.set_identity(Some(shard.guest.clone()));
    }
    if conn.read_identity(|i| i.is_some()) {
        welcome(shard, conn);
    } else {
        // The first frame must be `auth`, within auth_timeout (the sweep checks).
        conn.set_deadline(shard.now_ms(), shard.config.auth_timeout);
    }
}

pub(super) fn welcome(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    if !shard.config.echo {
        let hb = shard.config.heartbeat.as_secs();
        let welcome = encode_welcome(&shard.conn_name(conn.id), &shard.config.node_name, hb);
        shard.queue(conn, welcome);
    }
}
