//! The KPL aggregation format: Kinesis record bytes to user records ([`deaggregate`]) and back
//! ([`Aggregator`]).
//!
//! This module knows nothing of Lambda or JSON; it takes and returns bytes. The format is
//!
//! ```text
//! | F3 89 9A C2 | protobuf AggregatedRecord | MD5 of the protobuf bytes (16 bytes) |
//! ```
//!
//! with the messages of `src/kpl/messages.proto`.

mod aggregate;
mod each;
// Allowed `unsafe` (as are `memory.rs`'s one `mallopt` call and `event/vbmi.rs`): SIMD
// intrinsics, see its docs.
#[allow(unsafe_code)]
mod md5_many;
mod messages;
mod records;
mod wire;

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use md5::{Digest, Md5};

pub use aggregate::{AggregateError, AggregatedRecord, Aggregator, MAX_RECORD_SIZE};
#[cfg(feature = "sink-kinesis")]
pub(crate) use aggregate::{Unsigned, sign_all};
pub(crate) use each::Verifier;
// Public for the md5_many fuzz target and the benchmarks, not for users: hidden.
#[doc(hidden)]
pub use md5_many::md5_many;
pub use records::UserRecords;

/// The four bytes that start every KPL aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 trailer.
const DIGEST_LEN: usize = 16;

/// One user record, as the producer put it.
///
/// `data` is a slice of the buffer given to [`deaggregate`] (no copy), and the keys are ranges
/// of the aggregate's key tables, which are copied once into one shared string: a user record
/// costs no allocation of its own, and an aggregate of thousands of distinct keys costs one.
#[derive(Clone)]
pub struct UserRecord {
    sub_sequence_number: Option<u64>,
    /// The keys this record's ranges point into: its aggregate's tables, or a plain record's
    /// own keys.
    keys: Arc<str>,
    partition_key: Range<u32>,
    explicit_hash_key: Option<Range<u32>>,
    data: Bytes,
    lossy_keys: bool,
}

/// Equal when everything a caller can see is: where the keys are kept does not count.
impl PartialEq for UserRecord {
    fn eq(&self, other: &Self) -> bool {
        self.sub_sequence_number == other.sub_sequence_number
            && self.partition_key() == other.partition_key()
            && self.explicit_hash_key() == other.explicit_hash_key()
            && self.data == other.data
            && self.lossy_keys == other.lossy_keys
    }
}

impl Eq for UserRecord {}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("sub_sequence_number", &self.sub_sequence_number)
            .field("partition_key", &self.partition_key())
            .field("explicit_hash_key", &self.explicit_hash_key())
            .field("data", &self.data)
            .field("lossy_keys", &self.lossy_keys)
            .finish()
    }
}

impl UserRecord {
    /// A user record that was not aggregated: a plain Kinesis record's key and data.
    ///
    /// # Panics
    ///
    /// If the two keys together are 4 GiB or longer (Kinesis allows 256 characters).
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::kpl::UserRecord;
    /// let r = UserRecord::plain("user-1", None, "hello".into());
    /// assert_eq!(r.sub_sequence_number(), None);
    /// assert_eq!(r.partition_key(), "user-1");
    /// ```
    pub fn plain(partition_key: &str, explicit_hash_key: Option<&str>, data: Bytes) -> Self {
        let mut keys = KeyTable::default();
        let partition_key = keys.push(partition_key);
        let explicit_hash_key = explicit_hash_key.map(|k| keys.push(k));
        UserRecord {
            explicit_hash_key,
            partition_key,
            ..Self::plain_shared(keys.text.into(), data)
        }
    }

    /// [`UserRecord::plain`] with a key already shared (no copy of it).
    pub(crate) fn plain_shared(partition_key: Arc<str>, data: Bytes) -> Self {
        UserRecord {
            sub_sequence_number: None,
            partition_key: 0..key_offset(partition_key.len()),
            keys: partition_key,
            explicit_hash_key: None,
            data,
            lossy_keys: false,
        }
    }

    /// The 0-based position of this user record in its aggregate; `None` when the Kinesis record
    /// was not an aggregate.
    pub fn sub_sequence_number(&self) -> Option<u64> {
        self.sub_sequence_number
    }

