//! The Kinesis sink: user records into another stream with `PutRecords`, by default
//! re-aggregated in the KPL format, one aggregate per destination shard.
//!
//! A KCL consumer drops a whole aggregate when one of its user records hashes outside the
//! shard it was read from (KCL issue 343), so the sink reads the destination's shards and hash
//! key ranges (`ListShards`), groups user records by the shard their hash key falls in, and
//! puts each aggregate with an explicit hash key inside that shard (its first user record's).
//! When a put lands on a shard other than the one its aggregate was built for (the stream was
//! resharded), the map is read again and that aggregate is rebuilt and put again: duplicates,
//! never records a KCL consumer drops. The map is also read again when it is older than
//! `DEAGG_SINK_SHARD_MAP_MAX_AGE_S`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;

use super::aws::classify;
use super::{
    EntryOutcome, Limits, OnePerRecord, Pack, Position, SendError, SendErrorKind, Sink,
    SinkSettings, Staged,
};
use crate::kpl::{AggregateError, Aggregator, Unsigned, UserRecord, sign_all};
use crate::settings::Switch;
use crate::transform::{Error, RecordContext};

/// `PutRecords` takes at most 500 records.
const MAX_ENTRIES: usize = 500;
/// The most a `PutRecords` request may hold today (10 MiB; it was 5 MiB).
const MAX_REQUEST_BYTES: usize = 10 << 20;

/// The open shards of a stream and their hash key ranges, sorted.
#[derive(Debug)]
pub struct ShardMap {
    /// `(starting hash key, ending hash key, shard id)`, by starting hash key.
    shards: Vec<(u128, u128, Arc<str>)>,
    /// Bumped at every read, so that an entry knows whether it was built on the current map.
    generation: u64,
    read_at: Instant,
}

impl ShardMap {
    /// The map of the given `(shard id, starting hash key, ending hash key, ending sequence
    /// number)`s: closed shards (with an ending sequence number) are left out.
    ///
    /// # Errors
    ///
    /// When a hash key is not a decimal integer below 2^128.
    pub fn new<'a>(
        shards: impl IntoIterator<Item = (&'a str, &'a str, &'a str, Option<&'a str>)>,
    ) -> Result<Self, String> {
        let mut open = Vec::new();
        for (id, start, end, ending_sequence) in shards {
            if ending_sequence.is_some() {
                continue;
            }
            let parse = |k: &str| {
                k.parse::<u128>()
                    .map_err(|_| format!("shard {id} has an invalid hash key {k:?}"))
            };
            open.push((parse(start)?, parse(end)?, Arc::from(id)));
        }
        open.sort();
        Ok(ShardMap {
            shards: open,
            generation: 0,
            read_at: Instant::now(),
        })
    }

    /// The open shard whose range holds `hash_key`.
    pub fn shard_of(&self, hash_key: u128) -> Option<&Arc<str>> {
        let i = self
            .shards
            .partition_point(|(start, ..)| *start <= hash_key);
        let (_, end, id) = self.shards.get(i.checked_sub(1)?)?;
        (hash_key <= *end).then_some(id)
    }

    /// Number of open shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// True when the stream has no open shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

/// One `PutRecords` entry.
#[derive(Clone, Debug)]
pub struct KinesisEntry {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Bytes,
    /// The shard an aggregate was built for, and the map it was built on.
    shard: Option<(Arc<str>, u64)>,
    /// An aggregate's user records (or the one user record put on its own for a shard), to
    /// rebuild it.
    user_records: Held,
    /// A KPL aggregate, not one user record.
    aggregate: bool,
}

/// Delivers to a Kinesis stream; see the [module docs](self).
#[derive(Debug)]
pub struct KinesisSink {
    client: Client,
    /// The stream's name, or its ARN.
    target: String,
    aggregate: bool,
    aggregate_max_bytes: usize,
    limits: Limits,
    map_max_age: Duration,
    map: Mutex<Option<Arc<ShardMap>>>,
}

impl KinesisSink {
    /// A sink for the stream `settings.target`, with the AWS SDK's own configuration
    /// (region, credentials, `AWS_ENDPOINT_URL_KINESIS` or `AWS_ENDPOINT_URL`). The SDK's own
    /// retries are off: the sink retries within the invocation's deadline.
    ///
    /// # Errors
    ///
    /// When no target is set, or a limit is out of range.
    pub async fn from_settings(settings: &SinkSettings) -> Result<Self, String> {
        Self::new(Client::new(&super::aws::config().await), settings)
    }

