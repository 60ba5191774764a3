//! Tumbling windows: the state answered under failures is exactly that of the Kinesis
//! records before the reported one, over several invocations with Lambda's retries modelled;
//! the final invocation emits once, complete; a state over the size limit is closed early,
//! losing nothing.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use kinesis_deagg::batch::{BatchOutcome, Mode};
use kinesis_deagg::event::{KinesisEvent, TumblingWindow};
use kinesis_deagg::kpl::UserRecord;
use kinesis_deagg::settings::Switch;
use kinesis_deagg::sink::{EntryOutcome, Limits, SendError, Sink};
use kinesis_deagg::testing::EventBuilder;
use kinesis_deagg::transform::{Error, RecordContext};
use kinesis_deagg::window::{Window, WindowEnd, WindowError};
use kinesis_deagg::{Processor, Settings};
use serde::{Deserialize, Serialize};

/// Exact per-key counts, and every idempotency key seen (so a double count shows).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Counts {
    per_key: BTreeMap<String, u64>,
    bytes: u64,
    seen: Vec<String>,
}

/// Counts user records; `close` keeps each result it is given (with whether it was cut), and
/// whether the window was terminated early.
#[derive(Clone, Default)]
struct Count {
    closed: Rc<RefCell<Vec<(Counts, bool)>>>,
    early: Rc<RefCell<Vec<bool>>>,
}

const ARN: &str = "arn:aws:kinesis:us-east-1:123456789012:stream/orders";

impl Window for Count {
    type State = Counts;
    fn update(&self, state: &mut Counts, record: &UserRecord, ctx: &RecordContext) {
        *state
            .per_key
            .entry(record.partition_key().to_owned())
            .or_default() += 1;
        state.bytes += record.data().len() as u64;
        state.seen.push(ctx.idempotency_key());
    }
    async fn close(&self, state: Counts, end: &WindowEnd) -> Result<(), Error> {
        assert_eq!(
            (end.start(), end.end()),
            ("2026-12-04T06:00:00Z", "2026-12-04T06:05:00Z")
        );
        assert_eq!(
            (end.shard_id(), end.event_source_arn()),
            (Some("shardId-000000000000"), Some(ARN))
        );
        self.closed.borrow_mut().push((state, end.cut_by_size()));
        self.early.borrow_mut().push(end.terminated_early());
        Ok(())
    }
}

/// 40 Kinesis records: plain ones and aggregates of up to 7 user records, 6 keys.
fn records() -> KinesisEvent {
    let mut b = EventBuilder::new();
    for i in 0..40 {
        let key = |j: usize| format!("key-{}", (i + j) % 6);
        if i % 3 == 0 {
            b = b.plain(&key(0), format!("plain {i}").as_bytes());
        } else {
            let data: Vec<(String, Vec<u8>)> = (0..(i % 7 + 1))
                .map(|j| (key(j), format!("{i}.{j}").into_bytes()))
                .collect();
            let refs: Vec<(&str, &[u8])> = data.iter().map(|(k, d)| (k.as_str(), &d[..])).collect();
            b = b.aggregate(&refs);
        }
    }
    b.build()
}

fn window(state: serde_json::Value, last: bool) -> TumblingWindow {
    let mut w = TumblingWindow::default();
    w.start = "2026-12-04T06:00:00Z".into();
    w.end = "2026-12-04T06:05:00Z".into();
    w.shard_id = Some("shardId-000000000000".into());
    w.event_source_arn = Some(ARN.into());
    w.state = state;
    w.is_final_invoke_for_window = last;
    w
}

fn processor<T: kinesis_deagg::transform::Transform>(
    transform: T,
    count: &Count,
    mode: Mode,
    max_state_bytes: usize,
) -> Processor<T> {
    let settings = Settings {
        mode,
        metrics: Switch::Off,
        window_state_max_bytes: max_state_bytes,
        ..Settings::default()
    };
    Processor::new(transform, settings).with_window(count.clone())
}

