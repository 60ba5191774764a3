//! One batch, as Lambda delivers it: unpack each record, apply the corrupt-input policy, run
//! the transform on every user record in order, watch the deadline, and decide the one
//! sequence number to report.
//!
//! Lambda checkpoints at the **lowest** reported sequence number and retries every record
//! from there on, and only outer sequence numbers can be reported. So the outcome of a batch
//! is at most one sequence number: that of the first Kinesis record not fully processed.
//! Processing anything after it only creates duplicates, so both modes stop there.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use bytestring::ByteString;
use futures::FutureExt;

use crate::event::{EventRecord, TumblingWindow};
use crate::kpl::{DeaggError, Deaggregated, UserRecord, UserRecords, Verifier, deaggregate_with};
use crate::lookahead::{self, Keyed, Lookahead};
use crate::settings::Settings;
use crate::sink::outbox::{Driver, Outbox, Report};
use crate::sink::{NoSink, Position, Sink, SinkStats};
use crate::transform::{Batch, Output, RecordContext, Transform};
use crate::window::{State, WindowStats};

/// What happens to a record whose base64 is invalid or whose aggregate is corrupt
/// (`DEAGG_ON_CORRUPT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnCorrupt {
    /// Report it as a batch item failure: Lambda retries it until it expires or goes to the
    /// on-failure destination. Nothing is lost, but the shard waits.
    Fail,
    /// Deliver it to the transform as one raw record (the KCL's behaviour), with
    /// `RecordContext::passed_through` set.
    Passthrough,
    /// Log it, count it and acknowledge it. Its data is lost on purpose.
    Skip,
}

impl std::fmt::Display for OnCorrupt {
    /// The setting's value, as `DEAGG_ON_CORRUPT` takes it (`fail`, `passthrough`, `skip`).
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            OnCorrupt::Fail => "fail",
            OnCorrupt::Passthrough => "passthrough",
            OnCorrupt::Skip => "skip",
        })
    }
}

/// How user records are scheduled (`DEAGG_MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One at a time, in order; stop at the first failure.
    Ordered,
    /// Partition keys side by side (at most `DEAGG_CONCURRENCY` at once), in order within a
    /// key; records after the lowest failure are not started.
    Concurrent,
}

/// A problem with one Kinesis record, naming its sequence number.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("record {sequence_number}: {kind}")]
pub struct RecordError {
    /// The Kinesis record concerned.
    pub sequence_number: ByteString,
    /// What went wrong.
    pub kind: RecordErrorKind,
}

/// What went wrong with a record.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordErrorKind {
    /// The `data` field is absent, not a string, or not base64.
    #[error("{0}")]
    Data(String),
    /// The aggregate's checksum is right but its contents are not a valid aggregate.
    #[error("corrupt KPL aggregate: {0}")]
    Aggregate(#[from] DeaggError),
}

/// How one Kinesis record unpacked.
#[derive(Clone, Debug, PartialEq)]
pub enum RecordOutcome {
    /// Not an aggregate: one user record.
    Plain,
    /// A KPL aggregate with at least one user record.
    Aggregated,
    /// A valid KPL aggregate holding no user record.
    EmptyAggregate,
    /// The magic but a wrong MD5: delivered raw, as one user record.
    ChecksumMismatch,
    /// Invalid base64 or a corrupt aggregate, and what the policy made of it.
    Corrupt(RecordError, OnCorrupt),
}

/// One Kinesis record split into what the transform will see.
#[derive(Clone, Debug)]
pub struct Unpacked {
    /// The user records to deliver, in order (empty for an empty aggregate, or a corrupt
    /// record that is failed or skipped).
    pub user_records: UserRecords,
    /// How the record unpacked.
    pub outcome: RecordOutcome,
    /// Length of the record's data after base64 decoding (0 when it did not decode).
    pub decoded_len: usize,
}

