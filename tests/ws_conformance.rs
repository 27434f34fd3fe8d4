//! RFC 6455 conformance of the server, one test per rule: the upgrade and
//! its refusals, then frames built byte by byte over a plain `TcpStream`
//! (`common::raw`), so nothing here shares code with our own codec.
//!
//! After every close the server sends for a protocol error, it must end TCP
//! (FIN) at once without waiting for the client (RFC 6455 section 7.1.7),
//! and `ringcast_connections_active` must fall back to 0 once the client
//! closes its side, or at `--close-timeout` when it never does.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::raw::{self, frame, frame_with, read_close_code, read_frame, read_op};
use common::TestServer;

/// `Sec-WebSocket-Accept` for the RFC 6455 section 1.3 sample key, which
/// `raw::UPGRADE` sends.
const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// How long the server may take to end TCP once it owes nothing more.
const EOF_WITHIN: Duration = Duration::from_secs(2);

/// An HTTP response: status, headers (name lowercased), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` and reads the response head; for a non-101 answer, also
/// the body, and the server must then close the connection.
fn exchange(server: &TestServer, request: &str) -> (Response, TcpStream) {
    let mut s = raw::connect(server.addr, request.as_bytes());
    let head = raw::read_head(&mut s);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = String::new();
    if status != 101 {
        // The server closes after a refusal: the body ends at EOF.
        let mut bytes = Vec::new();
        let end = s.read_to_end(&mut bytes);
        assert!(
            end.is_ok()
                || end
                    .as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
            "the server did not close after refusing: {end:?}"
        );
        body = String::from_utf8(bytes).expect("the body is UTF-8 text");
    }
    let response = Response {
        status,
        headers,
        body,
    };
    (response, s)
}

/// Asserts a refused upgrade: `status`, a one-line text body mentioning
/// `names` (case-insensitive), Content-Length matching, the connection
/// closed, and the refusal counted under its status.
fn assert_refused(server: &TestServer, request: &str, status: u16, names: &str) -> Response {
    let (r, _s) = exchange(server, request);
    assert_eq!(r.status, status, "body: {:?}", r.body);
    assert!(r.body.ends_with('\n'), "body is one line: {:?}", r.body);
    assert_eq!(r.body.matches('\n').count(), 1, "one line: {:?}", r.body);
    assert!(
        r.body.to_lowercase().contains(&names.to_lowercase()),
        "body {:?} does not name {names:?}",
        r.body
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str()),
        "body must be exactly Content-Length bytes, then EOF"
    );
    assert_eq!(r.header("sec-websocket-accept"), None);
    let label = format!("ringcast_handshake_failures_total{{status=\"{status}\"}}");
    server.wait_for(&label, Duration::from_secs(5), |s| s.metric(&label) >= 1.0);
    assert_eq!(server.metric("ringcast_connections_active"), 0.0);
    r
}

/// The sample upgrade with `from` replaced by `to` (which must be present).
fn upgrade_with(from: &str, to: &str) -> String {
    assert!(raw::UPGRADE.contains(from), "{from:?}");
    raw::UPGRADE.replacen(from, to, 1)
}

/// The sample upgrade plus extra header lines (each ending in CRLF).
fn upgrade_plus(extra: &str) -> String {
    let base = raw::UPGRADE
        .strip_suffix("\r\n")
        .expect("ends with CRLFCRLF");
    format!("{base}{extra}\r\n")
}

/// Asserts the server ends TCP within `within`; a reset counts only when
/// `reset_ok`.
fn assert_eof(s: &mut TcpStream, within: Duration, reset_ok: bool) {
    match raw::wait_eof(s, within) {
        Ok(true) => {}
        Ok(false) => assert!(reset_ok, "connection reset instead of a clean EOF"),
        Err(e) => panic!("{e}"),
    }
}

/// The rule after every protocol error: a close frame with `code`, then the
/// server's FIN with nothing after it, without the client answering; once
/// the client closes too, no connection is left open.
fn assert_failed_with(server: &TestServer, mut s: TcpStream, code: u16) {
    assert_eq!(read_close_code(&mut s), Some(code), "close code");
    assert_eof(&mut s, EOF_WITHIN, true);
    drop(s);
    assert_no_connections(server);
}

fn assert_no_connections(server: &TestServer) {
    server.wait_for("connections_active == 0", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 0.0
    });
}

