//! For the tests of one's own transform: Kinesis events built in code, plain records and KPL
//! aggregates alike, and the handler run on them without Lambda.
//!
//! # Examples
//!
//! ```
//! use kinesis_deagg::prelude::*;
//! use kinesis_deagg::testing::{EventBuilder, handle};
//!
//! async fn only_json(record: UserRecord, _: RecordContext) -> Result<(), Error> {
//!     serde_json::from_slice::<serde_json::Value>(record.data())?;
//!     Ok(())
//! }
//!
//! let event = EventBuilder::new()
//!     .plain("k", br#"{"n":1}"#)
//!     .aggregate(&[("a", br#"{"n":2}"#), ("b", b"not json")])
//!     .build();
//! let outcome = handle(only_json, &event);
//! // The aggregate, the second Kinesis record, is reported: Lambda retries it whole.
//! assert_eq!(outcome.failure.unwrap().sequence_number, EventBuilder::sequence_number(1));
//! assert_eq!(outcome.stats.succeeded, 2);
//! ```

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::Processor;
use crate::batch::BatchOutcome;
use crate::event::KinesisEvent;
use crate::kpl::Aggregator;
use crate::settings::{Settings, Switch};
use crate::transform::Transform;

/// A Lambda Kinesis event under construction: one Kinesis record per call, numbered in order
/// ([`EventBuilder::sequence_number`]), on `shardId-000000000000` of a stream `test`.
#[derive(Clone, Debug, Default)]
pub struct EventBuilder {
    records: Vec<Value>,
}

impl EventBuilder {
    /// An event with no record yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sequence number the builder gives its `n`-th record (from 0).
    pub fn sequence_number(n: usize) -> String {
        format!("4959{n:052}")
    }

    /// Adds a plain (not aggregated) Kinesis record.
    pub fn plain(self, partition_key: &str, data: &[u8]) -> Self {
        self.record(partition_key, STANDARD.encode(data))
    }

    /// Adds a KPL aggregate of `(partition key, data)` user records, made by [`Aggregator`].
    ///
    /// # Panics
    ///
    /// When they do not fit in one aggregate (1 MiB) or there are none.
    pub fn aggregate(self, user_records: &[(&str, &[u8])]) -> Self {
        let mut aggregator = Aggregator::new();
        for (partition_key, data) in user_records {
            let full = aggregator
                .add(partition_key, None, *data)
                .expect("a valid user record");
            assert!(
                full.is_none(),
                "the user records do not fit in one aggregate"
            );
        }
        let aggregate = aggregator.finish().expect("at least one user record");
        self.record(&aggregate.partition_key, STANDARD.encode(&aggregate.data))
    }

    /// Adds a Kinesis record whose `data` field is `text` as given (invalid base64, say).
    pub fn raw(self, partition_key: &str, text: &str) -> Self {
        self.record(partition_key, text.to_owned())
    }

    fn record(mut self, partition_key: &str, data: String) -> Self {
        let seq = Self::sequence_number(self.records.len());
        self.records.push(json!({
            "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": partition_key,
                        "sequenceNumber": seq, "data": data,
                        "approximateArrivalTimestamp": 1_764_000_000.0},
            "eventSource": "aws:kinesis", "eventVersion": "1.0",
            "eventID": format!("shardId-000000000000:{seq}"), "eventName": "aws:kinesis:record",
            "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/test",
            "awsRegion": "us-east-1",
        }));
        self
    }

    /// The event, as Lambda would send it.
    pub fn build(self) -> KinesisEvent {
        let json = json!({ "Records": self.records }).to_string();
        KinesisEvent::from_slice(json.as_bytes()).expect("the builder makes valid events")
    }
}

/// Runs `transform` on `event` as the Lambda handler would, with the default settings and no
/// deadline (and no metrics document on stdout), and gives the outcome.
pub fn handle<T: Transform>(transform: T, event: &KinesisEvent) -> BatchOutcome {
    handle_with(transform, event, Settings::default())
}

/// [`handle`] with `settings` (`metrics` is turned off).
pub fn handle_with<T: Transform>(
    transform: T,
    event: &KinesisEvent,
    settings: Settings,
) -> BatchOutcome {
    let settings = Settings {
        metrics: Switch::Off,
        ..settings
    };
    let processor = Processor::new(transform, settings);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(processor.handle(event, None))
        .expect("only a window's state or result fails an invocation, and there is no window")
}
