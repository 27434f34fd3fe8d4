//! The HTTP/1.1 WebSocket upgrade (RFC 6455 §4.2), with no IO.
//!
//! Owns: parsing the client's request head into an [`UpgradeRequest`],
//! choosing the subprotocol, and writing the bytes of the `101` answer or of a
//! plain HTTP error. It never touches a socket and knows nothing of paths,
//! origins or tokens beyond extracting them: the connection layer decides
//! those and reports refusals through the [`HandshakeError`] variants it
//! constructs itself (`NotFound`, `OriginNotAllowed`, ...).
//!
//! Invariants: no panic on any input; a client-supplied value is echoed in an
//! error only `Debug`-escaped and cut to [`ECHO_MAX`] bytes, so an error is
//! always one short line.

use thiserror::Error;

/// Most request headers accepted. Browsers send about 15–20 on an upgrade;
/// more than this is refused with 431 rather than growing the parse array
/// (it lives on the stack, one slot per header).
pub const MAX_HEADERS: usize = 64;

/// The one subprotocol ringcast speaks (docs/PROTOCOL.md §1).
pub const PROTOCOL_V1: &str = "ringcast.v1";

/// Longest slice, in bytes, of a client-supplied value quoted in an error, so
/// a hostile 8 KiB header never becomes an 8 KiB log line or response body.
pub const ECHO_MAX: usize = 64;

/// The parts of a valid upgrade request the connection layer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// Request path without the query, e.g. `/ws`.
    pub path: String,
    /// Everything after the first `?`, without it (`Some("")` for `/ws?`).
    pub query: Option<String>,
    /// `Sec-WebSocket-Key`, already checked to be 16 base64-encoded bytes.
    pub key: String,
    /// `Origin`, when the client sent one (browsers always do).
    pub origin: Option<String>,
    /// Every `Sec-WebSocket-Protocol` token, trimmed, in order, across
    /// repeated headers; empty when none was offered.
    pub protocols: Vec<String>,
    /// Raw `Sec-WebSocket-Extensions` header values (trimmed), one per header
    /// line, for the extension negotiation to parse.
    pub extensions: Vec<String>,
    /// `User-Agent` (the first one), for the few clients whose extension
    /// support is known broken; not kept past the upgrade.
    pub user_agent: Option<String>,
    /// `X-Forwarded-For` entries, in order across repeated headers (each
    /// list split at commas, trimmed). Read only for a connection from a
    /// trusted proxy (`ws::proxy::forwarded_client`); ignored otherwise.
    pub forwarded_for: Vec<String>,
}