/// Decodes and deaggregates one record and applies the corrupt-input policy, logging one
/// line for anything unusual.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::batch::{unpack, RecordOutcome};
/// use kinesis_deagg::event::KinesisEvent;
/// use kinesis_deagg::Settings;
/// let event = KinesisEvent::from_slice(br#"{"Records":[{"kinesis":{"sequenceNumber":"1","data":"%%"}}]}"#).unwrap();
/// let unpacked = unpack(&event.records[0], &Settings::default());
/// assert!(matches!(unpacked.outcome, RecordOutcome::Corrupt(..)));
/// assert!(unpacked.user_records.is_empty());
/// ```
pub fn unpack(record: &EventRecord, settings: &Settings) -> Unpacked {
    let data = record.data.clone().unwrap_or_default();
    unpack_from(
        record,
        deaggregate_with(data, settings.verify_checksum),
        settings,
    )
}

/// [`unpack`], given what deaggregation made of the record's data (which is ignored when the
/// data did not decode).
fn unpack_from(
    record: &EventRecord,
    deaggregated: Result<Deaggregated, DeaggError>,
    settings: &Settings,
) -> Unpacked {
    let seq = &record.sequence_number;
    let corrupt = |kind: RecordErrorKind, raw: bytes::Bytes, decoded_len| {
        let error = RecordError {
            sequence_number: seq.clone(),
            kind,
        };
        let action = settings.on_corrupt;
        tracing::error!(sequence_number = %seq, action = %action, "{error}");
        let user_records = match action {
            OnCorrupt::Passthrough => UserRecords::one(UserRecord::plain_shared(
                Arc::from(&*record.partition_key),
                raw,
            )),
            OnCorrupt::Fail | OnCorrupt::Skip => UserRecords::none(),
        };
        Unpacked {
            user_records,
            outcome: RecordOutcome::Corrupt(error, action),
            decoded_len,
        }
    };
    let data = match &record.data {
        Ok(data) => data,
        // Passed through raw means the text as it came, since there are no decoded bytes.
        Err(bad) => {
            return corrupt(
                RecordErrorKind::Data(bad.message.clone()),
                bad.raw.clone(),
                0,
            );
        }
    };
    let decoded_len = data.len();
    let plain = |data, outcome| Unpacked {
        user_records: UserRecords::one(UserRecord::plain_shared(
            Arc::from(&*record.partition_key),
            data,
        )),
        outcome,
        decoded_len,
    };
    match deaggregated {
        Ok(Deaggregated::Plain(data)) => plain(data, RecordOutcome::Plain),
        Ok(Deaggregated::ChecksumMismatch(data)) => {
            tracing::warn!(
                sequence_number = %seq,
                "record {seq}: starts with the KPL magic but its MD5 does not match; delivered as one plain record"
            );
            plain(data, RecordOutcome::ChecksumMismatch)
        }
        Ok(Deaggregated::Aggregated(users)) if users.is_empty() => {
            tracing::warn!(sequence_number = %seq, "record {seq}: KPL aggregate holds no user record");
            Unpacked {
                user_records: users,
                outcome: RecordOutcome::EmptyAggregate,
                decoded_len,
            }
        }
        Ok(Deaggregated::Aggregated(users)) => Unpacked {
            user_records: users,
            outcome: RecordOutcome::Aggregated,
            decoded_len,
        },
        Err(e) => corrupt(e.into(), data.clone(), decoded_len),
    }
}

/// Counts of what one batch held and what became of it.
///
/// Processing stops at the first Kinesis record that will be reported, and what comes after
/// it is delivered again, so it is not unpacked: the counts of user records and of kinds of
/// records cover the records reached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStats {
    /// Kinesis records in the event.
    pub kinesis_records: u64,
    /// Of those, valid KPL aggregates (empty ones included).
    pub aggregated_records: u64,
    /// Decoded bytes of all Kinesis records (reached or not).
    pub bytes: u64,
    /// User records found in the batch (a passed-through record counts as one).
    pub user_records: u64,
    /// User records the transform accepted.
    pub succeeded: u64,
    /// User records the transform failed (an error or a panic).
    pub failed: u64,
    /// Corrupt records reported as failures (`fail`).
    pub corrupt_failed: u64,
    /// Corrupt records delivered raw (`passthrough`).
    pub corrupt_passed_through: u64,
    /// Corrupt records acknowledged without processing (`skip`).
    pub corrupt_skipped: u64,
    /// Records with the magic but a wrong MD5, delivered raw.
    pub checksum_mismatches: u64,
    /// Valid aggregates with no user record.
    pub empty_aggregates: u64,
    /// User records with a key that was not valid UTF-8.
    pub lossy_keys: u64,
    /// The oldest `approximateArrivalTimestamp` of the batch (reached or not).
    pub oldest_arrival: Option<SystemTime>,
    /// What the sink did, when there is one.
    pub sink: Option<SinkStats>,
    /// What the window step did, for a window event.
    pub window: Option<WindowStats>,
}

