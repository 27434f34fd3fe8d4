//! What the load tool counts: deliveries, their latency, and everything
//! that was not a plain delivery (server closes, error replies, unexpected
//! frames). A worker fills one and reports it as a JSON object; the parent
//! merges the workers' objects into one.

use std::collections::BTreeMap;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::Value;

/// Deliveries and anomalies since the last report.
pub(super) struct Tally {
    pub(super) received: u64,
    /// Publish-to-deliver latency, µs.
    pub(super) latency_us: Histogram<u64>,
    /// Server close codes seen on open connections, by code.
    pub(super) closes: BTreeMap<String, u64>,
    /// Error replies the server sent, by code.
    pub(super) errors: BTreeMap<String, u64>,
    /// Frames with no latency stamp (other than replies and control).
    pub(super) unstamped: u64,
    /// Messages whose sequence number was at or below one the subscriber
    /// already had: a duplicate or a reordered message. Not in `received`.
    pub(super) out_of_order: u64,
    /// Messages a subscriber never got although a later one of its topic
    /// came (gaps in the sequence); a loss at the end shows in `received`.
    pub(super) missing: u64,
    /// Subscribers that came back (churn, or following the server: a
    /// `drain`, a close) and got their `ok`.
    pub(super) reconnects: u64,
    /// Of those, the ones that sent `since` and were not answered
    /// `recovered:true`.
    pub(super) unrecovered: u64,
    /// From losing the connection (or, after a `drain`, from the end of
    /// the wait the server asked for) to the `ok` of the resubscription
    /// (failed attempts, backoff and replay included), µs.
    pub(super) recovery_us: Histogram<u64>,
    /// `drain` frames the server sent.
    pub(super) drains: u64,
    /// Drains followed: the subscriber waited the frame's
    /// `reconnect_in_ms` and started reconnecting.
    pub(super) drains_followed: u64,
    /// The `reconnect_in_ms` of every `drain`, ms (0 recorded as 1).
    pub(super) drain_wait_ms: Histogram<u64>,
    /// Connection attempts (first or reconnect) that failed and were
    /// retried after a backoff, by reason: a refused connect, an upgrade
    /// answered other than 101, a close before `ok`, a timeout.
    pub(super) failed_connects: BTreeMap<String, u64>,
    /// Connections that got a `welcome`, by its `node`.
    pub(super) landed: BTreeMap<String, u64>,
    /// Open subscribers by the `node` of their current connection, as of
    /// the report (a snapshot the worker fills, not a count of events).
    pub(super) ended_on: BTreeMap<String, u64>,
    /// Bytes the subscribers read off their sockets (frames as sent, so
    /// compressed ones count compressed).
    pub(super) wire_bytes: u64,
}

