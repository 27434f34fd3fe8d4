//! The scenarios of `ringcast load` (see the module docs of
//! [`crate::load`]): fanout and topics, ramp, idle, connect, and the
//! kernel and process memory figures they read from /proc.

use super::procs::*;
use super::*;

/// `fanout` and `topics`: one publishing window, then the figures.
pub(super) fn deliver(args: &LoadArgs) -> anyhow::Result<()> {
    let names = topic_names(args);
    let subs = subscribers_per_topic(args.connections, names.len());
    let (mut workers, connect_s, _) = start_workers(args, true)?;
    let mut pubs = Publishers::connect(args, names.len())?;
    let churn = args.scenario == Scenario::Churn;
    if churn {
        workers.ask("churn on", "churn")?;
    }
    let sent = pubs.run(&names, args.rate as f64, args)?;
    if churn {
        workers.ask("churn off", "churn")?;
    }
    let expected = expected(&sent, &subs);
    let waited = workers.settle(expected, args.settle.0)?;
    let tally = workers.report()?;
    let pub_errors = pubs.new_errors();
    workers.quit()?;
    let secs = args.duration.0.as_secs_f64() + waited.as_secs_f64();
    let rate = tally.received as f64 / secs;
    let scenario = match args.scenario {
        Scenario::Topics => "topics",
        Scenario::Churn => "churn",
        _ => "fanout",
    };
    out!(
        "{scenario}  subscribers={} topics={}{} publishers={} rate={}/s size={}B duration={:?} via={}",
        args.connections,
        names.len(),
        if args.wildcard { " (as patterns)" } else { "" },
        pubs.pubs.len(),
        args.rate,
        args.size,
        args.duration.0,
        if args.redis.is_some() { "xadd" } else { "websocket" },
    );
    out!(
        "connect     {connect_s:.3} s for {} clients",
        args.connections
    );
    out!(
        "published   {}  expected {expected}  received {}  ({:.4} %)",
        sent.total(),
        tally.received,
        100.0 * tally.received as f64 / expected.max(1) as f64
    );
    out!(
        "deliveries  {rate:.0}/s (received over the window plus {:.2} s settling)",
        waited.as_secs_f64()
    );
    out!(
        "wire        {:.0} bytes per delivery as read by the subscribers{}",
        tally.wire_bytes as f64 / tally.received.max(1) as f64,
        if args.deflate {
            " (permessage-deflate offered)"
        } else {
            ""
        }
    );
    out!(
        "latency ms  p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        tally.ms(0.5),
        tally.ms(0.99),
        tally.ms(0.999),
        tally.max_ms()
    );
    if churn {
        out!(
            "churn       {} reconnects ({:.0}/s), recovery ms p50 {:.2}  p99 {:.2}  max {:.2}, {} not recovered",
            tally.reconnects,
            tally.reconnects as f64 / args.duration.0.as_secs_f64(),
            tally.recovery_us.value_at_quantile(0.5) as f64 / 1000.0,
            tally.recovery_us.value_at_quantile(0.99) as f64 / 1000.0,
            tally.recovery_us.max() as f64 / 1000.0,
            tally.unrecovered
        );
        out!(
            "follow      {} drains, {} followed (reconnect_in_ms {}..{}), {} failed attempts; \
             connections by node {:?}, subscribers now on {:?}",
            tally.drains,
            tally.drains_followed,
            tally.drain_wait_ms.min(),
            tally.drain_wait_ms.max(),
            tally.failed_connects.values().sum::<u64>(),
            tally.landed,
            tally.ended_on
        );
    }
    let notes = tally.anomalies();
    if !notes.is_empty() || pub_errors > 0 {
        out!("note        {notes} publisher error replies: {pub_errors}");
    }
    out!(
        "{}",
        serde_json::json!({
            "scenario": scenario, "subscribers": args.connections, "topics": names.len(),
            "wildcard": args.wildcard,
            "rate": args.rate, "size": args.size, "duration_s": args.duration.0.as_secs_f64(),
            "published": sent.total(), "expected": expected, "received": tally.received,
            "deliveries_per_s": rate.round(), "settle_s": waited.as_secs_f64(),
            "p50_ms": tally.ms(0.5), "p99_ms": tally.ms(0.99), "p999_ms": tally.ms(0.999),
            "max_ms": tally.max_ms(), "connect_s": connect_s,
            "closes": tally.closes, "errors": tally.errors, "publisher_errors": pub_errors,
            "out_of_order": tally.out_of_order, "missing": tally.missing,
            "reconnects": tally.reconnects, "unrecovered": tally.unrecovered,
            "deflate": args.deflate, "json": args.json,
            "wire_bytes_per_delivery": (tally.wire_bytes as f64 / tally.received.max(1) as f64).round(),
            "recovery_p50_ms": tally.recovery_us.value_at_quantile(0.5) as f64 / 1000.0,
            "recovery_p99_ms": tally.recovery_us.value_at_quantile(0.99) as f64 / 1000.0,
            "recovery_max_ms": tally.recovery_us.max() as f64 / 1000.0,
            "reconnects_per_s": tally.reconnects as f64 / args.duration.0.as_secs_f64(),
            "drains": tally.drains, "drains_followed": tally.drains_followed,
            "drain_wait_ms": {
                "min": tally.drain_wait_ms.min(), "mean": tally.drain_wait_ms.mean().round(),
                "max": tally.drain_wait_ms.max(),
            },
            "failed_connects": tally.failed_connects, "landed": tally.landed,
            "ended_on": tally.ended_on,
        })
    );
    in_order(&tally)?;
    if churn && (tally.received != expected || tally.missing > 0 || tally.unrecovered > 0) {
        anyhow::bail!(
            "churn: not every subscriber had every message exactly once \
             (received {} of {expected}, {} missing, {} not recovered)",
            tally.received,
            tally.missing,
            tally.unrecovered
        );
    }
    Ok(())
}

