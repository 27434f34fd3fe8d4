//! Upgrade request parsing: `ws::handshake::parse_request` on the request
//! Chromium sends, against `httparse` alone on the same bytes (the floor:
//! what ringcast's checks add on top of the HTTP parse).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringcast::ws::handshake::{parse_request, MAX_HEADERS};

/// Shaped like Chromium's upgrade request (header order and values), with
/// a token in the query as browsers send it.
const REQUEST: &[u8] = b"GET /ws?token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTQyIn0.c2lnbmF0dXJl HTTP/1.1\r\n\
Host: ringcast.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Sec-WebSocket-Protocol: ringcast.v1\r\n\
\r\n";

const MAX_HEAD: usize = 8 << 10;

fn bench(c: &mut Criterion) {
    let (req, consumed) = parse_request(REQUEST, MAX_HEAD)
        .expect("valid upgrade")
        .expect("complete head");
    assert_eq!(consumed, REQUEST.len());
    assert_eq!(req.protocols, ["ringcast.v1"]);

    let mut group = c.benchmark_group("handshake_parse");
    group.throughput(Throughput::Bytes(REQUEST.len() as u64));
    group.bench_function("parse_request_chromium", |b| {
        b.iter(|| parse_request(black_box(REQUEST), MAX_HEAD).ok().flatten())
    });
    group.bench_function("baseline_httparse_only", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(black_box(REQUEST)).ok().map(|s| s.is_complete())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
