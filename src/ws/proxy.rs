//! The client's address behind a trusted proxy (`--trusted-proxies`): the
//! PROXY protocol header (v2, binary, as HAProxy's `send-proxy-v2` writes
//! it; v1, text, as nginx's stream module writes it) that precedes the
//! upgrade request, and the `X-Forwarded-For` header an HTTP proxy adds.
//!
//! Only connections from a trusted proxy are ever looked at here: from
//! anywhere else both are ignored (a PROXY header is then just a malformed
//! HTTP request, and `X-Forwarded-For` a header nobody reads), so a client
//! cannot choose the address its per-address limits are counted against.
//! Like the rest of `ws`, this does no IO.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every PROXY v2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Fixed part of a v2 header: signature, version/command, family, length.
const V2_FIXED: usize = 16;
/// A v1 line is at most 107 bytes with its CRLF (the specification's bound).
const V1_MAX: usize = 107;

/// What the start of a trusted proxy's byte stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// No PROXY header: the HTTP request starts at once.
    Absent,
    /// The start of a PROXY header: read more.
    Incomplete,
    /// A complete header of `len` bytes. `client` is the source address
    /// it names; `None` when it names none (v2 `LOCAL`, as a proxy's own
    /// health check sends, an unspecified or Unix family, v1 `UNKNOWN`):
    /// the connection is then the proxy's own.
    Found {
        /// The original client's address.
        client: Option<IpAddr>,
        /// Bytes the header takes, its TLVs included.
        len: usize,
    },
}

/// Why a trusted proxy's PROXY header or `X-Forwarded-For` was refused
/// (400; the text is the response's one-line body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// A PROXY v2 header that breaks the specification.
    #[error("PROXY v2 header: {0}")]
    V2(String),
    /// A PROXY v1 line that breaks the specification.
    #[error("PROXY v1 header: {0}")]
    V1(String),
    /// The `X-Forwarded-For` entry that names the client is not an address.
    #[error("X-Forwarded-For entry {0:?} is not an IP address")]
    Forwarded(String),
}

/// Reads a PROXY header (v2 or v1) from the start of `buf`, which holds
/// everything a trusted proxy has sent so far. A header longer than
/// `max_len` (TLVs included) is refused rather than buffered.
pub fn parse_preamble(buf: &[u8], max_len: usize) -> Result<Preamble, ProxyError> {
    if starts_like(buf, V2_SIGNATURE) {
        return parse_v2(buf, max_len);
    }
    if starts_like(buf, b"PROXY ") {
        return parse_v1(buf);
    }
    Ok(Preamble::Absent)
}

/// Whether `buf` begins with `prefix`, or is a beginning of it.
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    !buf.is_empty() && buf[..n] == prefix[..n]
}

fn parse_v2(buf: &[u8], max_len: usize) -> Result<Preamble, ProxyError> {
    if buf.len() < V2_FIXED {
        return Ok(Preamble::Incomplete);
    }
    let version = buf[12] >> 4;
    let command = buf[12] & 0x0f;
    if version != 2 {
        return Err(ProxyError::V2(format!("version {version}, expected 2")));
    }
    if command > 1 {
        return Err(ProxyError::V2(format!(
            "command {command} is neither LOCAL (0) nor PROXY (1)"
        )));
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = V2_FIXED + body;
    if len > max_len {
        return Err(ProxyError::V2(format!(
            "{len} bytes exceed the {max_len}-byte limit (max_handshake_size)"
        )));
    }
    let Some(block) = buf.get(V2_FIXED..len) else {
        return Ok(Preamble::Incomplete);
    };
    if command == 0 {
        return Ok(Preamble::Found { client: None, len });
    }
    let family = buf[13] >> 4;
    let client = match family {
        // AF_INET: source, destination, source port, destination port.
        1 => {
            let src: [u8; 4] = need(block, 12, "AF_INET")?;
            Some(IpAddr::V4(Ipv4Addr::from(src)))
        }
        2 => {
            let src: [u8; 16] = need(block, 36, "AF_INET6")?;
            Some(IpAddr::V6(Ipv6Addr::from(src)))
        }
        // AF_UNSPEC, AF_UNIX: no IP address to take.
        0 | 3 => None,
        other => return Err(ProxyError::V2(format!("unknown address family {other}"))),
    };
    Ok(Preamble::Found { client, len })
}

/// The first `N` bytes of an address block that must hold at least `min`.
fn need<const N: usize>(block: &[u8], min: usize, family: &str) -> Result<[u8; N], ProxyError> {
    if block.len() < min {
        return Err(ProxyError::V2(format!(
            "{family} needs {min} address bytes, the header has {}",
            block.len()
        )));
    }
    let mut out = [0; N];
    out.copy_from_slice(&block[..N]);
    Ok(out)
}

/// `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n`, or `PROXY UNKNOWN …\r\n`.
fn parse_v1(buf: &[u8]) -> Result<Preamble, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::V1(format!("no CRLF within {V1_MAX} bytes")))
        } else {
            Ok(Preamble::Incomplete)
        };
    };
    let len = end + 2;
    let line =
        std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::V1("not ASCII".to_owned()))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.get(1) {
        Some(&"UNKNOWN") => return Ok(Preamble::Found { client: None, len }),
        Some(&"TCP4") | Some(&"TCP6") => {}
        other => {
            return Err(ProxyError::V1(format!(
                "protocol {:?} is not TCP4, TCP6 or UNKNOWN",
                other.unwrap_or(&"")
            )))
        }
    }
    if fields.len() != 6 {
        return Err(ProxyError::V1(format!(
            "{} fields, expected 6 (PROXY, protocol, two addresses, two ports)",
            fields.len()
        )));
    }
    let client: IpAddr = fields[2]
        .parse()
        .map_err(|_| ProxyError::V1(format!("source {:?} is not an IP address", fields[2])))?;
    let v4 = fields[1] == "TCP4";
    if client.is_ipv4() != v4 {
        return Err(ProxyError::V1(format!(
            "source {client} does not match {}",
            fields[1]
        )));
    }
    Ok(Preamble::Found {
        client: Some(client),
        len,
    })
}

