//! The handler on whole Lambda events, as `kinesis_deagg::run` calls it:
//! `Processor::handle_body` on the invocation body (read as `KinesisEvent::from_owned`, then
//! processed) with the `discard` transform (metrics off), and the response serialized. Each run
//! gets its own copy of the body, made before the clock starts, as the Runtime API hands over
//! a fresh body per invocation.
//!
//! `cargo bench --bench workloads -- FILE...` prints one JSON line per file with the median of
//! 30 runs (after 3 warm-ups). Driven by tools/bench/compare.py (`make bench`).

use std::time::Instant;

use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::settings::Switch;
use kinesis_deagg::transform::{Builtin, BuiltinTransform};
use kinesis_deagg::{Processor, Settings};

fn main() {
    // As the kinesis-deagg binary does.
    assert!(kinesis_deagg::memory::retain_freed_memory());
    let settings = Settings {
        metrics: Switch::Off,
        ..Settings::default()
    };
    let processor = Processor::new(BuiltinTransform::new(Builtin::Discard, 0), settings);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let context = lambda_runtime::Context::default(); // no deadline
    // cargo bench passes `--bench`; everything else is a file.
    for path in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        let body = std::fs::read(&path).unwrap();
        let mut times = Vec::new();
        for run in 0..33 {
            let copy = bytes::BytesMut::from(&body[..]);
            let start = Instant::now();
            let response = rt.block_on(processor.handle_body(copy, &context)).unwrap();
            std::hint::black_box(serde_json::to_vec(&response).unwrap());
            if run >= 3 {
                times.push(start.elapsed().as_secs_f64() * 1000.0);
            }
        }
        // Counted once, outside the timed runs.
        let event = KinesisEvent::from_slice(&body).unwrap();
        let user_records = rt
            .block_on(processor.handle(&event, None))
            .unwrap()
            .stats
            .user_records;
        times.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({"file": path, "median_ms": times[times.len() / 2],
                               "min_ms": times[0], "max_ms": times[times.len() - 1],
                               "user_records": user_records, "bytes": body.len()})
        );
    }
}
