//! Matching one message against a shard's wildcard subscriptions: the
//! segment trie (`ringcast::shard::PatternTrie`, what the shard does)
//! against testing every pattern in turn (`auth::Pattern::matches`, the
//! scan the trie replaces), for 10, 1,000 and 10,000 distinct patterns of
//! the shape one-per-user subscriptions take (`user.N.*`, `user.N.#`,
//! `*.N`), and a topic that matches two of them. The trie's cost should
//! stay flat as patterns grow; the scan's grows with them.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ringcast::auth::Pattern;
use ringcast::shard::PatternTrie;
use ringcast::topic::TopicName;

fn patterns(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 3 {
            0 => format!("user.{i}.*"),
            1 => format!("user.{i}.#"),
            _ => format!("*.{i}"),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("match_one_topic");
    for n in [10usize, 1_000, 10_000] {
        let texts = patterns(n);
        let mut trie = PatternTrie::default();
        for t in &texts {
            trie.insert(&TopicName::filter(t).expect("a valid pattern"));
        }
        let parsed: Vec<Pattern> = texts
            .iter()
            .map(|t| Pattern::parse(t).expect("a valid pattern"))
            .collect();
        // Matches `user.{k}.#` (k = 1 mod 3) and `*.x`-free: two hits at most.
        let k = (n / 2) / 3 * 3 + 1;
        let topic = format!("user.{k}.inbox");
        group.bench_with_input(BenchmarkId::new("trie", n), &topic, |b, topic| {
            b.iter(|| {
                let mut hits = 0;
                trie.for_each_match(black_box(topic), |_| hits += 1);
                hits
            })
        });
        group.bench_with_input(BenchmarkId::new("scan", n), &topic, |b, topic| {
            b.iter(|| {
                parsed
                    .iter()
                    .filter(|p| p.matches(black_box(topic)))
                    .count()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
