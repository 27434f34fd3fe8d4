//! `ringcast doctor` on this machine and against fake /proc trees (the
//! hidden `--host-root`), and `serve` raising its own open-file limit.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::ringcast;

/// Every check, in report order.
const CHECKS: [&str; 14] = [
    "io_uring",
    "memlock",
    "nofile",
    "fs.nr_open",
    "fs.file-max",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.netfilter.nf_conntrack_max",
    "memory",
    "transparent_hugepage",
];

/// What one run printed: (status, check name, the whole line) per line.
struct Report {
    lines: Vec<(String, String, String)>,
    code: i32,
    stdout: String,
}

impl Report {
    fn line(&self, name: &str) -> &(String, String, String) {
        self.lines
            .iter()
            .find(|(_, n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} line:\n{}", self.stdout))
    }

    fn status(&self, name: &str) -> &str {
        &self.line(name).0
    }

    fn warns(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(s, _, _)| s == "warn")
            .map(|(_, n, _)| n.as_str())
            .collect()
    }
}

/// Runs `ringcast doctor ARGS` and checks the shape every report has: one
/// line per check, in order, each `ok|warn|info  name: detail`, a `fix:`
/// on every warn line, exit 1 exactly when some line warns.
fn doctor(args: &[&str]) -> Report {
    let out = ringcast(&[&["doctor"], args].concat(), &[]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let code = out.status.code().expect("doctor exited by itself");
    let mut lines = Vec::new();
    for line in stdout.lines() {
        let (status, rest) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("not `status name: detail`: {line:?}"));
        assert!(
            ["ok", "warn", "info"].contains(&status),
            "status {status:?}: {line}"
        );
        let (name, detail) = rest
            .trim_start()
            .split_once(": ")
            .unwrap_or_else(|| panic!("no `name: detail` in {line:?}"));
        assert!(!detail.is_empty(), "{line}");
        assert_eq!(
            status == "warn",
            line.contains("; fix: "),
            "a fix on warn lines, and only there: {line}"
        );
        lines.push((status.to_string(), name.to_string(), line.to_string()));
    }
    let names: Vec<&str> = lines.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(names, CHECKS, "one line per check, in order:\n{stdout}");
    let any_warn = lines.iter().any(|(s, _, _)| s == "warn");
    assert_eq!(
        code,
        i32::from(any_warn),
        "exit 1 exactly on a warn:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Report {
        lines,
        code,
        stdout,
    }
}

#[test]
fn on_this_host_every_check_prints_one_line_and_only_a_warn_fails() {
    let report = doctor(&["--connections", "1000"]);
    // This host's own values, whatever they are, read as this host has them.
    let hard = hard_nofile();
    let nofile = &report.line("nofile").2;
    assert!(nofile.contains(&format!("hard limit {hard}")), "{nofile}");
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap();
    assert!(report.line("fs.nr_open").2.contains(nr_open.trim()));
    // The ring probe ran here (on this machine or in a sandbox without it).
    let uring = &report.line("io_uring").2;
    assert!(!uring.contains("not probed"), "{uring}");
}

#[test]
fn more_connections_than_this_hosts_hard_limit_is_a_warn_naming_limitnofile() {
    let hard = hard_nofile();
    let n = (hard + 1).to_string();
    let report = doctor(&["--connections", &n]);
    assert_eq!(report.code, 1);
    assert_eq!(report.status("nofile"), "warn");
    assert!(report.line("nofile").2.contains("LimitNOFILE="));
}

/// A fake host: /proc and /sys under a temporary directory, with values
/// that pass for 100,000 connections unless a test changes them.
struct FakeHost {
    root: PathBuf,
}

