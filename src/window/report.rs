//! The built-in window report: per window and shard, the user records and bytes per
//! partition key, the heaviest keys published when the window closes.
//!
//! Kinesis throttles a shard's producers beyond 1 MB/s or 1,000 records/s, and one hot
//! partition key is the usual cause: the report names it. The state stays bounded whatever
//! the number of keys: each ranking (by bytes, by records) is a space-saving summary
//! (Metwally, Agrawal and El Abbadi, 2005) of `10 × N` counters. A key whose true share of
//! the window is more than `1/(10 N)` is always in it, and a count overestimates by at most
//! its `error` (never more than total / (10 N)); the totals are exact. Each invocation first
//! counts its batch exactly per key, then adds each key's count to the summaries once.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Window, WindowEnd};
use crate::kpl::UserRecord;
use crate::transform::{Error, RecordContext};

/// The most keys a report may rank (`DEAGG_WINDOW_REPORT_TOP`): with 256-character keys, the
/// state then stays under half of Lambda's 1 MB.
pub const MAX_TOP: usize = 20;

/// Counters kept per ranked key.
const COUNTERS_PER_KEY: usize = 10;

/// The built-in window report (`DEAGG_WINDOW_REPORT`): see the [module docs](self).
#[derive(Clone, Debug)]
pub struct HotKeyReport {
    top: usize,
}

impl HotKeyReport {
    /// A report ranking the `top` heaviest keys (clamped to 1..=[`MAX_TOP`]).
    pub fn new(top: usize) -> Self {
        HotKeyReport {
            top: top.clamp(1, MAX_TOP),
        }
    }

    fn capacity(&self) -> usize {
        self.top * COUNTERS_PER_KEY
    }
}

/// The report's state, as it travels in Lambda's `state` (documented in `docs/windows.md`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct ReportState {
    /// User records counted in the window (exact).
    pub user_records: u64,
    /// Their bytes of data (exact).
    pub bytes: u64,
    /// The summary ranked by bytes, heaviest first.
    pub by_bytes: Vec<KeyCount>,
    /// The summary ranked by user records, most first.
    pub by_records: Vec<KeyCount>,
    /// This invocation's exact counts per key, in first-seen order; merged by `settle`.
    #[serde(skip)]
    batch: Batch,
}

/// One counter of a summary: `[key, count, error]` in the state. The key's true count is
/// between `count - error` and `count`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCount(pub String, pub u64, pub u64);

#[derive(Clone, Debug, Default, PartialEq)]
struct Batch {
    index: HashMap<Arc<str>, usize>,
    /// Key, user records, bytes.
    counts: Vec<(Arc<str>, u64, u64)>,
}

impl Window for HotKeyReport {
    type State = ReportState;

    fn update(&self, state: &mut ReportState, record: &UserRecord, _: &RecordContext) {
        let bytes = record.data().len() as u64;
        let key = record.partition_key();
        let batch = &mut state.batch;
        let i = match batch.index.get(key) {
            Some(&i) => i,
            None => {
                let key: Arc<str> = Arc::from(key);
                batch.counts.push((key.clone(), 0, 0));
                batch.index.insert(key, batch.counts.len() - 1);
                batch.counts.len() - 1
            }
        };
        let count = &mut batch.counts[i];
        count.1 += 1;
        count.2 += bytes;
    }

    fn settle(&self, state: &mut ReportState) {
        let batch = std::mem::take(&mut state.batch);
        let capacity = self.capacity();
        let mut by_records = Summary::new(std::mem::take(&mut state.by_records));
        let mut by_bytes = Summary::new(std::mem::take(&mut state.by_bytes));
        for (key, records, bytes) in batch.counts {
            state.user_records += records;
            state.bytes += bytes;
            by_records.add(&key, records, capacity);
            by_bytes.add(&key, bytes, capacity);
        }
        state.by_records = by_records.into_sorted();
        state.by_bytes = by_bytes.into_sorted();
    }

