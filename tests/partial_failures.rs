//! The batch rules: what is reported to Lambda, what is processed, and what is not.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use common::*;
use kinesis_deagg::Settings;
use kinesis_deagg::batch::{self, BatchOutcome, Mode, OnCorrupt, StopReason};
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::UserRecord;
use kinesis_deagg::transform::{Error, RecordContext};

type Seen = Rc<RefCell<Vec<(String, Option<u64>, Vec<u8>)>>>;

/// A transform that remembers what it saw and fails (or panics) on data saying so.
fn recording(
    seen: &Seen,
) -> impl Fn(UserRecord, RecordContext) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Error>>>>
{
    let seen = seen.clone();
    move |r: UserRecord, c: RecordContext| {
        let seen = seen.clone();
        Box::pin(async move {
            seen.borrow_mut().push((
                c.sequence_number().to_string(),
                c.sub_sequence_number(),
                r.data().to_vec(),
            ));
            match &r.data()[..] {
                b"fail" => Err("asked to fail".into()),
                b"panic" => panic!("asked to panic"),
                _ => Ok(()),
            }
        })
    }
}

async fn run(event: &KinesisEvent, settings: &Settings) -> (BatchOutcome, Seen) {
    let seen = Seen::default();
    let outcome = batch::process(&event.records, &recording(&seen), settings, None).await;
    (outcome, seen)
}

fn reported(outcome: &BatchOutcome) -> String {
    serde_json::to_string(&outcome.response()).unwrap()
}

fn seqs(seen: &Seen) -> Vec<String> {
    seen.borrow()
        .iter()
        .map(|(s, sub, _)| format!("{s}/{sub:?}"))
        .collect()
}

#[tokio::test]
async fn a_batch_that_succeeds_reports_an_empty_list() {
    let e = event(vec![
        plain("1", "a", b"x"),
        aggregate("2", &[("k", b"y"), ("l", b"z")]),
    ]);
    let (outcome, seen) = run(&e, &Settings::default()).await;
    assert_eq!(reported(&outcome), r#"{"batchItemFailures":[]}"#);
    assert_eq!(seen.borrow().len(), 3);
    assert_eq!(outcome.stats.succeeded, 3);
    assert_eq!(outcome.stats.aggregated_records, 1);
}

#[tokio::test]
async fn an_empty_batch_succeeds() {
    let (outcome, _) = run(&event(vec![]), &Settings::default()).await;
    assert_eq!(reported(&outcome), r#"{"batchItemFailures":[]}"#);
}

#[tokio::test]
async fn of_several_failing_records_the_first_is_reported_and_nothing_after_it_runs() {
    let e = event(vec![
        plain("10", "a", b"ok"),
        plain("11", "a", b"fail"),
        plain("12", "b", b"ok"),
        plain("13", "c", b"fail"),
    ]);
    let (outcome, seen) = run(&e, &Settings::default()).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"11"}]}"#
    );
    assert_eq!(seqs(&seen), ["10/None", "11/None"]);
    assert_eq!((outcome.stats.succeeded, outcome.stats.failed), (1, 1));
}

#[tokio::test]
async fn a_failure_inside_an_aggregate_reports_its_sequence_number_and_nothing_else() {
    let e = event(vec![
        plain("1", "a", b"ok"),
        aggregate(
            "2",
            &[("k0", b"ok"), ("k1", b"ok"), ("k2", b"fail"), ("k3", b"ok")],
        ),
        plain("3", "a", b"ok"),
    ]);
    let (outcome, seen) = run(&e, &Settings::default()).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"2"}]}"#
    );
    assert_eq!(
        seqs(&seen),
        ["1/None", "2/Some(0)", "2/Some(1)", "2/Some(2)"]
    );
    let failure = outcome.failure.unwrap();
    assert!(matches!(
        failure.reason,
        StopReason::TransformError {
            sub_sequence_number: Some(2),
            ..
        }
    ));
}

