//! The producer side: packing user records into KPL aggregates.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use md5::{Digest, Md5};
use prost::Message;
use prost::encoding::encoded_len_varint;

use super::{DIGEST_LEN, MAGIC, effective_hash_key, messages};

/// The outer partition key the KPL gives every aggregate: the real keys are inside, and the
/// outer explicit hash key decides the shard, so one byte is enough.
const OUTER_PARTITION_KEY: &str = "a";

/// The largest record a Kinesis stream accepts (after `UpdateMaxRecordSize`): 10 MiB.
pub const MAX_RECORD_SIZE: usize = 10 * 1024 * 1024;

/// Default aggregate size: 1 MiB, the default Kinesis record limit.
pub const DEFAULT_MAX_SIZE: usize = 1024 * 1024;

/// One finished aggregate, ready for `PutRecord`/`PutRecords`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregatedRecord {
    /// The outer partition key, `"a"` as the KPL writes it.
    pub partition_key: String,
    /// The outer explicit hash key: the first user record's hash key in decimal, as the KPL
    /// does, so the aggregate lands on the shard that user record maps to.
    pub explicit_hash_key: String,
    /// Magic, protobuf and MD5.
    pub data: Bytes,
    /// Number of user records inside.
    pub user_records: usize,
}

/// Why a user record could not be added.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// The user record alone makes an aggregate larger than the limit.
    #[error(
        "user record with partition key {partition_key:?} needs {size} bytes in an aggregate, over the limit of {limit}"
    )]
    TooLarge {
        /// The record's partition key.
        partition_key: String,
        /// Size of an aggregate holding only this record (data plus outer partition key).
        size: usize,
        /// The aggregator's limit.
        limit: usize,
    },
    /// The explicit hash key is not a decimal integer below 2^128.
    #[error("explicit hash key {0:?} is not a decimal integer below 2^128")]
    InvalidExplicitHashKey(String),
    /// The limit asked of [`Aggregator::with_max_size`] is above 10 MiB.
    #[error(
        "aggregate size limit {0} is above the Kinesis maximum record size of {MAX_RECORD_SIZE}"
    )]
    LimitTooLarge(usize),
}

/// Packs user records into KPL aggregates, never larger than a limit.
///
/// Keys are deduplicated in the aggregate's tables, and the size is accounted exactly (the
/// size of the protobuf is tracked field by field), so an aggregate never exceeds its limit.
/// The limit counts what Kinesis counts against its record size limit: the data (magic,
/// protobuf, MD5) plus the outer partition key.
///
/// Unlike the KPL, which sends a lone user record without aggregating it, every finished
/// record here is an aggregate, as with the official Python and Node aggregators.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::Aggregator;
///
/// let mut agg = Aggregator::with_max_size(200).unwrap();
/// let mut finished = Vec::new();
/// for i in 0..10 {
///     // `add` hands back the previous aggregate when the new record does not fit.
///     if let Some(full) = agg.add(&format!("key-{i}"), None, [b'x'; 40]).unwrap() {
///         finished.push(full);
///     }
/// }
/// finished.extend(agg.finish());
/// assert!(finished.len() > 1);
/// assert!(finished.iter().all(|r| r.data.len() + r.partition_key.len() <= 200));
/// assert_eq!(finished.iter().map(|r| r.user_records).sum::<usize>(), 10);
/// ```
#[derive(Debug)]
pub struct Aggregator {
    limit: usize,
    message: messages::AggregatedRecord,
    partition_keys: HashMap<Bytes, u64>,
    explicit_hash_keys: HashMap<Bytes, u64>,
    /// Outer explicit hash key, from the first user record.
    first_hash_key: Option<u128>,
    /// Exact encoded length of `message`.
    encoded_len: usize,
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new()
    }
}

/// Encoded size of a length-delimited field (tag, length, payload) of `len` bytes; every field
/// number of the format is below 16, so each tag takes one byte.
fn delimited_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Size of an aggregate whose protobuf is `encoded_len` bytes, as Kinesis counts it.
fn record_size(encoded_len: usize) -> usize {
    MAGIC.len() + encoded_len + DIGEST_LEN + OUTER_PARTITION_KEY.len()
}

