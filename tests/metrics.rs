//! The metrics document (CloudWatch Embedded Metric Format) and the structured logs.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use kinesis_deagg::Settings;
use kinesis_deagg::batch;
use kinesis_deagg::kpl::UserRecord;
use kinesis_deagg::metrics::{Dimensions, document};
use kinesis_deagg::transform::{Error, RecordContext};
use serde_json::Value;

const UNITS: [&str; 27] = [
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
];

/// Checks a document against what the EMF specification requires; returns its metric names.
fn assert_valid_emf(doc: &Value) -> Vec<String> {
    let aws = &doc["_aws"];
    assert!(
        aws["Timestamp"].is_u64(),
        "_aws.Timestamp must be epoch milliseconds"
    );
    let directives = aws["CloudWatchMetrics"]
        .as_array()
        .expect("CloudWatchMetrics array");
    assert!(!directives.is_empty());
    let mut names = Vec::new();
    for d in directives {
        let ns = d["Namespace"].as_str().expect("Namespace string");
        assert!(!ns.is_empty() && ns.len() <= 255);
        for set in d["Dimensions"].as_array().expect("Dimensions array") {
            let set = set.as_array().expect("a dimension set is an array");
            assert!(set.len() <= 30, "at most 30 dimensions per set");
            for key in set {
                let key = key.as_str().expect("dimension keys are strings");
                assert!(
                    doc[key].is_string(),
                    "dimension {key} must be a string at the top level"
                );
            }
        }
        let metrics = d["Metrics"].as_array().expect("Metrics array");
        assert!(metrics.len() <= 100, "at most 100 metrics per directive");
        for m in metrics {
            let name = m["Name"].as_str().expect("metric Name");
            assert!(
                doc[name].is_number(),
                "metric {name} must be a number at the top level"
            );
            if let Some(unit) = m.get("Unit") {
                assert!(UNITS.contains(&unit.as_str().unwrap()), "unit {unit}");
            }
            names.push(name.to_owned());
        }
    }
    names
}

/// Runs `kinesis-deagg invoke` on an event; returns stdout lines and stderr.
fn invoke(event: &str, env: &[(&str, &str)], args: &[&str]) -> (Vec<Value>, String) {
    let out = run_binary(&[&["invoke"][..], args].concat(), env, event);
    assert!(out.status.success());
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, String::from_utf8(out.stderr).unwrap())
}

fn emf_documents(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l.get("_aws").is_some()).collect()
}

