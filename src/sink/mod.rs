//! Delivering user records onward: the [`Sink`] trait, and the built-in sinks.
//!
//! A sink receives, in order, what the transform made of each user record it accepted (see
//! [`Output`](crate::transform::Output)), and sends it in requests sized to its API's
//! limits: when a request is full, at the end of the batch, and before the deadline. The
//! library learns the outcome of every entry, sends again only the entries that failed, with
//! exponential back-off and full jitter, within the invocation's deadline, and reports to
//! Lambda **the first Kinesis record with an undelivered user record**: everything before it
//! was delivered; what after it was delivered is delivered again on the retry (duplicates).
//!
//! # Writing a sink
//!
//! A sink says how one user record becomes one entry of a request, how large an entry is,
//! what a request may hold, and sends one request, answering per entry:
//!
//! ```
//! use kinesis_deagg::kpl::UserRecord;
//! use kinesis_deagg::sink::{EntryOutcome, Limits, SendError, Sink};
//! use kinesis_deagg::transform::{Error, RecordContext};
//!
//! /// Collects the data of every user record, refusing empty ones.
//! struct Collect(std::sync::Mutex<Vec<bytes::Bytes>>);
//!
//! impl Sink for Collect {
//!     type Entry = bytes::Bytes;
//!     fn limits(&self) -> Limits {
//!         Limits { max_entries: 10, max_request_bytes: 1 << 20, max_entry_bytes: 1 << 20 }
//!     }
//!     fn entry(&self, record: UserRecord, _: &RecordContext) -> Result<bytes::Bytes, Error> {
//!         Ok(record.into_data())
//!     }
//!     fn size(&self, entry: &bytes::Bytes) -> usize {
//!         entry.len()
//!     }
//!     async fn send(&self, entries: &[bytes::Bytes]) -> Result<Vec<EntryOutcome>, SendError> {
//!         let mut kept = self.0.lock().unwrap();
//!         Ok(entries.iter().map(|e| {
//!             if e.is_empty() {
//!                 return EntryOutcome::failed("Empty", "no data");
//!             }
//!             kept.push(e.clone());
//!             EntryOutcome::Delivered
//!         }).collect())
//!     }
//! }
//! ```
//!
//! [`Processor::with_sink`](crate::Processor::with_sink) runs a transform with it; the
//! built-in sinks are chosen with `DEAGG_SINK` (see [`SinkSettings`]).

use std::future::Future;

use crate::kpl::UserRecord;
use crate::transform::{Error, RecordContext};

#[cfg(feature = "aws")]
mod aws;
mod backoff;
#[cfg(feature = "sink-firehose")]
pub mod firehose;
#[cfg(feature = "sink-kinesis")]
pub mod kinesis;
pub(crate) mod outbox;
mod settings;
#[cfg(feature = "sink-sqs")]
pub mod sqs;

pub use settings::{Body, SinkKind, SinkSettings};

/// What one request of a destination's API may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries per request (Kinesis `PutRecords`: 500).
    pub max_entries: usize,
    /// Bytes per request, as [`Sink::size`] counts them.
    pub max_request_bytes: usize,
    /// Bytes per entry: a larger one is never sent, and its user record is undelivered.
    pub max_entry_bytes: usize,
}

/// What became of one entry of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryOutcome {
    /// Accepted by the destination.
    Delivered,
    /// Refused for now: sent again after a back-off, within the deadline.
    Retry {
        /// The service's error code (`ProvisionedThroughputExceededException`, ...).
        code: String,
        /// True for throttling (counted apart in the metrics).
        throttled: bool,
    },
    /// Refused for good: its user records are undelivered at once.
    Failed {
        /// The service's error code.
        code: String,
        /// The service's message.
        message: String,
    },
    /// Accepted, but in the wrong place: delivered again, rebuilt (the Kinesis sink says so
    /// of an aggregate that landed on a shard other than the one it was built for).
    Resend,
}

impl EntryOutcome {
    /// A retryable refusal that is not throttling.
    pub fn retry(code: impl Into<String>) -> Self {
        EntryOutcome::Retry {
            code: code.into(),
            throttled: false,
        }
    }

    /// A throttled entry.
    pub fn throttled(code: impl Into<String>) -> Self {
        EntryOutcome::Retry {
            code: code.into(),
            throttled: true,
        }
    }

    /// A permanent refusal.
    pub fn failed(code: impl Into<String>, message: impl Into<String>) -> Self {
        EntryOutcome::Failed {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// A request that failed as a whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// Whether sending it again may succeed, and how.
    pub kind: SendErrorKind,
    /// What the service or the connection said.
    pub message: String,
}

/// Whether a failed request is worth sending again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendErrorKind {
    /// Throttled: sent again after a back-off.
    Throttled,
    /// A 5xx, a timeout, a reset connection: sent again after a back-off.
    Transient,
    /// Not found, access denied, invalid: never sent again; its user records are undelivered.
    Permanent,
}

impl SendError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: SendErrorKind, message: impl Into<String>) -> Self {
        SendError {
            kind,
            message: message.into(),
        }
    }
}

/// A destination for user records; see the [module docs](self) for the rules and an example.
pub trait Sink {
    /// One entry of a request: what one user record becomes.
    type Entry;

    /// What one request may hold.
    fn limits(&self) -> Limits;

    /// The entry for one user record.
    ///
    /// # Errors
    ///
    /// When the user record can never be sent (its user record is undelivered, and its
    /// Kinesis record reported).
    fn entry(&self, record: UserRecord, context: &RecordContext) -> Result<Self::Entry, Error>;