/// Runs a window over `all` as Lambda does: batches of `batch` records, each retried from
/// the reported record with the state answered, then a final invocation with no record.
/// Gives what `close` got, and the number of invocations.
async fn run_window<T: kinesis_deagg::transform::Transform>(
    transform: T,
    mode: Mode,
    batch: usize,
    max_state_bytes: usize,
) -> (Vec<(Counts, bool)>, usize) {
    let all = records();
    let count = Count::default();
    let processor = processor(transform, &count, mode, max_state_bytes);
    // Lambda's first state of a window.
    let (mut state, mut at, mut invocations) = (serde_json::json!({}), 0, 0);
    while at < all.records.len() {
        let end = (at + batch).min(all.records.len());
        let event = KinesisEvent {
            records: all.records[at..end].to_vec(),
            window: Some(window(state.clone(), false)),
        };
        let outcome: BatchOutcome = processor.handle(&event, None).await.unwrap();
        invocations += 1;
        assert!(invocations < 200, "no progress");
        let response = serde_json::to_value(outcome.response()).unwrap();
        state = response["state"].clone();
        assert!(state.is_object(), "{response}");
        at += outcome.failure.map_or(end - at, |f| f.index);
    }
    let last = KinesisEvent {
        records: vec![],
        window: Some(window(state, true)),
    };
    let response = processor.handle(&last, None).await.unwrap().response();
    assert!(response.state.is_some() && response.batch_item_failures.is_empty());
    assert!(
        !count.early.borrow().contains(&true),
        "no window ended early"
    );
    let closed = count.closed.borrow().clone();
    (closed, invocations + 1)
}

/// Fails each idempotency key in `fail` the first time it is seen.
fn failing_once(fail: &[&str]) -> impl kinesis_deagg::transform::Transform + use<> {
    let left: Rc<RefCell<HashSet<String>>> =
        Rc::new(RefCell::new(fail.iter().map(|s| s.to_string()).collect()));
    move |_: UserRecord, ctx: RecordContext| {
        let left = left.clone();
        async move {
            match left.borrow_mut().remove(&ctx.idempotency_key()) {
                true => Err("fails once"),
                false => Ok(()),
            }
        }
    }
}

fn key(record: usize, sub: Option<u64>) -> String {
    let seq = EventBuilder::sequence_number(record);
    match sub {
        Some(sub) => format!("{seq}:{sub}"),
        None => seq,
    }
}

#[tokio::test]
async fn failures_inside_aggregates_leave_the_state_as_if_there_were_none() {
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let (once, invocations) = run_window(ok, Mode::Ordered, 40, 1_000_000).await;
    assert_eq!(invocations, 2);
    assert_eq!(once.len(), 1);
    let expected = &once[0].0;
    // Independent of the window: every user record of the event, once.
    let all = records();
    let users = common::user_records_in(&all);
    assert_eq!(expected.seen.len(), users);
    assert_eq!(expected.per_key.values().sum::<u64>(), users as u64);

    // Failures at user records 3 and 5 of aggregates, at user record 0 of one, and at a
    // plain record; in batches that cut the window in several invocations.
    let fail = [
        key(5, Some(3)),
        key(13, Some(5)),
        key(20, Some(0)),
        key(27, Some(4)),
        key(9, None),
        key(33, None),
    ];
    let fail: Vec<&str> = fail.iter().map(String::as_str).collect();
    for mode in [Mode::Ordered, Mode::Concurrent] {
        for batch in [7, 40] {
            let (closed, invocations) =
                run_window(failing_once(&fail), mode, batch, 1_000_000).await;
            assert!(
                invocations > 40 / batch + 1 + 1,
                "{mode:?} {batch}: {invocations}"
            );
            assert_eq!(closed.len(), 1);
            assert_eq!(&closed[0].0, expected, "{mode:?}, batches of {batch}");
            assert!(!closed[0].1);
        }
    }
}

