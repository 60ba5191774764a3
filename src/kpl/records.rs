//! [`UserRecords`]: an aggregate's user records, made one at a time as they are taken.

use std::sync::Arc;

use bytes::Bytes;

use super::wire::{ABSENT, RawRecord};
use super::{KeyRange, UserRecord};

/// The user records of one Kinesis record, in order: an iterator that makes each
/// [`UserRecord`] as it is taken.
///
/// An aggregate's user records are kept in 16 bytes each until then (a `UserRecord` is 88):
/// the largest event Lambda sends, one 4.4 MB aggregate of 733,000 empty user records, then
/// takes about 12 MB rather than 64. Cloning is cheap (the aggregate is shared), and a clone
/// starts where the original is.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::{deaggregate, Aggregator, Deaggregated};
/// let mut agg = Aggregator::new();
/// agg.add("a", None, b"1").unwrap();
/// agg.add("b", None, b"2").unwrap();
/// let Deaggregated::Aggregated(mut users) = deaggregate(agg.finish().unwrap().data).unwrap() else {
///     panic!()
/// };
/// assert_eq!(users.len(), 2);
/// assert_eq!(users.next().unwrap().partition_key(), "a");
/// assert_eq!(users.len(), 1);
/// ```
#[derive(Clone)]
pub struct UserRecords {
    source: Source,
    /// The next position to give, and the end.
    next: usize,
    end: usize,
}

#[derive(Clone)]
enum Source {
    One(Option<UserRecord>),
    Aggregate(Arc<Split>),
}

/// A verified aggregate: every record's indices are within its tables.
pub(super) struct Split {
    pub(super) body: Bytes,
    pub(super) keys: Arc<str>,
    /// The partition key and explicit hash key tables.
    pub(super) tables: [Vec<KeyRange>; 2],
    pub(super) records: Vec<RawRecord>,
    /// User records with a key that was not valid UTF-8.
    pub(super) lossy: usize,
}

impl UserRecords {
    /// No user record.
    pub fn none() -> Self {
        UserRecords {
            source: Source::One(None),
            next: 0,
            end: 0,
        }
    }

    /// One user record (that of a plain Kinesis record).
    pub fn one(record: UserRecord) -> Self {
        UserRecords {
            source: Source::One(Some(record)),
            next: 0,
            end: 1,
        }
    }

    pub(super) fn of_split(split: Split) -> Self {
        UserRecords {
            end: split.records.len(),
            source: Source::Aggregate(Arc::new(split)),
            next: 0,
        }
    }

    /// Calls `each(k, partition key, data length)` for every user record left, without making
    /// the records (no reference counts taken): `k` numbers the distinct keys, below
    /// [`UserRecords::key_count`], so that a caller can look each one up once. For the window
    /// report (`benches/windows.rs` measures it).
    pub(crate) fn each_key(&self, mut each: impl FnMut(usize, &str, usize)) {
        match &self.source {
            // Taken once given, so present only while left.
            Source::One(Some(r)) => each(0, r.partition_key(), r.data().len()),
            Source::One(None) => {}
            Source::Aggregate(split) => {
                let partition_keys = &split.tables[0];
                for record in &split.records[self.next..self.end] {
                    let k = record.partition_key_index as usize;
                    let range = &partition_keys[k].0;
                    let key = &split.keys[range.start as usize..range.end as usize];
                    each(k, key, (record.data_end - record.data_start) as usize);
                }
            }
        }
    }

    /// How many distinct partition keys [`UserRecords::each_key`] numbers.
    pub(crate) fn key_count(&self) -> usize {
        match &self.source {
            Source::One(_) => 1,
            Source::Aggregate(split) => split.tables[0].len(),
        }
    }

    /// True when no user record is left.
    pub fn is_empty(&self) -> bool {
        self.next >= self.end
    }

    /// How many of the user records left have a key that was not valid UTF-8 (see
    /// [`UserRecord::has_lossy_keys`]); for an aggregate, counted when it was split.
    pub fn lossy_keys(&self) -> usize {
        match &self.source {
            Source::One(r) => r.iter().filter(|r| r.has_lossy_keys()).count(),
            Source::Aggregate(split) if self.next == 0 => split.lossy,
            Source::Aggregate(split) => (self.next..self.end)
                .filter(|&n| split.get(n).has_lossy_keys())
                .count(),
        }
    }
}

impl Split {
    fn get(&self, n: usize) -> UserRecord {
        let record = &self.records[n];
        let [partition_keys, explicit_hash_keys] = &self.tables;
        let (partition_key, pk_lossy) = partition_keys[record.partition_key_index as usize].clone();
        let (explicit_hash_key, ehk_lossy) = match record.explicit_hash_key_index {
            ABSENT => (None, false),
            i => {
                let (key, lossy) = explicit_hash_keys[i as usize].clone();
                (Some(key), lossy)
            }
        };
        UserRecord {
            sub_sequence_number: Some(n as u64),
            keys: self.keys.clone(),
            partition_key,
            explicit_hash_key,
            data: self
                .body
                .slice(record.data_start as usize..record.data_end as usize),
            lossy_keys: pk_lossy || ehk_lossy,
        }
    }
}

impl Iterator for UserRecords {
    type Item = UserRecord;

    #[inline]
    fn next(&mut self) -> Option<UserRecord> {
        if self.next >= self.end {
            return None;
        }
        let n = self.next;
        self.next += 1;
        match &mut self.source {
            Source::One(record) => record.take(),
            Source::Aggregate(split) => Some(split.get(n)),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.end - self.next.min(self.end);
        (left, Some(left))
    }
}

impl ExactSizeIterator for UserRecords {}

/// Equal when the user records left are.
impl PartialEq for UserRecords {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.clone().eq(other.clone())
    }
}

impl Eq for UserRecords {}

impl std::fmt::Debug for UserRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.clone()).finish()
    }
}
