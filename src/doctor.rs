//! `ringcast doctor`: checks this host for N connections and prints one
//! line per check to stdout, `ok`, `warn` or `info`, each `warn` with the
//! command or file line that fixes it; the process exits 1 on any `warn`.
//!
//! It only reads: `/proc/sys` (the sysctls of tuning/README.md),
//! `/proc/self/limits` (this process's limits, inherited from the shell
//! that ran it), `/proc/meminfo`, the transparent huge pages setting in
//! `/sys`, and it sets up one io_uring ring to see whether the kernel (and
//! any seccomp filter) allows it. Every path is read under a root (`/`,
//! or the hidden `--host-root` that tests point at a fake tree; the ring
//! probe then does not run, as it would probe this kernel, not the tree's).
//! Budgets per connection are the measured ones of tuning/README.md.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::config::Config;
use crate::server::{FD_RESERVE, LISTEN_BACKLOG};

/// Host memory one idle connection costs: ringcast's ~320 B plus the
/// kernel's socket, inode, epoll item and TCP control block, 3,700-4,900 B,
/// measured with `ringcast load idle` (tuning/README.md). The upper end.
pub const BYTES_PER_CONNECTION: u64 = 320 + 4_900;

/// Pages of TCP buffer memory (`net.ipv4.tcp_mem`) to budget per
/// connection: one notification of up to ~1 KB queued on every connection
/// at once is one buffer of 2-4 KB each (its truesize).
pub const TCP_PAGES_PER_CONNECTION: u64 = 1;

/// Conntrack entries to budget per connection: its own, and for two
/// minutes after a drain or a reconnect storm the closed one's, in
/// TIME_WAIT beside its replacement.
pub const CONNTRACK_PER_CONNECTION: u64 = 2;

/// Bytes of one conntrack entry (the `nf_conntrack` slab object on x86-64
/// Linux 6.x), for saying what a `nf_conntrack_max` costs.
const CONNTRACK_ENTRY_BYTES: u64 = 256;

/// The page `tcp_mem` counts in (x86-64, and most arm64 kernels).
const PAGE: u64 = 4096;

/// Locked memory below which io_uring may fail to set up a ring per shard
/// on kernels that still charge rings to RLIMIT_MEMLOCK (before 5.12).
const MEMLOCK_WANTED: u64 = 64 << 20;

/// The sysctl file that persists a fix (tuning/sysctl.conf is its model).
const SYSCTL_FILE: &str = "/etc/sysctl.d/60-ringcast.conf";

/// `ringcast doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Connections this node must hold (the default is serve's
    /// --max-connections default).
    #[arg(long, default_value_t = Config::default().max_connections as u64)]
    pub connections: u64,
    /// The node's --listen port, for the conntrack NOTRACK rules (the
    /// default is serve's).
    #[arg(long, default_value_t = Config::default().listen.port())]
    pub port: u16,
    /// Reads /proc and /sys under this directory instead of `/` (tests).
    #[arg(long, hide = true, default_value = "/")]
    pub host_root: PathBuf,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Enough for the connections asked about.
    Ok,
    /// Not enough: the line says how to fix it; `doctor` exits 1.
    Warn,
    /// Worth knowing, nothing to fix (or nothing could be read).
    Info,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Info => "info",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The verdict.
    pub status: Status,
    /// What was checked: a sysctl or limit name.
    pub name: &'static str,
    /// What was found, against what was needed.
    pub detail: String,
    /// The command or file line that fixes a `warn`.
    pub fix: Option<String>,
}