/// Aggregates are split when reached (one at a time) for small batches or on one core, ahead
/// when the MD5s can run beside the split: either way, what comes after the reported record is
/// not unpacked (it is delivered again), and only the bytes and the record count cover it.
#[tokio::test]
async fn a_batch_that_stops_early_leaves_the_rest_unpacked() {
    let big = vec![b'x'; 40_000]; // two of these pass the 64 KiB of the all-at-once split
    for size in [&b"ok"[..], &big] {
        let e = event(vec![
            aggregate("1", &[("k0", b"fail"), ("k1", size)]),
            aggregate("2", &[("k0", size), ("k1", size), ("k2", size)]),
            record("3", "a", "***"),
        ]);
        let (outcome, seen) = run(&e, &with_policy(OnCorrupt::Fail)).await;
        assert_eq!(seqs(&seen), ["1/Some(0)"]);
        assert_eq!(outcome.failure.unwrap().index, 0);
        let s = &outcome.stats;
        assert_eq!(
            (s.user_records, s.aggregated_records, s.corrupt_failed),
            (2, 1, 0)
        );
        let bytes: usize = e
            .records
            .iter()
            .map(|r| r.data.as_ref().map_or(0, |d| d.len()))
            .sum();
        assert_eq!((s.kinesis_records, s.bytes), (3, bytes as u64));
        assert!(s.bytes > 2 * size.len() as u64);
    }
}

#[tokio::test]
async fn a_panicking_transform_fails_its_record_not_the_runtime() {
    let e = event(vec![
        plain("1", "a", b"ok"),
        plain("2", "a", b"panic"),
        plain("3", "a", b"ok"),
    ]);
    let (outcome, seen) = run(&e, &Settings::default()).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"2"}]}"#
    );
    assert_eq!(seen.borrow().len(), 2);
    let reason = outcome.failure.unwrap().reason;
    assert_eq!(reason.to_string(), "transform panicked: asked to panic");
    let StopReason::TransformPanic { message, .. } = reason else {
        panic!("not a panic")
    };
    assert_eq!(message, "asked to panic");
    // The runtime is still usable.
    let (outcome, _) = run(&event(vec![plain("4", "a", b"ok")]), &Settings::default()).await;
    assert!(outcome.failure.is_none());
}

fn with_policy(on_corrupt: OnCorrupt) -> Settings {
    Settings {
        on_corrupt,
        ..Settings::default()
    }
}

#[tokio::test]
async fn invalid_base64_follows_the_corrupt_policy() {
    let e = event(vec![
        plain("1", "a", b"ok"),
        record("2", "a", "***"),
        plain("3", "a", b"ok"),
    ]);

    let (outcome, seen) = run(&e, &with_policy(OnCorrupt::Fail)).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"2"}]}"#
    );
    assert_eq!(seqs(&seen), ["1/None"]);
    assert!(matches!(
        outcome.failure.unwrap().reason,
        StopReason::Corrupt(_)
    ));
    assert_eq!(outcome.stats.corrupt_failed, 1);

    let (outcome, seen) = run(&e, &with_policy(OnCorrupt::Passthrough)).await;
    assert_eq!(reported(&outcome), r#"{"batchItemFailures":[]}"#);
    assert_eq!(seen.borrow()[1], ("2".into(), None, b"***".to_vec()));
    assert_eq!(outcome.stats.corrupt_passed_through, 1);

    let (outcome, seen) = run(&e, &with_policy(OnCorrupt::Skip)).await;
    assert_eq!(reported(&outcome), r#"{"batchItemFailures":[]}"#);
    assert_eq!(seqs(&seen), ["1/None", "3/None"]);
    assert_eq!(outcome.stats.corrupt_skipped, 1);
}

#[tokio::test]
async fn a_corrupt_aggregate_follows_the_corrupt_policy() {
    let bad = corrupt_aggregate_bytes();
    let e = event(vec![plain("1", "a", &bad), plain("2", "a", b"ok")]);

    let (outcome, seen) = run(&e, &with_policy(OnCorrupt::Fail)).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"1"}]}"#
    );
    assert!(seen.borrow().is_empty());

    let (outcome, seen) = run(&e, &with_policy(OnCorrupt::Passthrough)).await;
    assert!(outcome.failure.is_none());
    assert_eq!(
        seen.borrow()[0].2,
        bad,
        "passed through as the decoded bytes"
    );

    let (outcome, seen) = run(&e, &with_policy(OnCorrupt::Skip)).await;
    assert!(outcome.failure.is_none());
    assert_eq!(seqs(&seen), ["2/None"]);
}

