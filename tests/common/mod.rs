//! Test fixtures: [`TestServer`] starts the real `ringcast` binary on free
//! loopback ports and stops it on drop; [`raw`] opens a plain TCP socket
//! and speaks hand-built RFC 6455 frames, independent of our codec.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP/1.1 request with `Connection: close` to `addr`: the status
/// code and the body (the whole response after the head).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// One series of a Prometheus text exposition: name, labels in order, value.
pub type Series = (String, Vec<(String, String)>, f64);

/// The series of a Prometheus text exposition (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Series> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| parse_series(l).unwrap_or_else(|| panic!("not a metric line: {l:?}")))
        .collect()
}

/// `name{k="v",...} value` (or `name value`).
fn parse_series(line: &str) -> Option<Series> {
    let (head, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = parse_selector(head)?;
    Some((name, labels, value))
}

/// `name` or `name{k="v",...}` into the name and the label pairs.
pub fn parse_selector(s: &str) -> Option<(String, Vec<(String, String)>)> {
    let Some((name, rest)) = s.split_once('{') else {
        return Some((s.trim().to_string(), Vec::new()));
    };
    let mut rest = rest.trim_end().strip_suffix('}')?;
    let mut labels = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => value.push(match chars.next()?.1 {
                    'n' => '\n',
                    c => c,
                }),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((name.to_string(), labels))
}

fn series_key(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", pairs.join(","))
}

/// The sum of the series of `text` that `selector` (`name` or
/// `name{k="v",...}`) matches, or `None` when none does.
pub fn metric_in(text: &str, selector: &str) -> Option<f64> {
    let (name, want) = parse_selector(selector).expect("a metric selector");
    let matching: Vec<f64> = parse_metrics(text)
        .into_iter()
        .filter(|(n, labels, _)| *n == name && want.iter().all(|w| labels.contains(w)))
        .map(|(_, _, v)| v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Writes `body` to a new file in the temp directory (a TOML settings file
/// for `--config`); the caller removes it.
pub fn config_file(body: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "ringcast-config-{}-{}.toml",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, body).unwrap();
    path
}

/// A running `ringcast serve`.
pub struct TestServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stderr_path: std::path::PathBuf,
}

impl TestServer {
    /// Starts with anonymous access, 2 shards (unless `extra` sets
    /// `--shards`), and `extra` flags.
    pub fn start(extra: &[&str]) -> TestServer {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> TestServer {
        Self::try_start(extra, env).unwrap_or_else(|log| panic!("server did not start: {log}"))
    }

    /// Starts, or returns the server's log when it exits before being ready.
    pub fn try_start(extra: &[&str], env: &[(&str, &str)]) -> Result<TestServer, String> {
        let stderr_path = std::env::temp_dir().join(format!(
            "ringcast-test-{}-{}.log",
            std::process::id(),
            fastrand::u64(..)
        ));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
        cmd.arg("serve");
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--admin-listen", "127.0.0.1:0"]);
        // Auth tests configure a key; everyone else runs anonymous.
        if !extra.iter().any(|a| a.starts_with("--auth")) {
            cmd.arg("--allow-anonymous");
        }
        if !extra.contains(&"--shards") {
            cmd.args(["--shards", "2"]);
        }
        // Tests pipeline requests; the rate limit has its own tests.
        if !extra.contains(&"--inbound-rate") {
            cmd.args(["--inbound-rate", "0"]);
        }
        if !extra.contains(&"--inbound-bytes-rate") {
            cmd.args(["--inbound-bytes-rate", "0"]);
        }
        if !extra.contains(&"--max-handshakes-per-ip") {
            cmd.args(["--max-handshakes-per-ip", "0"]);
        }
        cmd.args(extra);
        // A developer's RINGCAST_REDIS (or any setting) must not leak in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RINGCAST_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn ringcast");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let field = |name: &str| -> Option<SocketAddr> {
            let v = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))?;
            v.parse().ok()
        };
        match (field("ws"), field("admin")) {
            (Some(addr), Some(admin)) => Ok(TestServer {
                child,
                addr,
                admin,
                stderr_path,
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let _ = std::fs::remove_file(&stderr_path);
                Err(format!("ready line {line:?}; log: {log}"))
            }
        }
    }

    /// `ws://ADDR/ws`
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// One request to the admin endpoint (`Connection: close`): the
    /// status code and the body.
    pub fn admin_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        http_request(self.admin, method, path, headers, body)
    }

    /// The text of one `GET /metrics`.
    pub fn metrics_text(&self) -> String {
        let (status, text) = self.admin_request("GET", "/metrics", &[], "");
        assert_eq!(status, 200, "/metrics: {text}");
        text
    }

    /// Scrapes /metrics into `name{labels}` -> value, each series as
    /// written, plus, for a name written only with labels (the per-shard
    /// gauges, `{shard="N"}`), `name` -> the sum of its series.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let series = parse_metrics(&self.metrics_text());
        let mut out: HashMap<String, f64> = HashMap::new();
        for (name, labels, v) in &series {
            if !labels.is_empty() && !series.iter().any(|(n, l, _)| n == name && l.is_empty()) {
                *out.entry(name.clone()).or_default() += v;
            }
        }
        for (name, labels, v) in series {
            out.insert(series_key(&name, &labels), v);
        }
        out
    }

    /// The value of `selector` in /metrics: `name` or `name{k="v",...}`,
    /// summed over every series of the name whose labels include those
    /// given (so `ringcast_connections_active` sums its shards). Panics,
    /// naming it, when no series matches: a renamed or missing metric must
    /// fail a test, not read as 0.
    pub fn metric(&self, selector: &str) -> f64 {
        let text = self.metrics_text();
        metric_in(&text, selector)
            .unwrap_or_else(|| panic!("metric {selector} is absent from /metrics:\n{text}"))
    }

    /// Polls `cond` until it holds or `timeout` passes.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&TestServer) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "timed out waiting for {what}; metrics: {:?}",
            self.metrics()
        );
    }

    /// Sends SIGTERM (the drain starts) without waiting.
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal_term();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Plain-socket WebSocket peer for conformance tests: every byte is built here.
pub mod raw {
    use super::*;