#[test]
fn a_real_invocation_prints_one_valid_emf_document() {
    let event =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/events/mixed.json")).unwrap();
    let (lines, _) = invoke(
        &event,
        &[
            ("AWS_LAMBDA_FUNCTION_NAME", "orders-consumer"),
            ("RUST_LOG", "off"),
        ],
        &["--transform", "discard"],
    );
    let docs = emf_documents(&lines);
    assert_eq!(docs.len(), 1);
    let doc = docs[0];
    let names = assert_valid_emf(doc);
    for expected in [
        "KinesisRecords",
        "UserRecords",
        "AggregatedRecords",
        "Bytes",
        "FailedRecords",
        "TransformErrors",
        "CorruptRecordsFailed",
        "CorruptRecordsPassedThrough",
        "CorruptRecordsSkipped",
        "ChecksumMismatches",
        "EmptyAggregates",
        "ProcessingTime",
        "MaxRecordAgeMs",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
    // events/mixed.json: 2 aggregates (3 and 2 user records) and 2 plain records.
    assert_eq!(
        (
            doc["KinesisRecords"].as_f64(),
            doc["UserRecords"].as_f64(),
            doc["AggregatedRecords"].as_f64()
        ),
        (Some(4.0), Some(7.0), Some(2.0))
    );
    assert_eq!(doc["FunctionName"], "orders-consumer");
    assert_eq!(doc["StreamName"], "kinesis-deagg-sample");
    assert_eq!(doc["ShardId"], "shardId-000000000000");
    assert_eq!(
        doc["_aws"]["CloudWatchMetrics"][0]["Namespace"],
        "KinesisDeagg"
    );
    // The response stays the last line.
    assert!(lines.last().unwrap().get("batchItemFailures").is_some());
}

#[test]
fn failures_and_corrupt_records_are_counted() {
    let e = event_json(vec![
        plain("1", "k", b"{}"),
        record("2", "k", "%%%"),
        plain("3", "k", b"{}"),
    ])
    .to_string();
    let (lines, _) = invoke(&e, &[("RUST_LOG", "off")], &["--transform", "json"]);
    let doc = emf_documents(&lines)[0];
    assert_eq!(doc["CorruptRecordsFailed"], 1.0);
    assert_eq!(
        doc["FailedRecords"], 2.0,
        "records 2 and 3 will be delivered again"
    );
    let (lines, _) = invoke(
        &e,
        &[("RUST_LOG", "off"), ("DEAGG_ON_CORRUPT", "skip")],
        &["--transform", "json"],
    );
    let doc = emf_documents(&lines)[0];
    assert_eq!(
        (
            doc["CorruptRecordsSkipped"].as_f64(),
            doc["FailedRecords"].as_f64()
        ),
        (Some(1.0), Some(0.0))
    );
}

#[test]
fn the_metrics_switch_and_namespace_are_honoured() {
    let e = event_json(vec![plain("1", "k", b"{}")]).to_string();
    let (lines, _) = invoke(&e, &[("DEAGG_METRICS", "off"), ("RUST_LOG", "off")], &[]);
    assert!(emf_documents(&lines).is_empty());
    assert_eq!(lines.len(), 1);
    let (lines, _) = invoke(
        &e,
        &[
            ("DEAGG_METRICS_NAMESPACE", "Team/Orders"),
            ("RUST_LOG", "off"),
        ],
        &[],
    );
    assert_eq!(
        emf_documents(&lines)[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"],
        "Team/Orders"
    );
}

fn dims() -> Dimensions {
    Dimensions {
        function_name: "f".into(),
        stream_name: "s".into(),
        shard_id: "shardId-000000000007".into(),
    }
}

fn at(seconds: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs_f64(seconds)
}

#[tokio::test]
async fn the_age_metric_is_the_invocation_time_minus_the_oldest_arrival() {
    let mut records = vec![
        plain("1", "k", b"a"),
        plain("2", "k", b"b"),
        plain("3", "k", b"c"),
    ];
    for (r, t) in records
        .iter_mut()
        .zip([1_700_000_001.0, 1_700_000_000.25, 1_700_000_003.5])
    {
        r["kinesis"]["approximateArrivalTimestamp"] = t.into();
    }
    let e = event(records);
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let outcome = batch::process(&e.records, &ok, &Settings::default(), None).await;
    let doc = document(
        "NS",
        &dims(),
        &outcome,
        at(1_700_000_005.0),
        Duration::from_millis(12),
    );
    assert_valid_emf(&doc);
    assert_eq!(doc["MaxRecordAgeMs"], 4750.0);
    assert_eq!(doc["ProcessingTime"], 12.0);
    assert_eq!(doc["_aws"]["Timestamp"], 1_700_000_005_000u64);
    // Published per shard, and per stream for one alarm over all shards.
    let age = &doc["_aws"]["CloudWatchMetrics"][1];
    assert_eq!(
        age["Dimensions"],
        serde_json::json!([
            ["FunctionName", "StreamName", "ShardId"],
            ["FunctionName", "StreamName"]
        ])
    );
}

#[tokio::test]
async fn a_transforms_own_counters_are_in_the_document() {
    let e = event(vec![
        plain("1", "k", b"{\"ok\":true}"),
        plain("2", "k", b"{\"ok\":false}"),
    ]);
    let counting = |r: UserRecord, c: RecordContext| async move {
        c.metrics().add("OrdersSeen", 1.0);
        if r.data().ends_with(b"false}") {
            c.metrics().add("OrdersRejected", 1.0);
        }
        c.metrics().add("UserRecords", 100.0); // clashes with a built-in: left out
        Ok::<(), Error>(())
    };
    let outcome = batch::process(&e.records, &counting, &Settings::default(), None).await;
    let doc = document("NS", &dims(), &outcome, at(1_700_000_000.0), Duration::ZERO);
    let names = assert_valid_emf(&doc);
    assert_eq!(
        (doc["OrdersSeen"].as_f64(), doc["OrdersRejected"].as_f64()),
        (Some(2.0), Some(1.0))
    );
    assert_eq!(doc["UserRecords"], 2.0, "the built-in wins");
    assert_eq!(names.iter().filter(|n| *n == "UserRecords").count(), 1);
}

#[tokio::test]
async fn no_directive_ever_holds_more_than_100_metrics() {
    let e = event(vec![plain("1", "k", b"x")]);
    let many = |_: UserRecord, c: RecordContext| async move {
        for i in 0..150 {
            c.metrics().add(&format!("Custom{i:03}"), 1.0);
        }
        Ok::<(), Error>(())
    };
    let outcome = batch::process(&e.records, &many, &Settings::default(), None).await;
    let doc = document("NS", &dims(), &outcome, at(1_700_000_000.0), Duration::ZERO);
    assert_valid_emf(&doc);
    assert_eq!(
        doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .len(),
        100
    );
}

#[test]
fn json_logs_carry_the_shard_and_the_record() {
    let event = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/events/json-failure.json"
    ))
    .unwrap();
    let (_, stderr) = invoke(
        &event,
        &[
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            ("AWS_LAMBDA_LOG_LEVEL", "INFO"),
        ],
        &["--transform", "json"],
    );
    let logs: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let failure = logs
        .iter()
        .find(|l| l["level"] == "ERROR")
        .expect("an error line for the failing user record");
    assert_eq!(
        failure["fields"]["sequence_number"],
        "49590000000000000000000000000000000000000000000000000001"
    );
    assert_eq!(failure["fields"]["sub_sequence_number"], 2);
    assert_eq!(failure["span"]["shard_id"], "shardId-000000000000");
}

