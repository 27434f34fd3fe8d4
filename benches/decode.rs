//! Inbound path: `ws::frame::Decoder::decode` over a read buffer holding 100
//! masked 100-byte text frames (as a busy client's socket read would), and
//! `ws::frame::unmask` on 100 B, 4 KiB and 64 KiB against a byte-at-a-time
//! XOR as the baseline.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ringcast::ws::frame::{encode_masked, unmask, Decoder, Message, OpCode};

const FRAMES: usize = 100;
const PAYLOAD: usize = 100;

fn read_buffer() -> BytesMut {
    let mut buf = BytesMut::new();
    for i in 0..FRAMES {
        // A JSON-looking 100-byte text payload; the key changes per frame.
        let body = format!(r#"{{"op":"ping","id":{i:03},"pad":"{}"}}"#, "p".repeat(69));
        assert_eq!(body.len(), PAYLOAD);
        let mask = (i as u32).wrapping_mul(0x9E37_79B9).to_be_bytes();
        buf.extend_from_slice(&encode_masked(OpCode::Text, true, body.as_bytes(), mask));
    }
    buf
}

fn decode_all(buf: &mut BytesMut) -> usize {
    let mut decoder = Decoder::new(64 << 10);
    let mut n = 0;
    while let Ok(Some(msg)) = decoder.decode(buf) {
        if let Message::Text(t) = msg {
            n += t.len();
        }
    }
    n
}

/// The obvious loop, one byte and one modulo at a time.
fn unmask_bytewise(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

fn bench(c: &mut Criterion) {
    let frames = read_buffer();
    assert_eq!(decode_all(&mut frames.clone()), FRAMES * PAYLOAD);

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("decoder_100x100B_masked", |b| {
        // The copy of the read buffer is setup, not timed.
        b.iter_batched_ref(|| frames.clone(), decode_all, BatchSize::SmallInput)
    });
    group.finish();

    let mut group = c.benchmark_group("unmask");
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    for size in [100usize, 4 << 10, 64 << 10] {
        let mut buf = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("unmask", size), |b| {
            b.iter(|| unmask(black_box(&mut buf), black_box(mask)))
        });
        group.bench_function(BenchmarkId::new("baseline_bytewise", size), |b| {
            b.iter(|| unmask_bytewise(black_box(&mut buf), black_box(mask)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