/// A run in which a subscriber saw a message twice or out of order failed,
/// whatever its counts say.
fn in_order(tally: &super::tally::Tally) -> anyhow::Result<()> {
    if tally.out_of_order > 0 {
        anyhow::bail!(
            "{} messages arrived twice or out of order (per subscriber, by the publisher's sequence)",
            tally.out_of_order
        );
    }
    Ok(())
}

/// `ramp`: rising rates over the same connections until a step falls behind.
pub(super) fn ramp(args: &LoadArgs) -> anyhow::Result<()> {
    let names = topic_names(args);
    let subs = subscribers_per_topic(args.connections, names.len());
    let (mut workers, connect_s, _) = start_workers(args, true)?;
    let mut pubs = Publishers::connect(args, names.len())?;
    out!(
        "ramp  subscribers={} topics={} size={}B step={:?} x{} p99 bound {} ms (connected in {connect_s:.3} s)",
        args.connections,
        names.len(),
        args.size,
        args.duration.0,
        args.step,
        args.p99_bound
    );
    out!(
        "{:>10} {:>12} {:>12} {:>12} {:>9} {:>9} {:>9}  verdict",
        "msg/s",
        "offered/s",
        "delivered/s",
        "received %",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    let mut rate = args.rate.max(1) as f64;
    let mut best: Option<(f64, f64)> = None;
    let mut steps = Vec::new();
    let mut whole = super::tally::Tally::new()?;
    while rate <= args.max_rate as f64 {
        let before = workers.received()?;
        let sent = pubs.run(&names, rate, args)?;
        let expected = expected(&sent, &subs);
        let waited = workers.settle(before + expected, args.settle.0)?;
        let tally = workers.report()?;
        let pub_errors = pubs.new_errors();
        let secs = args.duration.0.as_secs_f64();
        let offered = expected as f64 / secs;
        let delivered = tally.received as f64 / (secs + waited.as_secs_f64());
        let complete = tally.received >= expected && tally.closes.is_empty() && pub_errors == 0;
        let verdict = if !complete {
            "fell behind (not everything arrived)"
        } else if tally.ms(0.99) > args.p99_bound {
            "fell behind (p99 over the bound)"
        } else {
            "sustained"
        };
        out!(
            "{:>10.0} {:>12.0} {:>12.0} {:>12.4} {:>9.2} {:>9.2} {:>9.2}  {verdict}{}",
            rate,
            offered,
            delivered,
            100.0 * tally.received as f64 / expected.max(1) as f64,
            tally.ms(0.5),
            tally.ms(0.99),
            tally.max_ms(),
            if tally.anomalies().is_empty() {
                String::new()
            } else {
                format!(" [{}]", tally.anomalies())
            }
        );
        steps.push(serde_json::json!({
            "rate": rate.round(), "offered_per_s": offered.round(), "delivered_per_s": delivered.round(),
            "expected": expected, "received": tally.received, "p50_ms": tally.ms(0.5),
            "p99_ms": tally.ms(0.99), "p999_ms": tally.ms(0.999), "max_ms": tally.max_ms(),
            "verdict": verdict, "out_of_order": tally.out_of_order, "missing": tally.missing,
        }));
        whole.out_of_order += tally.out_of_order;
        whole.missing += tally.missing;
        if verdict != "sustained" {
            break;
        }
        best = Some((rate, delivered));
        rate *= args.step.max(1.01);
    }
    workers.quit()?;
    match best {
        Some((r, d)) => out!(
            "max sustained: {d:.0} deliveries/s ({r:.0} msg/s x {} subscribers)",
            args.connections
        ),
        None => out!("max sustained: none (the first step already fell behind: lower --rate)"),
    }
    out!(
        "{}",
        serde_json::json!({
            "scenario": "ramp", "subscribers": args.connections, "topics": names.len(), "size": args.size,
            "step_s": args.duration.0.as_secs_f64(), "p99_bound_ms": args.p99_bound,
            "max_sustained_deliveries_per_s": best.map(|(_, d)| d.round()),
            "max_sustained_rate": best.map(|(r, _)| r.round()), "steps": steps,
            "out_of_order": whole.out_of_order, "missing": whole.missing,
        })
    );
    in_order(&whole)
}

/// `idle`: hold S connections and read what they cost the server.
pub(super) fn idle(args: &LoadArgs) -> anyhow::Result<()> {
    let pid = args
        .server_pid
        .context("idle needs --server-pid to read the server's memory")?;
    let before = rss_bytes(pid).context("cannot read the server's /proc status")?;
    let anon_before = status_bytes(pid, "RssAnon:").unwrap_or(0);
    let (kmem_before, slab_before) = (tcp_mem_pages().unwrap_or(0), slab_bytes().unwrap_or(0));
    let (mut workers, connect_s, n) = start_workers(args, args.subscribe)?;
    if args.subscribe {
        // One message to every subscriber: a real idle subscriber has had some.
        let names = topic_names(args);
        let subs = subscribers_per_topic(args.connections, names.len());
        let mut pubs = Publishers::connect(args, names.len())?;
        let mut once = args.clone();
        // T msg/s round-robin over T topics: one each by 1 s (a few get a
        // second one by 1.2 s, when the publisher stops).
        once.duration = crate::config::HumanDuration(Duration::from_millis(1200));
        let sent = pubs.run(&names, names.len() as f64, &once)?;
        let expected = expected(&sent, &subs);
        workers.settle(expected, args.settle.0)?;
        let got = workers.received()?;
        if expected < args.connections as u64 || got < expected {
            anyhow::bail!("idle --subscribe: {got} of {expected} subscribers got their message");
        }
    }
    // Let the server settle (allocator, lazy structures), then measure.
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_bytes(pid).context("cannot read the server's /proc status")?;
    let anon_after = status_bytes(pid, "RssAnon:").unwrap_or(0);
    let (kmem_after, slab_after) = (tcp_mem_pages().unwrap_or(0), slab_bytes().unwrap_or(0));
    let per_conn = after.saturating_sub(before) as f64 / n.max(1) as f64;
    // Of it, the heap and other private memory: not the code pages the
    // run touched first (file-backed, fixed, shared with other processes).
    let anon_per_conn = anon_after.saturating_sub(anon_before) as f64 / n.max(1) as f64;
    // Both ends of every loopback connection are on this machine: halve.
    let kernel_tcp = (kmem_after.saturating_sub(kmem_before) * 4096) as f64 / n.max(1) as f64 / 2.0;
    let kernel_slab = slab_after.saturating_sub(slab_before) as f64 / n.max(1) as f64 / 2.0;
    out!(
        "idle  connections={n} connect={connect_s:.3}s\n\
         server RSS  before {:.1} MiB  after {:.1} MiB  per connection {per_conn:.0} B \
         (anonymous {anon_per_conn:.0} B)\n\
         kernel, per connection, one side: TCP buffers {kernel_tcp:.0} B (sockstat), slab {kernel_slab:.0} B (meminfo)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
    );
    out!(
        "{}",
        serde_json::json!({
            "scenario": "idle", "connections": n, "connect_s": connect_s, "rss_before": before,
            "subscribed": args.subscribe, "tokens": args.token_secret.is_some() || args.token.is_some(),
            "deflate": args.deflate,
            "rss_after": after, "bytes_per_conn": per_conn.round(),
            "anon_bytes_per_conn": anon_per_conn.round(),
            "kernel_tcp_bytes_per_conn": kernel_tcp.round(), "kernel_slab_bytes_per_conn": kernel_slab.round(),
        })
    );
    std::thread::sleep(args.duration.0.min(Duration::from_secs(60)));
    workers.quit()
}

/// The pause between `connect` rounds.
pub const ROUND_PAUSE: Duration = Duration::from_millis(500);

/// `connect`: rounds of connect-all then close-all, all workers starting
/// each round together.
pub(super) fn connect(args: &LoadArgs) -> anyhow::Result<()> {
    let mut workers = Workers::spawn(args, false, true)?;
    let mut spans = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        if round > 0 {
            std::thread::sleep(ROUND_PAUSE);
        }
        let rounds = workers.ask("next", "round")?;
        let start = rounds
            .iter()
            .filter_map(|v| v["start_us"].as_u64())
            .min()
            .unwrap_or(0);
        let end = rounds
            .iter()
            .filter_map(|v| v["end_us"].as_u64())
            .max()
            .unwrap_or(start);
        let n: u64 = rounds
            .iter()
            .map(|v| v["connections"].as_u64().unwrap_or(0))
            .sum();
        spans.push((end.saturating_sub(start).max(1) as f64 / 1e6, n));
    }
    workers.quit()?;
    let mut rates: Vec<f64> = spans.iter().map(|(s, n)| *n as f64 / s).collect();
    rates.sort_by(f64::total_cmp);
    let mut times: Vec<f64> = spans.iter().map(|(s, _)| *s).collect();
    times.sort_by(f64::total_cmp);
    let mid = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(0.0);
    out!(
        "connect  {} rounds x {} clients  handshakes/s median {:.0}  min {:.0}  max {:.0}  \
         time to connect all: median {:.3} s",
        args.rounds,
        args.connections,
        mid(&rates),
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0),
        mid(&times),
    );
    out!(
        "{}",
        serde_json::json!({
            "scenario": "connect", "rounds": args.rounds, "connections": args.connections,
            "handshakes_per_s_median": mid(&rates).round(), "connect_all_s_median": mid(&times),
            "connect_all_s": times,
        })
    );
    Ok(())
}

/// Resident memory of a process, in bytes.
pub(super) fn rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS:")
}

/// A size line of `/proc/PID/status` (`VmRSS:`, `RssAnon:`), in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Kernel TCP buffer memory in pages, from /proc/net/sockstat.
pub(super) fn tcp_mem_pages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Kernel slab memory (sockets, inodes, epoll items...), from /proc/meminfo.
pub(super) fn slab_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("Slab:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