impl Check {
    fn new(status: Status, name: &'static str, detail: String) -> Check {
        Check {
            status,
            name,
            detail,
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: String, fix: String) -> Check {
        Check {
            status: Status::Warn,
            name,
            detail,
            fix: Some(fix),
        }
    }

    fn unreadable(name: &'static str, path: &str) -> Check {
        let detail = format!("cannot read {path}: not checked");
        Check::new(Status::Info, name, detail)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<5} {}: {}", self.status, self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// Runs every check and prints one line each; returns how many warn.
pub fn run(args: &DoctorArgs) -> usize {
    let checks = checks(&args.host_root, args.connections, args.port);
    for c in &checks {
        println!("{c}");
    }
    checks.iter().filter(|c| c.status == Status::Warn).count()
}

/// Every check of the host under `root` for `connections` connections on
/// listener `port`, in report order.
pub fn checks(root: &Path, connections: u64, port: u16) -> Vec<Check> {
    let host = Host {
        root: root.to_path_buf(),
    };
    let (n, fds) = (connections, connections + FD_RESERVE);
    let kernel = host.sysctl("kernel.osrelease");
    let version = kernel.as_deref().and_then(kernel_version);
    vec![
        io_uring(&host, kernel.as_deref(), version),
        memlock(&host, version),
        nofile(&host, n),
        at_least(&host, "fs.nr_open", fds, "the ceiling of LimitNOFILE"),
        at_least(&host, "fs.file-max", fds, "open files of every process"),
        backlog(&host, "net.core.somaxconn"),
        syn_backlog(&host),
        port_range(&host, n),
        tcp_mem(&host, n),
        buffers(&host, "net.ipv4.tcp_rmem", n, "what clients send"),
        buffers(&host, "net.ipv4.tcp_wmem", n, "unread notifications"),
        conntrack(&host, n, port),
        memory(&host, n),
        huge_pages(&host),
    ]
}

/// The file system the checks read, under a root.
struct Host {
    root: PathBuf,
}

impl Host {
    /// `path` (absolute, as on the host) read under the root.
    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(path.trim_start_matches('/'))).ok()
    }

    /// A sysctl by its dotted name, trimmed.
    fn sysctl(&self, name: &str) -> Option<String> {
        self.read(&sysctl_path(name)).map(|s| s.trim().to_string())
    }

    fn sysctl_numbers(&self, name: &str) -> Option<Vec<u64>> {
        let text = self.sysctl(name)?;
        text.split_whitespace().map(|w| w.parse().ok()).collect()
    }

    fn sysctl_u64(&self, name: &str) -> Option<u64> {
        self.sysctl_numbers(name)?.first().copied()
    }

    /// This process's (soft, hard) limit named `name` in /proc/self/limits
    /// ("Max open files"); "unlimited" is `u64::MAX`.
    fn limit(&self, name: &str) -> Option<(u64, u64)> {
        parse_limit(&self.read("/proc/self/limits")?, name)
    }

    /// Whether this is the host itself (the ring probe then means something).
    fn is_this_host(&self) -> bool {
        self.root == Path::new("/")
    }
}

fn sysctl_path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

/// How to set a sysctl now and at every boot.
fn sysctl_fix(name: &str, value: &str) -> String {
    let quoted = if value.contains(' ') {
        format!("\"{value}\"")
    } else {
        value.to_string()
    };
    format!(
        "sysctl -w {name}={quoted}, and `{name} = {value}` in {SYSCTL_FILE} (tuning/sysctl.conf)"
    )
}

/// (soft, hard) of the /proc/<pid>/limits line starting with `name`.
fn parse_limit(limits: &str, name: &str) -> Option<(u64, u64)> {
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let value = |w: Option<&str>| match w? {
        "unlimited" => Some(u64::MAX),
        w => w.parse().ok(),
    };
    Some((value(words.next())?, value(words.next())?))
}

/// (major, minor) of a kernel release such as `6.1.0-26-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A byte count for people: GiB, MiB or KiB with one decimal.
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", b / f64::from(1u32 << 30))
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", b / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn io_uring(host: &Host, kernel: Option<&str>, version: Option<(u32, u32)>) -> Check {
    const NAME: &str = "io_uring";
    let kernel = kernel.unwrap_or("unknown");
    if version.is_some_and(|v| v < (5, 6)) {
        return Check::warn(
            NAME,
            format!("kernel {kernel} predates io_uring (5.6): ringcast runs on epoll"),
            "a kernel 5.6 or newer (5.12+ also stops charging rings to locked memory)".into(),
        );
    }
    let disabled = host.sysctl_u64("kernel.io_uring_disabled").unwrap_or(0);
    if disabled != 0 {
        let who = if disabled == 1 {
            "only the group kernel.io_uring_group names may use it"
        } else {
            "nobody may use it"
        };
        return Check::warn(
            NAME,
            format!("kernel.io_uring_disabled = {disabled}: {who}; ringcast runs on epoll"),
            sysctl_fix("kernel.io_uring_disabled", "0"),
        );
    }
    if !host.is_this_host() {
        return Check::new(
            Status::Ok,
            NAME,
            format!("kernel {kernel}, not disabled (not probed: another host's tree)"),
        );
    }
    if std::env::var_os("MONOIO_FORCE_LEGACY_DRIVER").is_some_and(|v| v != "0" && v != "false") {
        return Check::warn(
            NAME,
            "MONOIO_FORCE_LEGACY_DRIVER is set: ringcast would run on epoll".into(),
            "unset MONOIO_FORCE_LEGACY_DRIVER".into(),
        );
    }
    if monoio::utils::detect_uring() {
        Check::new(
            Status::Ok,
            NAME,
            format!("kernel {kernel}: a ring was set up with every operation ringcast uses"),
        )
    } else {
        Check::warn(
            NAME,
            format!(
                "kernel {kernel}: setting up a ring failed (a seccomp filter, such as a \
                 container runtime's default profile?); ringcast runs on epoll"
            ),
            "allow io_uring_setup, io_uring_enter and io_uring_register: seccompProfile in \
             deploy/k8s/deployment.yaml, SystemCallFilter= in deploy/systemd/ringcast.service"
                .into(),
        )
    }
}