/// Every count of the document, non-zero, against values worked out here from the event the
/// test wrote (the bytes from its base64), not from the counts the code keeps.
#[tokio::test]
async fn every_count_is_exact_on_a_batch_of_each_kind_of_record() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    // An aggregate with a key table and no user record.
    let empty = |key: u8| envelope(&[&[0x0A, 20][..], &[key; 20]].concat());
    let mut mismatch = aggregate("x", &[("m", b"mm")])["kinesis"]["data"]
        .as_str()
        .map(|d| STANDARD.decode(d).unwrap())
        .unwrap();
    *mismatch.last_mut().unwrap() ^= 1;
    let records = vec![
        plain("1", "k", b"hello world"),
        aggregate("2", &[("a", b"one"), ("b", b"two"), ("c", &[7; 300])]),
        plain("3", "k", &empty(b'p')),
        aggregate("4", &[("d", b""), ("e", b"five!")]),
        plain("5", "k", &mismatch),
        plain("6", "k", &empty(b'q')),
        plain("7", "k", b""),
        record("8", "k", "not base64!"),
    ];
    let expected_bytes: usize = records
        .iter()
        .map(|r| {
            let text = r["kinesis"]["data"].as_str().unwrap();
            STANDARD.decode(text).map_or(0, |d| d.len())
        })
        .sum();
    // 11 + two aggregates of 300 bytes or more + 2 * 44 + ...: well past any small count.
    assert!(expected_bytes > 11 + 300 + 5 + 2 * 44, "{expected_bytes}");
    let e = event(records);
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let outcome = batch::process(&e.records, &ok, &Settings::default(), None).await;
    let doc = document("NS", &dims(), &outcome, at(1_700_000_001.0), Duration::ZERO);
    assert_valid_emf(&doc);
    let counts: Vec<(&str, f64)> = [
        "KinesisRecords",
        "UserRecords",
        "AggregatedRecords",
        "Bytes",
        "FailedRecords",
        "TransformErrors",
        "CorruptRecordsFailed",
        "CorruptRecordsPassedThrough",
        "CorruptRecordsSkipped",
        "ChecksumMismatches",
        "EmptyAggregates",
    ]
    .into_iter()
    .map(|name| (name, doc[name].as_f64().unwrap()))
    .collect();
    assert_eq!(
        counts,
        [
            ("KinesisRecords", 8.0),
            // 1 + 3 + 0 + 2 + 1 (the mismatch, raw) + 0 + 1; the corrupt record none.
            ("UserRecords", 8.0),
            // Both empty aggregates and both with user records.
            ("AggregatedRecords", 4.0),
            ("Bytes", expected_bytes as f64),
            // The corrupt record (DEAGG_ON_CORRUPT=fail), the batch's last.
            ("FailedRecords", 1.0),
            ("TransformErrors", 0.0),
            ("CorruptRecordsFailed", 1.0),
            ("CorruptRecordsPassedThrough", 0.0),
            ("CorruptRecordsSkipped", 0.0),
            ("ChecksumMismatches", 1.0),
            ("EmptyAggregates", 2.0),
        ]
    );
    assert_eq!(doc["MaxRecordAgeMs"], 500.0);
}

