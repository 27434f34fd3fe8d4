//! Interop with independent, strict clients: the Python `websockets`
//! package drives two subscribers and a publisher through
//! `tests/interop/websockets_client.py`, and Node's `ws` (pinned in
//! clients/js) a subscriber and a publisher with permessage-deflate through
//! `tests/interop/ws_deflate_client.mjs` (each script's opening comment
//! lists its checks). Without python3 and `websockets`, or node, the test
//! fails, naming `tests/run`; `ws` is installed with `npm ci` in clients/js
//! when it is missing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::external::{self, Outcome};
use common::TestServer;

/// The script bounds itself at 25 s; this is the backstop.
const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn python_websockets_client() {
    external::require(
        "python3",
        &["-c", "import websockets.asyncio.client"],
        "the interop test needs python3 with the `websockets` package (13 or newer)",
    );
    let server = TestServer::start(&[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/websockets_client.py"
    );
    run_client(
        &server,
        "websockets_client.py",
        Command::new("python3").args([script, &server.url()]),
    );
}

/// `npm ci` is given this long to install clients/js's dev dependencies.
const NPM_LIMIT: Duration = Duration::from_secs(180);

/// Installs clients/js's pinned dev dependencies (`ws` among them) when
/// they are missing, as `tests/run` does before the JS tests.
fn install_node_ws(js: &Path) {
    if js.join("node_modules/ws/package.json").exists() {
        return;
    }
    external::require(
        "npm",
        &["--version"],
        "the Node interop test installs `ws` (clients/js/package.json) with npm",
    );
    let log = std::env::temp_dir().join(format!("ringcast-npm-ci-{}.log", std::process::id()));
    let outcome = external::run_bounded(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(js),
        NPM_LIMIT,
        &log,
    );
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    match outcome {
        Outcome::Exited(status) if status.success() => {}
        Outcome::Exited(status) => panic!("npm ci in {} {status}:\n{output}", js.display()),
        Outcome::TimedOut => panic!(
            "npm ci in {} still running after {NPM_LIMIT:?}",
            js.display()
        ),
    }
    assert!(
        js.join("node_modules/ws/package.json").exists(),
        "npm ci did not install ws:\n{output}"
    );
}

#[test]
fn node_ws_client_with_compression() {
    external::require(
        "node",
        &["--version"],
        "the Node interop test needs Node.js 20 or later (node)",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    install_node_ws(&root.join("clients/js"));
    let server = TestServer::start(&[]);
    let script = root.join("tests/interop/ws_deflate_client.mjs");
    let output = run_client(
        &server,
        "ws_deflate_client.mjs",
        Command::new("node").arg(&script).arg(server.url()),
    );
    // The server's side of it: the large and the fragmented message went
    // out compressed (each once, on the subscriber's shard).
    assert_eq!(
        server.metric("ringcast_messages_compressed_total"),
        2.0,
        "{output}"
    );
}

/// Runs an interop client against `server` within [`LIMIT`]; fails the test
/// with its output and the server's log unless it exits 0; returns the output.
fn run_client(server: &TestServer, name: &str, cmd: &mut Command) -> String {
    let log = server.stderr_path.with_extension(format!("{name}.log"));
    let started = Instant::now();
    let outcome = external::run_bounded(cmd, LIMIT, &log);
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    match outcome {
        Outcome::Exited(status) if status.success() => {
            println!("{} in {:?}", output.trim(), started.elapsed());
            output
        }
        Outcome::Exited(status) => panic!(
            "{name} {status}:\n{output}\n--- server log ---\n{}",
            server.log()
        ),
        Outcome::TimedOut => panic!(
            "{name} still running after {LIMIT:?}, killed:\n{output}\n--- server log ---\n{}",
            server.log()
        ),
    }
}
