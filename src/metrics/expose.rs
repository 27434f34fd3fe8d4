//! `/metrics`: a [`prometheus`] collector that reads the shards' and the
//! broker's atomics when scraped, the crate's process collector
//! (`process_*`, from /proc/self), and the crate's text encoder. Nothing
//! here runs on a shard thread: the admin thread scrapes.
//!
//! Per-shard gauges carry a `shard` label (a query sums them:
//! `sum(ringcast_connections_active)`); counters are summed over shards, as
//! before, except the busy time and the latency histogram, which are per
//! shard.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Registry, TextEncoder};
use tracing::warn;

use super::names::*;
use super::names::{Def, Kind, DEFS};
use super::{BrokerMetrics, Disconnect, ShardMetrics, Skip, Undelivered, HANDSHAKE_STATUSES};

/// The broker's plain counters, in `DEFS` order after `ringcast_broker_up`.
fn broker_counters(b: &BrokerMetrics) -> [(&'static str, u64); 9] {
    [
        (BROKER_ENTRIES_READ, &b.entries_read),
        (BROKER_RECOVERIES_CACHED, &b.recoveries_cached),
        (BROKER_RECOVERIES_REDIS, &b.recoveries_redis),
        (BROKER_READER_DISCONNECTS, &b.reader_disconnects),
        (BROKER_RECOVERY_RANGES, &b.recovery_ranges),
        (BROKER_RECOVERIES_SHED, &b.recoveries_shed),
        (BROKER_PUBLISH_ROUND_TRIPS, &b.publish_round_trips),
        (BROKER_GAPS, &b.gaps),
        (BROKER_GAP_CHECKS, &b.gap_checks),
    ]
    .map(|(name, c)| (name, c.load(Relaxed)))
}

/// The samples of one of the broker's families (none for another name).
fn broker_samples(b: &BrokerMetrics, name: &str) -> Vec<Sample> {
    match name {
        BROKER_UP => one(b.up.load(Relaxed) as f64),
        BROKER_ENTRIES_SKIPPED => each(
            Skip::ALL
                .iter()
                .enumerate()
                .map(|(i, d)| (d.label(), b.skipped[i].load(Relaxed) as f64)),
        ),
        PRESENCE_USERS => one(b.presence_users.load(Relaxed) as f64),
        PRESENCE_EVENTS => each([
            ("join", b.presence_joins.load(Relaxed) as f64),
            ("leave", b.presence_leaves.load(Relaxed) as f64),
        ]),
        PRESENCE_GHOSTS => one(b.presence_ghosts.load(Relaxed) as f64),
        PRESENCE_REDIS_CALLS => one(b.presence_redis_calls.load(Relaxed) as f64),
        BROKER_READ_LAG => each(
            b.read_lags()
                .into_iter()
                .map(|(p, ms)| (p, ms as f64 / 1e3)),
        ),
        _ => {
            let counters = broker_counters(b);
            let found = counters.iter().find(|(n, _)| *n == name);
            found.map_or_else(Vec::new, |(_, v)| one(*v as f64))
        }
    }
}

/// What one scrape reads.
struct View<'a> {
    shards: &'a [&'a ShardMetrics],
    /// Each shard's inbox depth, when known.
    depths: Option<&'a [usize]>,
    broker: Option<&'a BrokerMetrics>,
}

/// One series: its label values (in the family's label order) and value.
enum Sample {
    Value(Vec<String>, f64),
    Histogram(Vec<String>, super::histogram::Snapshot),
}

fn label_pairs(names: &[&str], values: Vec<String>) -> Vec<proto::LabelPair> {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let mut p = proto::LabelPair::default();
            p.set_name((*n).to_string());
            p.set_value(v);
            p
        })
        .collect()
}

fn family(d: &Def, samples: Vec<Sample>) -> MetricFamily {
    let metrics = samples
        .into_iter()
        .map(|s| {
            let mut m = proto::Metric::default();
            match s {
                Sample::Value(labels, v) => {
                    m.set_label(label_pairs(d.labels, labels));
                    match d.kind {
                        Kind::Counter => {
                            let mut c = proto::Counter::default();
                            c.set_value(v);
                            m.set_counter(c);
                        }
                        Kind::Gauge | Kind::Histogram => {
                            let mut g = proto::Gauge::default();
                            g.set_value(v);
                            m.set_gauge(g);
                        }
                    }
                }
                Sample::Histogram(labels, snap) => {
                    m.set_label(label_pairs(d.labels, labels));
                    let mut h = proto::Histogram::default();
                    h.set_sample_count(snap.count);
                    h.set_sample_sum(snap.sum);
                    let buckets = snap.buckets.iter().map(|&(le, n)| {
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(le);
                        b.set_cumulative_count(n);
                        b
                    });
                    h.set_bucket(buckets.collect());
                    m.set_histogram(h);
                }
            }
            m
        })
        .collect();
    let mut f = MetricFamily::default();
    f.set_name(d.name.to_string());
    f.set_help(d.help.to_string());
    f.set_field_type(match d.kind {
        Kind::Gauge => MetricType::GAUGE,
        Kind::Counter => MetricType::COUNTER,
        Kind::Histogram => MetricType::HISTOGRAM,
    });
    f.set_metric(metrics);
    f
}

