//! permessage-deflate (RFC 7692) of one 1 KiB `msg` frame payload, the way
//! the server will do it once compression lands: raw deflate, a sync flush,
//! the trailing `00 00 ff ff` stripped. With `server_no_context_takeover`
//! (docs/PROTOCOL.md section 1) every message starts from an empty window, so
//! one compressor per shard can be reset and reused; the baseline builds a
//! new compressor per message, as a per-connection or per-call design
//! would. Levels 1 and 6 show the speed/size trade-off; the inflate bench
//! is the inbound side (a client's compressed frame). The payload is
//! JSON-shaped text from a small vocabulary, not a run of one byte, so the
//! ratio is that of a real notification.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// A deterministic, notification-like JSON body of about `len` bytes.
fn payload(len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "order", "shipped", "user", "alice", "bob", "price", "updated", "comment", "new",
        "message", "from", "channel", "general", "likes", "your", "photo",
    ];
    let mut out =
        String::from(r#"{"op":"msg","topic":"user.42","id":"1732240000000-0","data":{"events":["#);
    let mut seed = 0x2545_f491_u32;
    while out.len() < len - 8 {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let w = WORDS[(seed % 16) as usize];
        let n = seed % 1000;
        out.push_str(&format!(r#"{{"kind":"{w}","n":{n}}},"#));
    }
    out.pop();
    out.push_str("]}}");
    out.into_bytes()
}

/// Compresses one message with `c`, which must be fresh or reset; returns the payload.
fn deflate(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> usize {
    out.clear();
    c.compress_vec(input, out, FlushCompress::Sync)
        .expect("in-memory deflate cannot fail");
    // RFC 7692 §7.2.1: remove the 4-octet tail of the sync flush.
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
    out.len()
}

fn bench(c: &mut Criterion) {
    let input = payload(1024);
    let mut g = c.benchmark_group("deflate_1KiB");
    g.throughput(Throughput::Bytes(input.len() as u64));
    for level in [1, 6] {
        let mut out = Vec::with_capacity(2 * input.len());
        let mut comp = Compress::new(Compression::new(level), false);
        let size = deflate(&mut comp, &input, &mut out);
        eprintln!("level {level}: {} -> {size} bytes", input.len());
        g.bench_function(format!("reset_reused/level{level}"), |b| {
            b.iter(|| {
                comp.reset();
                black_box(deflate(&mut comp, black_box(&input), &mut out))
            })
        });
        g.bench_function(format!("new_per_message/level{level}"), |b| {
            b.iter(|| {
                let mut fresh = Compress::new(Compression::new(level), false);
                black_box(deflate(&mut fresh, black_box(&input), &mut out))
            })
        });
    }
    g.finish();

    let mut comp = Compress::new(Compression::new(1), false);
    let mut compressed = Vec::with_capacity(2 * input.len());
    deflate(&mut comp, &input, &mut compressed);
    compressed.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut g = c.benchmark_group("inflate_1KiB");
    g.throughput(Throughput::Bytes(input.len() as u64));
    let mut inflater = Decompress::new(false);
    let mut plain = Vec::with_capacity(2 * input.len());
    g.bench_function("reset_reused", |b| {
        b.iter(|| {
            inflater.reset(false);
            plain.clear();
            inflater
                .decompress_vec(black_box(&compressed), &mut plain, FlushDecompress::Sync)
                .expect("valid stream");
            assert_eq!(plain.len(), input.len());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