impl Aggregator {
    /// An aggregator with the default limit of 1 MiB.
    pub fn new() -> Self {
        Aggregator {
            limit: DEFAULT_MAX_SIZE,
            message: Default::default(),
            partition_keys: HashMap::new(),
            explicit_hash_keys: HashMap::new(),
            first_hash_key: None,
            encoded_len: 0,
        }
    }

    /// An aggregator whose aggregates stay within `limit` bytes (data plus outer partition
    /// key). The KPL's default is 51,200; the Kinesis default record limit is 1 MiB.
    ///
    /// # Errors
    ///
    /// [`AggregateError::LimitTooLarge`] above 10 MiB, the largest record Kinesis accepts.
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::kpl::Aggregator;
    /// assert!(Aggregator::with_max_size(51_200).is_ok());
    /// assert!(Aggregator::with_max_size(11 << 20).is_err());
    /// ```
    pub fn with_max_size(limit: usize) -> Result<Self, AggregateError> {
        if limit > MAX_RECORD_SIZE {
            return Err(AggregateError::LimitTooLarge(limit));
        }
        Ok(Aggregator {
            limit,
            ..Self::new()
        })
    }

    /// Number of user records in the aggregate being built.
    pub fn len(&self) -> usize {
        self.message.records.len()
    }

    /// True when no user record waits in the aggregator.
    pub fn is_empty(&self) -> bool {
        self.message.records.is_empty()
    }

    /// Size of the aggregate being built, as Kinesis counts it (0 when empty).
    pub fn size(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            record_size(self.encoded_len)
        }
    }

    /// Adds one user record. When it does not fit in the current aggregate, that aggregate is
    /// finished and returned, and the record starts the next one.
    ///
    /// # Errors
    ///
    /// [`AggregateError::TooLarge`] when the record does not fit even in an empty aggregate,
    /// [`AggregateError::InvalidExplicitHashKey`] for an explicit hash key that Kinesis would
    /// reject. The aggregator is unchanged in both cases.
    pub fn add(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: impl AsRef<[u8]>,
    ) -> Result<Option<AggregatedRecord>, AggregateError> {
        let data = data.as_ref();
        let hash_key = effective_hash_key(partition_key, explicit_hash_key).ok_or_else(|| {
            AggregateError::InvalidExplicitHashKey(explicit_hash_key.unwrap_or_default().into())
        })?;
        let finished = self.add_hashed(
            partition_key,
            explicit_hash_key,
            Bytes::copy_from_slice(data),
            hash_key,
        )?;
        Ok(finished.map(Unsigned::sign))
    }

    /// [`Aggregator::add`] of a user record whose hash key is known, keeping `data` without a
    /// copy, and handing back an aggregate still to be signed (see [`sign_all`]).
    pub(crate) fn add_hashed(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: Bytes,
        hash_key: u128,
    ) -> Result<Option<Unsigned>, AggregateError> {
        let alone = record_size(Self::new().growth(partition_key, explicit_hash_key, data.len()));
        if alone > self.limit {
            return Err(AggregateError::TooLarge {
                partition_key: partition_key.into(),
                size: alone,
                limit: self.limit,
            });
        }
        let grown = self.encoded_len + self.growth(partition_key, explicit_hash_key, data.len());
        let finished = if record_size(grown) > self.limit {
            self.finish_unsigned()
        } else {
            None
        };
        self.push(partition_key, explicit_hash_key, data, hash_key);
        Ok(finished)
    }

    /// Bytes the protobuf grows by when this record is added to the current aggregate.
    fn growth(&self, pk: &str, ehk: Option<&str>, data_len: usize) -> usize {
        let (pk_index, new_pk) = key_index(&self.partition_keys, pk);
        let mut record = 1 + encoded_len_varint(pk_index) + delimited_len(data_len);
        let mut tables = if new_pk { delimited_len(pk.len()) } else { 0 };
        if let Some(ehk) = ehk {
            let (ehk_index, new_ehk) = key_index(&self.explicit_hash_keys, ehk);
            record += 1 + encoded_len_varint(ehk_index);
            if new_ehk {
                tables += delimited_len(ehk.len());
            }
        }
        tables + delimited_len(record)
    }

    fn push(&mut self, pk: &str, ehk: Option<&str>, data: Bytes, hash_key: u128) {
        self.encoded_len += self.growth(pk, ehk, data.len());
        self.first_hash_key.get_or_insert(hash_key);
        let pk_index = intern(
            &mut self.partition_keys,
            &mut self.message.partition_key_table,
            pk,
        );
        let ehk_index = ehk.map(|k| {
            intern(
                &mut self.explicit_hash_keys,
                &mut self.message.explicit_hash_key_table,
                k,
            )
        });
        self.message.records.push(messages::Record {
            partition_key_index: Some(pk_index),
            explicit_hash_key_index: ehk_index,
            data: Some(data),
            tags: Vec::new(),
        });
        debug_assert_eq!(self.encoded_len, self.message.encoded_len());
    }

    /// Finishes the aggregate being built and returns it; `None` when it is empty. The
    /// aggregator is then empty and ready for more.
    pub fn finish(&mut self) -> Option<AggregatedRecord> {
        self.finish_unsigned().map(Unsigned::sign)
    }

    /// [`Aggregator::finish`] without the MD5, for [`sign_all`] to add.
    pub(crate) fn finish_unsigned(&mut self) -> Option<Unsigned> {
        if self.is_empty() {
            return None;
        }
        let message = std::mem::take(&mut self.message);
        let hash_key = self.first_hash_key.take().unwrap_or_default();
        self.partition_keys.clear();
        self.explicit_hash_keys.clear();
        let encoded_len = std::mem::take(&mut self.encoded_len);

        let mut data =
            BytesMut::with_capacity(record_size(encoded_len) - OUTER_PARTITION_KEY.len());
        data.put_slice(&MAGIC);
        message
            .encode(&mut data)
            .expect("BytesMut grows as needed, so encoding cannot run out of space");
        Some(Unsigned {
            data,
            explicit_hash_key: hash_key,
            user_records: message.records.len(),
        })
    }
}

