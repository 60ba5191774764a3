//! The built-in window report: per window and shard, the user records and bytes per
//! partition key, the heaviest keys published when the window closes.
//!
//! Kinesis throttles a shard's producers beyond 1 MB/s or 1,000 records/s, and one hot
//! partition key is the usual cause: the report names it. The state stays bounded whatever
//! the number of keys: each ranking (by bytes, by records) is a summary of `10 × N`
//! counters in the manner of space-saving (Metwally, Agrawal and El Abbadi, 2005), one batch
//! at a time: each invocation counts its batch exactly per key, then adds the counts to the
//! summary and keeps the `10 × N` largest (see `merge`). A key's true count lies between
//! `count - error` and `count`, and a key not listed has at most the smallest count listed;
//! the totals are exact. Merging once per batch, rather than a space-saving update per key,
//! took W1 through the report from 2.44x the time of `discard` to 1.74x, and counting each
//! aggregate from its key table to 1.36x (`benches/windows.rs`).

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Window, WindowEnd};
use crate::kpl::{UserRecord, UserRecords};
use crate::transform::{Error, RecordContext};

/// The most keys a report may rank (`DEAGG_WINDOW_REPORT_TOP`): with 256-character keys, the
/// state then stays under half of Lambda's 1 MB.
pub const MAX_TOP: usize = 20;

/// Counters kept per ranked key.
const COUNTERS_PER_KEY: usize = 10;

/// The built-in window report (`DEAGG_WINDOW_REPORT`): per window and shard, user records
/// and bytes per partition key, and the heaviest keys; `docs/windows.md` documents its state.
#[derive(Clone, Debug)]
pub struct HotKeyReport {
    top: usize,
}

impl HotKeyReport {
    /// A report ranking the `top` heaviest keys (clamped to 1 to 20).
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
#[serde(rename_all = "camelCase", default)]
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

#[derive(Clone, Debug, Default)]
struct Batch {
    index: hashbrown::HashMap<Arc<str>, usize>,
    /// Key, user records, bytes.
    counts: Vec<(Arc<str>, u64, u64)>,
    /// Scratch for `update_all`: each key of an aggregate's table, its index in `counts`.
    slots: Vec<usize>,
}

/// The counts, not the scratch.
impl PartialEq for Batch {
    fn eq(&self, other: &Self) -> bool {
        self.counts == other.counts
    }
}

impl Batch {
    /// The index in `counts` of `key`'s counter, made if new.
    fn slot(&mut self, key: &str) -> usize {
        match self.index.entry_ref(key) {
            hashbrown::hash_map::EntryRef::Occupied(e) => *e.get(),
            hashbrown::hash_map::EntryRef::Vacant(e) => {
                let key: Arc<str> = Arc::from(key);
                e.insert_with_key(key.clone(), self.counts.len());
                self.counts.push((key, 0, 0));
                self.counts.len() - 1
            }
        }
    }

    fn add(&mut self, slot: usize, bytes: usize) {
        let count = &mut self.counts[slot];
        count.1 += 1;
        count.2 += bytes as u64;
    }
}

impl Window for HotKeyReport {
    type State = ReportState;

    fn update(&self, state: &mut ReportState, record: &UserRecord, _: &RecordContext) {
        let batch = &mut state.batch;
        let i = batch.slot(record.partition_key());
        batch.add(i, record.data().len());
    }

    fn update_all(&self, state: &mut ReportState, users: &UserRecords, _: &mut RecordContext) {
        let batch = &mut state.batch;
        // Each distinct key of an aggregate is looked up once.
        let mut slots = std::mem::take(&mut batch.slots);
        slots.clear();
        slots.resize(users.key_count(), usize::MAX);
        users.each_key(|k, key, len| {
            if slots[k] == usize::MAX {
                slots[k] = batch.slot(key);
            }
            batch.add(slots[k], len);
        });
        batch.slots = slots;
    }

