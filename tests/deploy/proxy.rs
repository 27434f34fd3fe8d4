//! A real nginx or HAProxy for one test: its config made from the deploy/
//! file with only the host-specific parts rewritten (listen port, node
//! addresses, log and pid paths: each rewrite is counted, so a deploy file
//! the rewrite no longer understands fails the test), started in the
//! foreground in a process group of its own on a free loopback port, and
//! stopped (that group, by its id) on drop.
#![allow(unreachable_pub)]

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::recipes;

/// Which proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nginx,
    Haproxy,
}

/// A ringcast node as a proxy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub ws: SocketAddr,
    pub admin: SocketAddr,
}

/// A running proxy.
pub struct Proxy {
    pub kind: Kind,
    child: Child,
    pub dir: PathBuf,
    pub port: u16,
}

fn temp_dir(kind: Kind) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ringcast-{kind:?}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Replaces the `index`-th whitespace-separated word of `line` (keeping
/// its indentation).
fn replace_word(line: &str, index: usize, with: &str) -> String {
    let indent = &line[..line.len() - line.trim_start().len()];
    let mut words: Vec<String> = line.split_whitespace().map(String::from).collect();
    let semicolon = words[index].ends_with(';');
    words[index] = format!("{with}{}", if semicolon { ";" } else { "" });
    format!("{indent}{}", words.join(" "))
}

/// deploy/nginx/ringcast.conf for this machine: listening on 127.0.0.1:`port`,
/// sending to `nodes`, its pid, logs and temporary files in `dir`.
pub fn nginx_config(dir: &Path, port: u16, nodes: &[Node]) -> String {
    let text = recipes::read("nginx/ringcast.conf");
    let d = dir.display();
    let (mut servers, mut rewrites) = (0, 0);
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        let new = if t.starts_with("pid ") {
            replace_word(line, 1, &format!("{d}/nginx.pid"))
        } else if t.starts_with("error_log ") {
            replace_word(line, 1, &format!("{d}/error.log"))
        } else if t.starts_with("access_log ") {
            replace_word(line, 1, &format!("{d}/access.log"))
        } else if t.starts_with("listen ") {
            replace_word(line, 1, &format!("127.0.0.1:{port}"))
        } else if t.starts_with("server ") && t.contains(':') {
            let node = nodes[servers];
            servers += 1;
            replace_word(line, 1, &node.ws.to_string())
        } else {
            out.push(line.to_string());
            if t.starts_with("http {") {
                // Not in the deploy file: the package's compiled-in paths
                // (/var/lib/nginx) may not be writable by whoever runs the test.
                for what in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    out.push(format!("    {what}_temp_path {d}/{what};"));
                }
            }
            continue;
        };
        rewrites += 1;
        out.push(new);
    }
    assert_eq!(servers, nodes.len(), "one upstream server per node");
    assert_eq!(
        rewrites,
        4 + nodes.len(),
        "pid, error_log, access_log, listen and the servers"
    );
    out.join("\n") + "\n"
}

/// deploy/haproxy/haproxy.cfg for this machine: binding 127.0.0.1:`port`,
/// sending to `nodes` and checking their admin ports, logging to stdout;
/// without chroot and user switch (the test need not run as root).
pub fn haproxy_config(port: u16, nodes: &[Node]) -> String {
    let text = recipes::read("haproxy/haproxy.cfg");
    let (mut servers, mut rewrites) = (0, 0);
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        let words: Vec<&str> = t.split_whitespace().collect();
        if ["chroot", "user", "group"].contains(&words.first().copied().unwrap_or("")) {
            rewrites += 1;
            continue;
        }
        let new = if words.first() == Some(&"maxconn") {
            // HAProxy refuses to start when it cannot raise its open-file
            // limit to about 2 x maxconn (a container without
            // CAP_SYS_RESOURCE): what this machine allows.
            let fits = (hard_nofile_limit() - 1000) / 2;
            let wanted: u64 = words[1].parse().unwrap();
            replace_word(line, 1, &wanted.min(fits).to_string())
        } else if t.starts_with("log /dev/log") {
            line.replace("log /dev/log", "log stdout format raw")
        } else if t.starts_with("bind ") {
            replace_word(line, 1, &format!("127.0.0.1:{port}"))
        } else if t.starts_with("server ") {
            let node = nodes[servers];
            servers += 1;
            let at = words.iter().position(|w| *w == "port").expect("check port") + 1;
            let line = replace_word(line, 2, &node.ws.to_string());
            replace_word(&line, at, &node.admin.port().to_string())
        } else {
            out.push(line.to_string());
            continue;
        };
        rewrites += 1;
        out.push(new);
    }
    assert_eq!(servers, nodes.len(), "one server per node");
    assert_eq!(
        rewrites,
        7 + nodes.len(),
        "chroot, user, group, log, two maxconn, bind and the servers"
    );
    out.join("\n") + "\n"
}