#[tokio::test]
async fn a_checksum_mismatch_is_passed_through_whatever_the_policy() {
    let mut bad = corrupt_aggregate_bytes();
    *bad.last_mut().unwrap() ^= 0xFF;
    let e = event(vec![plain("1", "a", &bad)]);
    let (outcome, seen) = run(&e, &with_policy(OnCorrupt::Fail)).await;
    assert!(outcome.failure.is_none());
    assert_eq!(seen.borrow()[0].2, bad);
    assert_eq!(outcome.stats.checksum_mismatches, 1);
}

#[tokio::test]
async fn an_empty_aggregate_is_counted_and_acknowledged() {
    // Build an empty aggregate by hand: a key table and no records.
    let data = envelope(&[&[0x0A, 20][..], &[b'p'; 20]].concat());
    let e = event(vec![plain("1", "a", &data), plain("2", "a", b"ok")]);
    let (outcome, seen) = run(&e, &Settings::default()).await;
    assert!(outcome.failure.is_none());
    assert_eq!(seqs(&seen), ["2/None"]);
    assert_eq!(outcome.stats.empty_aggregates, 1);
}

// Paused time: tokio's clock advances only when every task sleeps, so the timings are exact.
#[tokio::test(start_paused = true)]
async fn the_deadline_stops_the_batch_at_the_first_unprocessed_record() {
    let e = event(
        (1..=10)
            .map(|i| plain(&i.to_string(), "a", b"ok"))
            .collect(),
    );
    let settings = Settings {
        deadline_margin_ms: 100,
        ..Settings::default()
    };
    let calls = Rc::new(RefCell::new(0));
    let slow = {
        let calls = calls.clone();
        move |_: UserRecord, _: RecordContext| {
            *calls.borrow_mut() += 1;
            async {
                tokio::time::sleep(Duration::from_millis(60)).await;
                Ok::<(), Error>(())
            }
        }
    };
    // 100 ms margin before a deadline 250 ms away leaves 150 ms: three records of 60 ms
    // start, the third is abandoned at the margin, and Lambda is told to retry from it.
    let deadline = tokio::time::Instant::now().into_std() + Duration::from_millis(250);
    let outcome = batch::process(&e.records, &slow, &settings, Some(deadline)).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"3"}]}"#
    );
    assert_eq!(outcome.failure.unwrap().reason, StopReason::Deadline);
    assert_eq!(outcome.stats.succeeded, 2);
    assert_eq!(*calls.borrow(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_margin_above_the_time_left_takes_half_of_it() {
    let e = event(
        (1..=10)
            .map(|i| plain(&i.to_string(), "a", b"ok"))
            .collect(),
    );
    let slow = |_: UserRecord, _: RecordContext| async {
        tokio::time::sleep(Duration::from_millis(60)).await;
        Ok::<(), Error>(())
    };
    // The default 1,000 ms margin before a deadline 250 ms away would stop every retry before
    // its first record; it shrinks to 125 ms: two records of 60 ms succeed, the third is
    // abandoned at 125 ms.
    let deadline = tokio::time::Instant::now().into_std() + Duration::from_millis(250);
    let outcome = batch::process(&e.records, &slow, &Settings::default(), Some(deadline)).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"3"}]}"#
    );
    assert_eq!(outcome.stats.succeeded, 2);
}