impl FakeHost {
    fn new() -> FakeHost {
        let root = std::env::temp_dir().join(format!(
            "ringcast-doctor-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let host = FakeHost { root };
        for (name, value) in [
            ("kernel.osrelease", "6.1.0-26-amd64"),
            ("kernel.io_uring_disabled", "0"),
            ("fs.nr_open", "1048576"),
            ("fs.file-max", "9223372036854775807"),
            ("net.core.somaxconn", "65535"),
            ("net.ipv4.tcp_max_syn_backlog", "65535"),
            ("net.ipv4.tcp_syncookies", "1"),
            ("net.ipv4.ip_local_port_range", "32768\t60999"),
            ("net.ipv4.tcp_mem", "1048576\t1572864\t2097152"),
            ("net.ipv4.tcp_rmem", "4096\t16384\t1048576"),
            ("net.ipv4.tcp_wmem", "4096\t16384\t4194304"),
            ("net.netfilter.nf_conntrack_max", "262144"),
            ("net.netfilter.nf_conntrack_count", "17"),
        ] {
            host.sysctl(name, value);
        }
        host.limits(1024, 1_048_576);
        // 16 GiB, 12 GiB available.
        host.write(
            "proc/meminfo",
            "MemTotal:       16777216 kB\nMemFree:         1000000 kB\n\
             MemAvailable:   12582912 kB\n",
        );
        host.write(
            "sys/kernel/mm/transparent_hugepage/enabled",
            "always [madvise] never\n",
        );
        host
    }

    fn write(&self, path: &str, text: &str) {
        let p = self.root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn sysctl(&self, name: &str, value: &str) {
        self.write(
            &format!("proc/sys/{}", name.replace('.', "/")),
            &format!("{value}\n"),
        );
    }

    fn remove(&self, path: &str) {
        std::fs::remove_file(self.root.join(path)).unwrap();
    }

    /// /proc/self/limits as Linux prints it.
    fn limits(&self, soft: u64, hard: u64) {
        self.write(
            "proc/self/limits",
            &format!(
                "Limit                     Soft Limit           Hard Limit           Units     \n\
                 Max cpu time              unlimited            unlimited            seconds   \n\
                 Max open files            {soft:<20} {hard:<20} files     \n\
                 Max locked memory         8388608              8388608              bytes     \n"
            ),
        );
    }

    fn doctor(&self, connections: u64) -> Report {
        doctor(&[
            "--connections",
            &connections.to_string(),
            "--host-root",
            self.root.to_str().unwrap(),
        ])
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn a_host_with_enough_of_everything_passes() {
    let host = FakeHost::new();
    let report = host.doctor(100_000);
    assert_eq!(report.code, 0, "{}", report.stdout);
    assert!(report.warns().is_empty(), "{}", report.stdout);
    // A fake tree is not this kernel: no ring probe.
    assert!(report.line("io_uring").2.contains("not probed"));
    // The soft limit is low, but serve raises it to the hard one.
    let nofile = &report.line("nofile").2;
    assert_eq!(report.status("nofile"), "ok");
    assert!(
        nofile.contains("soft 1024, which serve raises to the hard limit at start"),
        "{nofile}"
    );
    // What is informational stays so.
    for name in [
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "transparent_hugepage",
    ] {
        assert_eq!(report.status(name), "info", "{}", report.stdout);
    }
    assert!(report
        .line("net.ipv4.ip_local_port_range")
        .2
        .contains("28232 ports per destination"));
    assert!(report.line("transparent_hugepage").2.contains("madvise"));
    assert!(report
        .line("net.netfilter.nf_conntrack_max")
        .2
        .contains("17 in use"));
}

#[test]
fn a_low_open_file_limit_warns_with_the_unit_line_that_fixes_it() {
    let host = FakeHost::new();
    host.limits(1024, 4096);
    let report = host.doctor(100_000);
    assert_eq!(report.code, 1);
    assert_eq!(report.warns(), ["nofile"], "{}", report.stdout);
    let line = &report.line("nofile").2;
    // 100,000 connections + 64 for the process, rounded up to a power of two.
    assert!(line.contains("hard limit 4096 < 100064"), "{line}");
    assert!(
        line.contains(
            "fix: LimitNOFILE=131072 in [Service] (deploy/systemd/ringcast.service), or \
             `ringcast hard nofile 131072` in /etc/security/limits.d/ringcast.conf"
        ),
        "{line}"
    );
}

#[test]
fn each_short_setting_warns_with_the_command_that_fixes_it() {
    let host = FakeHost::new();
    host.sysctl("kernel.io_uring_disabled", "2");
    host.sysctl("fs.nr_open", "65536");
    host.sysctl("fs.file-max", "65536");
    host.sysctl("net.core.somaxconn", "128");
    host.sysctl("net.ipv4.tcp_syncookies", "0");
    host.sysctl("net.ipv4.tcp_max_syn_backlog", "512");
    host.sysctl("net.ipv4.tcp_mem", "1000\t2000\t3000");
    host.sysctl("net.netfilter.nf_conntrack_max", "65536");
    // 1 GiB available: 100,000 connections at 5,220 B need about 0.5 GiB,
    // 500,000 about 2.4 GiB.
    host.write(
        "proc/meminfo",
        "MemTotal:        2097152 kB\nMemAvailable:    1048576 kB\n",
    );
    let report = host.doctor(500_000);
    let fixes = [
        ("io_uring", "sysctl -w kernel.io_uring_disabled=0"),
        ("fs.nr_open", "sysctl -w fs.nr_open=524288"),
        ("fs.file-max", "sysctl -w fs.file-max=524288"),
        ("net.core.somaxconn", "sysctl -w net.core.somaxconn=65535"),
        (
            "net.ipv4.tcp_max_syn_backlog",
            "sysctl -w net.ipv4.tcp_max_syn_backlog=65535",
        ),
        (
            "net.ipv4.tcp_mem",
            "sysctl -w net.ipv4.tcp_mem=\"500000 750000 1000000\", and \
             `net.ipv4.tcp_mem = 500000 750000 1000000` in /etc/sysctl.d/60-ringcast.conf",
        ),
        (
            "net.netfilter.nf_conntrack_max",
            "sysctl -w net.netfilter.nf_conntrack_max=1000000",
        ),
        ("memory", "--max-connections 205697"),
    ];
    for (name, fix) in fixes {
        let (status, _, line) = report.line(name);
        assert_eq!(status, "warn", "{line}");
        assert!(line.contains(fix), "{name}: expected {fix:?} in\n{line}");
    }
    // The conntrack fix offers NOTRACK of the listener port too.
    assert!(report
        .line("net.netfilter.nf_conntrack_max")
        .2
        .contains("iptables -t raw -A PREROUTING -p tcp --dport 8080 -j NOTRACK"));
    assert_eq!(report.warns().len(), fixes.len(), "{}", report.stdout);
    assert_eq!(report.code, 1);
}

#[test]
fn settings_the_kernel_does_not_have_are_not_warnings() {
    let host = FakeHost::new();
    // Before 6.6 there is no io_uring_disabled; without the module, no
    // conntrack table; a kernel built without THP has no such file.
    host.remove("proc/sys/kernel/io_uring_disabled");
    host.remove("proc/sys/net/netfilter/nf_conntrack_max");
    host.remove("sys/kernel/mm/transparent_hugepage/enabled");
    // With syncookies, a short SYN queue answers bursts with cookies.
    host.sysctl("net.ipv4.tcp_max_syn_backlog", "1024");
    let report = host.doctor(100_000);
    assert_eq!(report.code, 0, "{}", report.stdout);
    assert_eq!(report.status("io_uring"), "ok");
    assert_eq!(report.status("net.netfilter.nf_conntrack_max"), "info");
    assert!(report
        .line("net.netfilter.nf_conntrack_max")
        .2
        .contains("not loaded"));
    assert_eq!(report.status("net.ipv4.tcp_max_syn_backlog"), "ok");
    assert!(report
        .line("transparent_hugepage")
        .2
        .contains("not available"));
}

#[test]
fn an_old_kernel_warns_about_io_uring_and_locked_memory() {
    let host = FakeHost::new();
    host.sysctl("kernel.osrelease", "5.10.0-28-amd64");
    host.write(
        "proc/self/limits",
        "Max open files            1048576              1048576              files     \n\
         Max locked memory         65536                65536                bytes     \n",
    );
    let report = host.doctor(1000);
    assert_eq!(report.warns(), ["memlock"], "{}", report.stdout);
    assert!(report
        .line("memlock")
        .2
        .contains("fix: LimitMEMLOCK=infinity"));
    host.sysctl("kernel.osrelease", "4.19.0-21-amd64");
    let report = host.doctor(1000);
    assert_eq!(report.warns(), ["io_uring", "memlock"], "{}", report.stdout);
    assert!(report.line("io_uring").2.contains("predates io_uring"));
}

/// Starts `serve` under `sh -c 'ulimit -Sn SOFT; exec ringcast serve ...'`
/// and returns (the soft open-file limit the running server has, its log).
fn serve_with_soft_nofile(soft: u64, extra: &[&str]) -> (u64, String) {
    let log = std::env::temp_dir().join(format!(
        "ringcast-nofile-{}-{}.log",
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -Sn {soft} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_ringcast"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--allow-anonymous",
            "--shards",
            "1",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RINGCAST_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(ready.starts_with("ringcast ready"), "{ready:?}\n{text}");
    let soft_now = limits
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|s| s.parse().ok())
        .unwrap();
    (soft_now, text)
}

fn hard_nofile() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse().ok())
        .expect("a finite hard limit on open files")
}

#[test]
fn serve_raises_its_soft_open_file_limit_and_warns_below_max_connections() {
    let hard = hard_nofile();
    assert!(hard > 256, "this test needs a hard limit above 256: {hard}");
    // The default --max-connections (1,000,000) is above this host's hard
    // limit here (tuning/: 20000): raised, and a warning.
    let (soft, log) = serve_with_soft_nofile(256, &["--max-connections", &(hard * 2).to_string()]);
    assert_eq!(soft, hard, "soft limit raised to the hard one\n{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("open-file limit below --max-connections"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&format!("limit={hard}")), "{warning}");
    // Room for every connection: raised, no warning.
    let (soft, log) = serve_with_soft_nofile(256, &["--max-connections", "100"]);
    assert_eq!(soft, hard, "{log}");
    assert!(!log.contains("open-file limit below"), "{log}");
    assert!(log.contains("open-file limit"), "logged at start:\n{log}");
}
