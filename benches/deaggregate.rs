//! Deaggregation of a 1 MiB aggregate of 200-byte user records, beside the MD5 of the same
//! bytes (the floor: verification must hash every byte) and the handler on a 5 MiB event.
//!
//! `cargo bench --bench deaggregate` (or `make bench`); criterion prints time and throughput.

use std::hint::black_box;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::{Aggregator, deaggregate, deaggregate_with};
use kinesis_deagg::settings::Switch;
use kinesis_deagg::transform::{Builtin, BuiltinTransform};
use kinesis_deagg::{Processor, Settings};
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

fn handler(c: &mut Criterion) {
    let records: Vec<_> = aggregates(5)
        .iter()
        .enumerate()
        .map(|(i, d)| {
            serde_json::json!({"kinesis": {"sequenceNumber": i.to_string(), "partitionKey": "a",
                "data": STANDARD.encode(d), "approximateArrivalTimestamp": 1.7e9}})
        })
        .collect();
    let json = serde_json::to_vec(&serde_json::json!({ "Records": records })).unwrap();
    // Metrics off: the EMF line would be printed once per iteration.
    let settings = Settings {
        metrics: Switch::Off,
        ..Settings::default()
    };
    let processor = Processor::new(BuiltinTransform::new(Builtin::Discard, 0), settings);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("event-5x1MiB-aggregates");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.sample_size(30);
    g.bench_function("parse+handle(discard)", |b| {
        b.iter(|| {
            let event = KinesisEvent::from_slice(black_box(&json)).unwrap();
            rt.block_on(processor.handle(&event, None))
        })
    });
    g.finish();
}

criterion_group!(benches, kpl, handler);
criterion_main!(benches);