#[tokio::test(start_paused = true)]
async fn a_batch_that_arrives_at_its_deadline_processes_nothing() {
    let e = event(vec![plain("1", "a", b"ok")]);
    let deadline = tokio::time::Instant::now().into_std();
    let (settings, seen) = (Settings::default(), Seen::default());
    let outcome = batch::process(&e.records, &recording(&seen), &settings, Some(deadline)).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"1"}]}"#
    );
    assert!(seen.borrow().is_empty());
}

fn concurrent() -> Settings {
    Settings {
        mode: Mode::Concurrent,
        concurrency: 4,
        ..Settings::default()
    }
}

#[tokio::test]
async fn the_concurrent_mode_keeps_order_within_a_key_and_overlaps_keys() {
    let keys = ["a", "b", "c"];
    let mut records = Vec::new();
    for i in 0..30 {
        let key = keys[i % 3];
        records.push(plain(
            &format!("{:03}", i),
            key,
            format!("{key}{i}").as_bytes(),
        ));
    }
    let e = event(records);
    let order: Rc<RefCell<Vec<String>>> = Default::default();
    let in_flight = Rc::new(RefCell::new((0, 0)));
    let transform = {
        let (order, in_flight) = (order.clone(), in_flight.clone());
        move |r: UserRecord, c: RecordContext| {
            let (order, in_flight) = (order.clone(), in_flight.clone());
            async move {
                {
                    let mut f = in_flight.borrow_mut();
                    f.0 += 1;
                    f.1 = f.1.max(f.0);
                }
                // Later keys sleep less, so without per-key ordering they would overtake.
                let n: u64 = c.sequence_number().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(5 + (30 - n) % 7)).await;
                in_flight.borrow_mut().0 -= 1;
                order
                    .borrow_mut()
                    .push(String::from_utf8(r.data().to_vec()).unwrap());
                Ok::<(), Error>(())
            }
        }
    };
    let outcome = batch::process(&e.records, &transform, &concurrent(), None).await;
    assert!(outcome.failure.is_none());
    assert_eq!(outcome.stats.succeeded, 30);
    for key in keys {
        let seen: Vec<_> = order
            .borrow()
            .iter()
            .filter(|d| d.starts_with(key))
            .cloned()
            .collect();
        let expected: Vec<_> = (0..30)
            .filter(|i| keys[i % 3] == key)
            .map(|i| format!("{key}{i}"))
            .collect();
        assert_eq!(seen, expected, "order within key {key}");
    }
    assert!(in_flight.borrow().1 > 1, "keys never ran side by side");
}

#[tokio::test]
async fn the_concurrent_mode_reports_the_lowest_failed_record() {
    let e = event(vec![
        plain("1", "a", b"ok"),
        plain("2", "b", b"ok"),
        plain("3", "b", b"fail"),
        plain("4", "a", b"fail"),
        plain("5", "a", b"ok"),
        plain("6", "c", b"ok"),
    ]);
    let (outcome, seen) = run(&e, &concurrent()).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"3"}]}"#
    );
    // Nothing of key "a" runs after its own failure.
    assert!(!seqs(&seen).contains(&"5/None".to_string()));
}

#[tokio::test]
async fn the_concurrent_mode_splits_an_aggregate_by_its_inner_keys() {
    let e = event(vec![aggregate(
        "1",
        &[("x", b"ok"), ("y", b"fail"), ("x", b"ok")],
    )]);
    let (outcome, seen) = run(&e, &concurrent()).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"1"}]}"#
    );
    assert!(seqs(&seen).contains(&"1/Some(1)".to_string()));
}

