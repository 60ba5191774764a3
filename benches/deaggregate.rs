//! Deaggregation of a 1 MiB aggregate of 200-byte user records, beside the MD5 of the same
//! bytes (the floor: verification must hash every byte). The whole handler on whole events is
//! `benches/workloads.rs` (`make bench`).
//!
//! `cargo bench --bench deaggregate` (or `make bench-kpl`); criterion prints time and throughput.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kinesis_deagg::kpl::{Aggregator, deaggregate, deaggregate_all, deaggregate_with, md5_many};
use md5::{Digest, Md5};

/// Full 1 MiB aggregates of ~200-byte JSON-like user records with a few thousand keys.
fn aggregates(count: usize) -> Vec<Bytes> {
    let mut agg = Aggregator::new();
    let mut out = Vec::new();
    let mut i = 0u64;
    while out.len() < count {
        let data = format!(
            "{{\"id\":{i},\"user\":\"user-{}\",\"pad\":\"{}\"}}",
            i % 5000,
            "x".repeat(160)
        );
        out.extend(
            agg.add(&format!("user-{}", i % 5000), None, data)
                .unwrap()
                .map(|r| r.data),
        );
        i += 1;
    }
    out
}

fn kpl(c: &mut Criterion) {
    let data = aggregates(1).remove(0);
    let body = &data[4..data.len() - 16];
    let mut g = c.benchmark_group("1MiB-aggregate-200B-records");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("md5-only", |b| b.iter(|| Md5::digest(black_box(body))));
    g.bench_function("deaggregate", |b| {
        b.iter(|| deaggregate(black_box(data.clone())).unwrap())
    });
    g.bench_function("deaggregate-no-checksum", |b| {
        b.iter(|| deaggregate_with(black_box(data.clone()), false).unwrap())
    });
    g.finish();
}

/// The MD5s of an event's aggregates one after another, and side by side (`md5_many`): 5 of
/// 1 MiB (W1) and 88 of 50 KB (W5, the KPL's default size).
fn md5_of_an_event(c: &mut Criterion) {
    for (name, count, size) in [("5x1MiB", 5, 1 << 20), ("88x50KB", 88, 50 * 1024)] {
        let buffers: Vec<Vec<u8>> = (0..count)
            .map(|i| (0..size).map(|j| (i * 31 + j * 7) as u8).collect())
            .collect();
        let messages: Vec<&[u8]> = buffers.iter().map(Vec::as_slice).collect();
        let mut g = c.benchmark_group(format!("md5-{name}"));
        g.throughput(Throughput::Bytes((count * size) as u64));
        g.bench_function("md-5-one-by-one", |b| {
            b.iter(|| {
                messages
                    .iter()
                    .map(|m| Md5::digest(black_box(m)))
                    .collect::<Vec<_>>()
            })
        });
        g.bench_function("md5_many", |b| b.iter(|| md5_many(black_box(&messages))));
        g.finish();
    }
}

/// A whole event's aggregates at once (`deaggregate_all`): 5 x 1 MiB of ~200 B records. With a
/// second core a helper thread computes the MD5s and splits from the end of the batch
/// (`taskset -c 0` to see one core).
fn all_of_an_event(c: &mut Criterion) {
    let records = aggregates(5);
    let mut g = c.benchmark_group("5x1MiB-aggregates");
    g.throughput(Throughput::Bytes(
        records.iter().map(|r| r.len() as u64).sum(),
    ));
    g.bench_function("deaggregate_all", |b| {
        b.iter(|| deaggregate_all(black_box(&records), true))
    });
    g.finish();
}

criterion_group!(benches, kpl, md5_of_an_event, all_of_an_event);
criterion_main!(benches);