    /// An entry's size, as the destination counts it against [`Limits`].
    fn size(&self, entry: &Self::Entry) -> usize;

    /// Sends one request and says what became of each entry, in order (one outcome per
    /// entry; a different count fails the request as [`SendErrorKind::Transient`]).
    fn send(
        &self,
        entries: &[Self::Entry],
    ) -> impl Future<Output = Result<Vec<EntryOutcome>, SendError>>;

    /// What the destination keeps in order (a Kinesis shard, or partition key): a request
    /// holds at most one entry of each, so that a refused entry is sent again before the next
    /// one of its key is sent at all. `None` (the default) for entries in no particular order.
    fn order_key<'e>(&self, entry: &'e Self::Entry) -> Option<&'e [u8]> {
        let _ = entry;
        None
    }

    /// How user records become entries, made once per batch. The default makes one entry per
    /// user record with [`Sink::entry`]; a sink that packs several user records into one
    /// entry (the Kinesis sink's aggregates) gives its own [`Pack`].
    fn packer(&self) -> impl Future<Output = Result<Box<dyn Pack<Self::Entry> + '_>, SendError>> {
        async { Ok(Box::new(OnePerRecord(self)) as Box<dyn Pack<Self::Entry>>) }
    }
}

/// Where a user record is in the batch: its Kinesis record's place, then its sub-sequence
/// number. Entries are ordered by the first user record they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub(crate) index: usize,
    pub(crate) sub_sequence_number: Option<u64>,
}

impl Position {
    /// The position of the user record `context` describes.
    pub fn of(context: &RecordContext) -> Self {
        Position {
            index: context.index(),
            sub_sequence_number: context.sub_sequence_number(),
        }
    }
}

/// An entry ready to send, with the first user record it holds and how many.
#[derive(Clone, Debug)]
pub struct Staged<E> {
    /// The entry.
    pub entry: E,
    /// The earliest user record in it: reported if the entry is not delivered.
    pub first: Position,
    /// User records in it.
    pub user_records: usize,
}

/// Turns the user records of one batch into entries (see [`Sink::packer`]).
pub trait Pack<E> {
    /// Adds one user record; pushes onto `ready` the entries it completes.
    ///
    /// # Errors
    ///
    /// When the user record can never be sent.
    fn add(
        &mut self,
        record: UserRecord,
        context: &RecordContext,
        ready: &mut Vec<Staged<E>>,
    ) -> Result<(), Error>;

    /// Pushes onto `ready` whatever is still held, at the end of the batch.
    fn finish(&mut self, _ready: &mut Vec<Staged<E>>) {}

    /// Rebuilds an entry that is sent again (after a retryable refusal, or
    /// [`EntryOutcome::Resend`]); the default sends it as it is.
    fn repack(&mut self, staged: Staged<E>, ready: &mut Vec<Staged<E>>) {
        ready.push(staged);
    }
}

/// The default [`Pack`]: one entry per user record.
pub(crate) struct OnePerRecord<'a, S: ?Sized>(pub(crate) &'a S);

impl<S: Sink + ?Sized> Pack<S::Entry> for OnePerRecord<'_, S> {
    fn add(
        &mut self,
        record: UserRecord,
        context: &RecordContext,
        ready: &mut Vec<Staged<S::Entry>>,
    ) -> Result<(), Error> {
        ready.push(Staged {
            entry: self.0.entry(record, context)?,
            first: Position::of(context),
            user_records: 1,
        });
        Ok(())
    }
}

/// No sink: what a processor without one has. It is never sent anything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSink;

impl Sink for NoSink {
    type Entry = std::convert::Infallible;

    fn limits(&self) -> Limits {
        Limits {
            max_entries: 1,
            max_request_bytes: 0,
            max_entry_bytes: 0,
        }
    }

    fn entry(&self, _: UserRecord, _: &RecordContext) -> Result<Self::Entry, Error> {
        Err("no sink is configured".into())
    }

    fn size(&self, entry: &Self::Entry) -> usize {
        match *entry {}
    }

    async fn send(&self, entries: &[Self::Entry]) -> Result<Vec<EntryOutcome>, SendError> {
        Ok(entries.iter().map(|e| match *e {}).collect())
    }
}

/// What the sink did during one batch, for the metrics document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkStats {
    /// User records delivered.
    pub delivered_user_records: u64,
    /// Bytes of the entries delivered, as the sink counts them.
    pub delivered_bytes: u64,
    /// Requests sent (each attempt counts).
    pub requests: u64,
    /// Entries sent again after a refusal.
    pub retried_entries: u64,
    /// Entries refused as throttled (whole throttled requests count each of their entries).
    pub throttled_entries: u64,
    /// User records not delivered: their Kinesis records are delivered again by Lambda.
    pub undelivered_user_records: u64,
}

impl SinkStats {
    /// Adds what the sink did in `other` (a window's result, delivered after the batch).
    pub(crate) fn add(&mut self, other: &SinkStats) {
        self.delivered_user_records += other.delivered_user_records;
        self.delivered_bytes += other.delivered_bytes;
        self.requests += other.requests;
        self.retried_entries += other.retried_entries;
        self.throttled_entries += other.throttled_entries;
        self.undelivered_user_records += other.undelivered_user_records;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_add_field_by_field() {
        let stats = |n: u64| SinkStats {
            delivered_user_records: n,
            delivered_bytes: 2 * n,
            requests: 3 * n,
            retried_entries: 4 * n,
            throttled_entries: 5 * n,
            undelivered_user_records: 6 * n,
        };
        let mut sum = stats(1);
        sum.add(&stats(10));
        assert_eq!(sum, stats(11));
    }
}
