//! The built-in window report's cost: whole events through `Processor::handle_body` with the
//! `discard` transform, as plain events, and as tumbling-window events with the hot-key report
//! keeping its state (the fold over every user record, the summaries, the state's JSON).
//!
//! `cargo bench --bench windows -- FILE...` prints one JSON line per file: the median of 30
//! runs of each (interleaved, after 3 warm-ups) and their ratio. Driven by
//! tools/bench/compare.py (`make bench`).

use std::time::Instant;

use kinesis_deagg::settings::Switch;
use kinesis_deagg::transform::{Builtin, BuiltinTransform};
use kinesis_deagg::window::HotKeyReport;
use kinesis_deagg::{Processor, Settings};

/// The event at `body` as a window's (not final) invocation, with an empty state.
fn window_event(body: &[u8]) -> Vec<u8> {
    let mut event: serde_json::Value = serde_json::from_slice(body).unwrap();
    let fields = serde_json::json!({
        "window": {"start": "2025-11-24T16:00:00Z", "end": "2025-11-24T16:05:00Z"},
        "state": {},
        "shardId": "shardId-000000000000",
        "isFinalInvokeForWindow": false,
        "isWindowTerminatedEarly": false,
    });
    if let (serde_json::Value::Object(e), serde_json::Value::Object(f)) = (&mut event, fields) {
        e.extend(f);
    }
    serde_json::to_vec(&event).unwrap()
}

fn main() {
    assert!(kinesis_deagg::memory::retain_freed_memory());
    let settings = Settings {
        metrics: Switch::Off,
        ..Settings::default()
    };
    let discard = BuiltinTransform::new(Builtin::Discard, 0);
    let plain = Processor::new(discard, settings.clone());
    let report = Processor::new(discard, settings).with_window(HotKeyReport::new(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let context = lambda_runtime::Context::default();
    for path in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        let body = std::fs::read(&path).unwrap();
        let windowed = window_event(&body);
        let (mut discard_ms, mut report_ms) = (Vec::new(), Vec::new());
        let mut state_bytes = 0;
        for i in 0..33 {
            // Copies are made outside the clock.
            let (a, b) = (
                bytes::BytesMut::from(&body[..]),
                bytes::BytesMut::from(&windowed[..]),
            );
            let start = Instant::now();
            let r = rt.block_on(plain.handle_body(a, &context)).unwrap();
            let t = start.elapsed().as_secs_f64() * 1000.0;
            assert!(r.batch_item_failures.is_empty() && r.state.is_none());
            let start = Instant::now();
            let r = rt.block_on(report.handle_body(b, &context)).unwrap();
            let u = start.elapsed().as_secs_f64() * 1000.0;
            state_bytes = r.state.expect("a window event's state").json().len();
            if i >= 3 {
                discard_ms.push(t);
                report_ms.push(u);
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (d, r) = (median(discard_ms), median(report_ms));
        println!(
            "{}",
            serde_json::json!({"file": path, "discard_ms": d, "report_ms": r, "ratio": r / d,
                "state_bytes": state_bytes})
        );
    }
}
