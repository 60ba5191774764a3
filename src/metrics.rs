//! CloudWatch metrics in Embedded Metric Format (EMF): one JSON document per invocation on
//! stdout, which Lambda's log pipeline turns into metrics with no API call and no extra cost.
//!
//! The handler knows each record's shard and arrival time, so it publishes the age of the
//! oldest record per shard (`MaxRecordAgeMs`): the stream-level `IteratorAgeMilliseconds`
//! average hides a single lagging shard, and records older than the retention are lost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use crate::batch::BatchOutcome;

/// Most metrics one EMF directive may hold.
const MAX_METRICS_PER_DIRECTIVE: usize = 100;

/// Counters a transform adds to the invocation's metrics document (published with the
/// function and stream dimensions, unit `Count`).
///
/// Every user record's [`RecordContext`](crate::transform::RecordContext) carries the same
/// handle; cloning it is cheap.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::metrics::Metrics;
/// let m = Metrics::default();
/// m.add("OrdersStored", 1.0);
/// m.add("OrdersStored", 2.0);
/// assert_eq!(m.snapshot()["OrdersStored"], 3.0);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    counters: Arc<Mutex<BTreeMap<String, f64>>>,
}

impl Metrics {
    /// Adds `value` to the counter `name` (created at 0).
    pub fn add(&self, name: &str, value: f64) {
        // A transform that panicked while holding the lock cannot leave a counter half
        // written (one f64 add), so a poisoned lock is still good data.
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *counters.entry(name.to_owned()).or_default() += value;
    }

