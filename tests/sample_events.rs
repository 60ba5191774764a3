//! The sample events in events/: each gives the response paired with it in events/expected/
//! (under the `json` transform), and `make events` rebuilds each one byte for byte.

mod common;

use std::path::Path;

use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::transform::{Builtin, BuiltinTransform};
use kinesis_deagg::{Processor, Settings};

/// Each sample event with the `aggregate` flags the Makefile's `events` target uses.
const EVENTS: [(&str, &[&str]); 6] = [
    ("plain", &["--plain"]),
    ("aggregated", &["--per-aggregate", "4"]),
    ("mixed", &["--per-aggregate", "3"]),
    ("corrupt-aggregate", &[]),
    ("invalid-base64", &[]),
    ("json-failure", &[]),
];

fn read(path: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[tokio::test]
async fn each_sample_event_gives_its_expected_response() {
    let processor = Processor::new(BuiltinTransform::new(Builtin::Json, 0), Settings::default());
    for (name, _) in EVENTS {
        let event = KinesisEvent::from_slice(&read(&format!("events/{name}.json"))).unwrap();
        let response = processor.handle(&event, None).await.unwrap().response();
        let expected: serde_json::Value =
            serde_json::from_slice(&read(&format!("events/expected/{name}.json"))).unwrap();
        assert_eq!(
            serde_json::to_value(response).unwrap(),
            expected,
            "events/{name}.json"
        );
    }
}

#[test]
fn make_events_rebuilds_each_sample_event_byte_for_byte() {
    for (name, flags) in EVENTS {
        let out = common::command(env!("CARGO_BIN_EXE_kinesis-deagg"))
            .arg("aggregate")
            .args(flags)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("events/src/{name}.ndjson")))
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            out.stdout == read(&format!("events/{name}.json")),
            "events/{name}.json is stale: run `make events`"
        );
    }
}
