//! Any event Lambda can send fits in the 128 MB the template allows: the worst cases, a
//! 6 MB event of tiny user records, stay far below 64 MB of live heap in both modes.
//!
//! One test in its own process: the allocator counts every thread's blocks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kinesis_deagg::batch::Mode;
use kinesis_deagg::kpl::{Aggregator, UserRecord};
use kinesis_deagg::transform::{Error, RecordContext};
use kinesis_deagg::{Processor, Settings};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(live, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The largest invocation body Lambda sends.
const MAX_PAYLOAD: usize = 6 * 1024 * 1024;

/// An event of aggregates of `per` bytes each, filled with empty user records whose key is
/// made by `key`, as close to the payload limit as base64 allows; and its user records.
fn event(per: usize, key: impl Fn(usize) -> String) -> (Vec<u8>, usize) {
    let mut records = Vec::new();
    let (mut users, mut total, mut n) = (0, 0, 0);
    // base64 takes 4/3 of the data, plus about 100 bytes of JSON per record.
    while total + per < (MAX_PAYLOAD - 4096) / 4 * 3 {
        let mut agg = Aggregator::with_max_size(per).unwrap();
        let full = loop {
            n += 1;
            if let Some(full) = agg.add(&key(n), None, b"").unwrap() {
                break full;
            }
        };
        total += full.data.len();
        users += full.user_records;
        records.push(serde_json::json!({"kinesis": {
            "partitionKey": full.partition_key, "sequenceNumber": records.len().to_string(),
            "data": STANDARD.encode(&full.data)}}));
    }
    let body = serde_json::to_vec(&serde_json::json!({ "Records": records })).unwrap();
    assert!(body.len() <= MAX_PAYLOAD, "{}", body.len());
    (body, users)
}

// Building 733,000 user records takes minutes unoptimised: `make test` runs it with --release.
#[test]
#[cfg_attr(debug_assertions, ignore = "run with --release (make test does)")]
fn a_6_mb_event_of_tiny_user_records_stays_below_64_mb_in_both_modes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cases = [
        ("one aggregate, one key", 4_400_000, None),
        ("one aggregate, distinct keys", 4_400_000, Some(())),
        ("1 MiB aggregates, one key", 1 << 20, None),
    ];
    for (name, per, distinct) in cases {
        let (body, users) = event(per, |n| match distinct {
            Some(()) => format!("{n:x}"),
            None => "k".into(),
        });
        for mode in [Mode::Ordered, Mode::Concurrent] {
            let settings = Settings {
                mode,
                ..Settings::default()
            };
            let transform = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
            let processor = Processor::new(transform, settings);
            let body = bytes::BytesMut::from(&body[..]);
            let before = LIVE.load(Relaxed);
            PEAK.store(before, Relaxed);
            let context = lambda_runtime::Context::default();
            let response = rt.block_on(processor.handle_body(body, &context)).unwrap();
            let peak = PEAK.load(Relaxed) - before;
            assert!(response.batch_item_failures.is_empty(), "{name}");
            eprintln!("{name}, {mode:?}: {users} user records, peak {peak} bytes above the body");
            assert!(
                peak < 32 << 20,
                "{name}, {mode:?}: {peak} bytes of live heap for {users} user records"
            );
        }
    }
}