    /// The user record's partition key (for an aggregate, the key inside it, not the outer
    /// `"a"` the KPL writes).
    pub fn partition_key(&self) -> &str {
        self.key(&self.partition_key)
    }

    /// The explicit hash key, only when this user record carries one.
    ///
    /// The official Python and Node deaggregators give a record without one the table's entry
    /// 0; that is wrong and we do not copy it.
    pub fn explicit_hash_key(&self) -> Option<&str> {
        self.explicit_hash_key.as_ref().map(|range| self.key(range))
    }

    fn key(&self, range: &Range<u32>) -> &str {
        &self.keys[range.start as usize..range.end as usize]
    }

    /// The user record's payload (a slice of the aggregate's buffer, no copy).
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The same user record (keys, sub-sequence number) with other data.
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::kpl::UserRecord;
    /// let r = UserRecord::plain("k", Some("7"), "old".into()).with_data("new".into());
    /// assert_eq!((r.partition_key(), r.explicit_hash_key(), &r.data()[..]), ("k", Some("7"), &b"new"[..]));
    /// ```
    pub fn with_data(&self, data: Bytes) -> UserRecord {
        UserRecord {
            keys: self.keys.clone(),
            partition_key: self.partition_key.clone(),
            explicit_hash_key: self.explicit_hash_key.clone(),
            data,
            ..*self
        }
    }

    /// Consumes the record and returns its payload, without copying.
    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// True when a key of this record was not valid UTF-8 and was delivered with U+FFFD
    /// replacement characters.
    pub fn has_lossy_keys(&self) -> bool {
        self.lossy_keys
    }

    /// The 128-bit hash key that Kinesis maps to a shard: see [`effective_hash_key`].
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::kpl::UserRecord;
    /// let r = UserRecord::plain("k", Some("42"), bytes::Bytes::new());
    /// assert_eq!(r.hash_key(), Some(42));
    /// ```
    pub fn hash_key(&self) -> Option<u128> {
        effective_hash_key(self.partition_key(), self.explicit_hash_key())
    }
}

/// The hash key Kinesis uses to choose a shard: the explicit hash key when there is one, else
/// the MD5 of the UTF-8 partition key read as an unsigned 128-bit big-endian integer.
///
/// Returns `None` when the explicit hash key is not a decimal integer below 2^128.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::effective_hash_key;
/// // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
/// assert_eq!(effective_hash_key("a", None), Some(0x0cc175b9c0f1b6a831c399e269772661));
/// assert_eq!(effective_hash_key("a", Some("7")), Some(7));
/// assert_eq!(effective_hash_key("a", Some("-1")), None);
/// ```
pub fn effective_hash_key(partition_key: &str, explicit_hash_key: Option<&str>) -> Option<u128> {
    match explicit_hash_key {
        Some(ehk) if ehk.bytes().all(|b| b.is_ascii_digit()) => ehk.parse().ok(),
        Some(_) => None,
        None => Some(u128::from_be_bytes(
            Md5::digest(partition_key.as_bytes()).into(),
        )),
    }
}

/// What one Kinesis record's bytes turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deaggregated {
    /// Not a KPL aggregate (no magic, or too short to hold one): the data, unchanged.
    Plain(Bytes),
    /// Starts with the magic but the MD5 does not match: the data, unchanged.
    ///
    /// Raw data can start with the magic by chance, so, as the KCL and the Python module do,
    /// such a record is passed through as one plain record. It is its own variant so that the
    /// caller can log a warning and count it.
    ChecksumMismatch(Bytes),
    /// A verified aggregate and its user records, in order. There may be none: an
    /// aggregate with zero user records is valid protobuf and the caller should count it.
    Aggregated(UserRecords),
}