/// Sends one or more frames in one write.
fn send(s: &mut TcpStream, frames: &[Vec<u8>]) {
    s.write_all(&frames.concat()).expect("send frames");
}

/// Opens a connection, sends `frames`, and expects the close `code`.
fn assert_frames_fail(server: &TestServer, frames: &[Vec<u8>], code: u16) {
    let mut s = raw::open(server.addr);
    send(&mut s, frames);
    assert_failed_with(server, s, code);
}

fn text(json: &str) -> Vec<u8> {
    frame(true, 1, json.as_bytes())
}

/// A close payload: code and reason.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

fn protocol_disconnects(server: &TestServer) -> f64 {
    server.metric("ringcast_client_disconnects_total{reason=\"protocol\"}")
}

// ---- the upgrade (RFC 6455 section 4.2) -------------------------------

#[test]
fn upgrade_answers_101_with_the_rfc_accept_key() {
    let server = TestServer::start(&[]);
    let (r, mut s) = exchange(&server, raw::UPGRADE);
    assert_eq!(r.status, 101);
    assert_eq!(
        r.header("upgrade").map(str::to_lowercase).as_deref(),
        Some("websocket")
    );
    assert!(
        r.header("connection")
            .is_some_and(|v| v.to_lowercase().contains("upgrade")),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("sec-websocket-accept"), Some(RFC_ACCEPT));
    assert_eq!(
        r.header("sec-websocket-protocol"),
        None,
        "nothing offered, nothing echoed"
    );
    let (op, payload) = read_frame(&mut s).expect("welcome frame");
    assert_eq!(op, 1);
    let welcome: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(welcome["op"], "welcome");
    server.wait_for("connections_active == 1", Duration::from_secs(5), |s| {
        s.metric("ringcast_connections_active") == 1.0
    });
}

#[test]
fn subprotocol_is_echoed_only_when_offered() {
    let server = TestServer::start(&[]);
    let offered = upgrade_plus("Sec-WebSocket-Protocol: chat, ringcast.v1\r\n");
    let (r, _s) = exchange(&server, &offered);
    assert_eq!(r.status, 101);
    assert_eq!(r.header("sec-websocket-protocol"), Some("ringcast.v1"));
    assert_eq!(r.header("sec-websocket-accept"), Some(RFC_ACCEPT));
    let (r, _s) = exchange(&server, raw::UPGRADE);
    assert_eq!(r.status, 101);
    assert_eq!(r.header("sec-websocket-protocol"), None);
}