/// Why an upgrade is refused. Each variant maps to one HTTP status
/// ([`HandshakeError::status`]); its `Display` is the one-line body of the
/// error response. The first group comes from [`parse_request`], the second
/// is constructed by the connection layer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The bytes are not an HTTP/1.x request head.
    #[error("malformed HTTP request: {0}")]
    Malformed(httparse::Error),
    /// The head did not end within the configured limit (431).
    #[error("request head exceeds {max} bytes")]
    HeadTooLarge {
        /// The configured `max_head_bytes`.
        max: usize,
    },
    /// More than [`MAX_HEADERS`] header lines (431).
    #[error("request has more than {max} headers")]
    TooManyHeaders {
        /// The limit, [`MAX_HEADERS`].
        max: usize,
    },
    /// HTTP/1.0: RFC 6455 §4.1 needs HTTP/1.1 or later.
    #[error("HTTP/1.{minor} request; WebSocket needs HTTP/1.1")]
    HttpVersion {
        /// The minor version the client sent.
        minor: u8,
    },
    /// The method is not `GET`.
    #[error("method {method:?} is not GET")]
    NotGet {
        /// The method sent (cut to [`ECHO_MAX`] bytes).
        method: String,
    },
    /// No `Upgrade` header at all.
    #[error("missing \"Upgrade: websocket\" header")]
    MissingUpgrade,
    /// An `Upgrade` header that does not name `websocket`.
    #[error("Upgrade header {value:?} does not name websocket")]
    InvalidUpgrade {
        /// The first `Upgrade` value (cut to [`ECHO_MAX`] bytes).
        value: String,
    },
    /// No `upgrade` token in any `Connection` header.
    #[error("missing \"upgrade\" token in Connection header")]
    MissingConnectionUpgrade,
    /// No `Sec-WebSocket-Key` header.
    #[error("missing Sec-WebSocket-Key header")]
    MissingKey,
    /// A `Sec-WebSocket-Key` that is not 16 base64-encoded bytes.
    #[error("Sec-WebSocket-Key {key:?} is not 16 base64-encoded bytes")]
    InvalidKey {
        /// The key sent (cut to [`ECHO_MAX`] bytes).
        key: String,
    },
    /// A header that must appear at most once appeared again.
    #[error("repeated {name} header")]
    DuplicateHeader {
        /// The header's canonical name.
        name: &'static str,
    },
    /// A header ringcast keeps as text is not UTF-8.
    #[error("{name} header is not valid UTF-8")]
    NonUtf8Header {
        /// The header's canonical name.
        name: &'static str,
    },
    /// No `Sec-WebSocket-Version` header (426).
    #[error("missing Sec-WebSocket-Version header (only 13)")]
    MissingVersion,
    /// A version other than 13 (426).
    #[error("unsupported WebSocket version {version:?} (only 13)")]
    UnsupportedVersion {
        /// The version value(s) sent, comma-joined (cut to [`ECHO_MAX`] bytes).
        version: String,
    },
    /// The path is not a WebSocket endpoint (404).
    #[error("no WebSocket endpoint at {path:?}")]
    NotFound {
        /// The requested path, without query.
        path: String,
    },
    /// The `Origin` is not allow-listed (403). Only a request that sends
    /// an `Origin` can get this: one without (not a browser, which could
    /// send any value it liked) passes the allowlist, which exists to keep
    /// other sites' pages in a browser from connecting.
    #[error("origin {origin:?} is not allowed")]
    OriginNotAllowed {
        /// The `Origin` sent (its first [`ECHO_MAX`] characters; may be empty).
        origin: String,
    },
    /// Only unknown subprotocols were offered (400).
    #[error("none of the offered subprotocols {offered:?} is supported (only ringcast.v1)")]
    UnsupportedProtocol {
        /// The offered tokens, in order.
        offered: Vec<String>,
    },
    /// The token in `?token=` was refused (401). The reason is static so a
    /// token can never leak into a response or a log line.
    #[error("unauthorized: {reason}")]
    Unauthorized {
        /// Why, e.g. "token expired".
        reason: &'static str,
    },
    /// Too many connections or upgrades from this address (429).
    #[error("too many requests: {reason}")]
    TooManyConnections {
        /// Which limit, e.g. "max_connections_per_ip reached for this address".
        reason: &'static str,
    },
    /// The server is full or draining (503).
    #[error("service unavailable: {reason}")]
    Unavailable {
        /// Why, e.g. "server is draining".
        reason: &'static str,
    },
    /// The request head did not arrive in time (408).
    #[error("request head not received in time")]
    Timeout,
    /// A trusted proxy's PROXY header or `X-Forwarded-For` does not name
    /// an address (400).
    #[error(transparent)]
    Proxy(#[from] super::proxy::ProxyError),
}

impl HandshakeError {
    /// The HTTP status this refusal is answered with. Oversized heads get 431
    /// (Request Header Fields Too Large, RFC 6585) rather than a bare 400, so
    /// an operator can tell a limit from a broken client.
    pub fn status(&self) -> u16 {
        use HandshakeError as E;
        match self {
            E::HeadTooLarge { .. } | E::TooManyHeaders { .. } => 431,
            E::Malformed(_)
            | E::HttpVersion { .. }
            | E::NotGet { .. }
            | E::MissingUpgrade
            | E::InvalidUpgrade { .. }
            | E::MissingConnectionUpgrade
            | E::MissingKey
            | E::InvalidKey { .. }
            | E::DuplicateHeader { .. }
            | E::NonUtf8Header { .. }
            | E::UnsupportedProtocol { .. }
            | E::Proxy(_) => 400,
            E::MissingVersion | E::UnsupportedVersion { .. } => 426,
            E::NotFound { .. } => 404,
            E::OriginNotAllowed { .. } => 403,
            E::Unauthorized { .. } => 401,
            E::TooManyConnections { .. } => 429,
            E::Unavailable { .. } => 503,
            E::Timeout => 408,
        }
    }
}

