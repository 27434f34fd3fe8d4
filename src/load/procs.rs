//! The parent's side of a load run: the worker processes that hold the
//! subscribers ([`Workers`]), the publishing connections
//! ([`Publishers`]), and how many deliveries a run should see.

use super::publish::{Publisher, Sent, Via};
use super::tally::Tally;
use super::*;

/// The worker processes of one run.
pub(super) struct Workers {
    pub(super) procs: Vec<Proc>,
}

pub(super) struct Proc {
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) out: BufReader<ChildStdout>,
}

impl Workers {
    /// Starts the workers, sharing `--connections` between them.
    pub(super) fn spawn(
        args: &LoadArgs,
        subscribe: bool,
        rounds_mode: bool,
    ) -> anyhow::Result<Workers> {
        let n = if args.procs == 0 {
            args.connections.div_ceil(PER_PROC)
        } else {
            args.procs
        }
        .clamp(1, args.connections.max(1));
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut procs = Vec::with_capacity(n);
        let mut first = 0;
        for i in 0..n {
            let share = args.connections / n + usize::from(i < args.connections % n);
            let mut cmd = Command::new(&exe);
            cmd.args(["load", "worker", "--target"])
                .arg(args.target.to_string())
                .args(["--connections", &share.to_string()])
                .args(["--worker-first", &first.to_string()])
                .args(["--source-ips", &args.source_ips.to_string()])
                .args(["--topic", &args.topic])
                .args(["--topics", &topic_count(args).to_string()])
                .args(["--rounds", &args.rounds.to_string()])
                .args(["--churn", &args.churn.to_string()]);
            if subscribe {
                cmd.arg("--worker-subscribe");
            }
            if rounds_mode {
                cmd.arg("--rounds-mode");
            }
            if args.scenario == Scenario::Churn {
                cmd.arg("--worker-follow");
            }
            if let Some(t) = &args.token {
                cmd.args(["--token", t]);
            }
            if args.deflate {
                cmd.arg("--deflate");
            }
            if args.wildcard {
                cmd.arg("--wildcard");
            }
            if let Some(secret) = &args.token_secret {
                cmd.args(["--token-secret", secret]);
            }
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a load worker")?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                bail!("a load worker has no pipes");
            };
            procs.push(Proc {
                child,
                stdin,
                out: BufReader::new(stdout),
            });
            first += share;
        }
        Ok(Workers { procs })
    }

    /// Reads one line `<kind> {json}` from every worker.
    pub(super) fn collect(&mut self, kind: &str) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::with_capacity(self.procs.len());
        for (i, p) in self.procs.iter_mut().enumerate() {
            let mut line = String::new();
            let n = p.out.read_line(&mut line)?;
            if n == 0 {
                let status = p.child.wait()?;
                bail!(
                    "load worker {i} exited ({status}) before its {kind} line; its error is above"
                );
            }
            let Some(json) = line.strip_prefix(kind).map(str::trim) else {
                bail!("load worker {i} said {line:?}, expected {kind}");
            };
            all.push(serde_json::from_str(json).with_context(|| format!("worker line {line:?}"))?);
        }
        Ok(all)
    }

    /// Sends a command to every worker and reads its answers.
    pub(super) fn ask(&mut self, cmd: &str, answer: &str) -> anyhow::Result<Vec<Value>> {
        for p in &mut self.procs {
            writeln!(p.stdin, "{cmd}").context("a load worker went away")?;
            p.stdin.flush()?;
        }
        self.collect(answer)
    }

    /// Messages received so far, all workers.
    pub(super) fn received(&mut self) -> anyhow::Result<u64> {
        Ok(self
            .ask("count", "count")?
            .iter()
            .map(|v| v["received_total"].as_u64().unwrap_or(0))
            .sum())
    }

    /// Waits until `expected` messages arrived or `limit` passed; returns the time waited.
    pub(super) fn settle(&mut self, expected: u64, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while self.received()? < expected && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }

    /// Every worker's tally since the last report, merged.
    pub(super) fn report(&mut self) -> anyhow::Result<Tally> {
        let mut t = Tally::new()?;
        for v in self.ask("report", "report")? {
            t.add(&v)?;
        }
        Ok(t)
    }

    /// Tells every worker to close its connections, and waits for them.
    pub(super) fn quit(mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            let _ = writeln!(p.stdin, "quit");
        }
        for (i, p) in self.procs.iter_mut().enumerate() {
            let status = p.child.wait()?;
            if !status.success() {
                bail!("load worker {i} failed ({status})");
            }
        }
        Ok(())
    }
}

