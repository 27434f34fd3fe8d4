//! Interop with an independent, strict client: the Python `websockets`
//! package drives two subscribers and a publisher through
//! `tests/interop/websockets_client.py` (its docstring lists the checks).
//! Without python3 or `websockets` the test fails, naming `tests/run`.

mod common;

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
    let log = server.stderr_path.with_extension("python.log");
    let started = Instant::now();
    let outcome = external::run_bounded(
        Command::new("python3").args([script, &server.url()]),
        LIMIT,
        &log,
    );
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    match outcome {
        Outcome::Exited(status) if status.success() => {
            println!("{} in {:?}", output.trim(), started.elapsed());
        }
        Outcome::Exited(status) => panic!(
            "websockets_client.py {status}:\n{output}\n--- server log ---\n{}",
            server.log()
        ),
        Outcome::TimedOut => panic!(
            "websockets_client.py still running after {LIMIT:?}, killed:\n{output}\n--- server log ---\n{}",
            server.log()
        ),
    }
}
