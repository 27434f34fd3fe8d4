//! Client op parsing: `ClientOp::parse` (serde_json into a borrowed envelope,
//! then validation) on typical ops, against
//! - `serde_json::from_str::<serde_json::Value>`: the naive baseline, a
//!   whole DOM with owned strings;
//! - `serde_json` into the same envelope shape without the validation, to
//!   show what the checks cost (timed like the simd-json one below, from a
//!   fresh copy of the op, so those two compare directly);
//! - `simd-json` into the same envelope shape (issue #3 asks to compare).
//!   simd-json parses in place, so each iteration first copies the op into a
//!   scratch buffer (`iter_batched_ref`, not timed) — the server would parse
//!   in its read buffer. It has no equivalent of serde_json's `RawValue`, so
//!   `data` becomes a `BorrowedValue`; the `+reserialize` variant adds
//!   turning it back into text, which `msg` frames need.

use std::borrow::Cow;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use ringcast::protocol::ClientOp;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The fields `ClientOp::parse` reads, with serde_json's raw `data`.
#[derive(Deserialize)]
#[allow(dead_code)] // Fields are read by serde only; the bench drops them.
struct Envelope<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    id: Option<u64>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    since: Option<Cow<'a, str>>,
    epoch: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
}

/// The same envelope for simd-json: `data` as a borrowed DOM.
#[derive(Deserialize)]
#[allow(dead_code)]
struct SimdEnvelope<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    id: Option<u64>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    since: Option<Cow<'a, str>>,
    epoch: Option<String>,
    #[serde(borrow, default, deserialize_with = "borrowed_value")]
    data: Option<simd_json::BorrowedValue<'a>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
}

/// simd-json implements `Deserialize<'de>` for `BorrowedValue<'de>` only,
/// which serde's derive cannot name for a field; this function can.
fn borrowed_value<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<simd_json::BorrowedValue<'de>>, D::Error> {
    simd_json::BorrowedValue::deserialize(d).map(Some)
}

const OPS: [(&str, &str); 4] = [
    (
        "sub",
        r#"{"op":"sub","id":1,"topic":"user.42.notifications"}"#,
    ),
    (
        "sub_since",
        r#"{"op":"sub","id":2,"topic":"user.42.notifications","since":"1763788800123-7","epoch":"a1b2c3d4"}"#,
    ),
    (
        "pub",
        r#"{"op":"pub","id":3,"topic":"chat.room.7","data":{"from":"alice","text":"hello, everyone in the room","at":1763788800123,"tags":["greeting","ui"]}}"#,
    ),
    ("ping", r#"{"op":"ping","id":4}"#),
];

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ops_parse");
    for (name, op) in OPS {
        assert!(ClientOp::parse(op).is_ok(), "{name} must be a valid op");
        group.bench_with_input(BenchmarkId::new("client_op_parse", name), op, |b, op| {
            b.iter(|| ClientOp::parse(black_box(op)).map(|(id, _)| id).ok())
        });
        group.bench_with_input(
            BenchmarkId::new("baseline_serde_value", name),
            op,
            |b, op| b.iter(|| serde_json::from_str::<serde_json::Value>(black_box(op)).ok()),
        );
        group.bench_with_input(
            BenchmarkId::new("serde_json_envelope", name),
            op,
            |b, op| {
                // Same harness as the simd-json variant, so the two compare.
                b.iter_batched_ref(
                    || op.as_bytes().to_vec(),
                    |buf| {
                        serde_json::from_slice::<Envelope<'_>>(buf)
                            .map(|e| e.id)
                            .ok()
                    },
                    BatchSize::SmallInput,
                )
            },
        );
        group.bench_with_input(BenchmarkId::new("simd_json_envelope", name), op, |b, op| {
            b.iter_batched_ref(
                || op.as_bytes().to_vec(),
                |buf| {
                    simd_json::serde::from_slice::<SimdEnvelope<'_>>(buf)
                        .map(|e| e.id)
                        .ok()
                },
                BatchSize::SmallInput,
            )
        });
        if name == "pub" {
            group.bench_with_input(
                BenchmarkId::new("simd_json_envelope+reserialize", name),
                op,
                |b, op| {
                    b.iter_batched_ref(
                        || op.as_bytes().to_vec(),
                        |buf| {
                            simd_json::serde::from_slice::<SimdEnvelope<'_>>(buf)
                                .ok()
                                .and_then(|e| e.data)
                                .map(|d| simd_json::to_string(&d).ok())
                        },
                        BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