/// Why a batch stopped before its end.
#[derive(Clone, Debug, PartialEq)]
pub enum StopReason {
    /// A corrupt record under `DEAGG_ON_CORRUPT=fail`.
    Corrupt(RecordError),
    /// The transform returned an error for a user record.
    TransformError {
        /// The user record's sub-sequence number (`None` when not aggregated).
        sub_sequence_number: Option<u64>,
        /// The error's text.
        message: String,
    },
    /// The transform panicked on a user record.
    TransformPanic {
        /// The user record's sub-sequence number.
        sub_sequence_number: Option<u64>,
        /// The panic message.
        message: String,
    },
    /// Too little time was left.
    Deadline,
    /// The sink could not deliver a user record (or an entry holding it).
    Undelivered {
        /// The first undelivered user record's sub-sequence number.
        sub_sequence_number: Option<u64>,
        /// Why, as logged.
        message: String,
    },
}

impl std::fmt::Display for StopReason {
    /// A sentence for the log: `transform failed on user record 3: <its error>`.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            StopReason::Corrupt(e) => write!(f, "corrupt record: {}", e.kind),
            StopReason::TransformError {
                sub_sequence_number,
                message,
            }
            | StopReason::TransformPanic {
                sub_sequence_number,
                message,
            } => {
                let failed = match self {
                    StopReason::TransformPanic { .. } => "transform panicked",
                    _ => "transform failed",
                };
                f.write_str(failed)?;
                if let Some(sub) = sub_sequence_number {
                    write!(f, " on user record {sub}")?;
                }
                write!(f, ": {message}")
            }
            StopReason::Deadline => f.write_str("deadline margin reached"),
            StopReason::Undelivered {
                sub_sequence_number,
                message,
            } => {
                f.write_str("not delivered by the sink")?;
                if let Some(sub) = sub_sequence_number {
                    write!(f, " (user record {sub})")?;
                }
                write!(f, ": {message}")
            }
        }
    }
}

/// The first Kinesis record not fully processed, which is what Lambda is told.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// Its sequence number.
    pub sequence_number: ByteString,
    /// Its position in the batch (0-based).
    pub index: usize,
    /// Why processing stopped there.
    pub reason: StopReason,
}

/// The result of a batch: at most one failure to report, and counts.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchOutcome {
    /// The record Lambda should retry from, if any.
    pub failure: Option<Failure>,
    /// What the batch held.
    pub stats: BatchStats,
    /// The counters transforms added through [`RecordContext::metrics`].
    pub metrics: BTreeMap<String, f64>,
    /// The state to answer, for a tumbling-window event (see [`crate::window`]).
    pub state: Option<State>,
}

impl BatchOutcome {
    /// Kinesis records Lambda will deliver again: the reported one and every one after it.
    pub fn retried_records(&self) -> u64 {
        self.failure
            .as_ref()
            .map_or(0, |f| self.stats.kinesis_records - f.index as u64)
    }

    /// The partial batch response: `{"batchItemFailures":[]}` on success, else exactly one
    /// item naming the first record not fully processed. Never an empty identifier. For a
    /// window event, with the `state`.
    pub fn response(&self) -> Response {
        let mut response = KinesisEventResponse::default();
        if let Some(f) = &self.failure {
            response.add_failure(f.sequence_number.to_string());
        }
        Response {
            batch_item_failures: response.batch_item_failures,
            state: self.state.clone(),
        }
    }
}

/// What the function answers Lambda: `{"batchItemFailures":[...]}`, plus `"state"` for a
/// tumbling-window event (Lambda's `TimeWindowEventResponse`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Response {
    /// At most one: the first record not fully processed.
    pub batch_item_failures: Vec<KinesisBatchItemFailure>,
    /// The window's state, for a window event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
}

