//! The bad-input campaign: every malformed event or record gets a clear error or a documented
//! outcome, never a panic.

mod common;

use common::*;
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::{Aggregator, Deaggregated, deaggregate};
use kinesis_deagg::settings::Switch;
use kinesis_deagg::transform::{Builtin, BuiltinTransform};
use kinesis_deagg::{Processor, Settings};
use serde_json::{Value, json};

fn processor() -> Processor<BuiltinTransform> {
    let settings = Settings {
        metrics: Switch::Off,
        ..Settings::default()
    };
    Processor::new(BuiltinTransform::new(Builtin::Discard, 0), settings)
}

/// What an event turns into: the invocation error, or the reported identifiers.
async fn outcome(json: &[u8]) -> Result<Vec<String>, String> {
    let event = KinesisEvent::from_slice(json).map_err(|e| e.to_string())?;
    let response = processor().handle(&event, None).await.response();
    Ok(response
        .batch_item_failures
        .into_iter()
        .map(|f| f.item_identifier.expect("never a null identifier"))
        .collect())
}

/// Each way a field can be wrong: absent, or a value of each JSON type.
fn variants() -> Vec<(&'static str, Option<Value>)> {
    vec![
        ("missing", None),
        ("null", Some(Value::Null)),
        ("a number", Some(json!(12.5))),
        ("a boolean", Some(json!(true))),
        ("an array", Some(json!([]))),
        ("an object", Some(json!({}))),
        ("an empty string", Some(json!(""))),
        ("an odd string", Some(json!("!!"))),
    ]
}

#[tokio::test]
async fn every_field_missing_or_of_the_wrong_type_gets_a_defined_outcome() {
    let fields: [&[&str]; 10] = [
        &["kinesis"],
        &["kinesis", "sequenceNumber"],
        &["kinesis", "partitionKey"],
        &["kinesis", "data"],
        &["kinesis", "approximateArrivalTimestamp"],
        &["kinesis", "kinesisSchemaVersion"],
        &["kinesis", "encryptionType"],
        &["eventID"],
        &["eventSourceARN"],
        &["eventName"],
    ];
    let mut cases = 0;
    for path in fields {
        for (what, value) in variants() {
            let mut record = plain("42", "k", b"{}");
            let target = match path {
                [field] => record.as_object_mut().unwrap().entry(field.to_string()),
                [outer, field] => match record[outer].as_object_mut() {
                    Some(o) => o.entry(field.to_string()),
                    None => continue,
                },
                _ => unreachable!(),
            };
            let parent_and_field = path.join(".");
            match (value.clone(), target) {
                (None, serde_json::map::Entry::Occupied(o)) => {
                    o.remove();
                }
                (None, serde_json::map::Entry::Vacant(_)) => {}
                (Some(v), e) => {
                    *e.or_insert(Value::Null) = v;
                }
            }
            // A second, good record after it: it must not be swallowed.
            let event = event_json(vec![record, plain("43", "k", b"{}")]).to_string();
            let result = outcome(event.as_bytes()).await;
            cases += 1;
            let is_string = |empty_ok: bool| matches!(&value, Some(Value::String(s)) if empty_ok || !s.is_empty());
            let expected = match path {
                // No sequence number: no response could name the record, so the invocation fails.
                ["kinesis"] => Err(()),
                [_, "sequenceNumber"] if !is_string(false) => Err(()),
                // Corrupt data: the default policy (fail) reports that record, and only it.
                [_, "data"] if !matches!(&value, Some(Value::String(s)) if s.is_empty()) => {
                    Ok(vec!["42".to_string()])
                }
                _ => Ok(vec![]),
            };
            match (result, expected) {
                (Err(message), Err(())) => assert!(
                    message.contains("record 0") && message.contains("equenceNumber"),
                    "{parent_and_field} {what}: {message}"
                ),
                (got, want) => assert_eq!(got.map_err(|_| ()), want, "{parent_and_field} {what}"),
            }
        }
    }
    assert!(cases >= 70, "{cases} cases");
}

#[tokio::test]
async fn an_empty_batch_and_a_10000_record_batch() {
    assert_eq!(outcome(br#"{"Records":[]}"#).await, Ok(vec![]));
    let records: Vec<Value> = (0..10_000)
        .map(|i| plain(&format!("{i:07}"), "k", b"{}"))
        .collect();
    let event = event_json(records).to_string();
    let parsed = KinesisEvent::from_slice(event.as_bytes()).unwrap();
    let done = processor().handle(&parsed, None).await;
    assert!(done.failure.is_none());
    assert_eq!(done.stats.succeeded, 10_000);
}

#[tokio::test]
async fn a_10_mib_record_plain_and_aggregated() {
    let big = vec![b'x'; 10 << 20];
    let plain_event = event_json(vec![plain("1", "k", &big)]).to_string();
    let parsed = KinesisEvent::from_slice(plain_event.as_bytes()).unwrap();
    let done = processor().handle(&parsed, None).await;
    assert!(done.failure.is_none());
    assert_eq!(done.stats.bytes, 10 << 20);

    let mut agg = Aggregator::with_max_size(10 << 20).unwrap();
    assert!(
        agg.add("k", None, &big[..(10 << 20) - 100])
            .unwrap()
            .is_none()
    );
    let record = agg.finish().unwrap();
    assert!(record.data.len() + record.partition_key.len() <= 10 << 20);
    let Ok(Deaggregated::Aggregated(users)) = deaggregate(record.data) else {
        panic!("not an aggregate")
    };
    let users: Vec<_> = users.collect();
    assert_eq!(users[0].data().len(), (10 << 20) - 100);
}

#[tokio::test]
async fn deeply_nested_json_is_an_error_or_the_records_problem_not_a_stack_overflow() {
    for depth in [200, 100_000] {
        let nested = "[".repeat(depth) + &"]".repeat(depth);
        for json in [nested.clone(), format!(r#"{{"Records":{nested}}}"#)] {
            let err = outcome(json.as_bytes()).await.unwrap_err();
            assert!(err.starts_with("not a Kinesis event"), "{err}");
        }
        // Inside a record's field, it is that record's problem: `data` is not a string, so the
        // corrupt-input policy reports the record.
        let in_data =
            format!(r#"{{"Records":[{{"kinesis":{{"sequenceNumber":"1","data":{nested}}}}}]}}"#);
        assert_eq!(outcome(in_data.as_bytes()).await, Ok(vec!["1".to_string()]));
    }
}

#[tokio::test]
async fn every_truncation_of_an_event_is_an_error_or_a_valid_event() {
    let full = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/events/mixed.json")).unwrap();
    let mut errors = 0;
    for end in 0..full.len() {
        match outcome(&full[..end]).await {
            Err(message) => {
                assert!(message.starts_with("not a Kinesis event"), "{message}");
                errors += 1;
            }
            Ok(reported) => assert!(reported.iter().all(|id| !id.is_empty())),
        }
    }
    assert!(errors > full.len() / 2);
    assert_eq!(outcome(&full).await, Ok(vec![]));
}
