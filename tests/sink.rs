//! The sink machinery against a scripted destination: only refused entries are sent again,
//! requests respect the limits, and the reported record is exactly the first Kinesis record
//! with an undelivered user record, in both modes, whatever the destination does.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use kinesis_deagg::batch::{BatchOutcome, Mode, StopReason};
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::UserRecord;
use kinesis_deagg::sink::{
    EntryOutcome, Limits, Pack, Position, SendError, SendErrorKind, Sink, Staged,
};
use kinesis_deagg::testing::EventBuilder;
use kinesis_deagg::transform::{Error, Output, RecordContext};
use kinesis_deagg::{Processor, Settings};

/// What the scripted destination does with one attempt at one entry.
#[derive(Clone, Debug, PartialEq)]
enum Fate {
    Deliver,
    Throttle,
    Refuse,
    /// Asks for the entry to be sent again ([`EntryOutcome::Resend`]).
    Resend,
}

/// What the destination does with a whole request, before looking at entries.
#[derive(Clone, Debug, PartialEq)]
enum RequestFate {
    Answer,
    Throttled,
    Permanent,
    /// Never answers.
    Hang,
    /// Answers after this long.
    Late(Duration),
    /// Answers for every entry but the last.
    Short,
    /// Fails for good after this long.
    LatePermanent(Duration),
}

/// The script for entries: the fate of an attempt (1, 2, ...) at the entry with this data.
type EntryScript = Box<dyn Fn(&[u8], usize) -> Fate>;

/// A destination that keeps what it accepts, with a script for entries (by data and attempt)
/// and for requests (by request number).
struct Scripted {
    limits: Limits,
    entry_fate: EntryScript,
    request_fate: Box<dyn Fn(usize) -> RequestFate>,
    delivered: RefCell<Vec<bytes::Bytes>>,
    /// The partition keys of what was delivered, in order.
    delivered_keys: RefCell<Vec<bytes::Bytes>>,
    attempts: RefCell<std::collections::HashMap<bytes::Bytes, usize>>,
    requests: RefCell<Vec<usize>>,
    /// Entries are ordered per partition key.
    ordered: bool,
}

impl Scripted {
    fn new() -> Self {
        Scripted {
            limits: Limits {
                max_entries: 4,
                max_request_bytes: 1 << 20,
                max_entry_bytes: 1 << 20,
            },
            entry_fate: Box::new(|_, _| Fate::Deliver),
            request_fate: Box::new(|_| RequestFate::Answer),
            delivered: RefCell::default(),
            delivered_keys: RefCell::default(),
            attempts: RefCell::default(),
            requests: RefCell::default(),
            ordered: false,
        }
    }

    fn entries(mut self, f: impl Fn(&[u8], usize) -> Fate + 'static) -> Self {
        self.entry_fate = Box::new(f);
        self
    }

    fn requests(mut self, f: impl Fn(usize) -> RequestFate + 'static) -> Self {
        self.request_fate = Box::new(f);
        self
    }

    fn delivered(&self) -> Vec<String> {
        let d = self.delivered.borrow();
        d.iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }
}

/// An entry: partition key and data.
type Entry = (bytes::Bytes, bytes::Bytes);

impl Sink for &Scripted {
    type Entry = Entry;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn entry(&self, record: UserRecord, _: &RecordContext) -> Result<Entry, Error> {
        let key = bytes::Bytes::copy_from_slice(record.partition_key().as_bytes());
        Ok((key, record.into_data()))
    }

    fn size(&self, entry: &Entry) -> usize {
        entry.1.len()
    }