    fn settle(&self, state: &mut ReportState) {
        let batch = std::mem::take(&mut state.batch);
        let capacity = self.capacity();
        for (_, records, bytes) in &batch.counts {
            state.user_records += records;
            state.bytes += bytes;
        }
        let counts = batch.counts.iter();
        let by_records = std::mem::take(&mut state.by_records);
        state.by_records = merge(by_records, counts.clone().map(|c| (&c.0, c.1)), capacity);
        let by_bytes = std::mem::take(&mut state.by_bytes);
        state.by_bytes = merge(by_bytes, counts.map(|c| (&c.0, c.2)), capacity);
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

/// A counter being merged: count, error, and the key (`Ok`: an old counter's, `Err`: a new
/// one's).
type Candidate<'a> = (u64, u64, Result<usize, &'a Arc<str>>);

/// Adds a batch's exact counts to a summary of at most `capacity` counters: every key of
/// either gets an upper bound (its counter, or the summary's floor for a key it lacks, plus
/// the batch's count), and the `capacity` largest are kept. A key left out has at most the
/// smallest count kept, so the floor stays an upper bound on every key not listed.
fn merge<'a>(
    summary: Vec<KeyCount>,
    batch: impl Iterator<Item = (&'a Arc<str>, u64)>,
    capacity: usize,
) -> Vec<KeyCount> {
    let floor = match summary.len() >= capacity {
        true => summary.iter().map(|c| c.1).min().unwrap_or(0),
        false => 0,
    };
    let index: hashbrown::HashMap<&str, usize> = summary
        .iter()
        .enumerate()
        .map(|(i, c)| (c.0.as_str(), i))
        .collect();
    let mut added = vec![0; summary.len()];
    let mut new: Vec<Candidate> = Vec::new();
    for (key, weight) in batch {
        match index.get(&**key) {
            Some(&i) => added[i] += weight,
            None => new.push((floor + weight, floor, Err(key))),
        }
    }
    let mut all: Vec<Candidate> = summary
        .iter()
        .enumerate()
        .map(|(i, c)| (c.1 + added[i], c.2, Ok(i)))
        .collect();
    all.append(&mut new);
    fn name<'s>(summary: &'s [KeyCount], key: &Result<usize, &'s Arc<str>>) -> &'s str {
        match key {
            Ok(i) => &summary[*i].0,
            Err(key) => key,
        }
    }
    // Heaviest first; ties by key, so that the state does not depend on the order of arrival.
    let order = |a: &Candidate, b: &Candidate| {
        b.0.cmp(&a.0)
            .then_with(|| name(&summary, &a.2).cmp(name(&summary, &b.2)))
    };
    if all.len() > capacity {
        all.select_nth_unstable_by(capacity - 1, order);
        all.truncate(capacity);
    }
    all.sort_unstable_by(order);
    all.into_iter()
        .map(|(count, error, key)| KeyCount(name(&summary, &key).to_owned(), count, error))
        .collect()
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
    fn a_batch_of_more_keys_than_counters_keeps_exactly_the_heaviest() {
        // 30 keys with 1 to 30 records, arriving in several orders; 10 counters.
        for rotation in 0..30 {
            let mut records = Vec::new();
            for k in (0..30).map(|k| (k + rotation) % 30 + 1) {
                records.extend((0..k).map(|_| (format!("k{k:02}"), 1)));
            }
            let refs: Vec<(&str, usize)> = records.iter().map(|(k, n)| (k.as_str(), *n)).collect();
            let state = report_of(&refs, 1);
            let expected: Vec<KeyCount> = (21..=30)
                .rev()
                .map(|k| KeyCount(format!("k{k:02}"), k, 0))
                .collect();
            assert_eq!(state.by_records, expected, "rotation {rotation}");
        }
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
    fn counting_a_whole_aggregate_at_once_counts_as_each_record_would() {
        // Keys repeated within and across aggregates, empty data, and a plain record.
        let data: Vec<(String, Vec<u8>)> = (0..300)
            .map(|i| (format!("k{}", i * 7 % 23), vec![1; i % 5]))
            .collect();
        let refs: Vec<(&str, &[u8])> = data.iter().map(|(k, d)| (k.as_str(), &d[..])).collect();
        let event = crate::testing::EventBuilder::new()
            .aggregate(&refs[..200])
            .plain("k3", b"plain")
            .aggregate(&refs[200..])
            .build();
        let settings = crate::Settings::default();
        let report = HotKeyReport::new(3);
        let (mut each, mut all) = (ReportState::default(), ReportState::default());
        let mut ctx = RecordContext::new("1");
        for record in &event.records {
            let users = crate::batch::unpack(record, &settings).user_records;
            for user in users.clone() {
                report.update(&mut each, &user, &ctx);
            }
            report.update_all(&mut all, &users, &mut ctx);
        }
        assert_eq!(all.batch.counts.len(), 23);
        // Equal counts, whatever the scratch holds; unequal to no counts at all.
        assert_eq!(all, each);
        assert_ne!(all, ReportState::default());
        report.settle(&mut all);
        assert_eq!(all.user_records, 301);
        let bytes: usize = data.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(all.bytes, bytes as u64 + 5);
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