/// Parses an upgrade request head from the start of `buf`.
///
/// `Ok(None)` means the head is not complete yet: read more and call again
/// with the whole buffer. `Ok(Some((req, consumed)))` means the head was
/// parsed; `consumed` is its length including the final CRLFCRLF (bytes after
/// it belong to the WebSocket stream). Only the first `max_head_bytes` bytes
/// are ever looked at; a head that does not end within them is
/// [`HandshakeError::HeadTooLarge`].
///
/// Checks, in order: HTTP syntax and size, then the 400s (HTTP version,
/// method, `Upgrade`, `Connection`, key, duplicate or non-UTF-8 headers kept
/// as text), then the 426s (version). `Host` is not required.
pub fn parse_request(
    buf: &[u8],
    max_head_bytes: usize,
) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
    let window = buf.get(..max_head_bytes).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        // The first `max_head_bytes` bytes hold no complete head: it is too long.
        Ok(httparse::Status::Partial) if buf.len() >= max_head_bytes => {
            return Err(HandshakeError::HeadTooLarge {
                max: max_head_bytes,
            })
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::TooManyHeaders { max: MAX_HEADERS })
        }
        Err(e) => return Err(HandshakeError::Malformed(e)),
    };
    Ok(Some((validate(&req)?, consumed)))
}

/// Applies the RFC 6455 §4.2.1 rules to a complete head.
fn validate(req: &httparse::Request<'_, '_>) -> Result<UpgradeRequest, HandshakeError> {
    // A complete parse always fills version, method and path.
    let minor = req.version.unwrap_or(0);
    if minor < 1 {
        return Err(HandshakeError::HttpVersion { minor });
    }
    let method = req.method.unwrap_or("");
    if method != "GET" {
        return Err(HandshakeError::NotGet {
            method: echo(method),
        });
    }
    let headers: &[httparse::Header<'_>] = req.headers;
    check_upgrade(headers)?;
    check_connection(headers)?;
    let key = check_key(headers)?;
    let origin = single(headers, "Origin")?
        .map(|v| text(v, "Origin").map(str::to_owned))
        .transpose()?;
    let protocols = protocols(headers)?;
    let extensions = values(headers, "Sec-WebSocket-Extensions")
        .map(|v| text(v, "Sec-WebSocket-Extensions").map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()?;
    // Not checked further: only compared with known broken clients.
    let user_agent = values(headers, "User-Agent")
        .next()
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|v| v.chars().take(256).collect());
    let forwarded_for = values(headers, "X-Forwarded-For")
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|e| e.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|e| !e.is_empty())
        .collect();
    check_version(headers)?;
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
        None => (target.to_owned(), None),
    };
    Ok(UpgradeRequest {
        path,
        query,
        key,
        origin,
        protocols,
        extensions,
        user_agent,
        forwarded_for,
    })
}

/// Values of every header called `name` (case-insensitive), trimmed.
fn values<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.trim_ascii())
}

/// The value of a header that may appear at most once.
fn single<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'static str,
) -> Result<Option<&'h [u8]>, HandshakeError> {
    let mut found = values(headers, name);
    let first = found.next();
    match found.next() {
        Some(_) => Err(HandshakeError::DuplicateHeader { name }),
        None => Ok(first),
    }
}