    fn order_key<'e>(&self, entry: &'e Entry) -> Option<&'e [u8]> {
        self.ordered.then_some(&entry.0[..])
    }

    async fn send(&self, entries: &[Entry]) -> Result<Vec<EntryOutcome>, SendError> {
        assert!(!entries.is_empty() && entries.len() <= self.limits.max_entries);
        if self.ordered {
            let keys: BTreeSet<_> = entries.iter().map(|e| &e.0).collect();
            assert_eq!(
                keys.len(),
                entries.len(),
                "two entries of one key in a request"
            );
        }
        let bytes: usize = entries.iter().map(|e| e.1.len()).sum();
        assert!(entries.len() == 1 || bytes <= self.limits.max_request_bytes);
        let n = {
            let mut r = self.requests.borrow_mut();
            r.push(entries.len());
            r.len() - 1
        };
        let fate = (self.request_fate)(n);
        let answered = match fate {
            RequestFate::Short => &entries[..entries.len() - 1],
            _ => entries,
        };
        match fate {
            RequestFate::Answer | RequestFate::Short => {}
            RequestFate::Throttled => {
                return Err(SendError::new(SendErrorKind::Throttled, "Throttling"));
            }
            RequestFate::Permanent => {
                return Err(SendError::new(SendErrorKind::Permanent, "ResourceNotFound"));
            }
            RequestFate::Hang => std::future::pending::<()>().await,
            RequestFate::Late(wait) => tokio::time::sleep(wait).await,
            RequestFate::LatePermanent(wait) => {
                tokio::time::sleep(wait).await;
                return Err(SendError::new(SendErrorKind::Permanent, "ResourceNotFound"));
            }
        }
        let mut outcomes = Vec::new();
        for (key, e) in answered {
            let attempt = {
                let mut a = self.attempts.borrow_mut();
                let n = a.entry(e.clone()).or_default();
                *n += 1;
                *n
            };
            outcomes.push(match (self.entry_fate)(e, attempt) {
                Fate::Deliver => {
                    self.delivered.borrow_mut().push(e.clone());
                    self.delivered_keys.borrow_mut().push(key.clone());
                    EntryOutcome::Delivered
                }
                Fate::Throttle => EntryOutcome::throttled("ProvisionedThroughputExceededException"),
                Fate::Refuse => EntryOutcome::failed("ValidationException", "no"),
                Fate::Resend => EntryOutcome::Resend,
            });
        }
        Ok(outcomes)
    }
}

/// `n` Kinesis records, record i an aggregate of `per` user records `"i.j"` (plain when
/// `per` is 1), partition keys cycling over 3.
fn event(n: usize, per: usize) -> KinesisEvent {
    let mut b = EventBuilder::new();
    for i in 0..n {
        let data: Vec<String> = (0..per).map(|j| format!("{i}.{j}")).collect();
        let keys: Vec<String> = (0..per).map(|j| format!("k{}", (i + j) % 3)).collect();
        if per == 1 {
            b = b.plain(&keys[0], data[0].as_bytes());
        } else {
            let users: Vec<(&str, &[u8])> = keys
                .iter()
                .zip(&data)
                .map(|(k, d)| (k.as_str(), d.as_bytes()))
                .collect();
            b = b.aggregate(&users);
        }
    }
    b.build()
}

fn accept(_: UserRecord, _: RecordContext) -> std::future::Ready<Result<(), Error>> {
    std::future::ready(Ok(()))
}

async fn run_with<T: kinesis_deagg::transform::Transform>(
    transform: T,
    sink: &Scripted,
    event: &KinesisEvent,
    mode: Mode,
    deadline: Option<Duration>,
) -> BatchOutcome {
    let settings = Settings {
        mode,
        metrics: kinesis_deagg::settings::Switch::Off,
        ..Settings::default()
    };
    let deadline = deadline.map(|d| tokio::time::Instant::now().into_std() + d);
    Processor::with_sink(transform, sink, settings)
        .handle(event, deadline)
        .await
        .unwrap()
}

fn reported(outcome: &BatchOutcome) -> Option<usize> {
    outcome.failure.as_ref().map(|f| f.index)
}