/// One unlabelled value.
fn one(v: f64) -> Vec<Sample> {
    vec![Sample::Value(Vec::new(), v)]
}

/// One labelled value per label value.
fn each<T: ToString>(pairs: impl IntoIterator<Item = (T, f64)>) -> Vec<Sample> {
    let samples = pairs.into_iter();
    samples
        .map(|(l, v)| Sample::Value(vec![l.to_string()], v))
        .collect()
}

impl View<'_> {
    /// One value per shard, labelled with its number.
    fn per_shard(&self, f: impl Fn(&ShardMetrics) -> f64) -> Vec<Sample> {
        each(self.shards.iter().enumerate().map(|(i, m)| (i, f(m))))
    }

    /// A counter summed over shards.
    fn sum(&self, f: impl Fn(&ShardMetrics) -> u64) -> Vec<Sample> {
        one(self.shards.iter().map(|m| f(m)).sum::<u64>() as f64)
    }

    /// One summed counter per label: `labels[i]` is the label of each
    /// shard's `f(m, i)`.
    fn summed_by<L: ToString + Copy>(
        &self,
        labels: &[L],
        f: impl Fn(&ShardMetrics, usize) -> u64,
    ) -> Vec<Sample> {
        each(labels.iter().enumerate().map(|(i, l)| {
            let n: u64 = self.shards.iter().map(|m| f(m, i)).sum();
            (*l, n as f64)
        }))
    }

    /// The samples of one family; empty when this scrape has none of it.
    fn samples(&self, name: &str) -> Vec<Sample> {
        let gauge = |f: fn(&ShardMetrics) -> &std::sync::atomic::AtomicI64| {
            self.per_shard(|m| f(m).load(Relaxed) as f64)
        };
        match name {
            CONNECTIONS_ACTIVE => gauge(|m| &m.connections_active),
            SUBSCRIPTIONS_ACTIVE => gauge(|m| &m.subscriptions_active),
            WILDCARD_SUBSCRIPTIONS_ACTIVE => gauge(|m| &m.wildcard_subscriptions_active),
            REGISTRY_CONNECTIONS => gauge(|m| &m.registry_connections),
            TOPIC_INDEX_ENTRIES => gauge(|m| &m.topic_index_entries),
            TOPICS_ANNOUNCED => gauge(|m| &m.topics_announced),
            SHARD_INBOX_DEPTH => self
                .depths
                .map(|d| each(d.iter().enumerate().map(|(i, n)| (i, *n as f64))))
                .unwrap_or_default(),
            SHARD_BUSY_RATIO => self.per_shard(|m| m.busy_ppm.load(Relaxed) as f64 / 1e6),
            SHARD_BUSY_SECONDS => self.per_shard(|m| m.busy_ns.load(Relaxed) as f64 / 1e9),
            CONNECTIONS_ACCEPTED => self.sum(|m| m.connections_accepted.load(Relaxed)),
            MESSAGES_DELIVERED => self.sum(|m| m.messages_delivered.load(Relaxed)),
            SOCKET_WRITES => self.sum(|m| m.socket_writes.load(Relaxed)),
            BYTES_SENT => self.sum(|m| m.bytes_sent.load(Relaxed)),
            RING_SUBMITS => self.sum(|m| m.ring_submits.load(Relaxed)),
            MESSAGES_COMPRESSED => self.sum(|m| m.messages_compressed.load(Relaxed)),
            COMPRESSION_BYTES_IN => self.sum(|m| m.compression_bytes_in.load(Relaxed)),
            COMPRESSION_BYTES_OUT => self.sum(|m| m.compression_bytes_out.load(Relaxed)),
            DEFLATE_DECLINED => {
                let reasons =
                    crate::ws::deflate::Decline::ALL.map(crate::ws::deflate::Decline::label);
                self.summed_by(&reasons, |m, i| m.deflate_declined[i].load(Relaxed))
            }
            MESSAGES_PUBLISHED => {
                let b = self.broker;
                let client: u64 = self
                    .shards
                    .iter()
                    .map(|m| m.messages_published.load(Relaxed))
                    .sum();
                let http = b.map_or(0, |b| b.published_http.load(Relaxed));
                let redis = b.map_or(0, |b| b.entries_read.load(Relaxed));
                each(
                    [("client", client), ("http", http), ("redis", redis)]
                        .map(|(s, n)| (s, n as f64)),
                )
            }
            MESSAGES_DROPPED => {
                let reasons = Undelivered::ALL.map(Undelivered::label);
                self.summed_by(&reasons, |m, i| m.dropped[i].load(Relaxed))
            }
            CLIENT_DISCONNECTS => {
                let reasons = Disconnect::ALL.map(Disconnect::label);
                self.summed_by(&reasons, |m, i| m.disconnects[i].load(Relaxed))
            }
            HANDSHAKE_FAILURES => self.summed_by(&HANDSHAKE_STATUSES, |m, i| {
                m.handshake_failures[i].load(Relaxed)
            }),
            PUBLISH_TO_DELIVER => {
                let shards = self.shards.iter().enumerate();
                shards
                    .map(|(i, m)| {
                        Sample::Histogram(vec![i.to_string()], m.publish_to_deliver.snapshot())
                    })
                    .collect()
            }
            _ => self
                .broker
                .map_or_else(Vec::new, |b| broker_samples(b, name)),
        }
    }

    /// Every family with at least one series.
    fn families(&self) -> Vec<MetricFamily> {
        DEFS.iter()
            .filter_map(|d| {
                let samples = self.samples(d.name);
                (!samples.is_empty()).then(|| family(d, samples))
            })
            .collect()
    }
}