/// The publishers of a run and the share of topics each one takes.
pub(super) struct Publishers {
    pub(super) pubs: Vec<(Publisher, Vec<usize>)>,
    pub(super) errors_seen: u64,
}

impl Publishers {
    pub(super) fn connect(args: &LoadArgs, topics: usize) -> anyhow::Result<Publishers> {
        let via = match &args.redis {
            Some(url) => Via::Redis(url.clone(), args.redis_key_layout),
            None => Via::WebSocket {
                target: args.target,
                token: args.token.clone(),
            },
        };
        let n = args.publishers.clamp(1, topics.max(1));
        let mut pubs = Vec::with_capacity(n);
        for j in 0..n {
            let share: Vec<usize> = (j..topics).step_by(n).collect();
            pubs.push((Publisher::connect(&via)?, share));
        }
        Ok(Publishers {
            pubs,
            errors_seen: 0,
        })
    }

    /// Publishes at `rate` msg/s in all for `duration`; what each topic got.
    pub(super) fn run(
        &mut self,
        names: &[String],
        rate: f64,
        args: &LoadArgs,
    ) -> anyhow::Result<Sent> {
        let per = rate / self.pubs.len() as f64;
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pubs
                .iter_mut()
                .map(|(p, share)| {
                    let topics: Vec<String> = share.iter().map(|&t| names[t].clone()).collect();
                    let share = share.clone();
                    s.spawn(move || {
                        p.run(&topics, per, args.size, args.json, args.duration.0)
                            .map(|sent| (share, sent))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a publisher panicked")))
                })
                .collect::<Vec<_>>()
        });
        let mut sent = Sent {
            per_topic: vec![0; names.len()],
        };
        for r in results {
            let (share, got) = r?;
            for (i, t) in share.into_iter().enumerate() {
                sent.per_topic[t] += got.per_topic[i];
            }
        }
        Ok(sent)
    }

    /// Error replies the server sent to publishers since the last call.
    pub(super) fn new_errors(&mut self) -> u64 {
        let total: u64 = self
            .pubs
            .iter()
            .map(|(p, _)| p.errors.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let new = total - self.errors_seen;
        self.errors_seen = total;
        new
    }
}

/// Messages the subscribers should get for what was sent.
pub(super) fn expected(sent: &Sent, subs: &[u64]) -> u64 {
    sent.per_topic.iter().zip(subs).map(|(n, s)| n * s).sum()
}

/// Starts the workers and waits until every connection is up (and
/// subscribed, with `subscribe`); returns them, the seconds it took, and
/// the connections opened.
pub(super) fn start_workers(
    args: &LoadArgs,
    subscribe: bool,
) -> anyhow::Result<(Workers, f64, u64)> {
    let start = crate::sys::monotonic_us();
    let mut workers = Workers::spawn(args, subscribe, false)?;
    let ready = workers.collect("ready")?;
    let end = ready
        .iter()
        .filter_map(|v| v["at_us"].as_u64())
        .max()
        .unwrap_or(start);
    let opened = ready
        .iter()
        .map(|v| v["connections"].as_u64().unwrap_or(0))
        .sum();
    Ok((workers, end.saturating_sub(start) as f64 / 1e6, opened))
}
