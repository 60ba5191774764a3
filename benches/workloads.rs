//! The handler on whole Lambda events, as Lambda calls it: `KinesisEvent::from_slice` on the
//! invocation body, then `Processor::handle` with the `discard` transform (metrics off).
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
    // cargo bench passes `--bench`; everything else is a file.
    for path in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        let body = std::fs::read(&path).unwrap();
        let mut times = Vec::new();
        let mut user_records = 0;
        for run in 0..33 {
            let start = Instant::now();
            let event = KinesisEvent::from_slice(&body).unwrap();
            let outcome = rt.block_on(processor.handle(&event, None));
            let response = serde_json::to_vec(&outcome.response()).unwrap();
            std::hint::black_box(response);
            if run >= 3 {
                times.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            user_records = outcome.stats.user_records;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({"file": path, "median_ms": times[times.len() / 2],
                               "min_ms": times[0], "max_ms": times[times.len() - 1],
                               "user_records": user_records, "bytes": body.len()})
        );
    }
}