/// The descriptors of `DEFS`, made once.
fn descs() -> &'static [Desc] {
    static DESCS: OnceLock<Vec<Desc>> = OnceLock::new();
    DESCS.get_or_init(|| {
        DEFS.iter()
            .filter_map(|d| {
                let labels = d.labels.iter().map(|l| l.to_string()).collect();
                Desc::new(d.name.into(), d.help.into(), labels, HashMap::new())
                    .map_err(|e| warn!(metric = d.name, error = %e, "invalid metric descriptor"))
                    .ok()
            })
            .collect()
    })
}

/// The node's collector: reads the shards' and the broker's atomics when
/// scraped. The inbox depths are read by the caller just before.
#[derive(Debug)]
struct NodeCollector {
    shards: Vec<Arc<ShardMetrics>>,
    broker: Arc<BrokerMetrics>,
    depths: Vec<usize>,
}

impl Collector for NodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        descs().iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let shards: Vec<&ShardMetrics> = self.shards.iter().map(|m| &**m).collect();
        View {
            shards: &shards,
            depths: Some(&self.depths),
            broker: Some(&self.broker),
        }
        .families()
    }
}

/// The `process` collector of the crate (CPU, memory, file descriptors,
/// threads, start time of this process, from /proc/self), made once: its
/// start time is read when it is made.
#[derive(Debug)]
struct Process;

fn process() -> &'static ProcessCollector {
    static PROCESS: OnceLock<ProcessCollector> = OnceLock::new();
    PROCESS.get_or_init(ProcessCollector::for_self)
}

impl Collector for Process {
    fn desc(&self) -> Vec<&Desc> {
        process().desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        process().collect()
    }
}