/// One user record waiting for the transform, with the index of its Kinesis record.
struct Item {
    index: usize,
    record: UserRecord,
    context: RecordContext,
}

/// Shared state of the lanes: the lowest index that will be reported, and why.
struct Floor {
    index: Cell<usize>,
    reason: Cell<Option<StopReason>>,
}

impl Floor {
    fn lower(&self, index: usize, reason: StopReason) {
        if index < self.index.get() {
            self.index.set(index);
            self.reason.set(Some(reason));
        }
    }
}

/// The most of the time left that the deadline margin may take: a margin configured at or
/// above the time left would otherwise stop every retry before its first record.
const MARGIN_MAX_SHARE: u32 = 2;

/// When to stop for `deadline`: `margin` before it, but never more than half of the time
/// left ([`MARGIN_MAX_SHARE`]), so that every invocation with time left makes progress.
fn stop_time(deadline: Instant, margin: Duration) -> Instant {
    // tokio's clock, as the checks against the stop time use (tests pause it).
    let left = deadline.saturating_duration_since(tokio::time::Instant::now().into_std());
    let most = left / MARGIN_MAX_SHARE;
    if margin <= most {
        return deadline - margin;
    }
    tracing::warn!(
        margin_ms = margin.as_millis() as u64,
        left_ms = left.as_millis() as u64,
        "the deadline margin is more than half the time left; stopping {} ms before the deadline instead",
        most.as_millis()
    );
    deadline - most
}

/// Processes one batch: see the module docs for the rules.
///
/// `deadline` is when Lambda will stop the invocation; processing stops
/// [`Settings::deadline_margin`] before it. The future is not `Send`: the concurrent mode
/// interleaves transform calls on the current task rather than spawning. The transform's
/// contexts share a copy of `records` (reference counts, not data);
/// [`Processor::handle_body`](crate::Processor::handle_body) gives them its own instead.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::{batch, event::KinesisEvent, Settings};
/// use kinesis_deagg::kpl::UserRecord;
/// use kinesis_deagg::transform::RecordContext;
///
/// let event = KinesisEvent::from_slice(br#"{"Records":[
///   {"kinesis":{"sequenceNumber":"1","partitionKey":"k","data":"b2s="}},
///   {"kinesis":{"sequenceNumber":"2","partitionKey":"k","data":"YmFk"}},
///   {"kinesis":{"sequenceNumber":"3","partitionKey":"k","data":"b2s="}}]}"#).unwrap();
/// let transform = |r: UserRecord, _: RecordContext| async move {
///     if &r.data()[..] == b"bad" { Err("bad record") } else { Ok(()) }
/// };
/// let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
/// let outcome = rt.block_on(batch::process(&event.records, &transform, &Settings::default(), None));
/// assert_eq!(serde_json::to_string(&outcome.response()).unwrap(),
///            r#"{"batchItemFailures":[{"itemIdentifier":"2"}]}"#);
/// ```
pub async fn process<T: Transform>(
    records: &[EventRecord],
    transform: &T,
    settings: &Settings,
    deadline: Option<Instant>,
) -> BatchOutcome {
    let batch = Batch::new(records.to_vec());
    let (outcome, _) = process_verified(
        &batch,
        Verifier::default(),
        transform,
        None::<&NoSink>,
        settings,
        deadline,
        false,
    )
    .await;
    outcome
}