    /// A sink with this client; see [`KinesisSink::from_settings`].
    ///
    /// # Errors
    ///
    /// When no target is set, or a limit is out of range.
    pub fn new(client: Client, settings: &SinkSettings) -> Result<Self, String> {
        let target = settings.target()?;
        let (max_request_bytes, max_record_bytes) = settings.byte_limits(
            (5 << 20, 1 << 20),
            (MAX_REQUEST_BYTES, crate::kpl::MAX_RECORD_SIZE),
        )?;
        let aggregate_max_bytes = settings.aggregate_max_bytes.min(max_record_bytes);
        Aggregator::with_max_size(aggregate_max_bytes)
            .map_err(|e| format!("DEAGG_SINK_AGGREGATE_MAX_BYTES: {e}"))?;
        Ok(KinesisSink {
            client,
            target,
            aggregate: settings.aggregate == Switch::On,
            aggregate_max_bytes,
            limits: Limits {
                max_entries: MAX_ENTRIES,
                max_request_bytes,
                max_entry_bytes: max_record_bytes,
            },
            map_max_age: Duration::from_secs(settings.shard_map_max_age_s),
            map: Mutex::new(None),
        })
    }

    fn is_arn(&self) -> bool {
        self.target.starts_with("arn:")
    }

    /// The shard map, read again when it is missing or too old.
    async fn shard_map(&self, force: bool) -> Result<Arc<ShardMap>, SendError> {
        let current = self.map.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(map) = &current
            && !force
            && map.read_at.elapsed() < self.map_max_age
        {
            return Ok(map.clone());
        }
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // With a token, the stream must not be named again.
            let request = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None if self.is_arn() => self.client.list_shards().stream_arn(&self.target),
                None => self.client.list_shards().stream_name(&self.target),
            };
            let page = request
                .send()
                .await
                .map_err(|e| classify(&e, "ListShards"))?;
            shards.extend(page.shards().iter().cloned());
            match page.next_token() {
                Some(t) => token = Some(t.to_string()),
                None => break,
            }
        }
        let mut map = ShardMap::new(shards.iter().filter_map(|s| {
            let range = s.hash_key_range()?;
            Some((
                s.shard_id(),
                range.starting_hash_key(),
                range.ending_hash_key(),
                s.sequence_number_range()
                    .and_then(|r| r.ending_sequence_number()),
            ))
        }))
        .map_err(|e| SendError::new(SendErrorKind::Transient, e))?;
        if map.is_empty() {
            return Err(SendError::new(
                SendErrorKind::Transient,
                format!("stream {} has no open shard", self.target),
            ));
        }
        map.generation = current.map_or(1, |m| m.generation + 1);
        tracing::info!(
            stream = %self.target,
            shards = map.len(),
            "read the destination's shard map"
        );
        let map = Arc::new(map);
        *self.map.lock().unwrap_or_else(|p| p.into_inner()) = Some(map.clone());
        Ok(map)
    }

    fn current_map(&self) -> Option<Arc<ShardMap>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Per-entry error codes of `PutRecords` that throttle.
fn entry_outcome(code: &str, message: &str) -> EntryOutcome {
    match code {
        "ProvisionedThroughputExceededException" | "KMSThrottlingException" => {
            EntryOutcome::throttled(code)
        }
        "InternalFailure" | "InternalFailureException" | "ServiceUnavailable" => {
            EntryOutcome::retry(code)
        }
        _ => EntryOutcome::failed(code, message),
    }
}

impl Sink for KinesisSink {
    type Entry = KinesisEntry;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn entry(&self, record: UserRecord, _: &RecordContext) -> Result<KinesisEntry, Error> {
        plain_entry(record)
    }

    fn size(&self, entry: &KinesisEntry) -> usize {
        entry.data.len() + entry.partition_key.len()
    }

