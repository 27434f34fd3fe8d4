//! Running the independent peers the conformance tests drive (Python
//! `websockets`, kosoku): a missing tool fails the test with a pointer to
//! `tests/run` instead of skipping, and every run is bounded in time.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Fails the test unless `program args...` runs and exits 0. `what` says
/// what the test needs it for.
pub fn require(program: &str, args: &[&str], what: &str) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{what}: `{program} {}` failed ({}):\n{}{}\nrun tests/run, which installs the test prerequisites",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        ),
        Err(e) => panic!(
            "{what}: cannot run `{program}` ({e}); run tests/run, which installs the test prerequisites"
        ),
    }
}

/// How a bounded run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The program exited by itself.
    Exited(ExitStatus),
    /// It was still running at the limit and was killed.
    TimedOut,
}

/// Runs `cmd` with stdout and stderr appended to `log`; past `limit`, kills
/// its whole process group. The program gets no stdin.
pub fn run_bounded(cmd: &mut Command, limit: Duration, log: &Path) -> Outcome {
    let out = File::create(log).expect("create the output log");
    let err = out.try_clone().expect("clone the output log handle");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own group, so a timeout also ends anything it started.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}; run tests/run"));
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return Outcome::Exited(status);
        }
        if Instant::now() >= deadline {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