/// Why a verified aggregate (magic and MD5 correct) could not be split into user records.
///
/// The MD5 matched, so the producer really wrote these bytes: the aggregate is corrupt at its
/// source and no user record of it can be trusted to be complete. The runtime applies its
/// corrupt-input policy to it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeaggError {
    /// The protobuf does not decode (truncated, wrong wire type, ...).
    #[error("aggregate does not decode as protobuf: {message}")]
    Protobuf {
        /// What is wrong, where: the user record, the field and the byte offset.
        message: String,
    },
    /// A user record names a partition key beyond the table.
    #[error(
        "user record {sub_sequence_number}: partition key index {index} is out of range (table has {table_len} keys)"
    )]
    PartitionKeyIndexOutOfRange {
        /// Position of the user record in the aggregate.
        sub_sequence_number: u64,
        /// The index it names.
        index: u64,
        /// Number of entries in the partition key table.
        table_len: usize,
    },
    /// A user record names an explicit hash key beyond the table.
    #[error(
        "user record {sub_sequence_number}: explicit hash key index {index} is out of range (table has {table_len} keys)"
    )]
    ExplicitHashKeyIndexOutOfRange {
        /// Position of the user record in the aggregate.
        sub_sequence_number: u64,
        /// The index it names.
        index: u64,
        /// Number of entries in the explicit hash key table.
        table_len: usize,
    },
    /// A field that the format declares `required` is absent.
    #[error("user record {sub_sequence_number}: required field `{field}` is missing")]
    MissingField {
        /// Position of the user record in the aggregate.
        sub_sequence_number: u64,
        /// Name of the missing field, as in `messages.proto`.
        field: &'static str,
    },
}

/// Returns true when `data` has the shape of a KPL aggregate: the magic and more than the MD5
/// trailer after it. It says nothing of the checksum.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::{is_aggregated, MAGIC};
/// assert!(!is_aggregated(b"plain data"));
/// let mut d = MAGIC.to_vec();
/// d.extend([0u8; 17]);
/// assert!(is_aggregated(&d));
/// ```
pub fn is_aggregated(data: &[u8]) -> bool {
    data.len() > MAGIC.len() + DIGEST_LEN && data.starts_with(&MAGIC)
}

/// Splits one Kinesis record's data into its user records.
///
/// Every input has a defined outcome, and none panics:
///
/// | input | result |
/// |---|---|
/// | no magic, or 16 bytes or fewer after it (empty data included) | `Ok(Plain(data))` |
/// | magic, MD5 mismatch | `Ok(ChecksumMismatch(data))` |
/// | magic, MD5 matches, valid protobuf | `Ok(Aggregated(records))`, possibly empty |
/// | magic, MD5 matches, invalid protobuf, index out of range, missing field | `Err(DeaggError)` |
///
/// No user record is dropped: an aggregate is either returned whole or is an error. A key
/// that is not valid UTF-8 is delivered with U+FFFD replacements and
/// [`UserRecord::has_lossy_keys`] set.
///
/// # Errors
///
/// A [`DeaggError`] when the checksum is right but the contents are not a valid aggregate.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::{deaggregate, Aggregator, Deaggregated};
///
/// let mut agg = Aggregator::new();
/// agg.add("user-1", None, b"hello").unwrap();
/// agg.add("user-2", Some("42"), b"world").unwrap();
/// let record = agg.finish().unwrap();
///
/// let Deaggregated::Aggregated(users) = deaggregate(record.data.clone()).unwrap() else {
///     panic!("not an aggregate")
/// };
/// let users: Vec<_> = users.collect();
/// assert_eq!(users.len(), 2);
/// assert_eq!(users[1].partition_key(), "user-2");
/// assert_eq!(users[1].explicit_hash_key(), Some("42"));
/// assert_eq!(users[0].explicit_hash_key(), None);
/// assert_eq!(&users[1].data()[..], b"world");
///
/// assert_eq!(deaggregate("plain".into()).unwrap(), Deaggregated::Plain("plain".into()));
/// ```
pub fn deaggregate(data: Bytes) -> Result<Deaggregated, DeaggError> {
    deaggregate_with(data, true)
}

/// [`deaggregate`], with the MD5 check optional.
///
/// Skipping the check saves most of the time deaggregation takes, but a record that merely
/// starts with the magic is then decoded as an aggregate (usually an error). Only for producers
/// you trust to write KPL aggregates and nothing that could look like one.
pub fn deaggregate_with(data: Bytes, verify_checksum: bool) -> Result<Deaggregated, DeaggError> {
    let checksum_matches = verify_checksum.then(|| {
        let (body, digest) = checksum_parts(&data)?;
        Some(Md5::digest(body)[..] == *digest)
    });
    finish(data, checksum_matches.flatten())
}