#[tokio::test]
async fn a_state_over_the_limit_is_closed_early_and_nothing_is_lost() {
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let (whole, _) = run_window(ok, Mode::Ordered, 40, 1_000_000).await;
    let (parts, _) = run_window(ok, Mode::Ordered, 5, 1_500).await;
    assert!(parts.len() > 2, "{}", parts.len());
    // Every part but the last was cut by size; together they are the whole, once.
    assert!(parts[..parts.len() - 1].iter().all(|(_, cut)| *cut));
    assert!(!parts.last().unwrap().1);
    let seen: Vec<String> = parts.iter().flat_map(|(c, _)| c.seen.clone()).collect();
    assert_eq!(seen, whole[0].0.seen);
}

#[tokio::test]
async fn a_state_of_exactly_the_limit_is_answered_and_one_byte_more_is_cut() {
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let state = serde_json::json!({"per_key": {"a": 1}, "bytes": 0, "seen": []});
    let size = serde_json::to_string(&state).unwrap().len();
    for (max, cut) in [(size, 0), (size - 1, 1)] {
        let count = Count::default();
        let processor = processor(ok, &count, Mode::Ordered, max);
        let event = KinesisEvent {
            records: vec![],
            window: Some(window(state.clone(), false)),
        };
        let outcome = processor.handle(&event, None).await.unwrap();
        assert_eq!(outcome.stats.window.unwrap().cut_by_size, cut, "{max}");
        assert_eq!(count.closed.borrow().len() as u64, cut);
    }
}

#[tokio::test]
async fn a_final_invocation_with_a_failure_fails_whole_and_emits_nothing() {
    let all = records();
    let count = Count::default();
    let processor = processor(
        failing_once(&[&key(2, Some(1))]),
        &count,
        Mode::Ordered,
        1 << 20,
    );
    let last = |state| KinesisEvent {
        records: all.records[..4].to_vec(),
        window: Some(window(state, true)),
    };
    let state = serde_json::json!({"per_key": {"key-0": 10}, "bytes": 3, "seen": []});
    let err = processor
        .handle(&last(state.clone()), None)
        .await
        .unwrap_err();
    assert!(matches!(err, WindowError::FinalIncomplete(ref seq) if *seq == key(2, None)));
    assert!(count.closed.borrow().is_empty());
    // Lambda retries it with the same state: now complete, emitted once.
    let outcome = processor.handle(&last(state), None).await.unwrap();
    assert!(outcome.failure.is_none());
    let closed = count.closed.borrow();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].0.per_key["key-0"], 10 + 1);
}