/// [`process`] on a batch the contexts share, with the checks `verifier` has under way (see
/// [`Verifier`]), delivering what the transform accepts to `sink` when there is one. With
/// `keep`, it also gives the user records of each Kinesis record reached (for a window to
/// fold; shared, not copied).
pub(crate) async fn process_verified<T: Transform, S: Sink>(
    batch: &Arc<Batch>,
    verifier: Verifier,
    transform: &T,
    sink: Option<&S>,
    settings: &Settings,
    deadline: Option<Instant>,
    keep: bool,
) -> (BatchOutcome, Vec<UserRecords>) {
    let mut kept = Vec::new();
    let records = &batch.records[..];
    // Counted for every record, reached or not: the rest only for the records reached.
    let mut stats = BatchStats {
        kinesis_records: records.len() as u64,
        bytes: records
            .iter()
            .map(|r| r.data.as_ref().map_or(0, |d| d.len()) as u64)
            .sum(),
        oldest_arrival: records.iter().filter_map(|r| r.approximate_arrival).min(),
        ..Default::default()
    };
    let floor = Floor {
        index: Cell::new(records.len()),
        reason: Cell::new(None),
    };
    let data: Vec<bytes::Bytes> = records
        .iter()
        .map(|r| r.data.clone().unwrap_or_default())
        .collect();
    // Each aggregate is split when its turn comes, or ahead of it while a second core computes
    // its MD5 (the concurrent mode then gathers all user records into its lanes).
    let deaggregated = verifier.deaggregate_each(&data, settings.verify_checksum);
    let mut unpacked =
        records
            .iter()
            .enumerate()
            .zip(deaggregated)
            .map(|((index, record), deaggregated)| {
                let u = unpack_from(record, deaggregated, settings);
                if keep {
                    kept.push(u.user_records.clone());
                }
                let passed_through = tally(&mut stats, &floor, index, &u);
                (index, u, passed_through)
            });
    // Contexts are made as records are reached, not all up front.
    let to_items = |(index, u, passed_through): (usize, Unpacked, Option<Arc<str>>)| {
        if let Some(why) = passed_through {
            // Reached once: never set before.
            let _ = batch.passed_through[index].set(why);
        }
        u.user_records.map(move |user| Item {
            index,
            context: RecordContext::of(batch, index, user.sub_sequence_number()),
            record: user,
        })
    };

    let stop_at = deadline.map(|d| stop_time(d, settings.deadline_margin()));
    // With a sink, the transform stops a second margin earlier, leaving the sink one margin
    // to deliver what it holds.
    let lanes_stop = match (sink, stop_at, deadline) {
        (Some(_), Some(t), Some(d)) => Some(t.checked_sub(d - t).unwrap_or(t)),
        _ => stop_at,
    };
    let (outbox, receiver) = match sink {
        Some(s) => {
            let (outbox, receiver) = Outbox::new(s.limits());
            (Some(outbox), Some(receiver))
        }
        None => (None, None),
    };
    let run = Run {
        transform,
        records,
        floor: &floor,
        stop_at: lanes_stop,
        outbox: outbox.as_ref(),
        succeeded: Cell::new(0),
        failed: Cell::new(0),
    };
    let lanes = async {
        match settings.mode {
            Mode::Ordered => run.lane(unpacked.by_ref().flat_map(to_items)).await,
            Mode::Concurrent => {
                let workers = usize::from(settings.concurrency);
                let span = (workers * LOOKAHEAD_PER_WORKER).clamp(LOOKAHEAD_MIN, LOOKAHEAD_MAX);
                let items = Lookahead::new(unpacked.by_ref().flat_map(to_items), span, workers);
                let keep = |item: &Item| item.index < floor.index.get();
                lookahead::run_all(items, workers, keep, |item| run.one(item)).await
            }
        }
        if let Some(outbox) = run.outbox {
            outbox.close();
        }
    };
    let sink_stats = match (sink, &outbox, receiver) {
        (Some(sink), Some(outbox), Some(receiver)) => {
            let report = FloorReport(&floor);
            let driver = Driver::new(sink, settings.sink.policy(), stop_at, outbox, receiver);
            let ((), sink_stats) = futures::join!(lanes, driver.run(&report));
            Some(sink_stats)
        }
        _ => {
            lanes.await;
            None
        }
    };
    // What was not reached is left alone: it will be delivered again.
    drop(unpacked);
    stats.sink = sink_stats;
    stats.succeeded = run.succeeded.get();
    stats.failed = run.failed.get();
    let index = floor.index.get();
    let failure = records.get(index).map(|r| Failure {
        sequence_number: r.sequence_number.clone(),
        index,
        reason: floor
            .reason
            .take()
            .expect("the floor only moves below the batch's end together with a reason"),
    });
    if let Some(f) = &failure {
        tracing::warn!(
            sequence_number = %f.sequence_number,
            reason = %f.reason,
            "reporting record {} as the batch item failure; Lambda retries from it",
            f.sequence_number
        );
    }
    let outcome = BatchOutcome {
        failure,
        stats,
        metrics: batch.metrics.snapshot(),
        state: None,
    };
    (outcome, kept)
}