/// [`deaggregate_with`] on every record of a batch, with the same results, all at once: what
/// [`deaggregate_each`] gives, collected.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::{deaggregate_all, Aggregator, Deaggregated};
/// let mut agg = Aggregator::new();
/// agg.add("k", None, b"hello").unwrap();
/// let aggregate = agg.finish().unwrap().data;
/// let results = deaggregate_all(&[aggregate, "plain".into()], true);
/// assert!(matches!(&results[0], Ok(Deaggregated::Aggregated(users)) if users.len() == 1));
/// assert_eq!(results[1], Ok(Deaggregated::Plain("plain".into())));
/// ```
pub fn deaggregate_all(
    records: &[Bytes],
    verify_checksum: bool,
) -> Vec<Result<Deaggregated, DeaggError>> {
    deaggregate_each(records, verify_checksum).collect()
}

/// [`deaggregate_with`] on every record of a batch, in order, with the same results, faster:
///
/// - the MD5s of all aggregates are computed side by side ([`md5_many()`]), since one MD5 stream
///   cannot use more than a fraction of a core;
/// - with a second core available (`std::thread::available_parallelism`) and at least 64 KiB
///   of aggregates, a helper thread computes the MD5s, in batch order, and each verdict is used
///   as soon as it comes; the helper then splits aggregates from the end of the batch while
///   this thread splits from the front. A record whose checksum turns out wrong gets
///   `ChecksumMismatch`, whatever its split gave;
/// - otherwise the MD5s are computed first, on this thread, and each aggregate is split only
///   when the iterator reaches it, so that a caller consuming them in order holds one
///   aggregate's user records at a time rather than the batch's.
///
/// Dropping the iterator early stops the helper and waits for it.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::{deaggregate_each, Aggregator, Deaggregated};
/// let mut agg = Aggregator::new();
/// agg.add("k", None, b"hello").unwrap();
/// let aggregate = agg.finish().unwrap().data;
/// let records = [aggregate, "plain".into()];
/// let mut results = deaggregate_each(&records, true);
/// assert!(matches!(results.next(), Some(Ok(Deaggregated::Aggregated(users))) if users.len() == 1));
/// assert_eq!(results.next(), Some(Ok(Deaggregated::Plain("plain".into()))));
/// ```
pub fn deaggregate_each(
    records: &[Bytes],
    verify_checksum: bool,
) -> impl Iterator<Item = Result<Deaggregated, DeaggError>> + '_ {
    Verifier::default().deaggregate_each(records, verify_checksum)
}

/// The protobuf bytes and the MD5 trailer of data shaped like an aggregate.
fn checksum_parts(data: &[u8]) -> Option<(&[u8], &[u8])> {
    is_aggregated(data).then(|| {
        let body_end = data.len() - DIGEST_LEN;
        (&data[MAGIC.len()..body_end], &data[body_end..])
    })
}

/// The rest of [`deaggregate_with`], once the checksum is known to match (`Some(true)`), known
/// not to (`Some(false)`), or not checked (`None`).
fn finish(data: Bytes, checksum_matches: Option<bool>) -> Result<Deaggregated, DeaggError> {
    if !is_aggregated(&data) {
        return Ok(Deaggregated::Plain(data));
    }
    if checksum_matches == Some(false) {
        return Ok(Deaggregated::ChecksumMismatch(data));
    }
    let body = data.slice(MAGIC.len()..data.len() - DIGEST_LEN);
    let aggregate =
        wire::read_aggregate(&body).map_err(|message| DeaggError::Protobuf { message })?;
    split(&body, aggregate).map(Deaggregated::Aggregated)
}

/// A key's range in its table, and whether it was not valid UTF-8 (then replaced).
type KeyRange = (Range<u32>, bool);

/// Keys copied one after another into one string, each known by its range.
#[derive(Default)]
struct KeyTable {
    text: String,
}

impl KeyTable {
    fn push(&mut self, key: &str) -> Range<u32> {
        let start = key_offset(self.text.len());
        self.text.push_str(key);
        start..key_offset(self.text.len())
    }