/// The client's address from the `X-Forwarded-For` entries of a request
/// that came from a trusted proxy (`entries` in header order, each list
/// split at commas). Each proxy appends the address it was connected from,
/// so the list is read from the right, past every address that is itself
/// a trusted proxy; the first other one is the client. Everything left of
/// it was written by the client and is not believed. With no entry, or
/// only trusted ones, the answer is the leftmost entry or else `peer`.
pub fn forwarded_client(
    peer: IpAddr,
    entries: &[String],
    trusted: impl Fn(IpAddr) -> bool,
) -> Result<IpAddr, ProxyError> {
    let mut leftmost = peer;
    for entry in entries.iter().rev() {
        let ip = parse_entry(entry).ok_or_else(|| ProxyError::Forwarded(cut(entry)))?;
        if !trusted(ip) {
            return Ok(ip);
        }
        leftmost = ip;
    }
    Ok(leftmost)
}

/// An entry is an address, optionally with a port (`1.2.3.4:5`,
/// `[2001:db8::1]:5`) as some proxies write it.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })
        .map(|ip: IpAddr| ip.to_canonical())
}

/// An entry as echoed in an error: its first 64 characters.
fn cut(entry: &str) -> String {
    entry.trim().chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family << 4 | 1);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn v4_block(src: [u8; 4]) -> Vec<u8> {
        let mut b = src.to_vec();
        b.extend_from_slice(&[10, 0, 0, 1, 0x30, 0x39, 0x1f, 0x90]);
        b
    }

    #[test]
    fn v2_ipv4_and_ipv6_give_the_source_address() {
        let mut buf = v2(1, 1, &v4_block([203, 0, 113, 7]));
        buf.extend_from_slice(b"GET /ws HTTP/1.1\r\n");
        assert_eq!(
            parse_preamble(&buf, 8192),
            Ok(Preamble::Found {
                client: Some("203.0.113.7".parse().unwrap()),
                len: 28
            })
        );
        let src: Ipv6Addr = "2001:db8::42".parse().unwrap();
        let mut block = src.octets().to_vec();
        block.extend_from_slice(&[0; 20]);
        assert_eq!(
            parse_preamble(&v2(1, 2, &block), 8192),
            Ok(Preamble::Found {
                client: Some(IpAddr::V6(src)),
                len: 52
            })
        );
    }

    #[test]
    fn v2_tlvs_are_skipped_and_local_names_no_client() {
        let mut block = v4_block([198, 51, 100, 1]);
        block.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // ALPN TLV
        let buf = v2(1, 1, &block);
        assert_eq!(
            parse_preamble(&buf, 8192),
            Ok(Preamble::Found {
                client: Some("198.51.100.1".parse().unwrap()),
                len: buf.len()
            })
        );
        assert_eq!(
            parse_preamble(&v2(0, 0, &[]), 8192),
            Ok(Preamble::Found {
                client: None,
                len: 16
            })
        );
        assert_eq!(
            parse_preamble(&v2(1, 3, &[0; 216]), 8192),
            Ok(Preamble::Found {
                client: None,
                len: 232
            })
        );
    }

    #[test]
    fn every_truncation_is_incomplete_never_an_error() {
        let mut block = v4_block([203, 0, 113, 7]);
        block.extend_from_slice(&[0x04, 0x00, 0x01, 0]); // a NOOP TLV
        let full = v2(1, 1, &block);
        for n in 1..full.len() {
            assert_eq!(
                parse_preamble(&full[..n], 8192),
                Ok(Preamble::Incomplete),
                "{n}"
            );
        }
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 12345 8080\r\n";
        for n in 1..line.len() {
            assert_eq!(
                parse_preamble(&line[..n], 8192),
                Ok(Preamble::Incomplete),
                "{n}"
            );
        }
    }

    #[test]
    fn hostile_v2_headers_are_refused_with_the_reason() {
        let mut bad_version = v2(1, 1, &v4_block([1, 2, 3, 4]));
        bad_version[12] = 0x11;
        let err = parse_preamble(&bad_version, 8192).unwrap_err().to_string();
        assert!(err.contains("version 1"), "{err}");

        let mut bad_command = v2(1, 1, &v4_block([1, 2, 3, 4]));
        bad_command[12] = 0x2f;
        let err = parse_preamble(&bad_command, 8192).unwrap_err().to_string();
        assert!(err.contains("command 15"), "{err}");

        let err = parse_preamble(&v2(1, 1, &[1, 2, 3]), 8192)
            .unwrap_err()
            .to_string();
        assert!(err.contains("AF_INET needs 12"), "{err}");
        let err = parse_preamble(&v2(1, 2, &[0; 12]), 8192)
            .unwrap_err()
            .to_string();
        assert!(err.contains("AF_INET6 needs 36"), "{err}");
        let err = parse_preamble(&v2(1, 9, &[0; 12]), 8192)
            .unwrap_err()
            .to_string();
        assert!(err.contains("family 9"), "{err}");

        // A declared length past the limit is refused before it is read.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let err = parse_preamble(&huge, 8192).unwrap_err().to_string();
        assert!(
            err.contains("65551 bytes exceed the 8192-byte limit"),
            "{err}"
        );
    }

    #[test]
    fn v1_lines() {
        let found = |line: &[u8]| parse_preamble(line, 8192);
        assert_eq!(
            found(b"PROXY TCP4 203.0.113.7 10.0.0.1 12345 8080\r\nGET"),
            Ok(Preamble::Found {
                client: Some("203.0.113.7".parse().unwrap()),
                len: 44
            })
        );
        assert_eq!(
            found(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"),
            Ok(Preamble::Found {
                client: Some("2001:db8::1".parse().unwrap()),
                len: 40
            })
        );
        assert_eq!(
            found(b"PROXY UNKNOWN\r\n"),
            Ok(Preamble::Found {
                client: None,
                len: 15
            })
        );
        for (line, why) in [
            (
                &b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"[..],
                "protocol \"UDP4\"",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields"),
            (b"PROXY TCP4 nobody 5.6.7.8 1 2\r\n", "source \"nobody\""),
            (b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n", "does not match TCP4"),
            (b"PROXY TCP4 \xff 5.6.7.8 1 2\r\n", "not ASCII"),
        ] {
            let err = found(line).unwrap_err().to_string();
            assert!(err.contains(why), "{err} lacks {why}");
        }
        let endless = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        let err = found(&endless).unwrap_err().to_string();
        assert!(err.contains("no CRLF within 107 bytes"), "{err}");
    }

    #[test]
    fn an_http_request_has_no_preamble() {
        assert_eq!(
            parse_preamble(b"GET /ws HTTP/1.1\r\n", 8192),
            Ok(Preamble::Absent)
        );
        assert_eq!(parse_preamble(b"\r\n\r\nX", 8192), Ok(Preamble::Absent));
        assert_eq!(parse_preamble(b"PROXYX", 8192), Ok(Preamble::Absent));
    }

    #[test]
    fn forwarded_for_is_read_from_the_right_past_trusted_proxies() {
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let trusted = |ip: IpAddr| matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10);
        let list = |s: &[&str]| s.iter().map(|e| e.to_string()).collect::<Vec<_>>();
        // The client wrote a spoofed entry; the proxies appended theirs.
        let got = forwarded_client(
            peer,
            &list(&["6.6.6.6", "203.0.113.9", "10.0.0.7"]),
            trusted,
        );
        assert_eq!(got, Ok("203.0.113.9".parse().unwrap()));
        // Ports and brackets, and an IPv4-mapped address.
        for (entry, want) in [
            ("203.0.113.9:4711", "203.0.113.9"),
            ("[2001:db8::9]:443", "2001:db8::9"),
            ("[2001:db8::9]", "2001:db8::9"),
            ("::ffff:203.0.113.9", "203.0.113.9"),
        ] {
            assert_eq!(
                forwarded_client(peer, &list(&[entry]), trusted),
                Ok(want.parse().unwrap()),
                "{entry}"
            );
        }
        // None, or only trusted ones: the leftmost, else the proxy itself.
        assert_eq!(forwarded_client(peer, &[], trusted), Ok(peer));
        assert_eq!(
            forwarded_client(peer, &list(&["10.1.1.1", "10.2.2.2"]), trusted),
            Ok("10.1.1.1".parse().unwrap())
        );
        // Garbage where the client should be is refused; left of it, ignored.
        let err = forwarded_client(peer, &list(&["203.0.113.9", "unknown"]), trusted);
        assert_eq!(err, Err(ProxyError::Forwarded("unknown".to_owned())));
        assert_eq!(
            forwarded_client(peer, &list(&["garbage", "203.0.113.9"]), trusted),
            Ok("203.0.113.9".parse().unwrap())
        );
    }
}