/// Counts one unpacked record in `stats` (lowering the floor for a corrupt record that fails
/// the batch) and says why it is passed through, if it is.
fn tally(stats: &mut BatchStats, floor: &Floor, index: usize, u: &Unpacked) -> Option<Arc<str>> {
    stats.user_records += u.user_records.len() as u64;
    stats.lossy_keys += u.user_records.lossy_keys() as u64;
    match &u.outcome {
        RecordOutcome::Plain => None,
        RecordOutcome::Aggregated => {
            stats.aggregated_records += 1;
            None
        }
        RecordOutcome::EmptyAggregate => {
            stats.aggregated_records += 1;
            stats.empty_aggregates += 1;
            None
        }
        RecordOutcome::ChecksumMismatch => {
            stats.checksum_mismatches += 1;
            Some("KPL magic with a wrong MD5".into())
        }
        RecordOutcome::Corrupt(error, action) => {
            match action {
                OnCorrupt::Fail => {
                    stats.corrupt_failed += 1;
                    floor.lower(index, StopReason::Corrupt(error.clone()));
                }
                OnCorrupt::Passthrough => stats.corrupt_passed_through += 1,
                OnCorrupt::Skip => stats.corrupt_skipped += 1,
            }
            Some(error.kind.to_string().into())
        }
    }
}

/// The sink's view of the floor.
struct FloorReport<'a>(&'a Floor);

impl Report for FloorReport<'_> {
    fn floor(&self) -> usize {
        self.0.index.get()
    }

    fn undelivered(&self, first: Position, message: String) {
        self.0.lower(
            first.index,
            StopReason::Undelivered {
                sub_sequence_number: first.sub_sequence_number,
                message,
            },
        );
    }
}

/// Delivers what a window's `close` emitted (see [`crate::window::WindowEnd::emit`]) to
/// `sink` before the stop time: what the sink did, and whether all of it was delivered (or the
/// first reason one was not).
///
/// Each record hangs off a made-up Kinesis record, `window:<shard>:<start>:<MD5 of its keys
/// and data>`, so that its idempotency key names its content: the same on a retry, whatever
/// the order of emission, and different for the different results of one window.
pub(crate) async fn deliver_emitted<S: Sink>(
    sink: &S,
    emitted: Vec<UserRecord>,
    window: &TumblingWindow,
    settings: &Settings,
    deadline: Option<Instant>,
) -> (SinkStats, Result<u64, String>) {
    let shard = window.shard_id.as_deref().unwrap_or("unknown");
    let key = |record: &UserRecord| {
        use md5::{Digest, Md5};
        let mut md5 = Md5::new();
        for part in [
            record.partition_key().as_bytes(),
            record.explicit_hash_key().unwrap_or_default().as_bytes(),
        ] {
            md5.update((part.len() as u64).to_le_bytes());
            md5.update(part);
        }
        md5.update(record.data());
        let hex: String = md5.finalize().iter().map(|b| format!("{b:02x}")).collect();
        format!("window:{shard}:{}:{hex}", window.start)
    };
    let batch = Batch::new(
        emitted
            .iter()
            .map(|record| EventRecord {
                sequence_number: key(record).into(),
                partition_key: ByteString::new(),
                data: Ok(bytes::Bytes::new()),
                approximate_arrival: None,
                shard_id: window.shard_id.as_deref().map(Arc::from),
                event_source_arn: window.event_source_arn.as_deref().map(Arc::from),
            })
            .collect(),
    );
    let count = emitted.len();
    let (outbox, receiver) = Outbox::new(sink.limits());
    for (index, record) in emitted.into_iter().enumerate() {
        outbox.push(record, RecordContext::of(&batch, index, None));
    }
    outbox.close();
    let stop_at = deadline.map(|d| stop_time(d, settings.deadline_margin()));
    let floor = Floor {
        index: Cell::new(count),
        reason: Cell::new(None),
    };
    let stats = Driver::new(sink, settings.sink.policy(), stop_at, &outbox, receiver)
        .run(&FloorReport(&floor))
        .await;
    let delivered = match floor.reason.take() {
        None => Ok(count as u64),
        Some(reason) => Err(format!(
            "{}: {reason}",
            batch.records[floor.index.get()].sequence_number
        )),
    };
    (stats, delivered)
}