    /// Each key of `raw` (ranges of `body`) with whether it was not valid UTF-8 (then pushed
    /// with U+FFFD replacements).
    fn push_all(&mut self, body: &[u8], raw: &[Range<usize>]) -> Vec<KeyRange> {
        raw.iter()
            .map(|range| {
                let key = &body[range.clone()];
                match std::str::from_utf8(key) {
                    Ok(key) => (self.push(key), false),
                    Err(_) => (self.push(&String::from_utf8_lossy(key)), true),
                }
            })
            .collect()
    }

    /// An aggregate's partition and explicit hash key tables (`raw`: ranges of `body`) in one
    /// string, each key with its range and whether it was not valid UTF-8 (see
    /// [`KeyTable::push_all`]).
    ///
    /// The keys are copied as they are and checked as UTF-8 in one pass: text that is valid
    /// as a whole and cut at character boundaries is valid in each piece. Checked one by one,
    /// they cost about 80 instructions per user record of W5, mostly in the calls. Only
    /// tables that fail are read again key by key.
    fn of_aggregate(body: &[u8], raw: [&[Range<usize>]; 2]) -> (Arc<str>, [Vec<KeyRange>; 2]) {
        let mut bytes = Vec::new();
        let tables = raw.map(|table| {
            let mut copy = |range: &Range<usize>| {
                let start = key_offset(bytes.len());
                bytes.extend_from_slice(&body[range.clone()]);
                (start..key_offset(bytes.len()), false)
            };
            table.iter().map(&mut copy).collect::<Vec<_>>()
        });
        if let Ok(text) = std::str::from_utf8(&bytes)
            && tables
                .iter()
                .flatten()
                .all(|(range, _)| text.is_char_boundary(range.start as usize))
        {
            return (text.into(), tables);
        }
        let mut keys = KeyTable::default();
        let tables = raw.map(|table| keys.push_all(body, table));
        (keys.text.into(), tables)
    }
}

/// An offset into a key table. Tables are copied from one Kinesis record, far below 4 GiB.
fn key_offset(len: usize) -> u32 {
    u32::try_from(len).expect("key tables are shorter than a Kinesis record")
}

/// Checks every record of `message` (a field missing, an index beyond its table: the first
/// problem, in order, is the error) and makes them [`UserRecords`].
fn split(body: &Bytes, message: wire::RawAggregate) -> Result<UserRecords, DeaggError> {
    let (keys, tables) = KeyTable::of_aggregate(
        body,
        [
            &message.partition_key_table,
            &message.explicit_hash_key_table,
        ],
    );
    let [partition_keys, explicit_hash_keys] = &tables;
    let mut lossy = 0;
    for (n, record) in message.records.iter().enumerate() {
        let sub_sequence_number = n as u64;
        let missing = |field| DeaggError::MissingField {
            sub_sequence_number,
            field,
        };
        if record.partition_key_index == wire::ABSENT {
            return Err(missing("partition_key_index"));
        }
        if record.data_start == wire::ABSENT {
            return Err(missing("data"));
        }
        // An index as read: `HUGE` stands for the first such value of the field.
        let read = |index: u32, field: usize| match index {
            wire::HUGE => message.first_huge[field].unwrap_or(u64::MAX),
            i => u64::from(i),
        };
        let Some((_, pk_lossy)) = partition_keys.get(record.partition_key_index as usize) else {
            return Err(DeaggError::PartitionKeyIndexOutOfRange {
                sub_sequence_number,
                index: read(record.partition_key_index, 0),
                table_len: partition_keys.len(),
            });
        };
        let ehk_lossy = match record.explicit_hash_key_index {
            wire::ABSENT => false,
            index => match explicit_hash_keys.get(index as usize) {
                Some((_, lossy)) => *lossy,
                None => {
                    return Err(DeaggError::ExplicitHashKeyIndexOutOfRange {
                        sub_sequence_number,
                        index: read(index, 1),
                        table_len: explicit_hash_keys.len(),
                    });
                }
            },
        };
        lossy += usize::from(*pk_lossy || ehk_lossy);
    }
    Ok(UserRecords::of_split(records::Split {
        body: body.clone(),
        keys,
        tables,
        records: message.records,
        lossy,
    }))
}

#[cfg(test)]
mod tests;
