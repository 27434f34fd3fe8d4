//! Cross-shard hand-off: 1,000 `ShardMsg::Deliver` (topic and frame cloned,
//! as `Bus::deliver` does) sent into a shard inbox from `bus::inbox`, then
//! drained with `Inbox::try_recv`, against a `std::sync::mpsc::sync_channel`
//! of the same capacity carrying the same messages.
//!
//! Sender and receiver are the same thread here: this measures the per
//! message cost of the channel and the waker, not the cache-line traffic
//! between two cores, which the load scenarios see.

use std::hint::black_box;
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringcast::bus::{self, ShardMsg, SHARD_INBOX_CAPACITY};
use ringcast::id::MsgId;
use ringcast::metrics::ShardMetrics;
use ringcast::protocol::encode_msg;
use ringcast::topic::TopicName;

const BATCH: u64 = 1_000;

fn bench(c: &mut Criterion) {
    let topic = TopicName::new("news.breaking").expect("valid topic");
    let frame: Bytes = encode_msg(&topic, MsgId { ms: 1, seq: 0 }, None, r#""hello""#);
    let msg = |seq: u64| ShardMsg::Deliver {
        topic: topic.clone(),
        id: MsgId { ms: 1, seq },
        frame: frame.clone(),
    };

    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(BATCH));

    let (tx, inbox) = bus::inbox(Arc::new(ShardMetrics::default()));
    group.bench_function("bus_inbox_1000", |b| {
        b.iter(|| {
            for seq in 0..BATCH {
                tx.send(msg(seq));
            }
            let mut n = 0u64;
            while let Some(m) = inbox.try_recv() {
                black_box(&m);
                n += 1;
            }
            assert_eq!(n, BATCH);
        })
    });

    let (tx, rx) = mpsc::sync_channel::<ShardMsg>(SHARD_INBOX_CAPACITY);
    group.bench_function("baseline_std_mpsc_1000", |b| {
        b.iter(|| {
            for seq in 0..BATCH {
                tx.try_send(msg(seq)).expect("capacity");
            }
            let mut n = 0u64;
            while let Ok(m) = rx.try_recv() {
                black_box(&m);
                n += 1;
            }
            assert_eq!(n, BATCH);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