/// This process's hard open-file limit (what a child may raise its own to).
fn hard_nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse().ok())
        .unwrap_or(1 << 20)
}

/// The path to run `program` by: its name when it is on PATH, else
/// Debian's /usr/sbin (not on a user's PATH). Fails the test when neither
/// runs; `tests/run` installs both.
pub fn program(program: &str) -> String {
    for candidate in [program.to_string(), format!("/usr/sbin/{program}")] {
        let runs = Command::new(&candidate)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if runs {
            return candidate;
        }
    }
    panic!(
        "cannot run `{program} -v`: run tests/run, which installs nginx and haproxy \
         (apt-get install nginx haproxy)"
    )
}

/// `nginx -t` or `haproxy -c` of the config as rewritten for `nodes`:
/// (success, the tool's output).
pub fn check_config(kind: Kind, nodes: &[Node]) -> (bool, String) {
    let dir = temp_dir(kind);
    let port = free_port();
    let mut cmd = command(kind, &dir, port, nodes);
    match kind {
        Kind::Nginx => cmd.arg("-t"),
        Kind::Haproxy => cmd.arg("-c"),
    };
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The command that runs `kind` in the foreground with its config written
/// to `dir`.
fn command(kind: Kind, dir: &Path, port: u16, nodes: &[Node]) -> Command {
    match kind {
        Kind::Nginx => {
            let nginx = program("nginx");
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_config(dir, port, nodes)).unwrap();
            let mut cmd = Command::new(nginx);
            cmd.arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"]);
            cmd
        }
        Kind::Haproxy => {
            let haproxy = program("haproxy");
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config(port, nodes)).unwrap();
            let mut cmd = Command::new(haproxy);
            // -db: foreground, no daemon.
            cmd.arg("-db").arg("-f").arg(&cfg);
            cmd
        }
    }
}

impl Proxy {
    /// Starts `kind` in front of `nodes`; retries on another port when the
    /// free port was taken meanwhile.
    pub fn start(kind: Kind, nodes: &[Node]) -> Proxy {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = temp_dir(kind);
            let port = free_port();
            let log = std::fs::File::create(dir.join("stdout.log")).unwrap();
            let child = command(kind, &dir, port, nodes)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                // Its own group: the workers are stopped with it.
                .process_group(0)
                .spawn()
                .unwrap();
            let mut proxy = Proxy {
                kind,
                child,
                dir,
                port,
            };
            match proxy.wait_listening(Duration::from_secs(10)) {
                Ok(()) => return proxy,
                Err(e) => last = e,
            }
        }
        panic!("{kind:?} did not start: {last}");
    }

    fn wait_listening(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited ({status}):\n{}", self.logs()));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not listening after {within:?}:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ws://127.0.0.1:PORT/ws` plus `query`.
    pub fn url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws{query}", self.port)
    }

    /// Everything the proxy logged: access and error logs, and its output.
    pub fn logs(&self) -> String {
        ["access.log", "error.log", "stdout.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .collect::<Vec<_>>()
            .join("")
    }

    /// The access log: nginx's file, or HAProxy's lines on stdout.
    pub fn access_log(&self) -> String {
        let file = match self.kind {
            Kind::Nginx => "access.log",
            Kind::Haproxy => "stdout.log",
        };
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Stops the proxy (SIGTERM to its group, SIGKILL after 5 s); its log
    /// files stay until drop.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // nginx's workers may outlive the master by a moment.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &group])
                    .stderr(Stdio::null())
                    .status();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