    /// An aggregate's shard; a user record put on its own, its partition key.
    fn order_key<'e>(&self, entry: &'e KinesisEntry) -> Option<&'e [u8]> {
        Some(match &entry.shard {
            Some((shard, _)) => shard.as_bytes(),
            None => entry.partition_key.as_bytes(),
        })
    }

    async fn send(&self, entries: &[KinesisEntry]) -> Result<Vec<EntryOutcome>, SendError> {
        let records = entries
            .iter()
            .map(|e| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(e.data.to_vec()))
                    .partition_key(&e.partition_key)
                    .set_explicit_hash_key(e.explicit_hash_key.clone())
                    .build()
                    .map_err(|e| SendError::new(SendErrorKind::Permanent, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let request = self.client.put_records().set_records(Some(records));
        let request = if self.is_arn() {
            request.stream_arn(&self.target)
        } else {
            request.stream_name(&self.target)
        };
        let output = request
            .send()
            .await
            .map_err(|e| classify(&e, "PutRecords"))?;
        let mut misplaced = false;
        let outcomes = entries
            .iter()
            .zip(output.records())
            .map(|(entry, result)| match result.error_code() {
                Some(code) => entry_outcome(code, result.error_message().unwrap_or("")),
                None => match (&entry.shard, result.shard_id()) {
                    (Some((expected, _)), Some(landed)) if **expected != *landed => {
                        misplaced = true;
                        if entry.aggregate {
                            tracing::warn!(
                                expected = &**expected,
                                landed,
                                "an aggregate landed on another shard (the stream was resharded?): it is rebuilt and put again"
                            );
                            EntryOutcome::Resend
                        } else {
                            // Kinesis put it where its own hash key belongs: nothing to drop.
                            EntryOutcome::Delivered
                        }
                    }
                    _ => EntryOutcome::Delivered,
                },
            })
            .collect();
        if misplaced && let Err(e) = self.shard_map(true).await {
            tracing::warn!("could not read the shard map again: {e}");
        }
        Ok(outcomes)
    }

    async fn packer(&self) -> Result<Box<dyn Pack<KinesisEntry> + '_>, SendError> {
        if !self.aggregate {
            // `DEAGG_SINK_AGGREGATE=off`: one entry per user record, made by `entry`.
            return Ok(Box::new(OnePerRecord(self)));
        }
        let map = self.shard_map(false).await?;
        Ok(Box::new(ByShard::new(self, map)))
    }
}

/// A user record's hash key, or the aggregator's error for a key Kinesis would refuse.
fn hash_key_of(record: &UserRecord) -> Result<u128, AggregateError> {
    record.hash_key().ok_or_else(|| {
        AggregateError::InvalidExplicitHashKey(
            record.explicit_hash_key().unwrap_or_default().into(),
        )
    })
}

/// A user record as a `PutRecords` entry of its own.
fn plain_entry(record: UserRecord) -> Result<KinesisEntry, Error> {
    hash_key_of(&record)?;
    Ok(KinesisEntry {
        partition_key: record.partition_key().to_string(),
        explicit_hash_key: record.explicit_hash_key().map(str::to_string),
        data: record.into_data(),
        shard: None,
        user_records: Vec::new(),
        aggregate: false,
    })
}

/// The user records of an aggregate, where each came from.
type Held = Vec<(UserRecord, Position)>;

/// The aggregate being built for one shard.
struct Open {
    aggregator: Aggregator,
    user_records: Held,
}

/// Aggregates finished and waiting for their MD5s, computed [`SIGN_AT_ONCE`] at a time.
const SIGN_AT_ONCE: usize = 16;

/// Partition keys whose hash key is remembered, at most (then the memory starts again).
const KNOWN_KEYS: usize = 1 << 16;

/// Aggregates per destination shard.
struct ByShard<'a> {
    sink: &'a KinesisSink,
    map: Arc<ShardMap>,
    open: BTreeMap<Arc<str>, Open>,
    /// Finished aggregates, in order, still to be signed.
    unsigned: Vec<(Unsigned, Arc<str>, Held)>,
    /// The MD5 of partition keys seen (a batch repeats its keys).
    hash_keys: HashMap<Box<str>, u128>,
}

impl<'a> ByShard<'a> {
    fn new(sink: &'a KinesisSink, map: Arc<ShardMap>) -> Self {
        ByShard {
            sink,
            map,
            open: BTreeMap::new(),
            unsigned: Vec::new(),
            hash_keys: HashMap::new(),
        }
    }