impl Tally {
    pub(super) fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            received: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            closes: BTreeMap::new(),
            errors: BTreeMap::new(),
            unstamped: 0,
            out_of_order: 0,
            missing: 0,
            reconnects: 0,
            unrecovered: 0,
            recovery_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            drains: 0,
            drains_followed: 0,
            drain_wait_ms: Histogram::new_with_bounds(1, super::frames::MAX_DRAIN_WAIT_MS, 3)?,
            failed_connects: BTreeMap::new(),
            landed: BTreeMap::new(),
            ended_on: BTreeMap::new(),
            wire_bytes: 0,
        })
    }

    /// The worker's report line (`received_total` counts since the start).
    pub(super) fn to_json(&self, received_total: u64) -> String {
        let pairs = |h: &Histogram<u64>| -> Vec<[u64; 2]> {
            h.iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect()
        };
        let hist = pairs(&self.latency_us);
        serde_json::json!({
            "received": self.received,
            "received_total": received_total,
            "latency_us": hist,
            "closes": self.closes,
            "errors": self.errors,
            "unstamped": self.unstamped,
            "out_of_order": self.out_of_order,
            "missing": self.missing,
            "reconnects": self.reconnects,
            "unrecovered": self.unrecovered,
            "recovery_us": pairs(&self.recovery_us),
            "drains": self.drains,
            "drains_followed": self.drains_followed,
            "drain_wait_ms": pairs(&self.drain_wait_ms),
            "failed_connects": self.failed_connects,
            "landed": self.landed,
            "ended_on": self.ended_on,
            "wire_bytes": self.wire_bytes,
        })
        .to_string()
    }

    /// Adds one worker's report.
    pub(super) fn add(&mut self, v: &Value) -> anyhow::Result<()> {
        self.received += v["received"].as_u64().unwrap_or(0);
        self.unstamped += v["unstamped"].as_u64().unwrap_or(0);
        self.out_of_order += v["out_of_order"].as_u64().unwrap_or(0);
        self.missing += v["missing"].as_u64().unwrap_or(0);
        self.reconnects += v["reconnects"].as_u64().unwrap_or(0);
        self.wire_bytes += v["wire_bytes"].as_u64().unwrap_or(0);
        self.unrecovered += v["unrecovered"].as_u64().unwrap_or(0);
        self.drains += v["drains"].as_u64().unwrap_or(0);
        self.drains_followed += v["drains_followed"].as_u64().unwrap_or(0);
        for (hist, key) in [
            (&mut self.latency_us, "latency_us"),
            (&mut self.recovery_us, "recovery_us"),
            (&mut self.drain_wait_ms, "drain_wait_ms"),
        ] {
            for pair in v[key].as_array().into_iter().flatten() {
                let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) else {
                    bail!("a worker sent a malformed histogram entry {pair}");
                };
                hist.record_n(value.max(1), count)?;
            }
        }
        for (map, key) in [
            (&mut self.closes, "closes"),
            (&mut self.errors, "errors"),
            (&mut self.failed_connects, "failed_connects"),
            (&mut self.landed, "landed"),
            (&mut self.ended_on, "ended_on"),
        ] {
            for (code, n) in v[key].as_object().into_iter().flatten() {
                *map.entry(code.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
        Ok(())
    }

    /// Latency quantile in milliseconds.
    pub(super) fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub(super) fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }

    /// A note on anything that was not a plain delivery.
    pub(super) fn anomalies(&self) -> String {
        let mut notes = Vec::new();
        if !self.closes.is_empty() {
            notes.push(format!("server closed subscribers: {:?}", self.closes));
        }
        if !self.errors.is_empty() {
            notes.push(format!("error replies: {:?}", self.errors));
        }
        if self.unstamped > 0 {
            notes.push(format!("{} unexpected frames", self.unstamped));
        }
        if self.out_of_order > 0 {
            notes.push(format!("{} duplicated or reordered", self.out_of_order));
        }
        if self.missing > 0 {
            notes.push(format!("{} missing (gaps)", self.missing));
        }
        if !self.failed_connects.is_empty() {
            notes.push(format!(
                "failed connection attempts (retried): {:?}",
                self.failed_connects
            ));
        }
        if self.drains > self.drains_followed {
            notes.push(format!(
                "{} drains not followed",
                self.drains - self.drains_followed
            ));
        }
        if self.unrecovered > 0 {
            notes.push(format!(
                "{} resubscriptions not recovered",
                self.unrecovered
            ));
        }
        notes.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_reports_round_trip_and_merge() {
        let mut w = Tally::new().unwrap();
        w.received = 3;
        for v in [100, 100, 2000] {
            w.latency_us.record(v).unwrap();
        }
        *w.closes.entry("4009".into()).or_default() += 1;
        let a: Value = serde_json::from_str(&w.to_json(3)).unwrap();
        let b = serde_json::json!({"received": 1, "latency_us": [[50, 1]], "closes": {"4009": 2}, "errors": {"4008": 1}, "unstamped": 2});
        let mut t = Tally::new().unwrap();
        t.add(&a).unwrap();
        t.add(&b).unwrap();
        assert_eq!(t.received, 4);
        assert_eq!(t.latency_us.len(), 4);
        assert_eq!(t.closes["4009"], 3);
        assert_eq!(t.errors["4008"], 1);
        let c = serde_json::json!({"out_of_order": 2, "missing": 5, "reconnects": 3,
            "unrecovered": 1, "recovery_us": [[1500, 3]]});
        t.add(&c).unwrap();
        assert_eq!((t.out_of_order, t.missing), (2, 5));
        assert_eq!(
            (t.reconnects, t.unrecovered, t.recovery_us.len()),
            (3, 1, 3)
        );
        let again: Value = serde_json::from_str(&t.to_json(0)).unwrap();
        assert_eq!(again["recovery_us"][0][1], 3);
        assert!(t.anomalies().contains("1 resubscriptions not recovered"));
        assert!(t.anomalies().contains("2 duplicated or reordered"));
        assert!(t.anomalies().contains("5 missing"));
        assert!(t.anomalies().contains("4009"));
        assert!(t
            .add(&serde_json::json!({"latency_us": [["x", 1]]}))
            .is_err());
        // Following the server: drains, failed attempts and nodes add up.
        let mut w = Tally::new().unwrap();
        (w.drains, w.drains_followed) = (3, 2);
        w.drain_wait_ms.record(1800).unwrap();
        *w.failed_connects
            .entry("timed out while Welcome".into())
            .or_default() += 1;
        *w.landed.entry("a".into()).or_default() += 2;
        *w.ended_on.entry("b".into()).or_default() += 2;
        let mut t = Tally::new().unwrap();
        for v in [w.to_json(0), w.to_json(0)] {
            t.add(&serde_json::from_str(&v).unwrap()).unwrap();
        }
        assert_eq!(
            (t.drains, t.drains_followed, t.drain_wait_ms.len()),
            (6, 4, 2)
        );
        assert_eq!(t.failed_connects["timed out while Welcome"], 2);
        assert_eq!((t.landed["a"], t.ended_on["b"]), (4, 4));
        assert!(t.anomalies().contains("2 drains not followed"));
        assert!(t.anomalies().contains("timed out while Welcome"));
    }
}