#[tokio::test(start_paused = true)]
async fn every_accepted_user_record_is_delivered_once_in_order_in_full_requests() {
    let sink = Scripted::new();
    let outcome = run_with(accept, &sink, &event(5, 3), Mode::Ordered, None).await;
    assert_eq!(reported(&outcome), None);
    let expected: Vec<String> = (0..5)
        .flat_map(|i| (0..3).map(move |j| format!("{i}.{j}")))
        .collect();
    assert_eq!(sink.delivered(), expected);
    assert_eq!(*sink.requests.borrow(), [4, 4, 4, 3]);
    let stats = outcome.stats.sink.unwrap();
    assert_eq!(stats.delivered_user_records, 15);
    assert_eq!(stats.delivered_bytes, 15 * 3);
    assert_eq!(stats.requests, 4);
    assert_eq!(
        (stats.retried_entries, stats.undelivered_user_records),
        (0, 0)
    );
    // Full by bytes: 3 entries of 3 bytes in 9, however many wait.
    let mut sink = Scripted::new();
    sink.limits.max_request_bytes = 9;
    run_with(accept, &sink, &event(5, 3), Mode::Ordered, None).await;
    assert_eq!(*sink.requests.borrow(), [3, 3, 3, 3, 3]);

    // A transform that yields on each user record: the driver, running beside it, sends each
    // request as soon as it is full (by entries, or by bytes: 3 entries of 3 bytes in 9),
    // and not before.
    for (max_entries, max_request_bytes, requests) in [
        (4, 1 << 20, &[4, 4, 4, 3][..]),
        (100, 9, &[3, 3, 3, 3, 3][..]),
    ] {
        let mut sink = Scripted::new();
        sink.limits.max_entries = max_entries;
        sink.limits.max_request_bytes = max_request_bytes;
        let sent_before_last = std::cell::Cell::new(None);
        let yielding = |r: UserRecord, _: RecordContext| {
            if &r.data()[..] == b"4.2" {
                sent_before_last.set(Some(sink.requests.borrow().len()));
            }
            async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok::<(), Error>(())
            }
        };
        let outcome = run_with(yielding, &sink, &event(5, 3), Mode::Ordered, None).await;
        assert_eq!(reported(&outcome), None);
        assert_eq!(*sink.requests.borrow(), requests);
        // The 14 user records before the last filled every request but the last.
        assert_eq!(sent_before_last.get(), Some(requests.len() - 1));
    }
}