#[tokio::test]
async fn a_custom_counter_is_left_out_only_when_its_name_is_taken_empty_too_long_or_aws() {
    let long_ok = "L".repeat(255);
    let too_long = "T".repeat(256);
    let names = [
        "Kept".to_owned(),
        long_ok.clone(),
        too_long.clone(),
        String::new(),
        "_aws".to_owned(),
        "FunctionName".to_owned(),
        "Bytes".to_owned(),
    ];
    let e = event(vec![plain("1", "k", b"x")]);
    let custom = move |_: UserRecord, c: RecordContext| {
        let names = names.clone();
        async move {
            for name in &names {
                c.metrics().add(name, 5.0);
            }
            Ok::<(), Error>(())
        }
    };
    let outcome = batch::process(&e.records, &custom, &Settings::default(), None).await;
    let doc = document("NS", &dims(), &outcome, at(1_700_000_000.0), Duration::ZERO);
    let names = assert_valid_emf(&doc);
    let custom: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| {
            [
                "Kept",
                long_ok.as_str(),
                too_long.as_str(),
                "",
                "_aws",
                "FunctionName",
            ]
            .contains(n)
        })
        .collect();
    assert_eq!(custom, ["Kept", long_ok.as_str()]);
    assert_eq!(
        (doc["Kept"].as_f64(), doc[&long_ok].as_f64()),
        (Some(5.0), Some(5.0))
    );
    assert!(doc.get(&too_long).is_none() && doc.get("").is_none());
    assert_eq!(doc["FunctionName"], "f");
    assert_eq!(doc["Bytes"], 1.0, "the built-in wins");
    assert!(doc["_aws"].is_object());
}

#[test]
fn a_final_window_invocation_without_records_is_counted_under_the_windows_shard() {
    let event = serde_json::json!({
        "Records": [],
        "window": {"start": "2026-12-04T06:00:00Z", "end": "2026-12-04T06:05:00Z"},
        "state": {"userRecords": 3, "bytes": 12},
        "shardId": "shardId-000000000007",
        "eventSourceARN": "arn:aws:kinesis:eu-west-1:123456789012:stream/orders",
        "isFinalInvokeForWindow": true,
        "isWindowTerminatedEarly": false
    })
    .to_string();
    let (lines, _) = invoke(&event, &[("RUST_LOG", "off")], &[]);
    let docs = emf_documents(&lines);
    // The batch's document, then the report's totals (with no key, no per-rank document).
    assert_eq!(docs.len(), 2, "{lines:?}");
    for doc in docs {
        assert_valid_emf(doc);
        assert_eq!(doc["ShardId"], "shardId-000000000007");
        assert_eq!(doc["StreamName"], "orders");
    }
    assert!(lines.last().unwrap()["state"].is_object());
}