fn memlock(host: &Host, version: Option<(u32, u32)>) -> Check {
    const NAME: &str = "memlock";
    if version.is_none_or(|v| v >= (5, 12)) {
        return Check::new(
            Status::Ok,
            NAME,
            "io_uring rings are not charged to locked memory since Linux 5.12".into(),
        );
    }
    let Some((soft, _)) = host.limit("Max locked memory") else {
        return Check::unreadable(NAME, "/proc/self/limits");
    };
    if soft >= MEMLOCK_WANTED {
        return Check::new(
            Status::Ok,
            NAME,
            format!("{} of locked memory for io_uring rings", human(soft)),
        );
    }
    Check::warn(
        NAME,
        format!(
            "{} of locked memory; before Linux 5.12 each shard's ring is charged to it and \
             may fail to set up (epoll then)",
            human(soft)
        ),
        "LimitMEMLOCK=infinity in [Service] (deploy/systemd/ringcast.service), or \
         `ringcast hard memlock unlimited` in /etc/security/limits.d/ringcast.conf \
         (tuning/limits.conf)"
            .into(),
    )
}

fn nofile(host: &Host, n: u64) -> Check {
    const NAME: &str = "nofile";
    let Some((soft, hard)) = host.limit("Max open files") else {
        return Check::unreadable(NAME, "/proc/self/limits");
    };
    let needed = n + FD_RESERVE;
    let whose = "this shell's limits; a systemd unit sets its own";
    if hard < needed {
        let want = needed.next_power_of_two();
        return Check::warn(
            NAME,
            format!(
                "hard limit {hard} < {needed} (one per connection for {n}, plus {FD_RESERVE}); \
                 soft {soft} ({whose})"
            ),
            format!(
                "LimitNOFILE={want} in [Service] (deploy/systemd/ringcast.service), or \
                 `ringcast hard nofile {want}` in /etc/security/limits.d/ringcast.conf \
                 (tuning/limits.conf)"
            ),
        );
    }
    let soft_note = if soft < needed {
        format!("; soft {soft}, which serve raises to the hard limit at start")
    } else {
        format!("; soft {soft}")
    };
    Check::new(
        Status::Ok,
        NAME,
        format!("hard limit {hard} >= {needed} needed{soft_note} ({whose})"),
    )
}

/// A sysctl that must be at least `needed` (`what` says what it bounds).
fn at_least(host: &Host, name: &'static str, needed: u64, what: &str) -> Check {
    let Some(value) = host.sysctl_u64(name) else {
        return Check::unreadable(name, &sysctl_path(name));
    };
    if value >= needed {
        return Check::new(
            Status::Ok,
            name,
            format!("{value} >= {needed} needed ({what})"),
        );
    }
    let want = needed.next_power_of_two();
    Check::warn(
        name,
        format!("{value} < {needed} needed ({what})"),
        sysctl_fix(name, &want.to_string()),
    )
}

/// A queue length the kernel caps ringcast's listen backlog with.
fn backlog(host: &Host, name: &'static str) -> Check {
    let Some(value) = host.sysctl_u64(name) else {
        return Check::unreadable(name, &sysctl_path(name));
    };
    let wanted = LISTEN_BACKLOG as u64;
    if value >= wanted {
        return Check::new(
            Status::Ok,
            name,
            format!("{value} >= {wanted}, ringcast's listen backlog per shard"),
        );
    }
    Check::warn(
        name,
        format!(
            "{value} < {wanted}, ringcast's listen backlog per shard: a reconnect storm \
             overflows it and clients wait a second per dropped SYN"
        ),
        sysctl_fix(name, "65535"),
    )
}

