//! A real `redis-server` for one test: spawned on a free loopback port with
//! its own data directory and log file, killed (by its PID) on drop. A
//! missing `redis-server` fails the test with a clear message; it is never
//! skipped.
//!
//! A free port is only free when it is checked: another test (or another
//! process) may take it before our server binds. So a server is ready only
//! when the one answering on the port says it is our child (`INFO server`
//! `process_id`), and a child that exited (port taken) is reported with its
//! log, or retried on another port at first start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct TestRedis {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    persistent: bool,
}

/// A port that was free a moment ago (see the module docs).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Why a spawned server never became ready.
pub enum NotReady {
    /// The child exited (for instance: the port was taken); its log's tail.
    Exited(String),
    /// It did not answer as itself in time; what answered instead.
    Timeout(String),
}

impl NotReady {
    pub fn port_taken(&self) -> bool {
        matches!(self, NotReady::Exited(log) if log.contains("Address already in use"))
    }

    pub fn describe(&self) -> &str {
        match self {
            NotReady::Exited(s) | NotReady::Timeout(s) => s,
        }
    }
}

/// The last lines of a log file.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Spawns `redis-server` with `args` (its log to `log`) and waits until the
/// server answering on `port` is this child.
pub fn spawn_redis(args: &[String], port: u16, log: &Path) -> Result<Child, NotReady> {
    let mut child = Command::new("redis-server")
        .args(args)
        .arg("--logfile")
        .arg(log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}): install it (tests/run does: apt-get install redis-server)")
        });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotReady::Exited(format!(
                "redis-server on port {port} exited ({status}); its log:\n{}",
                tail(log)
            )));
        }
        let last = match server_pid(port) {
            Ok(pid) if pid == child.id() => return Ok(child),
            Ok(pid) => format!("another redis-server (pid {pid}) answers on port {port}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NotReady::Timeout(format!(
                "redis-server on port {port} was not ready in 10 s: {last}; its log:\n{}",
                tail(log)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `process_id` of the Redis server on `port`.
fn server_pid(port: u16) -> Result<u32, String> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}/0")).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(|e| e.to_string())?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut conn)
        .map_err(|e| e.to_string())?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("no process_id in INFO server from port {port}"))
}

impl TestRedis {
    /// No persistence.
    pub fn start() -> TestRedis {
        Self::start_with(false)
    }

    /// With `--appendonly yes`, so a restart keeps the streams.
    pub fn start_persistent() -> TestRedis {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> TestRedis {
        let dir = std::env::temp_dir().join(format!(
            "ringcast-redis-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = TestRedis {
            child: None,
            port: 0,
            dir,
            persistent,
        };
        // The port may be taken between checking and binding: try others.
        for attempt in 1.. {
            r.port = free_port();
            match r.spawn() {
                Ok(()) => break,
                Err(e) if e.port_taken() && attempt < 5 => {}
                Err(e) => panic!("{}", e.describe()),
            }
        }
        r
    }

    fn spawn(&mut self) -> Result<(), NotReady> {
        let mut args: Vec<String> = ["--port", &self.port.to_string(), "--bind", "127.0.0.1"]
            .map(String::from)
            .to_vec();
        args.extend(["--save", "", "--dir"].map(String::from));
        args.push(self.dir.to_string_lossy().into_owned());
        if self.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        }
        let log = self.dir.join("redis.log");
        self.child = Some(spawn_redis(&args, self.port, &log)?);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A plain client connection, as a producer would open.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Kills the server (SIGKILL, by PID) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory; fails the test if
    /// the port was taken meanwhile.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("restarting redis-server: {}", e.describe());
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `XADD` as a producer would: partition by crc32 (16 partitions, prefix
/// `ringcast`).
pub fn xadd(conn: &mut redis::Connection, topic: &str, fields: &[(&str, &str)]) -> String {
    xadd_to(conn, "ringcast", 16, topic, fields)
}

/// `XADD` to `topic`'s partition under another prefix / partition count.
pub fn xadd_to(
    conn: &mut redis::Connection,
    prefix: &str,
    partitions: u32,
    topic: &str,
    fields: &[(&str, &str)],
) -> String {
    let p = ringcast::broker::redis::partition(topic, partitions);
    let key = ringcast::broker::redis::stream_key(prefix, p);
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(conn).unwrap()
}