/// An aggregate without its MD5 trailer yet: the magic and the protobuf.
#[derive(Debug)]
pub(crate) struct Unsigned {
    data: BytesMut,
    explicit_hash_key: u128,
    user_records: usize,
}

impl Unsigned {
    fn sign(self) -> AggregatedRecord {
        let digest: [u8; DIGEST_LEN] = Md5::digest(&self.data[MAGIC.len()..]).into();
        self.signed(digest)
    }

    fn signed(mut self, digest: [u8; DIGEST_LEN]) -> AggregatedRecord {
        self.data.put_slice(&digest);
        AggregatedRecord {
            partition_key: OUTER_PARTITION_KEY.into(),
            explicit_hash_key: self.explicit_hash_key.to_string(),
            data: self.data.freeze(),
            user_records: self.user_records,
        }
    }
}

#[cfg(feature = "sink-kinesis")]
/// Adds the MD5 trailers of many aggregates at once, with the multi-buffer MD5 (16 at a time
/// with AVX-512): one aggregate's MD5 is a serial chain that a lone core computes at a few
/// hundred MB/s.
pub(crate) fn sign_all(unsigned: Vec<Unsigned>) -> Vec<AggregatedRecord> {
    let messages: Vec<&[u8]> = unsigned.iter().map(|u| &u.data[MAGIC.len()..]).collect();
    let digests = super::md5_many(&messages);
    unsigned
        .into_iter()
        .zip(digests)
        .map(|(u, digest)| u.signed(digest))
        .collect()
}

/// The index `key` has in a key table, or would get, and whether it is new.
fn key_index(lookup: &HashMap<Bytes, u64>, key: &str) -> (u64, bool) {
    match lookup.get(key.as_bytes()) {
        Some(&i) => (i, false),
        None => (lookup.len() as u64, true),
    }
}

/// Index of `key` in a key table, adding it when it is new.
fn intern(lookup: &mut HashMap<Bytes, u64>, table: &mut Vec<Bytes>, key: &str) -> u64 {
    if let Some(&i) = lookup.get(key.as_bytes()) {
        return i;
    }
    let key = Bytes::copy_from_slice(key.as_bytes());
    let i = table.len() as u64;
    table.push(key.clone());
    lookup.insert(key, i);
    i
}