/// The SYN queue: `tcp_max_syn_backlog` drops SYNs only with syncookies
/// off (with them, an overflow is answered with a cookie instead).
fn syn_backlog(host: &Host) -> Check {
    const NAME: &str = "net.ipv4.tcp_max_syn_backlog";
    let cookies = host.sysctl_u64("net.ipv4.tcp_syncookies").unwrap_or(1);
    match host.sysctl_u64(NAME) {
        Some(value) if value < LISTEN_BACKLOG as u64 && cookies != 0 => Check::new(
            Status::Ok,
            NAME,
            format!(
                "{value}; net.ipv4.tcp_syncookies = {cookies}: a burst past it is answered \
                 with syncookies, not dropped (65535 keeps it off that path, tuning/)"
            ),
        ),
        _ => backlog(host, NAME),
    }
}

fn port_range(host: &Host, n: u64) -> Check {
    const NAME: &str = "net.ipv4.ip_local_port_range";
    let Some(range) = host.sysctl_numbers(NAME).filter(|r| r.len() == 2) else {
        return Check::unreadable(NAME, &sysctl_path(NAME));
    };
    let ports = range[1].saturating_sub(range[0]) + 1;
    let sources = n.div_ceil(ports);
    Check::new(
        Status::Info,
        NAME,
        format!(
            "{}-{}: {ports} ports per destination; whatever connects {n} clients to one \
             ringcast address from this host (a proxy, `ringcast load`) needs {sources} source \
             address(es) (`1024 65535` widens it, tuning/README.md)",
            range[0], range[1]
        ),
    )
}

fn tcp_mem(host: &Host, n: u64) -> Check {
    const NAME: &str = "net.ipv4.tcp_mem";
    let Some(pages) = host.sysctl_numbers(NAME).filter(|p| p.len() == 3) else {
        return Check::unreadable(NAME, &sysctl_path(NAME));
    };
    let needed = n * TCP_PAGES_PER_CONNECTION;
    let found = format!(
        "min/pressure/max {}/{}/{} pages ({}/{}/{})",
        pages[0],
        pages[1],
        pages[2],
        human(pages[0] * PAGE),
        human(pages[1] * PAGE),
        human(pages[2] * PAGE)
    );
    if pages[2] >= needed {
        return Check::new(
            Status::Ok,
            NAME,
            format!(
                "{found}: max >= {needed} pages, one notification queued on all {n} \
                 connections at once"
            ),
        );
    }
    let want = format!("{} {} {}", needed, needed * 3 / 2, needed * 2);
    Check::warn(
        NAME,
        format!(
            "{found}: max < {needed} pages ({}), one notification queued on all {n} \
             connections at once; past max, sends fail",
            human(needed * PAGE)
        ),
        format!(
            "{} (limits, not reservations: only where {} can go to socket buffers)",
            sysctl_fix(NAME, &want),
            human(needed * 2 * PAGE)
        ),
    )
}

/// `tcp_rmem` / `tcp_wmem`: what `n` full default buffers would take.
fn buffers(host: &Host, name: &'static str, n: u64, what: &str) -> Check {
    let Some(v) = host.sysctl_numbers(name).filter(|v| v.len() == 3) else {
        return Check::unreadable(name, &sysctl_path(name));
    };
    let cap = host
        .sysctl_numbers("net.ipv4.tcp_mem")
        .and_then(|p| p.get(2).copied())
        .map_or_else(|| "tcp_mem's max".to_string(), |p| human(p * PAGE));
    Check::new(
        Status::Info,
        name,
        format!(
            "default {} B, max {} B per socket, held only while data waits ({what}): idle \
             connections cost nothing here; all {n} full at the default would be {}, which \
             tcp_mem caps at {cap}",
            v[1],
            v[2],
            human(n * v[1])
        ),
    )
}

