//! Where a reader starts, at boot and after Redis comes back: each
//! partition's position resolved once (`$` made concrete), its epoch, and
//! the idempotency keys of the window before the start.

use std::sync::Arc;

use ::redis::{RedisError, Value};
use tracing::{debug, warn};

use super::super::entry::{decode_entry, parse_id, range_entries, Retained};
use super::{dedup, gap, Conn, Reader};
use crate::id::{mint_epoch, MsgId};

impl Reader {
    /// Feeds each partition's idempotency table with the keyed entries of
    /// the last `--idempotency-window` before the start position (at most
    /// the newest [`dedup::BOOT_ENTRIES`] of them), oldest first, as a node
    /// that was reading then did: a node that (re)starts skips the same
    /// repeats as the others. One `XREVRANGE` per partition, at boot only.
    pub(super) fn learn_recent_keys(&mut self, conn: &mut Conn) -> Result<(), RedisError> {
        let window = self.settings.idempotency_window.as_millis() as u64;
        let partitions = self.settings.partitions();
        for (i, part) in self.parts.iter_mut().enumerate() {
            if !part.exists {
                continue;
            }
            let from = part.last.ms.saturating_sub(window);
            let v: Value = ::redis::cmd("XREVRANGE")
                .arg(&part.key)
                .arg(part.last.to_string())
                .arg(from.to_string())
                .arg("COUNT")
                .arg(dedup::BOOT_ENTRIES)
                .query(conn)?;
            let entries = range_entries(v).unwrap_or_default();
            let mut learned = 0usize;
            for (id, fields) in entries.into_iter().rev() {
                let Some(id) = parse_id(id) else { continue };
                if let Ok(e) = decode_entry(fields, self.base + i as u32, partitions) {
                    if let Some(key) = &e.key {
                        part.keys.repeats(&e.topic, key, id, window);
                        learned += 1;
                    }
                }
            }
            if learned > 0 {
                debug!(stream = %part.key, learned, "idempotency keys learned at boot");
            }
        }
        Ok(())
    }

    /// `$` resolved to concrete ids once, so a reconnect resumes exactly:
    /// each stream's `last-generated-id`, whose number is `entries-added`
    /// (the reader's count starts there). A missing stream starts at 0-0.
    pub(super) fn start_position(&mut self, conn: &mut Conn) -> Result<(), RedisError> {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for p in &self.parts {
            pipe.cmd("XINFO").arg("STREAM").arg(&p.key);
        }
        let infos: Vec<Value> = match pipe.query(conn) {
            Ok(v) => v,
            // On a cluster the one stream of this reader does not exist.
            Err(e) if e.detail().is_some_and(|d| d.contains("no such key")) => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut infos = infos.into_iter();
        for p in 0..self.parts.len() {
            let retained = match infos.next() {
                None => None,
                Some(Value::ServerError(e))
                    if e.details().is_some_and(|d| d.contains("no such key")) =>
                {
                    None
                }
                Some(Value::ServerError(e)) => return Err(e.into()),
                Some(v) => Some(Retained::from_xinfo(v).ok_or_else(|| {
                    RedisError::from((
                        ::redis::ErrorKind::UnexpectedReturnType,
                        "unreadable XINFO STREAM reply",
                    ))
                })?),
            };
            let part = &mut self.parts[p];
            let Some(r) = retained else {
                part.count = Some(0);
                continue;
            };
            let id = r.last_generated.unwrap_or_default();
            part.last = id;
            part.floor = id;
            part.exists = true;
            match gap::Snapshot::from_retained(&r) {
                Some(s) => {
                    part.count = Some(s.added);
                    part.retention = s
                        .retention()
                        .map_or(part.retention, |n| n.min(part.retention));
                }
                None => self.unavailable(),
            }
        }
        Ok(())
    }

    /// Creates missing epochs (`SET NX`) and reads them all. A changed epoch
    /// means Redis lost that partition's history: the cache goes with it.
    pub(super) fn sync_epochs(&mut self, conn: &mut Conn) -> Result<(), RedisError> {
        let mut pipe = ::redis::pipe();
        for i in 0..self.parts.len() as u32 {
            let key = self.settings.keys.epoch(self.base + i);
            pipe.cmd("SET")
                .arg(key)
                .arg(&*mint_epoch())
                .arg("NX")
                .ignore();
            pipe.cmd("GET").arg(key);
        }
        let epochs: Vec<String> = pipe.query(conn)?;
        for (i, (part, epoch)) in self.parts.iter_mut().zip(epochs).enumerate() {
            if *part.epoch != *epoch {
                if !part.epoch.is_empty() {
                    warn!(
                        partition = self.base as usize + i,
                        "partition epoch changed: Redis lost its history"
                    );
                    part.cache.clear();
                    part.cache_bytes = 0;
                    part.floor = part.last;
                    // Another history: its numbering and its losses too.
                    part.count = None;
                    part.cut = MsgId::default();
                }
                part.epoch = Arc::from(epoch);
            }
        }
        Ok(())
    }
}
