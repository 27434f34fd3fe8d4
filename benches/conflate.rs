//! The outbound queue's `slow_consumer` policies (src/shard/queue.rs), per
//! queue operation, over 10,000 subscribers' queues: the work a shard does
//! per `Deliver` when every subscriber of the topic is behind.
//!
//! - `close_append`: the `close` policy's push of one `msg` into a queue
//!   holding four other topics' frames, then the frame's write (`consume`):
//!   today's path, the baseline.
//! - `conflate_replace`: the same queue already holds the topic's older
//!   `msg` (not written): the new one replaces it in place.
//! - `drop_oldest_full`: the queue is at its bound with the namespace's
//!   messages: the push drops the oldest and moves the `lost` notice's `to`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast::id::MsgId;
use ringcast::namespace::SlowConsumer;
use ringcast::protocol::encode_msg;
use ringcast::shard::queue::{OutQueue, Pushed, Tag};
use ringcast::topic::TopicName;

const SUBSCRIBERS: usize = 10_000;

fn frame(topic: &TopicName, n: u64) -> Bytes {
    let data = format!(r#"{{"price":{n},"pad":"{}"}}"#, "x".repeat(80));
    encode_msg(topic, MsgId { ms: n, seq: 0 }, None, &data)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("slow_consumer_queue");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    let topic = TopicName::new("px:eurusd").expect("valid topic");
    let others: Vec<TopicName> = (0..4)
        .map(|i| TopicName::new(&format!("px:other{i}")).expect("valid topic"))
        .collect();
    let new = frame(&topic, 1_000_000);
    let id = MsgId {
        ms: 1_000_000,
        seq: 0,
    };
    let bound = 1 << 20;

    let filled = |tag: Option<&std::rc::Rc<Tag>>| -> Vec<OutQueue> {
        (0..SUBSCRIBERS)
            .map(|_| {
                let mut q = OutQueue::default();
                for (i, t) in others.iter().enumerate() {
                    let other = Tag::new(t, SlowConsumer::Conflate);
                    q.push_msg(
                        frame(t, i as u64),
                        other.as_ref(),
                        MsgId {
                            ms: i as u64,
                            seq: 0,
                        },
                        bound,
                    );
                }
                if tag.is_some() {
                    q.push_msg(frame(&topic, 5), tag, MsgId { ms: 5, seq: 0 }, bound);
                }
                q
            })
            .collect()
    };

    let mut queues = filled(None);
    group.bench_function(BenchmarkId::new("close_append", SUBSCRIBERS), |b| {
        b.iter(|| {
            for q in queues.iter_mut() {
                let pushed = q.push_msg(black_box(&new).clone(), None, id, bound);
                debug_assert_eq!(pushed, Pushed::Queued);
                // The write that takes it back out (the front frame here
                // is another topic's; what matters is one push, one pop).
                q.consume(new.len());
            }
        })
    });

    let tag = Tag::new(&topic, SlowConsumer::Conflate);
    let mut queues = filled(tag.as_ref());
    group.bench_function(BenchmarkId::new("conflate_replace", SUBSCRIBERS), |b| {
        b.iter(|| {
            for q in queues.iter_mut() {
                let pushed = q.push_msg(black_box(&new).clone(), tag.as_ref(), id, bound);
                debug_assert_eq!(pushed, Pushed::Conflated);
            }
        })
    });

    let tag = Tag::new(&topic, SlowConsumer::DropOldest);
    let one = new.len();
    let small_bound = 64 * one;
    let mut queues: Vec<OutQueue> = (0..SUBSCRIBERS)
        .map(|_| {
            let mut q = OutQueue::default();
            for n in 0..80 {
                q.push_msg(
                    frame(&topic, n),
                    tag.as_ref(),
                    MsgId { ms: n, seq: 0 },
                    small_bound,
                );
            }
            q
        })
        .collect();
    group.bench_function(BenchmarkId::new("drop_oldest_full", SUBSCRIBERS), |b| {
        b.iter(|| {
            for q in queues.iter_mut() {
                let pushed = q.push_msg(black_box(&new).clone(), tag.as_ref(), id, small_bound);
                debug_assert!(matches!(pushed, Pushed::DroppedOldest(_)));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