    /// A TCP connection to `addr` from source address `from` (every 127/8
    /// address reaches a loopback listener), sending nothing yet.
    pub fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let src: SocketAddr = SocketAddr::new(from.parse().unwrap(), 0);
        sock.bind(&src.into()).unwrap();
        sock.connect(&addr.into()).unwrap();
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    pub const UPGRADE: &str =
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    /// Connects and sends `request` as is; returns the socket.
    pub fn connect(addr: SocketAddr, request: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        s
    }

    /// Reads the HTTP response head (and nothing after it).
    pub fn read_head(s: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    /// Reads everything until the server closes (or 5 s pass).
    pub fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    /// Upgrades and consumes the response head and the welcome frame.
    pub fn open(addr: SocketAddr) -> TcpStream {
        let mut s = connect(addr, UPGRADE.as_bytes());
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let (op, payload) = read_frame(&mut s).expect("welcome");
        assert_eq!(op, 1);
        assert!(String::from_utf8_lossy(&payload).contains("welcome"));
        s
    }

    /// A client frame: masked with a fixed key.
    pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        frame_with(fin, 0, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
    }

    /// Any frame, including invalid ones (rsv bits, no mask).
    pub fn frame_with(
        fin: bool,
        rsv: u8,
        opcode: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        let len = payload.len();
        if len < 126 {
            out.push(m | len as u8);
        } else if len <= 0xffff {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(m | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        match mask {
            Some(k) => {
                out.extend_from_slice(&k);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    /// Reads one server frame: (opcode, payload). None on EOF/timeout.
    pub fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).ok()?;
        assert_eq!(h[1] & 0x80, 0, "server frames must not be masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).ok()?;
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                s.read_exact(&mut l).ok()?;
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).ok()?;
        Some((h[0] & 0x0f, p))
    }

    /// Reads frames until a close frame; returns its code (None: EOF first).
    pub fn read_close_code(s: &mut TcpStream) -> Option<u16> {
        loop {
            let (op, p) = read_frame(s)?;
            if op == 8 {
                return Some(if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                });
            }
        }
    }

    /// Reads text frames until one whose JSON has `op` == `want`.
    pub fn read_op(s: &mut TcpStream, want: &str) -> serde_json::Value {
        loop {
            let (op, p) = read_frame(s).unwrap_or_else(|| panic!("EOF waiting for {want}"));
            if op != 1 {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            if v["op"] == want {
                return v;
            }
        }
    }

    /// Reads until the server ends the connection. `Ok(true)`: EOF (FIN);
    /// `Ok(false)`: reset. `Err` names what came instead: bytes, a timeout
    /// after `within`, or another error.
    pub fn wait_eof(s: &mut TcpStream, within: Duration) -> Result<bool, String> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 256];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the server did not end TCP within {within:?}"));
            }
            s.set_read_timeout(Some(left)).unwrap();
            match s.read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => return Err(format!("{n} bytes instead of EOF: {:?}", &buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("the server did not end TCP within {within:?}"))
                }
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }
}

/// Runs `ringcast` with `args` and `env` (stdin closed, without the
/// `RINGCAST_*` variables of the caller's shell) and waits for it to exit:
/// for `--help` and settings errors, which exit before binding.
pub fn ringcast(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
    cmd.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RINGCAST_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// `ringcast serve --help`: the whole text, and one `(flag, text)` per
/// option in order, where `flag` is the long name without `--` (`help` for
/// `-h, --help`) and `text` its indented description lines.
pub fn serve_help() -> (String, Vec<(String, String)>) {
    let out = ringcast(&["serve", "--help"], &[]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    // Each option is a block: its flag line, then indented description lines.
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("--") {
            let flag = rest.split([' ', '\t']).next().unwrap().to_string();
            blocks.push((flag, String::new()));
        } else if trimmed.starts_with("-h, --help") {
            blocks.push(("help".into(), String::new()));
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push_str(trimmed);
            text.push('\n');
        }
    }
    (help, blocks)
}

pub mod external;
pub mod redis;
