//! Queueing one shared `msg` frame to 10,000 local subscribers, the work a
//! shard does per `Deliver`. The shard's connection type is crate-private,
//! so this does the same thing with the public pieces: each subscriber's
//! outbound queue is a `VecDeque<Bytes>` and gets a clone of one `Bytes`
//! (a refcount increment); the queues are then emptied (the decrement a
//! completed write does), so every iteration starts from the same state.
//!
//! - `shared_bytes`: queues keep their storage between messages (a busy
//!   connection).
//! - `shared_bytes_fresh_queue`: every queue starts with no storage, as the
//!   shard leaves an idle connection's queue once flushed (`VecDeque::new`),
//!   so the first frame allocates it (a connection that receives one
//!   message per wake-up).
//! - `baseline_copy_per_subscriber`: the anti-pattern, a `Vec<u8>` copy of
//!   the frame per subscriber.

use std::collections::VecDeque;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast::id::MsgId;
use ringcast::protocol::encode_msg;
use ringcast::topic::TopicName;

const SUBSCRIBERS: usize = 10_000;

fn frame(payload_len: usize) -> Bytes {
    let topic = TopicName::new("news.breaking").expect("valid topic");
    let data = format!(r#""{}""#, "x".repeat(payload_len - 2));
    encode_msg(&topic, MsgId { ms: 1, seq: 0 }, None, &data)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_local");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for payload in [100usize, 1024] {
        let frame = frame(payload);

        let mut shared: Vec<VecDeque<Bytes>> = (0..SUBSCRIBERS)
            .map(|_| VecDeque::with_capacity(4))
            .collect();
        group.bench_function(BenchmarkId::new("shared_bytes", payload), |b| {
            b.iter(|| {
                for q in shared.iter_mut() {
                    q.push_back(black_box(&frame).clone());
                }
                for q in shared.iter_mut() {
                    q.clear();
                }
            })
        });

        let mut fresh: Vec<VecDeque<Bytes>> = (0..SUBSCRIBERS).map(|_| VecDeque::new()).collect();
        group.bench_function(BenchmarkId::new("shared_bytes_fresh_queue", payload), |b| {
            b.iter(|| {
                for q in fresh.iter_mut() {
                    q.push_back(black_box(&frame).clone());
                }
                for q in fresh.iter_mut() {
                    *q = VecDeque::new();
                }
            })
        });

        let mut copies: Vec<VecDeque<Vec<u8>>> = (0..SUBSCRIBERS)
            .map(|_| VecDeque::with_capacity(4))
            .collect();
        group.bench_function(
            BenchmarkId::new("baseline_copy_per_subscriber", payload),
            |b| {
                b.iter(|| {
                    for q in copies.iter_mut() {
                        q.push_back(black_box(&frame[..]).to_vec());
                    }
                    for q in copies.iter_mut() {
                        q.clear();
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