/// With a second core, `Processor::handle_body` has the aggregates' MD5s checked while the
/// body is still being read. The transform sees, and Lambda is told, what checks made after
/// the read give (`batch::process` on the same event read by `from_slice`): a wrong checksum,
/// a corrupt aggregate with a right one and a failing user record among aggregates big
/// enough to be handed over early (16 KiB) and to start the helper (64 KiB).
#[tokio::test]
async fn checks_made_while_the_body_is_read_change_nothing() {
    use kinesis_deagg::kpl::Aggregator;
    use kinesis_deagg::settings::Switch;
    let data: Vec<Vec<u8>> = (0..150u8).map(|i| vec![i; 200]).collect();
    let users: Vec<(&str, &[u8])> = data.iter().map(|d| ("k", &d[..])).collect();
    let mut failing = users.clone();
    failing[100] = ("k", b"fail");
    let mut mismatch = Aggregator::new();
    for (pk, d) in &users {
        mismatch.add(pk, None, d).unwrap();
    }
    let mut mismatch = mismatch.finish().unwrap().data.to_vec();
    *mismatch.last_mut().unwrap() ^= 1;
    let corrupt = envelope(&vec![0xFF; 20_000]);
    let records = vec![
        aggregate("1", &users),
        plain("2", "a", &mismatch),
        aggregate("3", &users),
        plain("4", "a", &corrupt),
        plain("5", "a", b"small"),
        aggregate("6", &users),
        aggregate("7", &failing),
        aggregate("8", &users),
    ];
    let body = serde_json::to_vec(&event_json(records)).unwrap();
    let settings = Settings {
        metrics: Switch::Off,
        ..with_policy(OnCorrupt::Passthrough)
    };

    let (after, seen_after) = run(&KinesisEvent::from_slice(&body).unwrap(), &settings).await;
    let seen_early = Seen::default();
    let processor = kinesis_deagg::Processor::new(recording(&seen_early), settings);
    let context = lambda_runtime::Context::default();
    let early = processor.handle_body(bytes::Bytes::from(body), &context);
    let early = serde_json::to_string(&early.await.unwrap()).unwrap();

    assert_eq!(early, reported(&after));
    assert_eq!(early, r#"{"batchItemFailures":[{"itemIdentifier":"7"}]}"#);
    assert_eq!(*seen_early.borrow(), *seen_after.borrow());
    let seen = seen_early.borrow();
    assert_eq!(
        seen.len(),
        150 * 3 + 3 + 101,
        "up to the failing user record"
    );
    assert!(seen.contains(&("2".into(), None, mismatch)));
    assert!(seen.contains(&("4".into(), None, corrupt)));
}

/// Each user record's context tells the details of the Kinesis record that holds it, and all
/// of a batch's contexts share its metrics.
#[tokio::test]
async fn contexts_tell_the_details_of_their_kinesis_record() {
    let mut mismatch = envelope(b"not checked");
    *mismatch.last_mut().unwrap() ^= 1;
    let mut elsewhere = plain("3", "p", b"z");
    elsewhere["eventID"] = "shardId-000000000009:3".into();
    elsewhere["eventSourceARN"] = "arn:aws:kinesis:eu-west-1:1:stream/other".into();
    elsewhere["kinesis"]["approximateArrivalTimestamp"] = 1_800_000_000.25.into();
    let e = event(vec![
        aggregate("1", &[("a", b"x"), ("b", b"y")]),
        plain("2", "p", &mismatch),
        elsewhere,
    ]);
    let seen = Rc::new(RefCell::new(Vec::new()));
    let transform = |_: UserRecord, c: RecordContext| {
        let seen = seen.clone();
        async move {
            let ms = c
                .approximate_arrival()
                .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64);
            let why = c.passed_through().map(|why| why.contains("MD5"));
            let (shard, arn) = (c.shard_id().map(String::from), c.stream_arn());
            let stream = arn
                .and_then(|a| a.split_once(":stream/"))
                .map(|(_, s)| s.to_string());
            seen.borrow_mut()
                .push((c.idempotency_key(), c.aggregated(), shard, stream, ms, why));
            c.metrics().add("Seen", 1.0);
            Ok::<(), Error>(())
        }
    };
    let outcome = batch::process(&e.records, &transform, &Settings::default(), None).await;
    assert_eq!(outcome.metrics["Seen"], 4.0);
    let first = |key: &str, aggregated, why| {
        let shard = Some("shardId-000000000001".to_string());
        (
            key.to_string(),
            aggregated,
            shard,
            Some("test".into()),
            Some(1_700_000_000_500),
            why,
        )
    };
    let third = (
        "3".to_string(),
        false,
        Some("shardId-000000000009".to_string()),
        Some("other".to_string()),
        Some(1_800_000_000_250),
        None,
    );
    assert_eq!(
        *seen.borrow(),
        [
            first("1:0", true, None),
            first("1:1", true, None),
            first("2", false, Some(true)),
            third
        ]
    );
}