/// A header value as UTF-8 text.
fn text<'v>(value: &'v [u8], name: &'static str) -> Result<&'v str, HandshakeError> {
    std::str::from_utf8(value).map_err(|_| HandshakeError::NonUtf8Header { name })
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn check_upgrade(headers: &[httparse::Header<'_>]) -> Result<(), HandshakeError> {
    if values(headers, "Upgrade").any(|v| has_token(v, "websocket")) {
        return Ok(());
    }
    match values(headers, "Upgrade").next() {
        None => Err(HandshakeError::MissingUpgrade),
        Some(v) => Err(HandshakeError::InvalidUpgrade {
            value: echo(&String::from_utf8_lossy(v)),
        }),
    }
}

fn check_connection(headers: &[httparse::Header<'_>]) -> Result<(), HandshakeError> {
    // Firefox sends `Connection: keep-alive, Upgrade`.
    if values(headers, "Connection").any(|v| has_token(v, "upgrade")) {
        Ok(())
    } else {
        Err(HandshakeError::MissingConnectionUpgrade)
    }
}

fn check_key(headers: &[httparse::Header<'_>]) -> Result<String, HandshakeError> {
    let key = single(headers, "Sec-WebSocket-Key")?.ok_or(HandshakeError::MissingKey)?;
    let text = String::from_utf8_lossy(key);
    if is_base64_of_16_bytes(key) {
        Ok(text.into_owned())
    } else {
        Err(HandshakeError::InvalidKey { key: echo(&text) })
    }
}

/// 16 bytes encode to 22 base64 characters plus `==` (RFC 4648 §4). The
/// unused low bits of the last character are not checked: a lenient decoder
/// still gets 16 bytes, which is what RFC 6455 §4.2.1 asks.
fn is_base64_of_16_bytes(key: &[u8]) -> bool {
    match key {
        [body @ .., b'=', b'='] if body.len() == 22 => body
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'),
        _ => false,
    }
}

fn protocols(headers: &[httparse::Header<'_>]) -> Result<Vec<String>, HandshakeError> {
    let mut out = Vec::new();
    for value in values(headers, "Sec-WebSocket-Protocol") {
        let value = text(value, "Sec-WebSocket-Protocol")?;
        let tokens = value.split(',').map(str::trim).filter(|t| !t.is_empty());
        out.extend(tokens.map(str::to_owned));
    }
    Ok(out)
}

fn check_version(headers: &[httparse::Header<'_>]) -> Result<(), HandshakeError> {
    let sent: Vec<&[u8]> = values(headers, "Sec-WebSocket-Version").collect();
    match sent.as_slice() {
        [] => Err(HandshakeError::MissingVersion),
        [b"13"] => Ok(()),
        _ => {
            let joined: Vec<_> = sent.iter().map(|v| String::from_utf8_lossy(v)).collect();
            Err(HandshakeError::UnsupportedVersion {
                version: echo(&joined.join(", ")),
            })
        }
    }
}

/// A client-supplied value cut to [`ECHO_MAX`] bytes at a char boundary.
fn echo(value: &str) -> String {
    let end = value.floor_char_boundary(ECHO_MAX);
    value.get(..end).unwrap_or(value).to_owned()
}

/// Picks the subprotocol to answer with (docs/PROTOCOL.md §1): `ringcast.v1` when
/// offered, none when nothing was offered (the client is served v1 anyway),
/// and [`HandshakeError::UnsupportedProtocol`] (400) when only unknown ones
/// were. Tokens compare case-sensitively, as RFC 6455 §4.1 says.
pub fn choose_protocol(offered: &[String]) -> Result<Option<&'static str>, HandshakeError> {
    if offered.is_empty() {
        Ok(None)
    } else if offered.iter().any(|p| p == PROTOCOL_V1) {
        Ok(Some(PROTOCOL_V1))
    } else {
        Err(HandshakeError::UnsupportedProtocol {
            offered: offered.to_vec(),
        })
    }
}

/// The `101 Switching Protocols` answer for `key` (the request's
/// `Sec-WebSocket-Key`), with `Sec-WebSocket-Protocol: {p}` when `protocol`
/// is `Some`.
pub fn accept_response(key: &str, protocol: Option<&str>, extension: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = protocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    if let Some(e) = extension {
        out.push_str("Sec-WebSocket-Extensions: ");
        out.push_str(e);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A plain HTTP error answer for `err`: its status with the standard reason
/// phrase, `Content-Type: text/plain`, `Content-Length`, `Connection: close`,
/// and the error's one-line `Display` plus `\n` as the body. A 426 also
/// carries `Sec-WebSocket-Version: 13` (RFC 6455 §4.4).
pub fn error_response(err: &HandshakeError) -> Vec<u8> {
    let status = err.status();
    // Display is one line by construction; this keeps it so whatever a
    // caller-built variant holds.
    let body = format!("{err}").replace(|c: char| c.is_control(), " ") + "\n";
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\n\
         Content-Type: text/plain\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n",
        reason_phrase(status),
        body.len()
    );
    if status == 426 {
        out.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

/// RFC 9110 / RFC 6585 reason phrases for the statuses used here.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    const CHROMIUM: &str = "GET /ws?token=abc.def HTTP/1.1\r\n\
        Host: localhost:8080\r\n\
        Connection: Upgrade\r\n\
        Pragma: no-cache\r\n\
        Cache-Control: no-cache\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/124.0.0.0 Safari/537.36\r\n\
        Upgrade: websocket\r\n\
        Origin: http://localhost:8080\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Accept-Encoding: gzip, deflate, br, zstd\r\n\
        Accept-Language: en-US,en;q=0.9\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
        Sec-WebSocket-Protocol: ringcast.v1, chat\r\n\
        \r\n";

    /// A minimal valid request with `extra` header lines (each ending CRLF).
    fn request(extra: &str) -> String {
        format!(
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn parse(raw: &[u8]) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
        parse_request(raw, MAX)
    }

    fn parse_err(raw: &str) -> HandshakeError {
        parse(raw.as_bytes()).expect_err("request must be refused")
    }

    fn complete(raw: &[u8]) -> UpgradeRequest {
        parse(raw).expect("valid").expect("complete").0
    }

    #[test]
    fn accept_key_matches_rfc_6455_vector() {
        let response =
            String::from_utf8(accept_response("dGhlIHNhbXBsZSBub25jZQ==", None, None)).unwrap();
        assert_eq!(
            response,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn accept_response_echoes_protocol() {
        let response = String::from_utf8(accept_response(
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some("ringcast.v1"),
            Some("permessage-deflate; server_no_context_takeover"),
        ))
        .unwrap();
        assert!(response.ends_with(
            "\r\nSec-WebSocket-Protocol: ringcast.v1\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n"
        ));
    }

    #[test]
    fn parses_chromium_request() {
        let mut raw = CHROMIUM.as_bytes().to_vec();
        raw.extend_from_slice(b"\x81\x80"); // the first frame, already read
        let (req, consumed) = parse(&raw).unwrap().unwrap();
        assert_eq!(consumed, CHROMIUM.len());
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query.as_deref(), Some("token=abc.def"));
        assert_eq!(req.key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(req.origin.as_deref(), Some("http://localhost:8080"));
        assert_eq!(req.protocols, ["ringcast.v1", "chat"]);
        assert_eq!(
            req.extensions,
            ["permessage-deflate; client_max_window_bits"]
        );
    }

    #[test]
    fn accepts_firefox_style_and_no_host() {
        let req = complete(
            b"GET /ws HTTP/1.1\r\nconnection: keep-alive, Upgrade\r\nupgrade: WebSocket\r\n\
              sec-websocket-key: AQIDBAUGBwgJCgsMDQ4PEA==\r\nsec-websocket-version:13\r\n\r\n",
        );
        assert_eq!(req.key, "AQIDBAUGBwgJCgsMDQ4PEA==");
        assert_eq!(req.origin, None);
        assert_eq!(req.query, None);
        assert!(req.protocols.is_empty() && req.extensions.is_empty());
    }

    #[test]
    fn incremental_feeding_needs_more_until_complete() {
        let raw = CHROMIUM.as_bytes();
        for end in 0..raw.len() {
            assert_eq!(parse(&raw[..end]), Ok(None), "prefix of {end} bytes");
        }
        assert_eq!(parse(raw).unwrap().unwrap().1, raw.len());
    }

    #[test]
    fn splits_query() {
        let raw = request("").replace("/ws", "/ws?token=a?b&x=1");
        let req = complete(raw.as_bytes());
        assert_eq!(
            (req.path.as_str(), req.query.as_deref()),
            ("/ws", Some("token=a?b&x=1"))
        );
        let req = complete(request("").replace("/ws", "/ws?").as_bytes());
        assert_eq!(req.query.as_deref(), Some(""));
    }

    #[test]
    fn collects_protocols_across_headers() {
        let req = complete(
            request("Sec-WebSocket-Protocol: a , b,,\r\nsec-websocket-protocol:  ringcast.v1\r\n")
                .as_bytes(),
        );
        assert_eq!(req.protocols, ["a", "b", "ringcast.v1"]);
    }

    #[test]
    fn oversized_head_is_431() {
        let raw = request(&format!("X-Pad: {}\r\n", "a".repeat(MAX)));
        let err = parse_err(&raw);
        assert_eq!(err, HandshakeError::HeadTooLarge { max: MAX });
        assert_eq!(err.status(), 431);
        // Partial and already at the limit: no complete head can fit.
        assert_eq!(
            parse(&raw.as_bytes()[..MAX]),
            Err(HandshakeError::HeadTooLarge { max: MAX })
        );
        assert_eq!(parse(&raw.as_bytes()[..MAX - 1]), Ok(None));
        // A head exactly at the limit is fine.
        let exact = request("");
        assert!(parse_request(exact.as_bytes(), exact.len())
            .unwrap()
            .is_some());
    }

    #[test]
    fn too_many_headers_is_431() {
        let extra: String = (0..MAX_HEADERS).map(|i| format!("X-H{i}: v\r\n")).collect();
        let err = parse_err(&request(&extra));
        assert_eq!(err, HandshakeError::TooManyHeaders { max: MAX_HEADERS });
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn garbage_is_malformed() {
        for raw in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET\0/ HTTP/1.1\r\n\r\n",
            b"HELLO WORLD\r\n\r\n",
        ] {
            let err = parse(raw).expect_err("garbage");
            assert!(matches!(err, HandshakeError::Malformed(_)), "{err:?}");
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn non_utf8_values() {
        // Ignored where ringcast does not keep the header...
        let mut raw = request("User-Agent: cafe\r\n").into_bytes();
        let at = raw.windows(4).position(|w| w == b"cafe").unwrap() + 3;
        raw[at] = 0xE9;
        assert!(complete(&raw).origin.is_none());
        // ...refused where it does.
        let mut raw = request("Origin: http://x\r\n").into_bytes();
        let at = raw.windows(8).position(|w| w == b"http://x").unwrap() + 7;
        raw[at] = 0xFF;
        assert_eq!(
            parse(&raw),
            Err(HandshakeError::NonUtf8Header { name: "Origin" })
        );
        let mut raw = request("Sec-WebSocket-Protocol: ab\r\n").into_bytes();
        let at = raw.windows(2).position(|w| w == b"ab").unwrap();
        raw[at] = 0xC3;
        let err = parse(&raw).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::NonUtf8Header {
                name: "Sec-WebSocket-Protocol"
            }
        );
    }

    #[test]
    fn http_1_0_and_wrong_method() {
        let err = parse_err(&request("").replace("HTTP/1.1", "HTTP/1.0"));
        assert_eq!(err, HandshakeError::HttpVersion { minor: 0 });
        let err = parse_err(&request("").replace("GET", "POST"));
        assert_eq!(
            err,
            HandshakeError::NotGet {
                method: "POST".into()
            }
        );
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn upgrade_header_errors() {
        let err = parse_err(&request("").replace("Upgrade: websocket\r\n", ""));
        assert_eq!(err, HandshakeError::MissingUpgrade);
        let err = parse_err(&request("").replace("Upgrade: websocket", "Upgrade: h2c"));
        assert_eq!(
            err,
            HandshakeError::InvalidUpgrade {
                value: "h2c".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "Upgrade header \"h2c\" does not name websocket"
        );
    }

    #[test]
    fn connection_header_errors() {
        let err = parse_err(&request("").replace("Connection: Upgrade", "Connection: keep-alive"));
        assert_eq!(err, HandshakeError::MissingConnectionUpgrade);
        let err = parse_err(&request("").replace("Connection: Upgrade\r\n", ""));
        assert_eq!(err.status(), 400);
        // A token, not a substring.
        let err = parse_err(&request("").replace("Connection: Upgrade", "Connection: upgraded"));
        assert_eq!(err, HandshakeError::MissingConnectionUpgrade);
    }

    #[test]
    fn key_errors() {
        let base = request("");
        let err = parse_err(&base.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""));
        assert_eq!(err, HandshakeError::MissingKey);
        assert_eq!(err.to_string(), "missing Sec-WebSocket-Key header");
        for bad in [
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBs*SBub25jZQ==",
            "dGhlIHNhbXBsZSBub25jZQ===",
        ] {
            let err = parse_err(&base.replace("dGhlIHNhbXBsZSBub25jZQ==", bad));
            assert_eq!(err, HandshakeError::InvalidKey { key: bad.into() });
            assert_eq!(err.status(), 400);
        }
        let long = "A".repeat(1000);
        let HandshakeError::InvalidKey { key } =
            parse_err(&base.replace("dGhlIHNhbXBsZSBub25jZQ==", &long))
        else {
            panic!("expected InvalidKey");
        };
        assert_eq!(key.len(), ECHO_MAX);
        let err = parse_err(&request("Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"));
        assert_eq!(
            err,
            HandshakeError::DuplicateHeader {
                name: "Sec-WebSocket-Key"
            }
        );
        let err = parse_err(&request("Origin: a\r\nOrigin: b\r\n"));
        assert_eq!(err, HandshakeError::DuplicateHeader { name: "Origin" });
    }

    #[test]
    fn version_errors_are_426_and_come_last() {
        let base = request("");
        let err = parse_err(&base.replace("Sec-WebSocket-Version: 13\r\n", ""));
        assert_eq!(err, HandshakeError::MissingVersion);
        assert_eq!(err.status(), 426);
        let err = parse_err(&base.replace("Version: 13", "Version: 8"));
        assert_eq!(
            err.to_string(),
            "unsupported WebSocket version \"8\" (only 13)"
        );
        let err = parse_err(&request("Sec-WebSocket-Version: 8\r\n"));
        assert_eq!(
            err,
            HandshakeError::UnsupportedVersion {
                version: "13, 8".into()
            }
        );
        // A 400 wins over a 426.
        let err = parse_err(
            &base
                .replace("Version: 13", "Version: 8")
                .replace("Upgrade: websocket\r\n", ""),
        );
        assert_eq!(err, HandshakeError::MissingUpgrade);
    }

    #[test]
    fn statuses_of_connection_layer_variants() {
        let cases = [
            (HandshakeError::NotFound { path: "/x".into() }, 404),
            (
                HandshakeError::OriginNotAllowed {
                    origin: "http://evil".into(),
                },
                403,
            ),
            (
                HandshakeError::UnsupportedProtocol {
                    offered: vec!["chat".into()],
                },
                400,
            ),
            (
                HandshakeError::Unauthorized {
                    reason: "token expired",
                },
                401,
            ),
            (
                HandshakeError::TooManyConnections {
                    reason: "max_connections_per_ip reached for this address",
                },
                429,
            ),
            (
                HandshakeError::Unavailable {
                    reason: "server is draining",
                },
                503,
            ),
            (HandshakeError::Timeout, 408),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err}");
            let text = String::from_utf8(error_response(&err)).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            assert!(
                !text.contains("Error\r\n"),
                "standard reason phrase: {text}"
            );
        }
    }

    #[test]
    fn error_response_layout() {
        let text = String::from_utf8(error_response(&HandshakeError::MissingKey)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 33\r\n\
             Connection: close\r\n\r\nmissing Sec-WebSocket-Key header\n"
        );
        let err = HandshakeError::UnsupportedVersion {
            version: "8".into(),
        };
        let text = String::from_utf8(error_response(&err)).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        let err = HandshakeError::NotFound {
            path: "/a\nb".into(),
        };
        let text = String::from_utf8(error_response(&err)).unwrap();
        assert_eq!(text.split_once("\r\n\r\n").unwrap().1.lines().count(), 1);
    }

    #[test]
    fn protocol_choice() {
        let v = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(choose_protocol(&[]), Ok(None));
        assert_eq!(
            choose_protocol(&v(&["chat", "ringcast.v1"])),
            Ok(Some("ringcast.v1"))
        );
        assert_eq!(
            choose_protocol(&v(&["ringcast.v1"])),
            Ok(Some("ringcast.v1"))
        );
        let err = choose_protocol(&v(&["chat", "RINGCAST.V1"])).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::UnsupportedProtocol {
                offered: v(&["chat", "RINGCAST.V1"])
            }
        );
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("\"chat\""), "{err}");
    }
}