    fn hash_key(&mut self, record: &UserRecord) -> Result<u128, Error> {
        if record.explicit_hash_key().is_none()
            && let Some(&h) = self.hash_keys.get(record.partition_key())
        {
            return Ok(h);
        }
        let h = hash_key_of(record)?;
        if record.explicit_hash_key().is_none() {
            if self.hash_keys.len() >= KNOWN_KEYS {
                self.hash_keys.clear();
            }
            self.hash_keys.insert(record.partition_key().into(), h);
        }
        Ok(h)
    }

    fn add_at(
        &mut self,
        record: UserRecord,
        at: Position,
        ready: &mut Vec<Staged<KinesisEntry>>,
    ) -> Result<(), Error> {
        let hash_key = self.hash_key(&record)?;
        let Some(shard) = self.map.shard_of(hash_key).cloned() else {
            // A hole in the map (it is being resharded): put it on its own, Kinesis finds the
            // shard.
            self.seal(ready);
            ready.push(Staged {
                entry: plain_entry(record)?,
                first: at,
                user_records: 1,
            });
            return Ok(());
        };
        let limit = self.sink.aggregate_max_bytes;
        let open = self.open.entry(shard.clone()).or_insert_with(|| Open {
            aggregator: Aggregator::with_max_size(limit).expect("checked when the sink was made"),
            user_records: Vec::new(),
        });
        let added = open.aggregator.add_hashed(
            record.partition_key(),
            record.explicit_hash_key(),
            record.data().clone(),
            hash_key,
        );
        match added {
            Ok(None) => open.user_records.push((record, at)),
            Ok(Some(full)) => {
                let held = std::mem::replace(&mut open.user_records, vec![(record, at)]);
                self.unsigned.push((full, shard, held));
                if self.unsigned.len() >= SIGN_AT_ONCE {
                    self.seal(ready);
                }
            }
            Err(AggregateError::TooLarge { .. }) => {
                // Too large for an aggregate: on its own, after what its shard holds, and in
                // its shard's order.
                self.finish_shard(&shard);
                self.seal(ready);
                let mut entry = plain_entry(record.clone())?;
                entry.shard = Some((shard, self.map.generation));
                entry.user_records = vec![(record, at)];
                ready.push(Staged {
                    entry,
                    first: at,
                    user_records: 1,
                });
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Signs the finished aggregates and hands them on, in order.
    fn seal(&mut self, ready: &mut Vec<Staged<KinesisEntry>>) {
        if self.unsigned.is_empty() {
            return;
        }
        let (unsigned, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unsigned)
            .into_iter()
            .map(|(u, shard, held)| (u, (shard, held)))
            .unzip();
        for (full, (shard, held)) in sign_all(unsigned).into_iter().zip(rest) {
            ready.push(self.staged(full, shard, held));
        }
    }

    fn staged(
        &self,
        full: crate::kpl::AggregatedRecord,
        shard: Arc<str>,
        user_records: Held,
    ) -> Staged<KinesisEntry> {
        let first = user_records
            .iter()
            .map(|(_, at)| *at)
            .min()
            .expect("an aggregate holds a user record");
        Staged {
            user_records: user_records.len(),
            first,
            entry: KinesisEntry {
                partition_key: full.partition_key,
                explicit_hash_key: Some(full.explicit_hash_key),
                data: full.data,
                shard: Some((shard, self.map.generation)),
                aggregate: true,
                user_records,
            },
        }
    }

    /// Finishes the aggregate open for `shard`, if any (it waits to be signed).
    fn finish_shard(&mut self, shard: &Arc<str>) {
        if let Some(open) = self.open.get_mut(shard)
            && let Some(full) = open.aggregator.finish_unsigned()
        {
            let held = std::mem::take(&mut open.user_records);
            self.unsigned.push((full, shard.clone(), held));
        }
    }
}

impl Pack<KinesisEntry> for ByShard<'_> {
    fn add(
        &mut self,
        record: UserRecord,
        context: &RecordContext,
        ready: &mut Vec<Staged<KinesisEntry>>,
    ) -> Result<(), Error> {
        self.add_at(record, Position::of(context), ready)
    }

    fn finish(&mut self, ready: &mut Vec<Staged<KinesisEntry>>) {
        let shards: Vec<_> = self.open.keys().cloned().collect();
        for shard in shards {
            self.finish_shard(&shard);
        }
        self.seal(ready);
    }

    fn repack(&mut self, staged: Staged<KinesisEntry>, ready: &mut Vec<Staged<KinesisEntry>>) {
        let current = self.sink.current_map();
        let stale = matches!(
            (&staged.entry.shard, &current),
            (Some((_, generation)), Some(map)) if *generation != map.generation
        );
        if !stale {
            ready.push(staged);
            return;
        }
        // Built on an older map: split again by the current one, each shard's user records
        // in their order.
        self.map = current.expect("stale only against a current map");
        let mut rebuilt = ByShard::new(self.sink, self.map.clone());
        for (record, at) in staged.entry.user_records {
            if let Err(e) = rebuilt.add_at(record, at, ready) {
                // It was accepted before, on the same keys: not reachable.
                tracing::error!("could not rebuild an aggregate: {e}");
            }
        }
        rebuilt.finish(ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_key_maps_to_the_open_shard_whose_range_holds_it() {
        let max = u128::MAX.to_string();
        let half = (u128::MAX / 2).to_string();
        let above_half = (u128::MAX / 2 + 1).to_string();
        let map = ShardMap::new([
            // Listed out of order, with the closed parent of the two.
            ("shardId-2", above_half.as_str(), max.as_str(), None),
            ("shardId-0", "0", max.as_str(), Some("4959")),
            ("shardId-1", "0", half.as_str(), None),
        ])
        .unwrap();
        assert_eq!(map.len(), 2);
        assert!(!map.is_empty());
        let closed = ShardMap::new([("shardId-0", "0", max.as_str(), Some("4959"))]).unwrap();
        assert!(closed.is_empty());
        let shard = |k: u128| map.shard_of(k).map(|s| s.to_string());
        assert_eq!(shard(0).as_deref(), Some("shardId-1"));
        assert_eq!(shard(u128::MAX / 2).as_deref(), Some("shardId-1"));
        assert_eq!(shard(u128::MAX / 2 + 1).as_deref(), Some("shardId-2"));
        assert_eq!(shard(u128::MAX).as_deref(), Some("shardId-2"));
        // A hole (a range being resharded) maps to no shard.
        let holed = ShardMap::new([("a", "10", "19", None), ("b", "30", "39", None)]).unwrap();
        assert_eq!(holed.shard_of(9), None);
        assert_eq!(holed.shard_of(25), None);
        assert_eq!(holed.shard_of(40), None);
        assert_eq!(holed.shard_of(39).map(|s| &**s), Some("b"));
        assert!(ShardMap::new([("x", "-1", "5", None)]).is_err());
    }

    #[test]
    fn an_entry_counts_its_key_and_is_ordered_by_its_shard_or_else_its_key() {
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
            .build();
        let settings = SinkSettings {
            target: Some("s".into()),
            ..SinkSettings::default()
        };
        let sink = KinesisSink::new(Client::from_conf(config), &settings).unwrap();
        let mut entry =
            plain_entry(UserRecord::plain("pk-1", None, Bytes::from_static(b"abc"))).unwrap();
        // Kinesis counts the partition key in a record's size.
        assert_eq!(sink.size(&entry), 3 + 4);
        assert_eq!(sink.order_key(&entry), Some(&b"pk-1"[..]));
        entry.shard = Some((Arc::from("shardId-7"), 1));
        assert_eq!(sink.order_key(&entry), Some(&b"shardId-7"[..]));
    }

    #[test]
    fn per_entry_codes_are_throttled_retried_or_final() {
        assert_eq!(
            entry_outcome("ProvisionedThroughputExceededException", ""),
            EntryOutcome::throttled("ProvisionedThroughputExceededException")
        );
        assert_eq!(
            entry_outcome("KMSThrottlingException", ""),
            EntryOutcome::throttled("KMSThrottlingException")
        );
        assert_eq!(
            entry_outcome("InternalFailure", ""),
            EntryOutcome::retry("InternalFailure")
        );
        assert_eq!(
            entry_outcome("KMSAccessDeniedException", "no"),
            EntryOutcome::failed("KMSAccessDeniedException", "no")
        );
    }
}