/// What the lanes of one batch share.
struct Run<'a, T> {
    transform: &'a T,
    records: &'a [EventRecord],
    floor: &'a Floor,
    stop_at: Option<Instant>,
    /// Where accepted user records go, when there is a sink.
    outbox: Option<&'a Outbox>,
    succeeded: Cell<u64>,
    failed: Cell<u64>,
}

impl<T: Transform> Run<'_, T> {
    /// Runs the transform on `items` in order, until one fails or the floor is reached.
    async fn lane(&self, items: impl Iterator<Item = Item>) {
        for item in items {
            if item.index >= self.floor.index.get() || !self.one(item).await {
                break;
            }
            if self.outbox.is_some_and(Outbox::request_waiting) {
                // Let the sink's driver start sending it.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Runs the transform on one item, lowering the floor if it fails; true if it succeeded.
    async fn one(&self, item: Item) -> bool {
        let seq = &self.records[item.index].sequence_number;
        // The sink needs the record after the transform has taken it (two reference counts).
        let kept = self
            .outbox
            .map(|_| (item.record.clone(), item.context.clone()));
        match call(self.transform, item.record, item.context, seq, self.stop_at).await {
            Ok(output) => {
                self.succeeded.set(self.succeeded.get() + 1);
                let (Some(outbox), Some((record, context))) = (self.outbox, kept) else {
                    return true;
                };
                let record = match output {
                    Output::Same => record,
                    Output::Data(data) => record.with_data(data),
                    Output::Record(other) => other,
                    Output::Drop => return true,
                };
                let at = Position::of(&context);
                if !outbox.push(record, context) {
                    FloorReport(self.floor).undelivered(at, "the sink had stopped".into());
                    return false;
                }
                true
            }
            Err(reason) => {
                if reason != StopReason::Deadline {
                    self.failed.set(self.failed.get() + 1);
                }
                self.floor.lower(item.index, reason);
                false
            }
        }
    }
}

impl Keyed for Item {
    fn key(&self) -> &[u8] {
        self.record.partition_key().as_bytes()
    }
}

/// The concurrent mode looks this many user records ahead per worker (see [`lookahead`]),
/// within these bounds.
const LOOKAHEAD_PER_WORKER: usize = 32;
const LOOKAHEAD_MIN: usize = 256;
const LOOKAHEAD_MAX: usize = 16_384;

/// Runs the transform on one user record, turning an error, a panic or the deadline into the
/// reason to stop, and logging it.
async fn call<T: Transform>(
    transform: &T,
    record: UserRecord,
    context: RecordContext,
    seq: &str,
    stop_at: Option<Instant>,
) -> Result<Output, StopReason> {
    let sub = context.sub_sequence_number();
    // tokio's clock (the same as std's, unless a test pauses it).
    if stop_at.is_some_and(|t| tokio::time::Instant::now() >= t.into()) {
        tracing::warn!(sequence_number = %seq, sub_sequence_number = sub, "deadline margin reached before record {seq}; stopping");
        return Err(StopReason::Deadline);
    }
    let mut run = std::pin::pin!(AssertUnwindSafe(transform.call(record, context)).catch_unwind());
    // Most transforms finish on their first poll; only one that waits races the deadline,
    // which saves setting a timer per user record.
    let result = match (futures::poll!(&mut run), stop_at) {
        (Poll::Ready(result), _) => result,
        (Poll::Pending, None) => run.await,
        (Poll::Pending, Some(t)) => match tokio::time::timeout_at(t.into(), run).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(sequence_number = %seq, sub_sequence_number = sub, "deadline margin reached while the transform ran on record {seq}; abandoning it");
                return Err(StopReason::Deadline);
            }
        },
    };
    match result {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => {
            tracing::error!(sequence_number = %seq, sub_sequence_number = sub, "record {seq}: transform failed: {e}");
            Err(StopReason::TransformError {
                sub_sequence_number: sub,
                message: e.to_string(),
            })
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            tracing::error!(sequence_number = %seq, sub_sequence_number = sub, "record {seq}: transform panicked: {message}");
            Err(StopReason::TransformPanic {
                sub_sequence_number: sub,
                message,
            })
        }
    }
}
