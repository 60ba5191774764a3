//! A complete Lambda function with its own transform: order events from a KPL producer.
//!
//! Each user record is one JSON order event, which `transform::json` parses into a typed
//! struct (a record that is not an order event fails). The transform drops test orders, fails
//! ones of an unknown status (so Lambda retries from that Kinesis record and, after
//! `MaximumRetryAttempts`, sends its metadata to the on-failure queue), and enriches the rest
//! with where they came from before "storing" them (here: printing one JSON line).
//!
//! Build and deploy it like the main binary, naming it: `cargo lambda build --release --arm64
//! --example orders`. Try it locally:
//!
//! ```sh
//! cargo run --example orders -- events/mixed.json
//! ```

use std::time::UNIX_EPOCH;

use kinesis_deagg::transform::{self, Error, RecordContext};
use serde::{Deserialize, Serialize};

/// One order event, as producers write it.
#[derive(Debug, Deserialize)]
struct OrderEvent {
    order: u64,
    status: String,
    #[serde(default)]
    test: bool,
}

/// What we store: the event plus where it came from.
#[derive(Debug, Serialize)]
struct StoredOrder<'a> {
    order: u64,
    status: &'a str,
    /// Sequence number and sub-sequence number: the same on every retry, so the store can
    /// ignore a record it has already seen.
    idempotency_key: String,
    shard: Option<&'a str>,
    arrived_ms: Option<u128>,
}

const STATUSES: [&str; 4] = ["created", "paid", "shipped", "cancelled"];

/// The transform, given each order event already parsed: wrapped in [`transform::json`],
/// any async function of `(T, RecordContext)` will do, for a `T` serde can deserialize.
async fn store_order(event: OrderEvent, ctx: RecordContext) -> Result<(), Error> {
    if event.test {
        return Ok(()); // dropped on purpose: acknowledged, not stored
    }
    if !STATUSES.contains(&event.status.as_str()) {
        return Err(format!(
            "order {} has an unknown status {:?}",
            event.order, event.status
        )
        .into());
    }
    let stored = StoredOrder {
        order: event.order,
        status: &event.status,
        idempotency_key: ctx.idempotency_key(),
        shard: ctx.shard_id(),
        arrived_ms: ctx
            .approximate_arrival()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis()),
    };
    println!("{}", serde_json::to_string(&stored)?);
    Ok(())
}

/// Inside Lambda it serves invocations; outside, it runs on an event file or stdin.
fn main() -> std::process::ExitCode {
    kinesis_deagg::main(transform::json(store_order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinesis_deagg::event::KinesisEvent;
    use kinesis_deagg::{Processor, Settings};

    fn event(records: &[(&str, &str)]) -> KinesisEvent {
        use base64::Engine;
        let records: Vec<_> = records
            .iter()
            .map(|(seq, data)| {
                serde_json::json!({"kinesis": {"sequenceNumber": seq, "partitionKey": "k",
                    "data": base64::engine::general_purpose::STANDARD.encode(data)}})
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap()
    }

    #[tokio::test]
    async fn valid_and_test_orders_pass_and_the_first_invalid_one_is_reported() {
        let processor = Processor::new(transform::json(store_order), Settings::default());
        let e = event(&[
            ("1", r#"{"order":1,"status":"paid"}"#),
            ("2", r#"{"order":2,"status":"bogus","test":true}"#),
            ("3", r#"{"order":3,"status":"lost"}"#),
            ("4", r#"not json"#),
        ]);
        let outcome = processor.handle(&e, None).await.unwrap();
        assert_eq!(outcome.failure.unwrap().sequence_number, "3");
        assert_eq!(outcome.stats.succeeded, 2);
    }

    #[tokio::test]
    async fn a_record_that_is_not_an_order_event_is_reported_with_serdes_reason() {
        let processor = Processor::new(transform::json(store_order), Settings::default());
        let e = event(&[("1", r#"{"order":1,"status":"paid"}"#), ("2", "not json")]);
        let failure = processor.handle(&e, None).await.unwrap().failure.unwrap();
        assert_eq!(failure.sequence_number, "2");
        let reason = failure.reason.to_string();
        assert!(
            reason.contains("user record 2 is not a valid OrderEvent: expected ident"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn the_sample_mixed_event_is_all_valid_orders() {
        let e = KinesisEvent::from_slice(include_bytes!("../events/mixed.json")).unwrap();
        let outcome = Processor::new(transform::json(store_order), Settings::default())
            .handle(&e, None)
            .await
            .unwrap();
        assert!(outcome.failure.is_none());
        assert_eq!(outcome.stats.succeeded, 7);
    }
}