fn conntrack(host: &Host, n: u64, port: u16) -> Check {
    const NAME: &str = "net.netfilter.nf_conntrack_max";
    let Some(max) = host.sysctl_u64(NAME) else {
        return Check::new(
            Status::Info,
            NAME,
            "nf_conntrack is not loaded: connections are not tracked".into(),
        );
    };
    let count = host
        .sysctl_u64("net.netfilter.nf_conntrack_count")
        .map_or_else(String::new, |c| format!(", {c} in use"));
    let needed = n * CONNTRACK_PER_CONNECTION;
    if max >= needed {
        return Check::new(
            Status::Ok,
            NAME,
            format!(
                "{max}{count} >= {needed} ({CONNTRACK_PER_CONNECTION} per connection: closed \
                 ones linger in TIME_WAIT through a reconnect storm)"
            ),
        );
    }
    Check::warn(
        NAME,
        format!(
            "{max}{count} < {needed} ({CONNTRACK_PER_CONNECTION} per connection: closed ones \
             linger in TIME_WAIT through a reconnect storm); a full table drops new \
             connections. {needed} entries take about {}",
            human(needed * CONNTRACK_ENTRY_BYTES)
        ),
        format!(
            "{}; or do not track the listener: iptables -t raw -A PREROUTING -p tcp --dport \
             {port} -j NOTRACK && iptables -t raw -A OUTPUT -p tcp --sport {port} -j NOTRACK",
            sysctl_fix(NAME, &needed.to_string())
        ),
    )
}

fn memory(host: &Host, n: u64) -> Check {
    const NAME: &str = "memory";
    let Some(meminfo) = host.read("/proc/meminfo") else {
        return Check::unreadable(NAME, "/proc/meminfo");
    };
    let kib = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    let (Some(total), Some(available)) = (kib("MemTotal:"), kib("MemAvailable:")) else {
        return Check::unreadable(NAME, "/proc/meminfo");
    };
    let (total, available) = (total * 1024, available * 1024);
    let needed = n * BYTES_PER_CONNECTION;
    let found = format!(
        "{n} idle connections need about {} ({BYTES_PER_CONNECTION} B each, measured: \
         tuning/README.md); {} available of {}",
        human(needed),
        human(available),
        human(total)
    );
    if available >= needed {
        return Check::new(Status::Ok, NAME, found);
    }
    Check::warn(
        NAME,
        found,
        format!(
            "more memory, or fewer connections per node: --max-connections {}",
            available / BYTES_PER_CONNECTION
        ),
    )
}

fn huge_pages(host: &Host) -> Check {
    const NAME: &str = "transparent_hugepage";
    const PATH: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
    let Some(text) = host.read(PATH) else {
        return Check::new(Status::Info, NAME, "not available on this kernel".into());
    };
    let setting = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or("unknown");
    Check::new(
        Status::Info,
        NAME,
        format!(
            "host setting {setting}; ringcast turns them off for itself unless --huge-pages \
             (tuning/README.md)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_read_as_proc_prints_them() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n\
                      Max locked memory         unlimited            unlimited            bytes     \n";
        assert_eq!(parse_limit(limits, "Max open files"), Some((1024, 524_288)));
        assert_eq!(
            parse_limit(limits, "Max locked memory"),
            Some((u64::MAX, u64::MAX))
        );
        assert_eq!(parse_limit(limits, "Max processes"), None);
    }

    #[test]
    fn kernel_versions_parse_from_release_strings() {
        assert_eq!(kernel_version("6.1.0-26-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.4.17-2136.el8uek.x86_64"), Some((5, 4)));
        assert_eq!(kernel_version("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(kernel_version("junk"), None);
        assert!(kernel_version("5.11.0").unwrap() < (5, 12));
    }

    #[test]
    fn a_line_is_status_name_detail_and_fix() {
        let c = Check::warn("fs.nr_open", "1024 < 2048".into(), "sysctl -w x=1".into());
        assert_eq!(
            c.to_string(),
            "warn  fs.nr_open: 1024 < 2048; fix: sysctl -w x=1"
        );
        let ok = Check::new(Status::Ok, "memory", "plenty".into());
        assert_eq!(ok.to_string(), "ok    memory: plenty");
        assert_eq!(
            sysctl_fix("net.ipv4.tcp_mem", "1 2 3"),
            "sysctl -w net.ipv4.tcp_mem=\"1 2 3\", and `net.ipv4.tcp_mem = 1 2 3` in \
             /etc/sysctl.d/60-ringcast.conf (tuning/sysctl.conf)"
        );
    }

    #[test]
    fn sizes_read_in_the_largest_whole_unit() {
        assert_eq!(human(5_220 * 1_000_000), "4.9 GiB");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(human(2048), "2.0 KiB");
    }
}
