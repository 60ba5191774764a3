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
    let response = processor().handle(&event, None).await.unwrap().response();
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
    let done = processor().handle(&parsed, None).await.unwrap();
    assert!(done.failure.is_none());
    assert_eq!(done.stats.succeeded, 10_000);
}

#[tokio::test]
async fn a_10_mib_record_plain_and_aggregated() {
    let big = vec![b'x'; 10 << 20];
    let plain_event = event_json(vec![plain("1", "k", &big)]).to_string();
    let parsed = KinesisEvent::from_slice(plain_event.as_bytes()).unwrap();
    let done = processor().handle(&parsed, None).await.unwrap();
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

/// The reported identifiers of `json` read each way: `from_slice` and `from_owned` (the fast
/// path, which gives up on what it does not read itself) and serde alone (the lenient path).
async fn outcomes(json: &str) -> [Result<Vec<String>, String>; 3] {
    let ids = |event: Result<KinesisEvent, String>| async move {
        let response = processor().handle(&event?, None).await.unwrap().response();
        let ids = response.batch_item_failures.into_iter();
        Ok(ids.map(|f| f.item_identifier.unwrap()).collect())
    };
    let fast = KinesisEvent::from_slice(json.as_bytes()).map_err(|e| e.to_string());
    let owned = KinesisEvent::from_owned(json.as_bytes()).map_err(|e| e.to_string());
    let serde = serde_json::from_str::<KinesisEvent>(json).map_err(|e| e.to_string());
    [ids(fast).await, ids(owned).await, ids(serde).await]
}

/// Three good records (41, 42, 43) but for `field` of 42 (`outer.name` or `name`): written
/// twice, or given the JSON text `value`.
fn with_field(field: &str, value: Option<&str>) -> String {
    let mut record = plain("42", "k", b"{}");
    let (outer, name) = field
        .split_once('.')
        .map_or((None, field), |(o, n)| (Some(o), n));
    let object = match outer {
        Some(outer) => &mut record[outer],
        None => &mut record,
    };
    let key = format!("\"{name}\":");
    let text = match value {
        None => {
            let twice = format!("{key}{},{key}", object[name]);
            record.to_string().replacen(&key, &twice, 1)
        }
        Some(value) => {
            object[name] = json!("__BAD__");
            record.to_string().replacen("\"__BAD__\"", value, 1)
        }
    };
    format!(
        r#"{{"Records":[{},{text},{}]}}"#,
        plain("41", "k", b"{}"),
        plain("43", "k", b"{}")
    )
}

#[tokio::test]
async fn a_field_twice_or_a_lone_surrogate_fails_that_record_not_the_event() {
    let reported = Ok(vec!["42".to_string()]);
    let fields = [
        "kinesis.partitionKey",
        "kinesis.data",
        "kinesis.approximateArrivalTimestamp",
        "eventID",
        "eventSourceARN",
    ];
    for field in fields {
        let json = with_field(field, None);
        assert_eq!(
            json.matches(field.rsplit('.').next().unwrap()).count(),
            4,
            "{json}"
        );
        for got in outcomes(&json).await {
            assert_eq!(got, reported, "{field} twice: {json}");
        }
    }
    for field in ["kinesis.partitionKey", "kinesis.data", "eventID"] {
        for surrogate in [r#""\ud800""#, r#""a\udc00b""#, r#""\ud800\ud800""#] {
            let json = with_field(field, Some(surrogate));
            for got in outcomes(&json).await {
                assert_eq!(got, reported, "{field} {surrogate}: {json}");
            }
        }
    }
    // In a key too; in a field no one reads it troubles no one.
    let json = with_field("eventName", Some("\"x\""));
    let json = json.replacen(r#""eventName":"x""#, r#""event\ud800Name":"x""#, 1);
    assert!(json.contains(r#""event\ud800Name":"x""#));
    for got in outcomes(&json).await {
        assert_eq!(got, reported, "{json}");
    }
    for field in ["eventName", "kinesis.x"] {
        let json = with_field(field, Some(r#""\udfff""#));
        for got in outcomes(&json).await {
            assert_eq!(got, Ok(vec![]), "{json}");
        }
    }
    // The message says what serde said, and the data is unusable: under passthrough the
    // record is delivered empty, under skip it is dropped.
    let json = with_field("kinesis.data", None);
    let event = KinesisEvent::from_slice(json.as_bytes()).unwrap();
    let bad = event.records[1].data.as_ref().unwrap_err();
    assert_eq!(
        bad.message,
        "the record cannot be read: duplicate field `data`"
    );
    assert_eq!(&*event.records[1].sequence_number, "42");
    let json = with_field("kinesis.partitionKey", Some(r#""\ud800""#));
    let event = KinesisEvent::from_slice(json.as_bytes()).unwrap();
    let bad = event.records[1].data.as_ref().unwrap_err();
    assert!(bad.message.contains("lone surrogate"), "{}", bad.message);
}

#[tokio::test]
async fn a_sequence_number_twice_or_unreadable_still_fails_the_event() {
    let twice = with_field("kinesis.sequenceNumber", None);
    let surrogate = with_field("kinesis.sequenceNumber", Some(r#""42\ud800""#));
    let kinesis_twice = with_field("kinesis", None);
    let get_records = r#"{"Records":[{"SequenceNumber":"1","SequenceNumber":"2","Data":""}]}"#;
    for (json, says) in [
        (&twice[..], "`sequenceNumber` appears more than once"),
        (&surrogate, "its sequence number cannot be read"),
        (&kinesis_twice, "`kinesis` appears more than once"),
        (get_records, "`SequenceNumber` appears more than once"),
    ] {
        let [fast, owned, serde] = outcomes(json).await.map(Result::unwrap_err);
        for err in [fast, owned] {
            assert!(err.starts_with("not a Kinesis event"), "{err}");
        }
        assert!(serde.contains("record ") && serde.contains(says), "{serde}");
    }
}

#[tokio::test]
async fn other_event_sources_are_named() {
    let sqs = r#"{"Records":[{"messageId":"059f36b4","receiptHandle":"AQEB","body":"hi",
        "attributes":{},"messageAttributes":{},"md5OfBody":"x","eventSource":"aws:sqs",
        "eventSourceARN":"arn:aws:sqs:us-east-1:1:q","awsRegion":"us-east-1"}]}"#;
    let dynamodb = r#"{"Records":[{"eventID":"1","eventName":"INSERT","eventVersion":"1.0",
        "eventSource":"aws:dynamodb","awsRegion":"us-east-1","dynamodb":{"Keys":{"Id":{"N":"101"}},
        "SequenceNumber":"111","SizeBytes":26,"StreamViewType":"NEW_AND_OLD_IMAGES"}}]}"#;
    for (json, source) in [(sqs, "aws:sqs"), (dynamodb, "aws:dynamodb")] {
        for got in outcomes(json).await {
            let err = got.unwrap_err();
            let says = format!(
                "record 0: `eventSource` is {source}: only Kinesis events (aws:kinesis) are handled"
            );
            assert!(err.contains(&says), "{err}");
        }
    }
}