    /// The counters so far.
    pub fn snapshot(&self) -> BTreeMap<String, f64> {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The dimension values of one invocation's metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dimensions {
    /// The Lambda function (`AWS_LAMBDA_FUNCTION_NAME`).
    pub function_name: String,
    /// The stream, from the records' `eventSourceARN`.
    pub stream_name: String,
    /// The shard, from the records' `eventID`; one invocation reads one shard.
    pub shard_id: String,
}

/// Built-in metrics published with the function and stream dimensions: name, unit, value.
fn batch_metrics(
    outcome: &BatchOutcome,
    processing: Duration,
) -> Vec<(&'static str, &'static str, f64)> {
    let stats = &outcome.stats;
    let mut metrics = vec![
        ("KinesisRecords", "Count", stats.kinesis_records as f64),
        ("UserRecords", "Count", stats.user_records as f64),
        (
            "AggregatedRecords",
            "Count",
            stats.aggregated_records as f64,
        ),
        ("Bytes", "Bytes", stats.bytes as f64),
        ("FailedRecords", "Count", outcome.retried_records() as f64),
        ("TransformErrors", "Count", stats.failed as f64),
        ("CorruptRecordsFailed", "Count", stats.corrupt_failed as f64),
        (
            "CorruptRecordsPassedThrough",
            "Count",
            stats.corrupt_passed_through as f64,
        ),
        (
            "CorruptRecordsSkipped",
            "Count",
            stats.corrupt_skipped as f64,
        ),
        (
            "ChecksumMismatches",
            "Count",
            stats.checksum_mismatches as f64,
        ),
        ("EmptyAggregates", "Count", stats.empty_aggregates as f64),
        (
            "ProcessingTime",
            "Milliseconds",
            processing.as_secs_f64() * 1000.0,
        ),
    ];
    if let Some(sink) = &stats.sink {
        metrics.extend([
            (
                "SinkDeliveredUserRecords",
                "Count",
                sink.delivered_user_records as f64,
            ),
            ("SinkDeliveredBytes", "Bytes", sink.delivered_bytes as f64),
            ("SinkRequests", "Count", sink.requests as f64),
            ("SinkRetriedEntries", "Count", sink.retried_entries as f64),
            (
                "SinkThrottledEntries",
                "Count",
                sink.throttled_entries as f64,
            ),
            (
                "SinkUndeliveredUserRecords",
                "Count",
                sink.undelivered_user_records as f64,
            ),
        ]);
    }
    if let Some(window) = &stats.window {
        metrics.extend([
            ("WindowStateBytes", "Bytes", window.state_bytes as f64),
            ("WindowsClosed", "Count", window.closed as f64),
            ("WindowStateCutBySize", "Count", window.cut_by_size as f64),
            ("WindowRecordsEmitted", "Count", window.emitted as f64),
        ]);
    }
    metrics
}

/// The EMF document for one invocation.
///
/// `invoked_at` is when the invocation started: `MaxRecordAgeMs` is that time minus the
/// oldest `approximateArrivalTimestamp` of the batch, published per shard and, with the same
/// value, per stream (so one alarm on the stream-level maximum catches any lagging shard).
///
/// Custom counters whose names clash with a built-in metric or a dimension, or that would
/// take a directive past 100 metrics, are left out with a warning.
///
/// # Examples
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use kinesis_deagg::metrics::{document, Dimensions};
/// use kinesis_deagg::{batch, event::KinesisEvent, Settings};
///
/// let event = KinesisEvent::from_slice(br#"{"Records":[{"kinesis":{"sequenceNumber":"1",
///     "data":"e30=","approximateArrivalTimestamp":1700000000.0}}]}"#).unwrap();
/// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
/// let ok = |_, _| async { Ok::<(), &str>(()) };
/// let outcome = rt.block_on(batch::process(&event.records, &ok, &Settings::default(), None));
/// let dims = Dimensions { function_name: "f".into(), stream_name: "s".into(), shard_id: "shardId-0".into() };
/// let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_002);
/// let doc = document("KinesisDeagg", &dims, &outcome, at, Duration::from_millis(3));
/// assert_eq!(doc["MaxRecordAgeMs"], 2000.0);
/// assert_eq!(doc["UserRecords"], 1.0);
/// ```
pub fn document(
    namespace: &str,
    dims: &Dimensions,
    outcome: &BatchOutcome,
    invoked_at: SystemTime,
    processing: Duration,
) -> Value {
    let mut root = Map::new();
    root.insert("FunctionName".into(), dims.function_name.clone().into());
    root.insert("StreamName".into(), dims.stream_name.clone().into());
    root.insert("ShardId".into(), dims.shard_id.clone().into());

    let mut batch = Vec::new();
    for (name, unit, value) in batch_metrics(outcome, processing) {
        batch.push(json!({"Name": name, "Unit": unit}));
        root.insert(name.into(), value.into());
    }
    for (name, value) in &outcome.metrics {
        if root.contains_key(name) || name.is_empty() || name.len() > 255 || name == "_aws" {
            tracing::warn!(metric = %name, "custom metric left out: its name is taken, empty or too long");
        } else if batch.len() >= MAX_METRICS_PER_DIRECTIVE {
            tracing::warn!(metric = %name, "custom metric left out: a directive holds at most 100 metrics");
        } else {
            batch.push(json!({"Name": name, "Unit": "Count"}));
            root.insert(name.clone(), (*value).into());
        }
    }
    let stream = json!(["FunctionName", "StreamName"]);
    let mut directives =
        vec![json!({"Namespace": namespace, "Dimensions": [stream], "Metrics": batch})];

    let age = outcome
        .stats
        .oldest_arrival
        .map(|oldest| invoked_at.duration_since(oldest).unwrap_or(Duration::ZERO));
    if let Some(age) = age {
        root.insert("MaxRecordAgeMs".into(), (age.as_millis() as f64).into());
        directives.push(json!({
            "Namespace": namespace,
            "Dimensions": [["FunctionName", "StreamName", "ShardId"], stream],
            "Metrics": [{"Name": "MaxRecordAgeMs", "Unit": "Milliseconds"}],
        }));
    }
    let timestamp = invoked_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    root.insert(
        "_aws".into(),
        json!({"Timestamp": timestamp, "CloudWatchMetrics": directives}),
    );
    Value::Object(root)
}