#[tokio::test]
async fn the_concurrent_mode_starts_nothing_more_of_the_reported_record() {
    // Record 2's user record 0 fails; its user record 1, of the same key, waits behind it
    // and is never started: Lambda delivers the whole record again.
    let e = event(vec![
        plain("1", "b", b"ok"),
        aggregate("2", &[("a", b"fail"), ("a", b"ok"), ("c", b"ok")]),
        plain("3", "d", b"ok"),
    ]);
    let (outcome, seen) = run(&e, &concurrent()).await;
    assert_eq!(
        reported(&outcome),
        r#"{"batchItemFailures":[{"itemIdentifier":"2"}]}"#
    );
    assert!(
        !seqs(&seen).contains(&"2/Some(1)".to_string()),
        "{:?}",
        seqs(&seen)
    );
}

/// Two user records of one Kinesis record fail side by side, the first one first: the reason
/// given is the first failure's, not the later one's.
#[tokio::test(start_paused = true)]
async fn the_concurrent_mode_gives_the_first_failure_of_the_reported_record() {
    let e = event(vec![aggregate(
        "1",
        &[("a", b"10"), ("b", b"20"), ("c", b"ok")],
    )]);
    let transform = |r: UserRecord, _: RecordContext| async move {
        let Ok(ms) = std::str::from_utf8(r.data()).unwrap().parse() else {
            return Ok(());
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Err::<(), Error>(format!("failed after {ms} ms").into())
    };
    let outcome = batch::process(&e.records, &transform, &concurrent(), None).await;
    let failure = outcome.failure.unwrap();
    assert_eq!(failure.index, 0);
    assert_eq!(
        failure.reason.to_string(),
        "transform failed on user record 0: failed after 10 ms"
    );
}

/// A KPL aggregate with any bytes as partition keys: `(key index, data)` per user record,
/// encoded by hand (our aggregator takes only valid keys).
fn aggregate_of_raw_keys(seq: &str, keys: &[&[u8]], users: &[(u8, &[u8])]) -> serde_json::Value {
    let mut pb = Vec::new();
    for key in keys {
        pb.extend([0x0A, key.len() as u8]);
        pb.extend_from_slice(key);
    }
    for (index, data) in users {
        let record = [&[0x08, *index, 0x1A, data.len() as u8][..], data].concat();
        pb.extend([0x1A, record.len() as u8]);
        pb.extend(record);
    }
    use base64::Engine;
    record(
        seq,
        "a",
        &base64::engine::general_purpose::STANDARD.encode(envelope(&pb)),
    )
}

#[tokio::test]
async fn user_records_with_keys_that_are_not_utf8_are_counted_and_delivered() {
    let e = event(vec![
        aggregate_of_raw_keys(
            "1",
            &[b"\xff\xfe", b"ok"],
            &[(0, b"x"), (1, b"y"), (0, b"z"), (0, b"v")],
        ),
        plain("2", "p", b"plain"),
        aggregate_of_raw_keys("3", &[b"k\xc3"], &[(0, b"w")]),
    ]);
    let (outcome, seen) = run(&e, &Settings::default()).await;
    assert!(outcome.failure.is_none());
    assert_eq!(outcome.stats.lossy_keys, 4);
    assert_eq!(outcome.stats.user_records, 6);
    assert_eq!(seen.borrow().len(), 6);
}