#[tokio::test]
async fn every_answer_carries_the_state_even_empty_or_failed() {
    let count = Count::default();
    let fail = |_: UserRecord, _: RecordContext| async { Err::<(), _>("no") };
    let processor = processor(fail, &count, Mode::Ordered, 1 << 20);
    let state = serde_json::json!({"per_key": {"a": 1}, "bytes": 0, "seen": ["x"]});
    for records in [vec![], records().records[..3].to_vec()] {
        let event = KinesisEvent {
            records,
            window: Some(window(state.clone(), false)),
        };
        let response =
            serde_json::to_value(processor.handle(&event, None).await.unwrap().response());
        assert_eq!(response.unwrap()["state"], state);
    }
    // A state that is not this window's fails the invocation with a clear error.
    let event = KinesisEvent {
        records: vec![],
        window: Some(window(serde_json::json!({"per_key": 5}), false)),
    };
    let err = processor.handle(&event, None).await.unwrap_err();
    assert!(err.to_string().contains("does not read"), "{err}");
    // A plain event gets no state.
    let plain = KinesisEvent {
        records: vec![],
        window: None,
    };
    let response = serde_json::to_string(&processor.handle(&plain, None).await.unwrap().response());
    assert_eq!(response.unwrap(), r#"{"batchItemFailures":[]}"#);
}

#[tokio::test]
async fn a_window_terminated_early_closes_with_its_state_and_says_so() {
    let count = Count::default();
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let processor = processor(ok, &count, Mode::Ordered, 1 << 20);
    let state = serde_json::json!({"per_key": {"key-0": 10}, "bytes": 3, "seen": []});
    let mut w = window(state.clone(), false);
    // An invocation that is neither final nor terminated early closes nothing.
    let event = KinesisEvent {
        records: vec![],
        window: Some(w.clone()),
    };
    processor.handle(&event, None).await.unwrap();
    assert!(count.closed.borrow().is_empty());
    w.is_window_terminated_early = true;
    let event = KinesisEvent {
        records: vec![],
        window: Some(w),
    };
    processor.handle(&event, None).await.unwrap();
    assert_eq!(*count.early.borrow(), [true]);
    assert_eq!(count.closed.borrow()[0].0.per_key["key-0"], 10);
}

/// A destination that refuses results (entries with a `=`) for good while `refuse` is set,
/// keeping the idempotency key of each entry it is given and the data of each it accepts.
#[derive(Default)]
struct Destination {
    refuse: std::cell::Cell<bool>,
    /// Idempotency key and data of every entry made.
    keys: RefCell<Vec<(String, String)>>,
    delivered: RefCell<Vec<String>>,
}

impl Sink for &Destination {
    type Entry = bytes::Bytes;
    fn limits(&self) -> Limits {
        Limits {
            max_entries: 2,
            max_request_bytes: 1 << 20,
            max_entry_bytes: 1 << 20,
        }
    }
    fn entry(&self, record: UserRecord, ctx: &RecordContext) -> Result<bytes::Bytes, Error> {
        let data = String::from_utf8(record.data().to_vec()).unwrap();
        self.keys.borrow_mut().push((ctx.idempotency_key(), data));
        Ok(record.into_data())
    }
    fn size(&self, entry: &bytes::Bytes) -> usize {
        entry.len()
    }
    async fn send(&self, entries: &[bytes::Bytes]) -> Result<Vec<EntryOutcome>, SendError> {
        Ok(entries
            .iter()
            .map(|e| match self.refuse.get() && e.contains(&b'=') {
                true => EntryOutcome::failed("AccessDenied", "refused"),
                false => {
                    let text = String::from_utf8(e.to_vec()).unwrap();
                    self.delivered.borrow_mut().push(text);
                    EntryOutcome::Delivered
                }
            })
            .collect())
    }
}

/// Emits one record per key of the final state, `<key>=<count>`: in key order, then in the
/// reverse order on the next close, and so on.
#[derive(Default)]
struct EmitPerKey {
    reverse: std::cell::Cell<bool>,
}

impl Window for EmitPerKey {
    type State = BTreeMap<String, u64>;
    fn update(&self, state: &mut Self::State, record: &UserRecord, _: &RecordContext) {
        *state.entry(record.partition_key().to_owned()).or_default() += 1;
    }
    async fn close(&self, state: Self::State, end: &WindowEnd) -> Result<(), Error> {
        let mut results: Vec<_> = state.into_iter().collect();
        if self.reverse.replace(!self.reverse.get()) {
            results.reverse();
        }
        end.metrics().add("ResultsEmitted", results.len() as f64);
        for (key, n) in results {
            end.emit(UserRecord::plain(&key, None, format!("{key}={n}").into()))?;
        }
        Ok(())
    }
}

/// The idempotency key of each window result among `keys` (entries whose data has a `=`).
fn result_keys(keys: &[(String, String)]) -> BTreeMap<String, String> {
    keys.iter()
        .filter(|(_, data)| data.contains('='))
        .map(|(key, data)| (data.clone(), key.clone()))
        .collect()
}

#[tokio::test]
async fn what_close_emits_reaches_the_sink_or_the_final_invocation_fails_and_is_retried() {
    let destination = Destination::default();
    let settings = Settings {
        metrics: Switch::Off,
        ..Settings::default()
    };
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let processor =
        Processor::with_sink(ok, &destination, settings).with_window(EmitPerKey::default());
    // The final invocation's own records go to the sink too; 3 of key a, 2 of b.
    let event = EventBuilder::new()
        .plain("a", b"1")
        .aggregate(&[("b", b"2"), ("a", b"3")])
        .build();
    let last = KinesisEvent {
        records: event.records,
        window: Some(window(serde_json::json!({"a": 1, "b": 1}), true)),
    };
    destination.refuse.set(true);
    let err = processor.handle(&last, None).await.unwrap_err();
    assert!(matches!(err, WindowError::Undelivered(_)), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(destination.delivered.take(), ["1", "2", "3"]);

    // Lambda retries the same invocation; the result is delivered, under the same keys.
    destination.refuse.set(false);
    let keys_before = destination.keys.take();
    let outcome = processor.handle(&last, None).await.unwrap();
    assert!(outcome.failure.is_none());
    let doc = common::metrics_document(&outcome);
    for (name, value) in [
        ("WindowRecordsEmitted", 2.0),
        // Added by `close` to the invocation's metrics.
        ("ResultsEmitted", 2.0),
        ("WindowsClosed", 1.0),
        ("WindowStateCutBySize", 0.0),
        ("WindowStateBytes", r#"{"a":3,"b":2}"#.len() as f64),
    ] {
        assert_eq!(doc[name], value, "{name}");
    }
    assert_eq!(
        *destination.delivered.borrow(),
        ["1", "2", "3", "b=2", "a=3"]
    );
    // Emitted in the other order this time: each result keeps its key, and no two share one.
    let (before, after) = (
        result_keys(&keys_before),
        result_keys(&destination.keys.take()),
    );
    assert_eq!(after, before);
    assert_eq!(after.len(), 2);
    let distinct: std::collections::BTreeSet<_> = after.values().collect();
    assert_eq!(distinct.len(), 2);
    for key in distinct {
        assert!(
            key.starts_with("window:shardId-000000000000:2026-12-04T06:00:00Z:"),
            "{key}"
        );
    }
    // The sink's metrics count the results too.
    let sink = outcome.stats.sink.unwrap();
    assert_eq!(sink.delivered_user_records, 3 + 2);
    // Entries in no order (the default `order_key`) share requests, of at most 2 here: the
    // three user records in two, the two results in one.
    assert_eq!(sink.requests, 2 + 1);
}

#[tokio::test]
async fn the_results_of_a_window_cut_by_size_do_not_share_keys_with_its_final_result() {
    let destination = Destination::default();
    let settings = Settings {
        metrics: Switch::Off,
        window_state_max_bytes: 4,
        ..Settings::default()
    };
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let processor =
        Processor::with_sink(ok, &destination, settings).with_window(EmitPerKey::default());
    let cut = KinesisEvent {
        records: EventBuilder::new().plain("a", b"1").build().records,
        window: Some(window(serde_json::json!({}), false)),
    };
    let outcome = processor.handle(&cut, None).await.unwrap();
    assert_eq!(outcome.stats.window.unwrap().cut_by_size, 1);
    let last = KinesisEvent {
        records: EventBuilder::new().plain("z", b"2").build().records,
        window: Some(window(serde_json::json!({}), true)),
    };
    processor.handle(&last, None).await.unwrap();
    assert_eq!(*destination.delivered.borrow(), ["1", "a=1", "2", "z=1"]);
    let keys = result_keys(&destination.keys.borrow());
    assert_ne!(keys["a=1"], keys["z=1"]);
}

#[tokio::test]
async fn emitting_without_a_sink_fails_the_final_invocation_with_a_clear_error() {
    let ok = |_: UserRecord, _: RecordContext| async { Ok::<(), Error>(()) };
    let processor = Processor::new(ok, Settings::default()).with_window(EmitPerKey::default());
    let last = KinesisEvent {
        records: vec![],
        window: Some(window(serde_json::json!({"a": 1}), true)),
    };
    let err = processor.handle(&last, None).await.unwrap_err();
    assert!(matches!(err, WindowError::Close(_)), "{err}");
    assert!(err.to_string().contains("no sink"), "{err}");
}
