//! The sample events in events/: each gives the response paired with it in events/expected/
//! (under the `json` transform), and `make events` rebuilds each one byte for byte.

mod common;

use std::path::Path;

use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::transform::{Builtin, BuiltinTransform};
use kinesis_deagg::window::HotKeyReport;
use kinesis_deagg::{Processor, Settings};

/// Each sample event with the `aggregate` flags the Makefile's `events` target uses.
const EVENTS: [(&str, &[&str]); 8] = [
    ("plain", &["--plain"]),
    ("aggregated", &["--per-aggregate", "4"]),
    ("mixed", &["--per-aggregate", "3"]),
    ("corrupt-aggregate", &[]),
    ("invalid-base64", &[]),
    ("json-failure", &[]),
    (
        "window",
        &[
            "--per-aggregate",
            "4",
            WINDOW[0],
            WINDOW[1],
            WINDOW[2],
            WINDOW[3],
            WINDOW[4],
            WINDOW[5],
        ],
    ),
    (
        "window-final",
        &[
            "--final", WINDOW[0], WINDOW[1], WINDOW[2], WINDOW[3], WINDOW[4], WINDOW[5],
        ],
    ),
];

/// The Makefile's `WINDOW` (the state file's path is from the crate's root).
const WINDOW: [&str; 6] = [
    "--window-start",
    "2025-11-24T16:00:00Z",
    "--window-end",
    "2025-11-24T16:05:00Z",
    "--state",
    "events/src/window-state.json",
];

fn read(path: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[tokio::test]
async fn each_sample_event_gives_its_expected_response() {
    // The window events go through the built-in report, as the binary runs them.
    let processor = Processor::new(BuiltinTransform::new(Builtin::Json, 0), Settings::default())
        .with_window(HotKeyReport::new(10));
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
            .current_dir(env!("CARGO_MANIFEST_DIR"))
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