    async fn close(&self, state: ReportState, end: &WindowEnd) -> Result<(), Error> {
        let top = |ranked: &[KeyCount]| -> Vec<String> {
            ranked
                .iter()
                .take(self.top)
                .map(|KeyCount(key, n, _)| format!("{key:?}={n}"))
                .collect()
        };
        tracing::info!(
            window_start = %end.start(),
            window_end = %end.end(),
            shard_id = end.shard_id().unwrap_or("unknown"),
            terminated_early = end.terminated_early(),
            cut_by_size = end.cut_by_size(),
            user_records = state.user_records,
            bytes = state.bytes,
            top_by_bytes = %top(&state.by_bytes).join(" "),
            top_by_records = %top(&state.by_records).join(" "),
            "window report"
        );
        if let Some(namespace) = &end.namespace {
            let mut out = std::io::stdout().lock();
            for doc in documents(namespace, end, &state, self.top) {
                // As for the invocation's document: a closed stdout loses metrics, no data.
                if let Err(e) = writeln!(out, "{doc}") {
                    tracing::warn!("could not write a window report document: {e}");
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The report's EMF documents: the window's totals, then one per ranked key and ranking
/// (dimension `Rank`, so that the metrics are `2 × N` per shard whatever the keys; the key
/// is the document's `PartitionKey` property).
pub(crate) fn documents(
    namespace: &str,
    end: &WindowEnd,
    state: &ReportState,
    top: usize,
) -> Vec<Value> {
    let dims = &end.dims;
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let doc = |dimensions: Value, metrics: Value, fields: Value| {
        let mut doc = json!({
            "_aws": {"Timestamp": timestamp, "CloudWatchMetrics": [
                {"Namespace": namespace, "Dimensions": dimensions, "Metrics": metrics}]},
            "FunctionName": dims.function_name,
            "StreamName": dims.stream_name,
            "ShardId": dims.shard_id,
            "WindowStart": end.start(),
            "WindowEnd": end.end(),
        });
        let (Value::Object(doc_fields), Value::Object(more)) = (&mut doc, fields) else {
            unreachable!("both are objects")
        };
        doc_fields.extend(more);
        doc
    };
    let shard = json!([["FunctionName", "StreamName", "ShardId"]]);
    let mut docs = vec![doc(
        shard,
        json!([{"Name": "WindowUserRecords", "Unit": "Count"},
               {"Name": "WindowBytes", "Unit": "Bytes"}]),
        json!({"WindowUserRecords": state.user_records, "WindowBytes": state.bytes}),
    )];
    let ranked = [
        ("HotKeyBytes", "Bytes", &state.by_bytes),
        ("HotKeyRecords", "Count", &state.by_records),
    ];
    for (name, unit, summary) in ranked {
        for (rank, KeyCount(key, count, error)) in summary.iter().take(top).enumerate() {
            docs.push(doc(
                json!([["FunctionName", "StreamName", "ShardId", "Rank"]]),
                json!([{"Name": name, "Unit": unit}]),
                json!({
                    "Rank": (rank + 1).to_string(),
                    "PartitionKey": key,
                    name: count,
                    format!("{name}Error"): error,
                }),
            ));
        }
    }
    docs
}

/// A space-saving summary being added to.
struct Summary {
    counters: Vec<KeyCount>,
    index: HashMap<String, usize>,
}

impl Summary {
    fn new(counters: Vec<KeyCount>) -> Self {
        let index = counters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.0.clone(), i))
            .collect();
        Summary { counters, index }
    }

    /// Adds `weight` to `key`: to its counter, or a new one while there is room, or else to
    /// the smallest counter, which `key` takes over (its count becomes the error).
    fn add(&mut self, key: &str, weight: u64, capacity: usize) {
        if let Some(&i) = self.index.get(key) {
            self.counters[i].1 += weight;
            return;
        }
        if self.counters.len() < capacity {
            self.index.insert(key.to_owned(), self.counters.len());
            self.counters.push(KeyCount(key.to_owned(), weight, 0));
            return;
        }
        let Some((i, _)) = self.counters.iter().enumerate().min_by_key(|(_, c)| c.1) else {
            return; // capacity 0: never (HotKeyReport::new clamps)
        };
        let smallest = &mut self.counters[i];
        self.index.remove(&smallest.0);
        let error = smallest.1;
        *smallest = KeyCount(key.to_owned(), error + weight, error);
        self.index.insert(key.to_owned(), i);
    }

    fn into_sorted(mut self) -> Vec<KeyCount> {
        // Ties by key, so that the state does not depend on the order of arrival.
        self.counters
            .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn report_of(records: &[(&str, usize)], top: usize) -> ReportState {
        let report = HotKeyReport::new(top);
        let mut state = ReportState::default();
        let ctx = RecordContext::new("1");
        for (key, len) in records {
            let record = UserRecord::plain(key, None, Bytes::from(vec![0; *len]));
            report.update(&mut state, &record, &ctx);
        }
        report.settle(&mut state);
        state
    }

    #[test]
    fn small_windows_are_counted_exactly() {
        let state = report_of(&[("a", 10), ("b", 1), ("a", 5), ("c", 0), ("b", 1)], 2);
        assert_eq!((state.user_records, state.bytes), (5, 17));
        let names = |v: &[KeyCount]| {
            v.iter()
                .map(|k| (k.0.clone(), k.1, k.2))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&state.by_bytes),
            [("a".into(), 15, 0), ("b".into(), 2, 0), ("c".into(), 0, 0)]
        );
        assert_eq!(
            names(&state.by_records),
            [("a".into(), 2, 0), ("b".into(), 2, 0), ("c".into(), 1, 0)]
        );
    }

    #[test]
    fn a_hot_key_among_many_is_found_within_the_error_bound() {
        // 5,000 keys of 1 record each and one key with 2,000: the summary holds 10 counters.
        let mut records: Vec<(String, usize)> = (0..5_000).map(|i| (format!("k{i}"), 1)).collect();
        for i in 0..2_000 {
            records.insert(i * 3, ("hot".into(), 1));
        }
        let refs: Vec<(&str, usize)> = records.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let state = report_of(&refs, 1);
        assert_eq!(state.user_records, 7_000);
        assert_eq!(state.by_records.len(), 10);
        let KeyCount(key, count, error) = &state.by_records[0];
        assert_eq!(key, "hot");
        assert!(*count >= 2_000 && count - error <= 2_000, "{count} {error}");
        assert!(*error <= 7_000 / 10);
    }

    #[test]
    fn the_state_survives_json_and_goes_on_counting() {
        let report = HotKeyReport::new(3);
        let first = report_of(&[("a", 4), ("b", 2)], 3);
        let json = serde_json::to_string(&first).unwrap();
        assert_eq!(
            json,
            r#"{"userRecords":2,"bytes":6,"byBytes":[["a",4,0],["b",2,0]],"byRecords":[["a",1,0],["b",1,0]]}"#
        );
        let mut state: ReportState = serde_json::from_str(&json).unwrap();
        let ctx = RecordContext::new("2");
        report.update(
            &mut state,
            &UserRecord::plain("b", None, Bytes::from_static(b"xyz")),
            &ctx,
        );
        report.settle(&mut state);
        assert_eq!((state.user_records, state.bytes), (3, 9));
        assert_eq!(state.by_bytes[0], KeyCount("b".into(), 5, 0));
    }
}