#[test]
fn frames_sent_with_the_upgrade_request_are_not_lost() {
    let server = TestServer::start(&[]);
    let mut bytes = raw::UPGRADE.as_bytes().to_vec();
    bytes.extend(frame(true, 9, b"early"));
    bytes.extend(text(r#"{"op":"ping","id":3}"#));
    let mut s = raw::connect(server.addr, &bytes);
    assert!(raw::read_head(&mut s).starts_with("HTTP/1.1 101"));
    let frames: Vec<(u8, Vec<u8>)> = (0..3).map(|_| read_frame(&mut s).expect("frame")).collect();
    assert!(
        String::from_utf8_lossy(&frames[0].1).contains("welcome"),
        "welcome comes first"
    );
    assert_eq!((frames[1].0, frames[1].1.as_slice()), (0xA, &b"early"[..]));
    let pong: serde_json::Value = serde_json::from_slice(&frames[2].1).unwrap();
    assert_eq!(
        (pong["op"].as_str(), pong["id"].as_u64()),
        (Some("pong"), Some(3))
    );
}

#[test]
fn upgrade_and_frames_arriving_one_byte_at_a_time() {
    let server = TestServer::start(&[]);
    let mut bytes = raw::UPGRADE.as_bytes().to_vec();
    bytes.extend(frame(true, 9, b"slow"));
    bytes.extend(text(r#"{"op":"ping","id":8}"#));
    let mut s = raw::connect(server.addr, b"");
    s.set_nodelay(true).unwrap();
    for b in &bytes {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    assert!(raw::read_head(&mut s).starts_with("HTTP/1.1 101"));
    let (_, welcome) = read_frame(&mut s).expect("welcome");
    assert!(String::from_utf8_lossy(&welcome).contains("welcome"));
    let (op, payload) = read_frame(&mut s).expect("pong");
    assert_eq!((op, payload.as_slice()), (0xA, &b"slow"[..]));
    assert_eq!(read_op(&mut s, "pong")["id"], 8);
}

#[test]
fn unsolicited_pong_is_ignored() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    send(
        &mut s,
        &[
            frame(true, 0xA, b"unasked"),
            text(r#"{"op":"ping","id":9}"#),
        ],
    );
    let (op, payload) = read_frame(&mut s).expect("reply");
    assert_eq!(op, 1, "nothing answers a pong");
    let reply: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        (reply["op"].as_str(), reply["id"].as_u64()),
        (Some("pong"), Some(9))
    );
}

#[test]
fn not_get_is_400() {
    let server = TestServer::start(&[]);
    assert_refused(&server, &upgrade_with("GET ", "POST "), 400, "POST");
}

#[test]
fn missing_upgrade_header_is_400() {
    let server = TestServer::start(&[]);
    let request = upgrade_with("Upgrade: websocket\r\n", "");
    assert_refused(&server, &request, 400, "Upgrade");
}

#[test]
fn missing_key_is_400() {
    let server = TestServer::start(&[]);
    let request = upgrade_with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    assert_refused(&server, &request, 400, "Sec-WebSocket-Key");
}

#[test]
fn version_8_is_426_naming_version_13() {
    let server = TestServer::start(&[]);
    let request = upgrade_with("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let r = assert_refused(&server, &request, 426, "version");
    assert_eq!(r.header("sec-websocket-version"), Some("13"));
}

#[test]
fn unknown_path_is_404() {
    let server = TestServer::start(&[]);
    assert_refused(
        &server,
        &upgrade_with("GET /ws ", "GET /nope "),
        404,
        "/nope",
    );
}

#[test]
fn origin_outside_the_allow_list_is_403() {
    let server = TestServer::start(&["--allowed-origins", "http://good,http://also-good"]);
    let evil = upgrade_plus("Origin: http://evil\r\n");
    assert_refused(&server, &evil, 403, "http://evil");
    // An empty Origin is not on the list either (only a missing one passes).
    assert_refused(&server, &upgrade_plus("Origin:\r\n"), 403, "origin \"\"");
    for good in ["http://good", "http://also-good"] {
        let (r, mut s) = exchange(&server, &upgrade_plus(&format!("Origin: {good}\r\n")));
        assert_eq!(r.status, 101, "{good}");
        assert_eq!(r.header("sec-websocket-accept"), Some(RFC_ACCEPT));
        assert!(read_frame(&mut s).is_some(), "welcome after {good}");
    }
}

#[test]
fn no_origin_passes_the_allow_list() {
    // Browsers always send Origin; the allowlist protects them from
    // cross-site WebSocket hijacking. A client without one is not a
    // browser, and could send any Origin it liked: it is let through.
    let server = TestServer::start(&["--allowed-origins", "http://good"]);
    assert!(!raw::UPGRADE.contains("Origin"));
    let (r, mut s) = exchange(&server, raw::UPGRADE);
    assert_eq!(r.status, 101);
    assert!(read_frame(&mut s).is_some(), "welcome without an Origin");
    assert_eq!(
        server.metric("ringcast_handshake_failures_total{status=\"403\"}"),
        0.0
    );
}

#[test]
fn only_unknown_subprotocols_is_400() {
    let server = TestServer::start(&[]);
    let request = upgrade_plus("Sec-WebSocket-Protocol: chat, mqtt\r\n");
    assert_refused(&server, &request, 400, "subprotocol");
}

#[test]
fn handshake_not_finished_in_time_is_408() {
    let server = TestServer::start(&["--handshake-timeout", "1s"]);
    // Half a request head, then nothing.
    let started = std::time::Instant::now();
    let partial = &raw::UPGRADE[..40];
    let r = assert_refused(&server, partial, 408, "not received in time");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(r.header("connection"), Some("close"));
    // Not a single byte: the same.
    assert_refused(&server, "", 408, "not received in time");
}

#[test]
fn bytes_after_a_refused_upgrade_are_not_read_as_frames() {
    let server = TestServer::start(&[]);
    // A refused upgrade followed at once by what would be protocol errors
    // (unmasked, then a reserved opcode; no FIN bit, so the bytes stay
    // ASCII): only the HTTP answer comes back (one line, exactly
    // Content-Length bytes, then EOF), never a close frame.
    let mut request = upgrade_with("GET /ws ", "GET /nope ").into_bytes();
    request.extend(frame_with(false, 0, 1, b"{}", None));
    request.extend(frame_with(false, 0, 0x3, b"x", None));
    let request = String::from_utf8(request).expect("ASCII frames");
    assert_refused(&server, &request, 404, "/nope");
    assert_eq!(protocol_disconnects(&server), 0.0);
}

#[test]
fn request_head_over_8_kib_is_431() {
    let server = TestServer::start(&[]);
    let pad = format!("X-Pad: {}\r\n", "a".repeat(9000));
    assert_refused(&server, &upgrade_plus(&pad), 431, "exceeds");
}

// ---- frames (RFC 6455 section 5) ---------------------------------------

#[test]
fn unmasked_client_frame_is_1002() {
    let server = TestServer::start(&[]);
    let unmasked = frame_with(true, 0, 1, br#"{"op":"ping","id":1}"#, None);
    assert_frames_fail(&server, &[unmasked], 1002);
    assert!(protocol_disconnects(&server) >= 1.0);
}

#[test]
fn rsv_bits_without_extension_are_1002() {
    let server = TestServer::start(&[]);
    for rsv in [0b100, 0b010, 0b001] {
        let f = frame_with(true, rsv, 1, br#"{"op":"ping","id":1}"#, Some([1, 2, 3, 4]));
        assert_frames_fail(&server, &[f], 1002);
    }
    assert!(protocol_disconnects(&server) >= 3.0);
}

#[test]
fn reserved_opcodes_are_1002() {
    let server = TestServer::start(&[]);
    for opcode in [0x3, 0xB] {
        assert_frames_fail(&server, &[frame(true, opcode, b"x")], 1002);
    }
}

#[test]
fn ping_is_answered_with_pong_carrying_the_same_payload() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    let big: Vec<u8> = (0..125u8).collect();
    for payload in [&b""[..], b"hello", &big] {
        send(&mut s, &[frame(true, 9, payload)]);
        let (op, got) = read_frame(&mut s).expect("pong");
        assert_eq!(op, 0xA, "pong opcode");
        assert_eq!(got, payload);
    }
}

#[test]
fn ping_payload_of_126_bytes_is_1002() {
    let server = TestServer::start(&[]);
    assert_frames_fail(&server, &[frame(true, 9, &[7; 126])], 1002);
}

#[test]
fn pong_payload_of_126_bytes_is_1002() {
    let server = TestServer::start(&[]);
    assert_frames_fail(&server, &[frame(true, 0xA, &[7; 126])], 1002);
}

#[test]
fn close_payload_of_126_bytes_is_1002() {
    let server = TestServer::start(&[]);
    // A valid code and a 124-byte UTF-8 reason: 126 bytes, one too many.
    let payload = close_payload(1000, &"r".repeat(124));
    assert_eq!(payload.len(), 126);
    assert_frames_fail(&server, &[frame(true, 8, &payload)], 1002);
    // 125 bytes is still a close, and is echoed.
    let mut s = raw::open(server.addr);
    send(
        &mut s,
        &[frame(true, 8, &close_payload(1000, &"r".repeat(123)))],
    );
    assert_eq!(read_close_code(&mut s), Some(1000));
    assert_eof(&mut s, EOF_WITHIN, false);
}

#[test]
fn fragmented_ping_is_1002() {
    let server = TestServer::start(&[]);
    let frames = [frame(false, 9, b"pi"), frame(true, 0, b"ng")];
    assert_frames_fail(&server, &frames, 1002);
}

#[test]
fn text_message_in_three_fragments_is_answered() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    let json = br#"{"op":"ping","id":41}"#;
    send(
        &mut s,
        &[
            frame(false, 1, &json[..5]),
            frame(false, 0, &json[5..12]),
            frame(true, 0, &json[12..]),
        ],
    );
    assert_eq!(read_op(&mut s, "pong")["id"], 41);
}

#[test]
fn ping_between_fragments_gets_its_pong_and_the_message_completes() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    let json = br#"{"op":"ping","id":42}"#;
    send(
        &mut s,
        &[frame(false, 1, &json[..7]), frame(true, 9, b"mid")],
    );
    let (op, payload) = read_frame(&mut s).expect("pong");
    assert_eq!((op, payload.as_slice()), (0xA, &b"mid"[..]));
    send(&mut s, &[frame(true, 0, &json[7..])]);
    let (op, payload) = read_frame(&mut s).expect("reply to the fragmented message");
    assert_eq!(op, 1);
    let reply: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        (reply["op"].as_str(), reply["id"].as_u64()),
        (Some("pong"), Some(42))
    );
}

#[test]
fn continuation_without_a_message_is_1002() {
    let server = TestServer::start(&[]);
    assert_frames_fail(&server, &[frame(true, 0, br#"{"op":"ping"}"#)], 1002);
}

#[test]
fn new_text_frame_inside_a_fragmented_message_is_1002() {
    let server = TestServer::start(&[]);
    let frames = [
        frame(false, 1, br#"{"op":"#),
        text(r#"{"op":"ping","id":1}"#),
    ];
    assert_frames_fail(&server, &frames, 1002);
}

#[test]
fn invalid_utf8_in_a_text_frame_is_1007() {
    let server = TestServer::start(&[]);
    let bad = frame(true, 1, b"{\"op\":\"ping\",\"x\":\"\xC0\xAF\"}");
    assert_frames_fail(&server, &[bad], 1007);
}

#[test]
fn invalid_utf8_split_across_fragments_is_1007() {
    let server = TestServer::start(&[]);
    // F0 90 80 starts a 4-byte sequence; the next fragment breaks it.
    let frames = [
        frame(false, 1, b"{\"op\":\"\xF0\x90\x80"),
        frame(true, 0, b"(\"}"),
    ];
    assert_frames_fail(&server, &frames, 1007);
}

#[test]
fn multibyte_char_split_across_fragments_is_valid() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    send(&mut s, &[text(r#"{"op":"sub","id":1,"topic":"utf8"}"#)]);
    assert_eq!(read_op(&mut s, "ok")["id"], 1);
    let word = "é€😀";
    let json = format!(r#"{{"op":"pub","id":2,"topic":"utf8","data":"{word}"}}"#);
    let bytes = json.as_bytes();
    let at = json.find(word).unwrap();
    // Cut inside é (2 bytes), inside € (3 bytes) and inside 😀 (4 bytes).
    let cuts = [0, at + 1, at + 2 + 2, at + 5 + 3, bytes.len()];
    let frames: Vec<Vec<u8>> = cuts
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            let fin = w[1] == bytes.len();
            frame(fin, if i == 0 { 1 } else { 0 }, &bytes[w[0]..w[1]])
        })
        .collect();
    send(&mut s, &frames);
    let msg = read_op(&mut s, "msg");
    assert_eq!(msg["data"], word);
}

#[test]
fn message_over_max_message_size_is_1009() {
    let server = TestServer::start(&["--max-message-size", "1KiB"]);
    // Just under the limit is fine.
    let mut s = raw::open(server.addr);
    let pad = "a".repeat(1024 - r#"{"op":"ping","id":1,"x":""}"#.len());
    send(
        &mut s,
        &[text(&format!(r#"{{"op":"ping","id":1,"x":"{pad}"}}"#))],
    );
    assert_eq!(read_op(&mut s, "pong")["id"], 1);
    // One frame over it.
    let over = format!(r#"{{"op":"ping","id":2,"x":"{pad}a"}}"#);
    assert_eq!(over.len(), 1025);
    send(&mut s, &[text(&over)]);
    assert_failed_with(&server, s, 1009);
    // Fragments that add up to more than the limit.
    let frames = [frame(false, 1, &[b' '; 600]), frame(true, 0, &[b' '; 600])];
    assert_frames_fail(&server, &frames, 1009);
}

#[test]
fn client_answering_a_failure_close_ends_the_connection_at_once() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    send(&mut s, &[frame_with(true, 0, 1, b"{}", None)]);
    assert_eq!(read_close_code(&mut s), Some(1002));
    assert_eof(&mut s, EOF_WITHIN, true);
    // The socket stays open; the close answer alone must end it, well
    // before the 5 s close timeout.
    send(&mut s, &[frame(true, 8, &1002u16.to_be_bytes())]);
    server.wait_for("connections_active == 0", Duration::from_secs(2), |s| {
        s.metric("ringcast_connections_active") == 0.0
    });
    drop(s);
}

#[test]
fn failed_connection_left_open_by_the_client_ends_at_the_close_timeout() {
    let server = TestServer::start(&["--close-timeout", "1s"]);
    let mut s = raw::open(server.addr);
    send(&mut s, &[frame_with(true, 0, 1, b"{}", None)]);
    assert_eq!(read_close_code(&mut s), Some(1002));
    assert_eof(&mut s, EOF_WITHIN, true);
    // Neither a close answer nor our FIN: the close timeout (1 s, checked by
    // the once-a-second sweep) must end it.
    server.wait_for("connections_active == 0", Duration::from_secs(4), |s| {
        s.metric("ringcast_connections_active") == 0.0
    });
    drop(s);
}

// ---- the close handshake (RFC 6455 sections 5.5.1 and 7) ---------------

#[test]
fn client_close_1000_is_echoed_then_the_server_ends_tcp() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    send(&mut s, &[frame(true, 8, &close_payload(1000, "bye"))]);
    let (op, payload) = read_frame(&mut s).expect("close reply");
    assert_eq!(op, 8);
    assert_eq!(
        payload.get(..2),
        Some(&1000u16.to_be_bytes()[..]),
        "{payload:?}"
    );
    assert_eof(&mut s, EOF_WITHIN, false);
    assert_no_connections(&server);
}

#[test]
fn client_close_codes_of_applications_and_libraries_are_echoed() {
    let server = TestServer::start(&[]);
    // 3000-3999: registered for libraries; 4000-4999: private use. RFC 6455
    // section 5.5.1: the endpoint typically echoes the status code it received.
    for code in [3000u16, 3999, 4000, 4321, 4999, 1001, 1011] {
        let mut s = raw::open(server.addr);
        send(&mut s, &[frame(true, 8, &close_payload(code, "going"))]);
        let (op, payload) = read_frame(&mut s).expect("close reply");
        assert_eq!(op, 8, "code {code}");
        assert_eq!(
            payload.get(..2),
            Some(&code.to_be_bytes()[..]),
            "code {code} echoed: {payload:?}"
        );
        assert_eof(&mut s, EOF_WITHIN, false);
    }
    assert_no_connections(&server);
}

#[test]
fn close_with_a_code_not_for_the_wire_is_1002() {
    let server = TestServer::start(&[]);
    for code in [1005, 999, 2000] {
        assert_frames_fail(&server, &[frame(true, 8, &close_payload(code, ""))], 1002);
    }
}

#[test]
fn close_with_a_one_byte_payload_is_1002() {
    let server = TestServer::start(&[]);
    assert_frames_fail(&server, &[frame(true, 8, &[0x03])], 1002);
}

#[test]
fn empty_close_is_answered_with_a_close() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    send(&mut s, &[frame(true, 8, b"")]);
    let (op, payload) = read_frame(&mut s).expect("close reply");
    assert_eq!(op, 8);
    assert!(
        payload.is_empty() || payload.get(..2) == Some(&1000u16.to_be_bytes()[..]),
        "no code (1005) is answered with none or 1000: {payload:?}"
    );
    assert_eof(&mut s, EOF_WITHIN, false);
    assert_no_connections(&server);
}

#[test]
fn close_reason_that_is_not_utf8_is_1007() {
    let server = TestServer::start(&[]);
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye \xFF\xFE");
    assert_frames_fail(&server, &[frame(true, 8, &payload)], 1007);
}

// ---- data frames ringcast.v1 does not use --------------------------------

#[test]
fn binary_frame_gets_error_4000_and_the_connection_stays_open() {
    let server = TestServer::start(&[]);
    let mut s = raw::open(server.addr);
    send(&mut s, &[frame(true, 2, br#"{"op":"ping","id":5}"#)]);
    let err = read_op(&mut s, "error");
    assert_eq!(err["code"], 4000);
    assert!(
        err["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("binary"),
        "{err}"
    );
    send(&mut s, &[text(r#"{"op":"ping","id":6}"#)]);
    assert_eq!(read_op(&mut s, "pong")["id"], 6);
    assert_eq!(protocol_disconnects(&server), 0.0);
    assert_eq!(server.metric("ringcast_connections_active"), 1.0);
}