fn encode(families: &[MetricFamily]) -> String {
    let mut out = String::with_capacity(16 << 10);
    if let Err(e) = TextEncoder::new().encode_utf8(families, &mut out) {
        warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The body of `GET /metrics`: every shard's and the broker's metrics, the
/// inbox depths (`depths[i]` is shard i's), and the process metrics, in
/// the Prometheus text format (version 0.0.4).
pub fn scrape(
    shards: &[Arc<ShardMetrics>],
    broker: &Arc<BrokerMetrics>,
    depths: Vec<usize>,
) -> String {
    let registry = Registry::new();
    let node = NodeCollector {
        shards: shards.to_vec(),
        broker: broker.clone(),
        depths,
    };
    let collectors: [Box<dyn Collector>; 2] = [Box::new(node), Box::new(Process)];
    for c in collectors {
        if let Err(e) = registry.register(c) {
            warn!(error = %e, "cannot register a metrics collector");
        }
    }
    encode(&registry.gather())
}

/// The shards' metrics alone (no broker, inbox or process metrics), as
/// `/metrics` writes them: for tests of a shard.
pub fn render(shards: &[&ShardMetrics]) -> String {
    let view = View {
        shards,
        depths: None,
        broker: None,
    };
    encode(&view.families())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Skip;
    use std::sync::atomic::Ordering;

    /// The series of `text` as `name{labels} value` lines.
    fn series(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn shard_gauges_are_labelled_and_counters_summed() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        a.connections_active.fetch_add(2, Ordering::Relaxed);
        b.connections_active.fetch_add(3, Ordering::Relaxed);
        a.registry_connections.store(4, Ordering::Relaxed);
        b.topic_index_entries.store(7, Ordering::Relaxed);
        a.dropped(Undelivered::SlowConsumer);
        b.dropped_n(Undelivered::SlowConsumer, 4);
        b.handshake_failed(404);
        a.messages_published.fetch_add(5, Ordering::Relaxed);
        a.connections_accepted.fetch_add(1, Ordering::Relaxed);
        b.connections_accepted.fetch_add(2, Ordering::Relaxed);
        let text = render(&[&a, &b]);
        let lines = series(&text);
        for want in [
            "ringcast_connections_active{shard=\"0\"} 2",
            "ringcast_connections_active{shard=\"1\"} 3",
            "ringcast_registry_connections{shard=\"0\"} 4",
            "ringcast_topic_index_entries{shard=\"1\"} 7",
            "ringcast_connections_accepted_total 3",
            "ringcast_messages_dropped_total{reason=\"slow_consumer\"} 5",
            "ringcast_handshake_failures_total{status=\"404\"} 1",
            "ringcast_messages_published_total{source=\"client\"} 5",
            "ringcast_messages_published_total{source=\"http\"} 0",
            "ringcast_publish_to_deliver_seconds_count{shard=\"1\"} 0",
        ] {
            assert!(lines.contains(&want), "{want} missing in:\n{text}");
        }
        assert!(text.contains("# TYPE ringcast_publish_to_deliver_seconds histogram"));
        assert!(!text.contains("ringcast_broker_"), "no broker given");
        assert!(
            !text.contains("ringcast_shard_inbox_depth"),
            "no depths given"
        );
    }

    #[test]
    fn a_scrape_has_the_broker_the_inboxes_and_the_process() {
        let shards = vec![Arc::new(ShardMetrics::default())];
        shards[0].delivered_after(0);
        shards[0].busy_ppm.store(250_000, Ordering::Relaxed);
        shards[0].busy_ns.store(1_500_000_000, Ordering::Relaxed);
        let broker = Arc::new(BrokerMetrics::default());
        broker.entries_read.fetch_add(9, Ordering::Relaxed);
        broker.published_http.fetch_add(2, Ordering::Relaxed);
        broker.skipped(Skip::InvalidTopic);
        let text = scrape(&shards, &broker, vec![17]);
        let lines = series(&text);
        for want in [
            "ringcast_shard_inbox_depth{shard=\"0\"} 17",
            "ringcast_shard_busy_ratio{shard=\"0\"} 0.25",
            "ringcast_shard_busy_seconds_total{shard=\"0\"} 1.5",
            "ringcast_messages_published_total{source=\"http\"} 2",
            "ringcast_messages_published_total{source=\"redis\"} 9",
            "ringcast_broker_entries_read_total 9",
            "ringcast_broker_up 1",
            "ringcast_broker_entries_skipped_total{reason=\"invalid_topic\"} 1",
            "ringcast_publish_to_deliver_seconds_bucket{shard=\"0\",le=\"+Inf\"} 1",
            "ringcast_publish_to_deliver_seconds_bucket{shard=\"0\",le=\"10\"} 0",
        ] {
            assert!(lines.contains(&want), "{want} missing in:\n{text}");
        }
        assert!(!text.contains(BROKER_READ_LAG), "no partition read yet");
        for p in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("\n{p} ")), "{p} missing in:\n{text}");
        }
        broker.read_up_to(3, 4, 0);
        let text = scrape(&shards, &broker, vec![0]);
        assert!(
            text.contains("ringcast_broker_read_lag_seconds{partition=\"3\"} "),
            "{text}"
        );
        assert!(!text.contains("partition=\"2\""), "never read: absent");
    }

    #[test]
    fn every_family_has_a_valid_descriptor_and_is_written() {
        assert_eq!(descs().len(), DEFS.len());
        let shards = vec![Arc::new(ShardMetrics::default())];
        let broker = Arc::new(BrokerMetrics::default());
        broker.read_up_to(0, 1, 0);
        let text = scrape(&shards, &broker, vec![0]);
        for d in DEFS {
            assert!(
                text.contains(&format!("# TYPE {} ", d.name)),
                "{} missing",
                d.name
            );
        }
    }
}