#[tokio::test(start_paused = true)]
async fn throttled_entries_alone_are_sent_again_until_delivered() {
    // Without a deadline, and with one far enough for every back-off.
    for deadline in [None, Some(Duration::from_secs(60))] {
        // "1.1" and "3.0" are throttled twice.
        let sink = Scripted::new().entries(|d, attempt| match d {
            b"1.1" | b"3.0" if attempt <= 2 => Fate::Throttle,
            _ => Fate::Deliver,
        });
        let started = tokio::time::Instant::now();
        let (logs, guard) = common::capture_logs();
        let outcome = run_with(accept, &sink, &event(4, 2), Mode::Ordered, deadline).await;
        drop(guard);
        assert_eq!(reported(&outcome), None, "{deadline:?}");
        // Each round of retries is logged with the destination's codes.
        let logs = logs.text();
        let retried = "entries refused, sent again after a back-off: \
            ProvisionedThroughputExceededException";
        assert!(logs.contains(retried), "{logs}");
        // Each round of retries waits its back-off first.
        assert!(started.elapsed() > Duration::ZERO);
        let delivered = sink.delivered();
        assert_eq!(delivered.len(), 8, "{delivered:?}");
        assert_eq!(delivered.iter().collect::<BTreeSet<_>>().len(), 8);
        let attempts = sink.attempts.borrow();
        assert_eq!(attempts[&b"1.1"[..]], 3);
        assert_eq!(attempts[&b"0.0"[..]], 1);
        let stats = outcome.stats.sink.unwrap();
        assert_eq!((stats.throttled_entries, stats.retried_entries), (4, 4));
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_user_record_inside_an_aggregate_reports_its_kinesis_record() {
    for mode in [Mode::Ordered, Mode::Concurrent] {
        let sink = Scripted::new().entries(|d, _| {
            if d == b"2.1" {
                Fate::Refuse
            } else {
                Fate::Deliver
            }
        });
        let outcome = run_with(accept, &sink, &event(5, 3), mode, None).await;
        let f = outcome.failure.clone().unwrap();
        assert_eq!(f.index, 2, "{mode:?}");
        assert!(
            matches!(&f.reason, StopReason::Undelivered { sub_sequence_number: Some(1), message } if message.contains("ValidationException")),
            "{:?}",
            f.reason
        );
        // Everything before record 2 was delivered.
        let delivered = sink.delivered();
        for i in 0..2 {
            for j in 0..3 {
                assert!(delivered.contains(&format!("{i}.{j}")), "{mode:?} {i}.{j}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_throttled_request_is_sent_again_and_a_permanent_one_stops_at_its_first_record() {
    let sink = Scripted::new().requests(|n| {
        if n < 3 {
            RequestFate::Throttled
        } else {
            RequestFate::Answer
        }
    });
    let outcome = run_with(accept, &sink, &event(3, 1), Mode::Ordered, None).await;
    assert_eq!(reported(&outcome), None);
    assert_eq!(sink.delivered(), ["0.0", "1.0", "2.0"]);
    assert_eq!(outcome.stats.sink.unwrap().throttled_entries, 9);

    // Requests of 4: the second request (records 4..8) fails for good.
    let sink = Scripted::new().requests(|n| {
        if n == 1 {
            RequestFate::Permanent
        } else {
            RequestFate::Answer
        }
    });
    let outcome = run_with(accept, &sink, &event(10, 1), Mode::Ordered, None).await;
    assert_eq!(reported(&outcome), Some(4));
    assert_eq!(sink.delivered(), ["0.0", "1.0", "2.0", "3.0"]);
    assert_eq!(
        sink.requests.borrow().len(),
        2,
        "nothing is sent after a permanent error"
    );
}

#[tokio::test(start_paused = true)]
async fn entries_given_up_after_the_last_attempt_are_reported() {
    let sink = Scripted::new().entries(|d, _| {
        if d == b"1.0" {
            Fate::Throttle
        } else {
            Fate::Deliver
        }
    });
    let outcome = run_with(accept, &sink, &event(3, 1), Mode::Ordered, None).await;
    let f = outcome.failure.unwrap();
    assert_eq!(f.index, 1);
    assert!(
        f.reason.to_string().contains("after 10 attempts"),
        "{}",
        f.reason
    );
    assert_eq!(sink.attempts.borrow()[&b"1.0"[..]], 10);
}

#[tokio::test(start_paused = true)]
async fn a_destination_that_never_answers_is_given_up_before_the_deadline() {
    let sink = Scripted::new().requests(|_| RequestFate::Hang);
    let started = tokio::time::Instant::now();
    let outcome = run_with(
        accept,
        &sink,
        &event(6, 1),
        Mode::Ordered,
        Some(Duration::from_secs(30)),
    )
    .await;
    assert_eq!(reported(&outcome), Some(0));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30) - Duration::from_millis(900),
        "{took:?}"
    );
    assert!(sink.delivered().is_empty());
    assert_eq!(outcome.stats.sink.unwrap().undelivered_user_records, 6);
}

#[tokio::test(start_paused = true)]
async fn what_was_pushed_while_the_sink_stopped_is_reported_too() {
    // Concurrent: "1.0" and "2.0" go first, in a request that fails for good 5 ms later;
    // "0.0", slower, is pushed while it is in flight. It is reported, not lost.
    let transform = |r: UserRecord, _: RecordContext| async move {
        if &r.data()[..] == b"0.0" {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok::<(), Error>(())
    };
    let mut sink = Scripted::new().requests(|n| match n {
        0 => RequestFate::LatePermanent(Duration::from_millis(5)),
        _ => RequestFate::Answer,
    });
    sink.limits.max_entries = 2;
    let outcome = run_with(transform, &sink, &event(3, 1), Mode::Concurrent, None).await;
    assert_eq!(*sink.requests.borrow(), [2]);
    assert_eq!(reported(&outcome), Some(0));
    assert_eq!(outcome.stats.sink.unwrap().undelivered_user_records, 3);
}

#[tokio::test(start_paused = true)]
async fn outputs_can_be_the_same_record_new_data_another_record_or_nothing() {
    let transform = |r: UserRecord, _: RecordContext| async move {
        Ok::<_, Error>(match &r.data()[..] {
            b"0.0" => Output::Same,
            b"1.0" => Output::Data("one".into()),
            b"2.0" => Output::Record(UserRecord::plain("other", None, "two".into())),
            _ => Output::Drop,
        })
    };
    let sink = Scripted::new();
    let outcome = run_with(transform, &sink, &event(4, 1), Mode::Ordered, None).await;
    assert_eq!(reported(&outcome), None);
    assert_eq!(sink.delivered(), ["0.0", "one", "two"]);

    // The same, as the plain values a transform returns: a record, or an `Option` of one.
    let transform = |r: UserRecord, _: RecordContext| async move {
        Ok::<_, Error>(match &r.data()[..] {
            b"0.0" => Some(UserRecord::plain("other", None, "zero".into())),
            b"1.0" => None,
            _ => Some(r),
        })
    };
    let sink = Scripted::new();
    let outcome = run_with(transform, &sink, &event(4, 1), Mode::Ordered, None).await;
    assert_eq!(reported(&outcome), None);
    assert_eq!(sink.delivered(), ["zero", "2.0", "3.0"]);
}

#[tokio::test(start_paused = true)]
async fn a_transform_failure_keeps_what_came_before_it_delivered() {
    // It yields on each user record, so that the driver takes each one as it comes.
    let transform = |r: UserRecord, _: RecordContext| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if &r.data()[..] == b"3.1" {
            Err("bad")
        } else {
            Ok(())
        }
    };
    for mode in [Mode::Ordered, Mode::Concurrent] {
        let sink = Scripted::new();
        let outcome = run_with(transform, &sink, &event(6, 2), mode, None).await;
        assert_eq!(reported(&outcome), Some(3), "{mode:?}");
        let delivered: BTreeSet<String> = sink.delivered().into_iter().collect();
        for i in 0..3 {
            for j in 0..2 {
                assert!(delivered.contains(&format!("{i}.{j}")), "{mode:?}");
            }
        }
        if mode == Mode::Ordered {
            // "3.0", accepted but still held when "3.1" failed, is not sent: Lambda delivers
            // record 3 again.
            assert!(!delivered.contains("3.0"));
            let stats = outcome.stats.sink.unwrap();
            assert_eq!(stats.undelivered_user_records, 1);
        }
    }
}

/// A small deterministic generator for the fault scripts.
fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    }
}

#[tokio::test(start_paused = true)]
async fn under_random_faults_the_report_is_the_first_record_with_an_undelivered_user_record() {
    let mut outcomes = [0; 2];
    for seed in 0..60u64 {
        let mut next = lcg(seed);
        let n = 3 + (next() % 10) as usize;
        let per = 1 + (next() % 4) as usize;
        // Per entry: throttled some attempts, maybe refused for good.
        let refuse: BTreeSet<String> = (0..n * per)
            .filter(|_| next().is_multiple_of(40))
            .map(|k| format!("{}.{}", k / per, k % per))
            .collect();
        let throttle: BTreeSet<String> = (0..n * per)
            .filter(|_| next().is_multiple_of(4))
            .map(|k| format!("{}.{}", k / per, k % per))
            .collect();
        let hopeless: BTreeSet<String> = throttle
            .iter()
            .filter(|_| next().is_multiple_of(8))
            .cloned()
            .collect();
        let request_throttled: BTreeSet<usize> =
            (0..40).filter(|_| next().is_multiple_of(5)).collect();
        let mode = if seed % 2 == 0 {
            Mode::Ordered
        } else {
            Mode::Concurrent
        };
        let ordered = seed % 4 < 2;
        let (r, t, h) = (refuse.clone(), throttle.clone(), hopeless.clone());
        let sink = Scripted::new()
            .entries(move |d, attempt| {
                let d = std::str::from_utf8(d).unwrap();
                if r.contains(d) {
                    Fate::Refuse
                } else if h.contains(d) || (t.contains(d) && attempt <= 2) {
                    Fate::Throttle
                } else {
                    Fate::Deliver
                }
            })
            .requests(move |k| {
                if request_throttled.contains(&k) {
                    RequestFate::Throttled
                } else {
                    RequestFate::Answer
                }
            });
        let sink = Scripted { ordered, ..sink };
        let outcome = run_with(accept, &sink, &event(n, per), mode, None).await;
        let delivered: BTreeSet<String> = sink.delivered().into_iter().collect();
        let first_lost =
            (0..n).find(|i| (0..per).any(|j| !delivered.contains(&format!("{i}.{j}"))));
        assert_eq!(
            reported(&outcome),
            first_lost,
            "seed {seed} ({mode:?}): refuse {refuse:?} hopeless {hopeless:?}"
        );
        outcomes[usize::from(first_lost.is_some())] += 1;
        if ordered {
            // Per partition key, first deliveries follow the batch's order.
            let keys = sink.delivered_keys.borrow();
            let mut last: std::collections::HashMap<&[u8], (usize, usize)> = Default::default();
            let mut seen = BTreeSet::new();
            for (key, data) in keys.iter().zip(sink.delivered.borrow().iter()) {
                let text = std::str::from_utf8(data).unwrap();
                if !seen.insert(text.to_string()) {
                    continue;
                }
                let (i, j) = text.split_once('.').unwrap();
                let at = (i.parse().unwrap(), j.parse().unwrap());
                if let Some(before) = last.insert(key, at) {
                    assert!(
                        before < at,
                        "seed {seed}: {text} after {before:?} for one key"
                    );
                }
            }
        }
        // Nothing was refused and reported without a reason.
        if let Some(f) = &outcome.failure {
            assert!(
                matches!(f.reason, StopReason::Undelivered { .. }),
                "seed {seed}: {:?}",
                f.reason
            );
        }
    }
    // Both kinds of batch were tried.
    assert!(outcomes[0] >= 10 && outcomes[1] >= 10, "{outcomes:?}");
}

#[tokio::test(start_paused = true)]
async fn the_metrics_document_counts_what_the_sink_did() {
    // 6 user records of 3 bytes; "1.0" throttled once, "4.0" refused: records 0..4 delivered.
    let sink = Scripted::new().entries(|d, attempt| match d {
        b"1.0" if attempt == 1 => Fate::Throttle,
        b"4.0" => Fate::Refuse,
        _ => Fate::Deliver,
    });
    let outcome = run_with(accept, &sink, &event(6, 1), Mode::Ordered, None).await;
    assert_eq!(reported(&outcome), Some(4));
    let doc = common::metrics_document(&outcome);
    let listed: Vec<&str> = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Name"].as_str().unwrap())
        .collect();
    // Requests of 4: [0,1,2,3] (1 throttled), then [1,4,5]; 5 was delivered in the request
    // that refused 4, and Lambda will deliver it again with record 4.
    for (name, value) in [
        ("SinkDeliveredUserRecords", 5.0),
        ("SinkDeliveredBytes", 15.0),
        ("SinkRequests", 2.0),
        ("SinkRetriedEntries", 1.0),
        ("SinkThrottledEntries", 1.0),
        ("SinkUndeliveredUserRecords", 1.0),
    ] {
        assert_eq!(doc[name], value, "{name}");
        assert!(listed.contains(&name), "{name}");
    }
    // Without a sink, no sink metrics.
    let plain = Processor::new(accept, Settings::default())
        .handle(&event(2, 1), None)
        .await
        .unwrap();
    let doc = common::metrics_document(&plain);
    assert!(doc.get("SinkRequests").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_response_that_does_not_answer_every_entry_fails_the_request_which_is_sent_again() {
    let sink = Scripted::new().requests(|n| match n {
        0 => RequestFate::Short,
        _ => RequestFate::Answer,
    });
    let outcome = run_with(accept, &sink, &event(6, 1), Mode::Ordered, None).await;
    assert_eq!(reported(&outcome), None);
    // The three answered in the short response are delivered twice: at least once.
    let delivered: BTreeSet<String> = sink.delivered().into_iter().collect();
    assert_eq!(delivered.len(), 6);
    assert_eq!(*sink.requests.borrow(), [4, 4, 2]);
    assert_eq!(outcome.stats.sink.unwrap().retried_entries, 4);
}

#[tokio::test(start_paused = true)]
async fn an_entry_over_the_destinations_limit_is_undelivered_and_one_at_it_is_sent() {
    let transform = |r: UserRecord, _: RecordContext| async move {
        Ok::<_, Error>(match &r.data()[..] {
            b"1.0" => Output::Data("12345".into()),
            b"2.0" => Output::Data("123456".into()),
            _ => Output::Same,
        })
    };
    let mut sink = Scripted::new();
    sink.limits.max_entry_bytes = 5;
    let outcome = run_with(transform, &sink, &event(3, 1), Mode::Ordered, None).await;
    assert_eq!(sink.delivered(), ["0.0", "12345"]);
    assert_eq!(reported(&outcome), Some(2));
    let reason = outcome.failure.unwrap().reason.to_string();
    assert!(
        reason.contains("over the destination's limit of 5"),
        "{reason}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_entry_the_destination_asks_for_again_is_sent_again() {
    let sink = Scripted::new().entries(|d, attempt| match d {
        b"1.0" if attempt == 1 => Fate::Resend,
        _ => Fate::Deliver,
    });
    let outcome = run_with(accept, &sink, &event(3, 1), Mode::Ordered, None).await;
    assert_eq!(reported(&outcome), None);
    assert_eq!(sink.delivered(), ["0.0", "2.0", "1.0"]);
    let stats = outcome.stats.sink.unwrap();
    assert_eq!((stats.retried_entries, stats.requests), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn giving_up_names_the_last_refusal_of_the_first_undelivered_entry() {
    // "0.0" is throttled, "1.0" only ever asked for again, until the deadline.
    let sink = Scripted::new().entries(|d, _| match d {
        b"0.0" => Fate::Throttle,
        b"1.0" => Fate::Resend,
        _ => Fate::Deliver,
    });
    let mut settings = Settings {
        metrics: kinesis_deagg::settings::Switch::Off,
        ..Settings::default()
    };
    // More attempts than the deadline leaves time for.
    settings.sink.max_attempts = 1_000;
    let deadline = tokio::time::Instant::now().into_std() + Duration::from_secs(10);
    let outcome = Processor::with_sink(accept, &sink, settings)
        .handle(&event(2, 1), Some(deadline))
        .await
        .unwrap();
    assert_eq!(reported(&outcome), Some(0));
    let reason = outcome.failure.unwrap().reason.to_string();
    assert!(
        reason.ends_with("(last refused: ProvisionedThroughputExceededException)"),
        "{reason}"
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_sent_after_the_stop_time() {
    // The deadline 10 s away: the stop time is one margin (1 s) before it, and the first
    // request is answered exactly then (within its 10 s timeout).
    let sink = Scripted::new().requests(|n| match n {
        0 => RequestFate::Late(Duration::from_secs(9)),
        _ => RequestFate::Answer,
    });
    let deadline = Some(Duration::from_secs(10));
    let outcome = run_with(accept, &sink, &event(8, 1), Mode::Ordered, deadline).await;
    assert_eq!(*sink.requests.borrow(), [4]);
    assert_eq!(sink.delivered().len(), 4);
    assert_eq!(reported(&outcome), Some(4));
    let reason = outcome.failure.unwrap().reason.to_string();
    assert!(reason.contains("before it was sent"), "{reason}");
}

/// `Scripted`, with a packer that fails as `fates` say, one after another, then works.
struct Unready<'a> {
    inner: &'a Scripted,
    fates: RefCell<std::collections::VecDeque<SendErrorKind>>,
    packers: std::cell::Cell<usize>,
}

impl<'a> Unready<'a> {
    fn new(inner: &'a Scripted, fates: &[SendErrorKind]) -> Self {
        Unready {
            inner,
            fates: RefCell::new(fates.iter().copied().collect()),
            packers: Default::default(),
        }
    }
}

/// One entry per user record, as the default packer makes them.
struct OneEach<'a>(&'a Scripted);

impl Pack<Entry> for OneEach<'_> {
    fn add(
        &mut self,
        record: UserRecord,
        context: &RecordContext,
        ready: &mut Vec<Staged<Entry>>,
    ) -> Result<(), Error> {
        ready.push(Staged {
            entry: Sink::entry(&self.0, record, context)?,
            first: Position::of(context),
            user_records: 1,
        });
        Ok(())
    }
}

impl Sink for &Unready<'_> {
    type Entry = Entry;

    fn limits(&self) -> Limits {
        self.inner.limits
    }

    fn entry(&self, record: UserRecord, context: &RecordContext) -> Result<Entry, Error> {
        Sink::entry(&self.inner, record, context)
    }

    fn size(&self, entry: &Entry) -> usize {
        Sink::size(&self.inner, entry)
    }

    async fn send(&self, entries: &[Entry]) -> Result<Vec<EntryOutcome>, SendError> {
        Sink::send(&self.inner, entries).await
    }

    async fn packer(&self) -> Result<Box<dyn Pack<Entry> + '_>, SendError> {
        self.packers.set(self.packers.get() + 1);
        match self.fates.borrow_mut().pop_front() {
            Some(kind) => Err(SendError::new(kind, "not ready")),
            None => Ok(Box::new(OneEach(self.inner))),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_cannot_start_is_retried_if_transient_and_given_up_if_not() {
    use SendErrorKind::{Permanent, Throttled};
    let settings = Settings {
        metrics: kinesis_deagg::settings::Switch::Off,
        ..Settings::default()
    };
    let attempts = settings.sink.max_attempts as usize;
    // Fails twice, then starts: everything is delivered, after two back-offs.
    // Fails for good at once, or transiently every time: the first record is reported.
    for (fates, packers, delivered) in [
        (vec![Throttled; 2], 3, true),
        (vec![Permanent], 1, false),
        (vec![Throttled; 100], attempts, false),
    ] {
        let scripted = Scripted::new();
        let sink = Unready::new(&scripted, &fates);
        let started = tokio::time::Instant::now();
        let deadline = Some(started.into_std() + Duration::from_secs(600));
        let outcome = Processor::with_sink(accept, &sink, settings.clone())
            .handle(&event(3, 1), deadline)
            .await
            .unwrap();
        assert_eq!(sink.packers.get(), packers, "{fates:?}");
        if delivered {
            assert_eq!(reported(&outcome), None);
            assert_eq!(scripted.delivered(), ["0.0", "1.0", "2.0"]);
            assert!(started.elapsed() > Duration::ZERO);
        } else {
            assert_eq!(reported(&outcome), Some(0), "{fates:?}");
            let reason = outcome.failure.unwrap().reason.to_string();
            assert!(reason.contains("could not start"), "{reason}");
        }
    }
}
