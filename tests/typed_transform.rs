//! `transform::json`: typed user records reach the closure; one that does not parse fails its
//! Kinesis record, and the log says which user record and why.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use kinesis_deagg::batch::StopReason;
use kinesis_deagg::settings::Switch;
use kinesis_deagg::transform::{self, RecordContext};
use kinesis_deagg::{Processor, Settings};
use serde::Deserialize;

#[derive(Debug, PartialEq, Deserialize)]
struct Order {
    id: u64,
    items: Vec<String>,
    #[serde(default)]
    gift: bool,
}

/// What the closure saw: each order with its idempotency key.
type Seen = Arc<Mutex<Vec<(String, Order)>>>;

fn processor(seen: &Seen) -> Processor<impl transform::Transform> {
    let seen = seen.clone();
    let transform = transform::json(move |order: Order, ctx: RecordContext| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push((ctx.idempotency_key(), order));
            Ok::<(), transform::Error>(())
        }
    });
    let settings = Settings {
        metrics: Switch::Off,
        ..Settings::default()
    };
    Processor::new(transform, settings)
}

#[tokio::test(flavor = "current_thread")]
async fn a_user_record_that_is_not_json_fails_its_kinesis_record_and_the_valid_ones_arrive_typed() {
    // The test runs on this thread only, so the capture sees the whole batch.
    let (logs, _guard) = capture_logs();

    let seen = Seen::default();
    let event = event(vec![
        plain("100", "a", br#"{"id":1,"items":["tea"]}"#),
        aggregate(
            "200",
            &[
                ("b", br#"{"id":2,"items":["jam","bread"],"gift":true}"#),
                ("c", br#"{"id":3,"items":["#),
                ("d", br#"{"id":4,"items":[]}"#),
            ],
        ),
        plain("300", "e", br#"{"id":5,"items":[]}"#),
    ]);
    let outcome = processor(&seen).handle(&event, None).await.unwrap();

    let failure = outcome
        .failure
        .as_ref()
        .expect("the unreadable order fails");
    assert_eq!(failure.sequence_number, "200");
    assert_eq!(failure.index, 1);
    let StopReason::TransformError {
        sub_sequence_number,
        message,
    } = &failure.reason
    else {
        panic!("{:?}", failure.reason)
    };
    assert_eq!(*sub_sequence_number, Some(1));
    assert!(
        message.starts_with("user record 200:1 is not a valid Order: EOF while parsing"),
        "{message}"
    );
    assert_eq!(
        serde_json::to_value(outcome.response()).unwrap(),
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "200"}]})
    );

    // The orders before it reached the closure, typed; none after it did (Lambda retries
    // from record 200).
    let seen = seen.lock().unwrap();
    let order = |id, items: &[&str], gift| Order {
        id,
        items: items.iter().map(|s| s.to_string()).collect(),
        gift,
    };
    assert_eq!(
        *seen,
        [
            ("100".to_string(), order(1, &["tea"], false)),
            ("200:0".to_string(), order(2, &["jam", "bread"], true)),
        ]
    );

    // The log names the Kinesis record, the user record and serde's reason.
    let logs = logs.text();
    let line = logs
        .lines()
        .find(|l| l.contains("transform failed"))
        .unwrap_or_else(|| panic!("no error line in {logs:?}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("sequence_number=200"), "{line}");
    assert!(line.contains("sub_sequence_number=1"), "{line}");
    assert!(
        line.contains("record 200: transform failed: user record 200:1 is not a valid Order: EOF while parsing a list at line 1 column 17"),
        "{line}"
    );
}

#[tokio::test]
async fn a_document_of_the_wrong_shape_is_named_by_the_field_serde_could_not_read() {
    let seen = Seen::default();
    let event = event(vec![aggregate(
        "7",
        &[("k", br#"{"id":"seven","items":[]}"#)],
    )]);
    let outcome = processor(&seen).handle(&event, None).await.unwrap();
    let failure = outcome.failure.unwrap();
    assert_eq!(failure.sequence_number, "7");
    let reason = failure.reason.to_string();
    assert!(
        reason.contains(
            "user record 7:0 is not a valid Order: invalid type: string \"seven\", expected u64"
        ),
        "{reason}"
    );
    assert!(seen.lock().unwrap().is_empty());
}
