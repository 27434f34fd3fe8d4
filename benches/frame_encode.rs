//! `msg` frame encoding: `protocol::encode_msg` (hand-written JSON into one
//! buffer) against the naive way, `serde_json::to_vec` of an equivalent
//! struct and then a WebSocket header in front (a second buffer and a copy).
//! Both produce the same bytes; the bench checks that before timing.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast::id::MsgId;
use ringcast::protocol::encode_msg;
use ringcast::topic::TopicName;
use ringcast::ws::frame::encode_text;
use serde::Serialize;
use serde_json::value::RawValue;

/// The `msg` frame's body, the way one would write it with serde.
#[derive(Serialize)]
struct MsgFrame<'a> {
    op: &'static str,
    topic: &'a str,
    id: String,
    data: &'a RawValue,
}

/// `{"text":"xxx…"}` of exactly `len` bytes.
fn payload(len: usize) -> String {
    let filler = len - r#"{"text":""}"#.len();
    format!(r#"{{"text":"{}"}}"#, "x".repeat(filler))
}

fn naive(topic: &TopicName, id: MsgId, data: &RawValue) -> bytes::Bytes {
    let body = MsgFrame {
        op: "msg",
        topic: topic.as_str(),
        id: id.to_string(),
        data,
    };
    let json = serde_json::to_vec(&body).expect("serializable");
    encode_text(&json)
}

fn bench(c: &mut Criterion) {
    let topic = TopicName::new("user.42.notifications").expect("valid topic");
    let id = MsgId {
        ms: 1_763_788_800_123,
        seq: 7,
    };
    let mut group = c.benchmark_group("frame_encode");
    for size in [100usize, 1024] {
        let data = payload(size);
        let raw: Box<RawValue> = serde_json::from_str(&data).expect("valid JSON");
        assert_eq!(
            encode_msg(&topic, id, None, &data),
            naive(&topic, id, &raw),
            "both encoders must produce the same frame"
        );
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode_msg", size), &data, |b, data| {
            b.iter(|| encode_msg(black_box(&topic), black_box(id), None, black_box(data)))
        });
        group.bench_with_input(
            BenchmarkId::new("baseline_serde_to_vec", size),
            &raw,
            |b, raw| b.iter(|| naive(black_box(&topic), black_box(id), black_box(raw))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
