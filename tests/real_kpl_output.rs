//! Bytes written by the real Java KPL deaggregate to exactly the user records they hold.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::{Deaggregated, deaggregate};
use serde_json::{Value, json};

fn ours() -> Vec<Value> {
    let event =
        KinesisEvent::from_slice(include_bytes!("data/kpl-java-generated.event.json")).unwrap();
    let mut lines = Vec::new();
    for record in &event.records {
        let Deaggregated::Aggregated(users) = deaggregate(record.decode_data().unwrap()).unwrap()
        else {
            panic!(
                "record {} is not a verified aggregate",
                record.sequence_number
            )
        };
        let users: Vec<_> = users.collect();
        for u in users {
            lines.push(json!({
                "sequenceNumber": &*record.sequence_number,
                "subSequenceNumber": u.sub_sequence_number(),
                "partitionKey": u.partition_key(),
                "explicitHashKey": u.explicit_hash_key(),
                "data": STANDARD.encode(u.data()),
            }));
        }
    }
    lines
}

#[test]
fn java_kpl_aggregates_deaggregate_to_the_expected_user_records() {
    let expected: Vec<Value> = include_str!("data/kpl-java-generated.expected.ndjson")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(expected.len() > 5);
    assert_eq!(ours(), expected);
}
