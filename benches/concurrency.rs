//! The concurrent mode against the ordered one on a transform that waits: 400 user records of
//! about 200 bytes in 2 KPL aggregates, keyed as W1's are (`user-N`, N of 10,000: nearly
//! every record its own key), each awaiting 10 ms (an API call, say). Prints one JSON line:
//! user records per second in each mode and their ratio; the concurrent mode at concurrency 8
//! should come close to 8 times the ordered one.
//!
//! `cargo bench --bench concurrency`; run by tools/bench/compare.py (`make bench`).

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kinesis_deagg::batch::Mode;
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::{Aggregator, UserRecord};
use kinesis_deagg::settings::Switch;
use kinesis_deagg::transform::{Error, RecordContext};
use kinesis_deagg::{Processor, Settings};

const USER_RECORDS: usize = 400;
const PER_AGGREGATE: usize = 200;
const WAIT: Duration = Duration::from_millis(10);

fn event() -> KinesisEvent {
    let mut records = Vec::new();
    for a in 0..USER_RECORDS / PER_AGGREGATE {
        let mut agg = Aggregator::new();
        for i in a * PER_AGGREGATE..(a + 1) * PER_AGGREGATE {
            let key = format!("user-{}", (i * 7919 + 13) % 10_000);
            let data = format!(
                r#"{{"id":{i},"user":"{key}","event":"view","pad":"{}"}}"#,
                "x".repeat(150)
            );
            assert!(agg.add(&key, None, data.as_bytes()).unwrap().is_none());
        }
        let full = agg.finish().unwrap();
        records.push(serde_json::json!({"kinesis": {
            "partitionKey": full.partition_key, "sequenceNumber": format!("{a:04}"),
            "data": STANDARD.encode(&full.data)}}));
    }
    KinesisEvent::from_slice(
        &serde_json::to_vec(&serde_json::json!({ "Records": records })).unwrap(),
    )
    .unwrap()
}

fn main() {
    let event = event();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let per_second = |mode| {
        let settings = Settings {
            mode,
            concurrency: 8,
            metrics: Switch::Off,
            ..Settings::default()
        };
        let transform = |_: UserRecord, _: RecordContext| async {
            tokio::time::sleep(WAIT).await;
            Ok::<(), Error>(())
        };
        let processor = Processor::new(transform, settings);
        let start = Instant::now();
        let outcome = rt.block_on(processor.handle(&event, None)).unwrap();
        assert!(outcome.failure.is_none());
        assert_eq!(outcome.stats.user_records, USER_RECORDS as u64);
        USER_RECORDS as f64 / start.elapsed().as_secs_f64()
    };
    let ordered = per_second(Mode::Ordered);
    let concurrent = per_second(Mode::Concurrent);
    println!(
        "{}",
        serde_json::json!({"user_records": USER_RECORDS, "wait_ms": WAIT.as_millis() as u64,
                           "ordered_per_s": ordered, "concurrent_8_per_s": concurrent,
                           "ratio": concurrent / ordered})
    );
}
