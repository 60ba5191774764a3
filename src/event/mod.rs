//! The Lambda Kinesis event, read leniently, with each record's data base64-decoded.
//!
//! Two readers give the same records: serde (the `Deserialize` impl, which decides every
//! case) and a fast path for the events Lambda sends (`fast.rs`), which `from_slice` and
//! `from_owned` try first. Decoding is in `decode.rs`.
//!
//! `aws_lambda_events` deserializes the whole event at once, so one record with unpadded
//! base64, an unknown `encryptionType` or a timestamp with many fractional digits fails the
//! whole invocation, and a failed invocation blocks the shard. Here only the envelope must be
//! right (a JSON object with a `Records` array whose entries have a sequence number); every
//! other problem belongs to its record and gets the corrupt-input policy.
//!
//! The same types also read the output of `aws kinesis get-records` (`Records[].Data`,
//! `PartitionKey`, `SequenceNumber`), so the command line can inspect a live stream.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
/// The string type of a record's sequence number and partition key: UTF-8 kept in a
/// [`Bytes`], so that it can be a slice of the invocation body (re-exported from
/// `bytestring`).
pub use bytestring::ByteString;
use serde::de::value::MapAccessDeserializer;
use serde::de::{Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

mod decode;
mod fast;
mod salvage;
// Allowed `unsafe`: SIMD intrinsics, see its docs.
#[allow(unsafe_code)]
mod vbmi;
mod window;

pub use window::TumblingWindow;
use window::{WINDOW_FIELDS, WindowFields};

/// A Lambda Kinesis event (or `get-records` output), one [`EventRecord`] per Kinesis record.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::event::KinesisEvent;
/// let event: KinesisEvent = serde_json::from_str(r#"{"Records":[{"kinesis":{
///     "sequenceNumber":"1","partitionKey":"k","data":"aGk=","encryptionType":"new"}}]}"#).unwrap();
/// assert_eq!(&event.records[0].decode_data().unwrap()[..], b"hi");
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KinesisEvent {
    /// The records, in the order Lambda gave them (sequence order within the shard).
    pub records: Vec<EventRecord>,
    /// The window of a tumbling-window event; `None` for a plain event.
    pub window: Option<TumblingWindow>,
}

/// One Kinesis record of the event, with what Lambda tells about it.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    /// The record's sequence number: what a batch item failure names. Like the partition
    /// key, a slice of the invocation body when the event was read from one
    /// ([`KinesisEvent::from_owned`]), else a copy; as with `data`, keeping it keeps the body.
    pub sequence_number: ByteString,
    /// The outer partition key (`"a"` for KPL aggregates); empty when absent.
    pub partition_key: ByteString,
    /// The `data` field, base64-decoded as the event is read (the text is never copied), or
    /// why it is unusable. The records of an event share one buffer: the body itself
    /// ([`KinesisEvent::from_owned`]) or one of decoded data; keeping any of it keeps that
    /// buffer.
    pub data: Result<Bytes, BadData>,
    /// When Kinesis received the record.
    pub approximate_arrival: Option<SystemTime>,
    /// The shard id, from `eventID` (`shardId-...:<sequenceNumber>`).
    pub shard_id: Option<Arc<str>>,
    /// The stream ARN (`eventSourceARN`).
    pub event_source_arn: Option<Arc<str>>,
}

/// Why a record's `data` field is unusable, with the field as it came.
#[derive(Clone, Debug, PartialEq)]
pub struct BadData {
    /// What is wrong: absent, not a string, or not base64.
    pub message: String,
    /// The field's text when it was a string (delivered as is under
    /// `DEAGG_ON_CORRUPT=passthrough`), else empty.
    pub raw: Bytes,
}

/// Why an event could not be read at all (an invocation error, not a record's problem).
#[derive(Debug, thiserror::Error)]
#[error("not a Kinesis event: {0}")]
pub struct EventError(#[from] serde_json::Error);

impl KinesisEvent {
    /// Reads an event from JSON bytes.
    ///
    /// # Errors
    ///
    /// When the bytes are not JSON, have no `Records` array, or a record has no sequence
    /// number, or one given twice or unreadable (Lambda could not be told which record failed,
    /// so the only safe answer is to fail the invocation; the message names the event source
    /// of a record from another one, SQS say). A record otherwise unreadable (a field twice, a
    /// lone surrogate escape) is read with its `data` unusable: see `salvage.rs`.
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::event::KinesisEvent;
    /// let err = KinesisEvent::from_slice(br#"{"Items":[]}"#).unwrap_err();
    /// assert!(err.to_string().contains("Records"));
    /// ```
    pub fn from_slice(json: &[u8]) -> Result<Self, EventError> {
        // The fast path answers for the events Lambda sends; serde decides everything else.
        let mut texts = Vec::new();
        let found = fast::read(&mut &json[..], |_, i, at| {
            texts.push((i, at));
            0
        });
        if let Some(((mut records, strings), extras)) = found {
            let texts = texts.into_iter().map(|(i, at)| (i, &json[at]));
            decode::into_one_buffer(&mut records, texts);
            if let (true, Some(window)) = (fast::refused_texts_are_json(&records), window(&extras))
            {
                for (record, [seq, pk]) in records.iter_mut().zip(strings) {
                    record.sequence_number = copy_str(&json[seq]);
                    record.partition_key = copy_str(&json[pk]);
                }
                return Ok(KinesisEvent { records, window });
            }
        }
        Ok(serde_json::from_slice(json)?)
    }

    /// [`KinesisEvent::from_slice`] on a body the caller gives away: each record's data is
    /// decoded where its base64 text stood, so the event takes no memory beyond the body,
    /// which the records share. What [`run`](crate::run) does with each invocation.
    ///
    /// The body is a `BytesMut`, as the runtime reads it (`BytesMut` so that its front can be
    /// handed over while the rest is read, see `from_owned_each`). A `Bytes` that is the only
    /// handle on its buffer (as one made from a `Vec<u8>`) becomes one without a copy;
    /// anything else, a `&[u8]` say, is copied.
    ///
    /// # Errors
    ///
    /// As [`KinesisEvent::from_slice`].
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::event::KinesisEvent;
    /// let body = br#"{"Records":[{"kinesis":{"sequenceNumber":"1","data":"aGk="}}]}"#.to_vec();
    /// let event = KinesisEvent::from_owned(bytes::Bytes::from(body)).unwrap();
    /// assert_eq!(&event.records[0].decode_data().unwrap()[..], b"hi");
    /// ```
    pub fn from_owned(body: impl Into<BytesMut>) -> Result<Self, EventError> {
        Self::from_owned_each(body, |_| {})
    }

    /// [`KinesisEvent::from_owned`] that also hands `early` the data of every record of
    /// [`EARLY_MIN`] bytes or more as soon as the record is read, while the rest of the body
    /// is still being read: so a second core can start on it (the runtime checks aggregates'
    /// MD5s that way). Each is the very buffer the event's record then holds, unless the fast
    /// path gives up later in the body: serde then reads it afresh, into other buffers.
    ///
    /// To hand data over while the body is still being written further on, the front of the
    /// body up to the record's text is cut off and frozen (`BytesMut::split_to`, no copy).
    pub(crate) fn from_owned_each(
        body: impl Into<BytesMut>,
        mut early: impl FnMut(&Bytes),
    ) -> Result<Self, EventError> {
        let mut body = Cut {
            rest: body.into(),
            fronts: Vec::new(),
            cut: 0,
        };
        // By record: where its text stood and, unless refused (then it is still whole, to be
        // explained), where its bytes are now; both from the start of the body.
        let mut texts = Vec::new();
        let read = fast::read(&mut body, |body, i, at| {
            let span = decode::in_place(&mut body.rest, at.clone());
            texts.push((i, body.at(at.clone()), span.clone().map(|s| body.at(s))));
            match span {
                Some(span) if span.len() >= EARLY_MIN => {
                    early(&body.cut_to(at.end).slice(span));
                    at.end
                }
                _ => 0,
            }
        });
        let mut json = match read {
            Some(((mut records, strings), extras)) => {
                let body = body.freeze();
                let refused = texts.iter().filter(|(_, _, span)| span.is_none());
                let refused = refused.map(|(i, at, _)| (*i, body.slice(at.clone())));
                let refused: Vec<_> = refused.collect();
                decode::into_one_buffer(&mut records, refused.iter().map(|(i, t)| (*i, &t[..])));
                let window = window(&extras);
                if let (true, Some(window)) = (fast::refused_texts_are_json(&records), window) {
                    for (i, _, span) in texts {
                        if let Some(span) = span {
                            records[i].data = Ok(body.slice(span));
                        }
                    }
                    for (record, [seq, pk]) in records.iter_mut().zip(strings) {
                        record.sequence_number = body_str(&body, seq);
                        record.partition_key = body_str(&body, pk);
                    }
                    return Ok(KinesisEvent { records, window });
                }
                body.whole()
            }
            None => body.whole(),
        };
        // Serde reads the body as it came (rare: the fast path gave up, or a refused text is
        // not even a JSON string).
        for (_, at, span) in texts {
            if let Some(span) = span {
                decode::put_back(&mut json, at, span.end);
            }
        }
        Ok(serde_json::from_slice(&json)?)
    }
}

/// The window of the fields the fast path kept (see [`fast::read`]); `None` when they do
/// not read, so that serde reads the whole event and says why.
fn window(extras: &[u8]) -> Option<Option<TumblingWindow>> {
    if extras.is_empty() {
        return Some(None);
    }
    let fields: WindowFields = serde_json::from_slice(extras).ok()?;
    Some(fields.into_window())
}

/// A record's data this long or longer is handed over early by
/// [`KinesisEvent::from_owned_each`]: worth a head start on another core (a KPL aggregate is
/// up to 1 MiB, 50 KB by default), and rare enough that the cut costs nothing.
const EARLY_MIN: usize = 16 * 1024;

/// A body being read, its front cut off in pieces (for [`fast::read`], which sees only the
/// rest): places are counted from the start of the whole body.
struct Cut {
    rest: BytesMut,
    /// The pieces cut off, in order, with where each starts.
    fronts: Vec<(usize, Bytes)>,
    /// How much was cut off: where the rest starts.
    cut: usize,
}

impl Cut {
    /// `range` of the rest, from the start of the body.
    fn at(&self, range: Range<usize>) -> Range<usize> {
        range.start + self.cut..range.end + self.cut
    }

    /// Cuts the rest's first `len` bytes off and gives them.
    fn cut_to(&mut self, len: usize) -> &Bytes {
        let front = self.rest.split_to(len).freeze();
        self.fronts.push((self.cut, front));
        self.cut += len;
        &self.fronts.last().expect("just pushed").1
    }

    /// Every piece, the rest last.
    fn freeze(self) -> Pieces {
        let mut pieces = self.fronts;
        pieces.push((self.cut, self.rest.freeze()));
        Pieces(pieces)
    }

    /// The whole body, in one piece again (copied only if it was cut).
    fn whole(self) -> BytesMut {
        if self.fronts.is_empty() {
            self.rest
        } else {
            self.freeze().whole()
        }
    }
}

impl AsRef<[u8]> for Cut {
    fn as_ref(&self) -> &[u8] {
        &self.rest
    }
}

/// A body cut in pieces, each with where it starts.
struct Pieces(Vec<(usize, Bytes)>);

impl Pieces {
    /// `range` of the body (never across a cut: each cut ends a text), without a copy.
    fn slice(&self, range: Range<usize>) -> Bytes {
        // Most bodies (all without big records) are one piece.
        let piece = match self.0.len() {
            1 => 0,
            _ => self.0.partition_point(|(start, _)| *start <= range.start) - 1,
        };
        let (start, bytes) = &self.0[piece];
        bytes.slice(range.start - start..range.end - start)
    }

    /// The body in one piece again: a copy.
    fn whole(self) -> BytesMut {
        let mut whole = BytesMut::with_capacity(self.0.iter().map(|(_, b)| b.len()).sum());
        for (_, piece) in self.0 {
            whole.extend_from_slice(&piece);
        }
        whole
    }
}

impl<'de> Deserialize<'de> for KinesisEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `flatten` buffers the fields it takes (the window's, and unknown ones), never
        // `Records`.
        #[derive(Deserialize)]
        struct Envelope {
            #[serde(rename = "Records")]
            records: Records,
            #[serde(flatten)]
            window: WindowFields,
        }
        let Envelope { records, window } = Envelope::deserialize(deserializer)?;
        Ok(KinesisEvent {
            records: records.0,
            window: window.into_window(),
        })
    }
}

/// The `Records` array, each record read and checked as it is reached (no list of raw
/// records in between).
struct Records(Vec<EventRecord>);

impl<'de> Deserialize<'de> for Records {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RecordsVisitor;
        impl<'de> Visitor<'de> for RecordsVisitor {
            type Value = Records;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of records")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Records, A::Error> {
                let mut records = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                let mut texts = Vec::with_capacity(records.capacity());
                let mut repeated = Repeated::default();
                while let Some(slot) = seq.next_element::<salvage::Slot>()? {
                    let i = records.len();
                    let (mut record, borrowed) = slot
                        .read(&mut repeated)
                        .map_err(|e| A::Error::custom(format!("record {i}: {e}")))?;
                    borrowed.copy_strings_into(&mut record);
                    records.push(record);
                    texts.extend(borrowed.data.map(|text| (i, text)));
                }
                decode::into_one_buffer(&mut records, texts.iter().map(|(i, t)| (*i, &*t.0)));
                Ok(Records(records))
            }
        }
        deserializer.deserialize_seq(RecordsVisitor)
    }
}

/// One record as it comes: Lambda's shape (`kinesis` object) or `get-records`' (capitalised
/// fields at the top). Every field is [`Loose`], so a field of the wrong type is that
/// record's problem, found when the record is read, not a failure of the whole event. (No
/// `#[serde(flatten)]`: it would buffer, and so copy, every record before reading it.)
#[derive(Deserialize, Default)]
struct RawRecord<'a> {
    #[serde(borrow)]
    kinesis: Option<Lenient<RawKinesis<'a>>>,
    #[serde(rename = "eventID", borrow)]
    event_id: Option<Loose<Str<'a>>>,
    #[serde(rename = "eventSourceARN", borrow)]
    event_source_arn: Option<Loose<Str<'a>>>,
    #[serde(rename = "SequenceNumber", borrow)]
    get_records_sequence_number: Option<Loose<Str<'a>>>,
    #[serde(rename = "PartitionKey", borrow)]
    get_records_partition_key: Option<Loose<Str<'a>>>,
    #[serde(rename = "Data", borrow)]
    get_records_data: Option<Loose<Text<'a>>>,
    #[serde(rename = "ApproximateArrivalTimestamp")]
    get_records_approximate_arrival_timestamp: Option<Loose>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawKinesis<'a> {
    #[serde(borrow)]
    sequence_number: Option<Loose<Str<'a>>>,
    #[serde(borrow)]
    partition_key: Option<Loose<Str<'a>>>,
    #[serde(borrow)]
    data: Option<Loose<Text<'a>>>,
    approximate_arrival_timestamp: Option<Loose>,
}

/// What a JSON string becomes in a [`Loose`] value.
trait FromJsonStr<'de>: Sized {
    fn from_json_str(s: &str) -> Self;
    /// A string that stands as is in the input (no escapes), which lives as long as it.
    fn from_borrowed(s: &'de str) -> Self {
        Self::from_json_str(s)
    }
    /// [`from_borrowed`](Self::from_borrowed) on bytes the fast path checked as a JSON
    /// string (UTF-8, no escapes); `None` only if they were not.
    fn from_checked_bytes(bytes: &'de [u8]) -> Option<Self> {
        std::str::from_utf8(bytes).ok().map(Self::from_borrowed)
    }
}

impl FromJsonStr<'_> for Arc<str> {
    fn from_json_str(s: &str) -> Self {
        Arc::from(s)
    }
}

/// A string read without a copy: the shard and the stream, the same in most records of an
/// event, then shared through [`Repeated`]; the sequence number and partition key (see
/// [`Borrowed`]). Its bytes are checked UTF-8, kept as bytes so that an ASCII string the fast
/// path found equal to the last one is never converted.
struct Str<'de>(Cow<'de, [u8]>);

impl<'de: 'a, 'a> FromJsonStr<'de> for Str<'a> {
    fn from_json_str(s: &str) -> Self {
        Str(Cow::Owned(s.as_bytes().to_vec()))
    }
    fn from_borrowed(s: &'de str) -> Self {
        Str(Cow::Borrowed(s.as_bytes()))
    }
    fn from_checked_bytes(bytes: &'de [u8]) -> Option<Self> {
        Some(Str(Cow::Borrowed(bytes)))
    }
}

/// The shard id and stream ARN of the last record read: an event holds one shard of one
/// stream, so each record shares them instead of allocating its own.
#[derive(Default)]
struct Repeated {
    shard_id: Option<Arc<str>>,
    stream_arn: Option<Arc<str>>,
}

impl Repeated {
    /// `s` (checked UTF-8, so nothing is ever replaced), the last one's `Arc` if equal.
    fn share(slot: &mut Option<Arc<str>>, s: &[u8]) -> Arc<str> {
        match slot {
            Some(last) if last.as_bytes() == s => last.clone(),
            _ => slot.insert(String::from_utf8_lossy(s).into()).clone(),
        }
    }
}

/// A `data` string: borrowed from the invocation body, copied only when it had escapes.
/// Decoded once the whole `Records` array is read, into one buffer for all records. Bytes,
/// not `str`: the fast path leaves the check of the text to the base64 decoder.
struct Text<'de>(Cow<'de, [u8]>);

impl<'de: 'a, 'a> FromJsonStr<'de> for Text<'a> {
    fn from_json_str(s: &str) -> Self {
        Text(Cow::Owned(s.as_bytes().to_vec()))
    }
    fn from_borrowed(s: &'de str) -> Self {
        Text(Cow::Borrowed(s.as_bytes()))
    }
}

/// Any JSON value, kept only as far as a record needs it: strings and numbers as they are,
/// anything else as the name of its type (nested values are skipped, not built).
enum Loose<S = Arc<str>> {
    Str(S),
    Num(f64),
    Other(&'static str),
}

impl<S> Loose<S> {
    fn kind(&self) -> &'static str {
        match self {
            Loose::Str(_) => "a string",
            Loose::Num(_) => "a number",
            Loose::Other(kind) => kind,
        }
    }
}

impl<'de, S: FromJsonStr<'de>> Deserialize<'de> for Loose<S> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LooseVisitor(std::marker::PhantomData))
    }
}

struct LooseVisitor<S>(std::marker::PhantomData<S>);

impl<'de, S: FromJsonStr<'de>> Visitor<'de> for LooseVisitor<S> {
    type Value = Loose<S>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Loose::Str(S::from_json_str(v)))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Loose::Str(S::from_borrowed(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Loose::Num(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Loose::Num(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Loose::Num(v as f64))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Loose::Other("a boolean"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Loose::Other("null"))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Loose::Other("null"))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::Other("an object"))
    }
}

/// An object read as `T`, or the type of whatever else stood there.
enum Lenient<T> {
    Object(T),
    Not(&'static str),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Lenient<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Lenient::Object)
            }
            fn visit_str<E>(self, _: &str) -> Result<Lenient<T>, E> {
                Ok(Lenient::Not("a string"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Lenient<T>, E> {
                Ok(Lenient::Not("a number"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Lenient<T>, E> {
                Ok(Lenient::Not("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Lenient<T>, E> {
                Ok(Lenient::Not("a number"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Lenient<T>, E> {
                Ok(Lenient::Not("a boolean"))
            }
            fn visit_unit<E>(self) -> Result<Lenient<T>, E> {
                Ok(Lenient::Not("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient<T>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient::Not("an array"))
            }
        }
        deserializer.deserialize_any(ObjectVisitor(std::marker::PhantomData))
    }
}

impl EventRecord {
    /// Reads one record: `{"kinesis": {...}, "eventID", "eventSourceARN"}` from Lambda, or
    /// `{"Data", "PartitionKey", "SequenceNumber"}` from `get-records`. Its sequence number,
    /// partition key and `data` text come back beside it (see [`Borrowed`]).
    fn from_raw<'a>(
        raw: Lenient<RawRecord<'a>>,
        repeated: &mut Repeated,
    ) -> Result<(Self, Borrowed<'a>), String> {
        let raw = match raw {
            Lenient::Object(raw) => raw,
            Lenient::Not(kind) => {
                return Err(format!(
                    "the record is {kind}, not an object with a `sequenceNumber` (or `SequenceNumber`)"
                ));
            }
        };
        let (names, seq, pk, data, arrival) = match raw.kinesis {
            Some(Lenient::Object(k)) => (
                LAMBDA_NAMES,
                k.sequence_number,
                k.partition_key,
                k.data,
                k.approximate_arrival_timestamp,
            ),
            Some(Lenient::Not(kind)) => {
                return Err(format!(
                    "`kinesis` is {kind}, not an object with a `sequenceNumber`"
                ));
            }
            None => (
                GET_RECORDS_NAMES,
                raw.get_records_sequence_number,
                raw.get_records_partition_key,
                raw.get_records_data,
                raw.get_records_approximate_arrival_timestamp,
            ),
        };
        let [seq_name, data_name] = names;
        let sequence_number = match seq {
            Some(Loose::Str(Str(s))) if !s.is_empty() => s,
            Some(other) => {
                return Err(format!(
                    "`{seq_name}` is not a non-empty string but {}",
                    other.kind()
                ));
            }
            None => return Err(format!("no `{seq_name}`, so no failure could ever name it")),
        };
        let bad = |message| BadData {
            message,
            raw: Bytes::new(),
        };
        let (data, data_text) = match data {
            Some(Loose::Str(text)) => (Ok(Bytes::new()), Some(text)),
            Some(other) => (
                Err(bad(format!(
                    "`{data_name}` is not a string but {}",
                    other.kind()
                ))),
                None,
            ),
            None => (Err(bad(format!("no `{data_name}` field"))), None),
        };
        let approximate_arrival = match arrival {
            Some(Loose::Num(s)) if s.is_finite() && (0.0..1e12).contains(&s) => {
                // Kinesis stamps milliseconds; rounding keeps 1545084650.987 from becoming .986999.
                Some(SystemTime::UNIX_EPOCH + Duration::from_millis((s * 1000.0).round() as u64))
            }
            _ => None,
        };
        let shard_id = match raw.event_id {
            Some(Loose::Str(Str(id))) => memchr::memchr(b':', &id)
                .map(|colon| Repeated::share(&mut repeated.shard_id, &id[..colon])),
            _ => None,
        };
        let event_source_arn = match raw.event_source_arn {
            Some(Loose::Str(Str(arn))) => Some(Repeated::share(&mut repeated.stream_arn, &arn)),
            _ => None,
        };
        let partition_key = match pk {
            Some(Loose::Str(Str(pk))) => pk,
            _ => Cow::Borrowed(&[][..]),
        };
        let record = EventRecord {
            sequence_number: ByteString::new(),
            partition_key: ByteString::new(),
            data,
            approximate_arrival,
            shard_id,
            event_source_arn,
        };
        let borrowed = Borrowed {
            sequence_number,
            partition_key,
            data: data_text,
        };
        Ok((record, borrowed))
    }

    /// The record's decoded `data` (a cheap clone of [`EventRecord::data`]).
    ///
    /// # Errors
    ///
    /// A message saying what is wrong with the field: absent, not a string, or not base64.
    pub fn decode_data(&self) -> Result<Bytes, String> {
        self.data.clone().map_err(|bad| bad.message)
    }
}

/// What a record read from JSON still borrows from it: its sequence number and partition key
/// (empty when absent), which the reader then makes the record's own, and its `data` text,
/// still to be decoded.
///
/// Why: an event holds up to 10,000 records, and two strings of their own each would be two
/// blocks of memory to allocate and free per record (on W3, 3,166 plain records, 360
/// instructions per record and half the time of dropping the event). Read from an owned
/// body, they are slices of it instead ([`KinesisEvent::from_owned`]).
struct Borrowed<'a> {
    sequence_number: Cow<'a, [u8]>,
    partition_key: Cow<'a, [u8]>,
    data: Option<Text<'a>>,
}

impl Borrowed<'_> {
    /// The same, owning what it borrowed.
    fn into_owned(self) -> Borrowed<'static> {
        Borrowed {
            sequence_number: Cow::Owned(self.sequence_number.into_owned()),
            partition_key: Cow::Owned(self.partition_key.into_owned()),
            data: self.data.map(|Text(t)| Text(Cow::Owned(t.into_owned()))),
        }
    }

    /// Gives `record` copies of its strings.
    fn copy_strings_into(&self, record: &mut EventRecord) {
        record.sequence_number = copy_str(&self.sequence_number);
        record.partition_key = copy_str(&self.partition_key);
    }
}

/// A copy of a string read from JSON (so UTF-8; anything else would be replaced, U+FFFD).
fn copy_str(bytes: &[u8]) -> ByteString {
    ByteString::from(&*String::from_utf8_lossy(bytes))
}

/// A string read from JSON (so UTF-8), as a slice of the body that held it (no copy).
fn body_str(body: &Pieces, range: Range<usize>) -> ByteString {
    ByteString::try_from(body.slice(range.clone())).unwrap_or_else(|_| copy_str(&body.slice(range)))
}

/// Names of the sequence number and data fields, for messages, in each shape.
const LAMBDA_NAMES: [&str; 2] = ["sequenceNumber", "data"];
const GET_RECORDS_NAMES: [&str; 2] = ["SequenceNumber", "Data"];

#[cfg(test)]
mod tests {
    use super::*;

    fn one(record: &str) -> Result<EventRecord, String> {
        KinesisEvent::from_slice(format!(r#"{{"Records":[{record}]}}"#).as_bytes())
            .map(|mut e| e.records.remove(0))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_lambda_record_is_read() {
        let r = one(
            r#"{"kinesis":{"kinesisSchemaVersion":"1.0","partitionKey":"pk","sequenceNumber":"495",
            "data":"aGk=","approximateArrivalTimestamp":1545084650.987},"eventSource":"aws:kinesis",
            "eventID":"shardId-000000000006:495","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}"#,
        )
        .unwrap();
        assert_eq!(&*r.sequence_number, "495");
        assert_eq!(&*r.partition_key, "pk");
        assert_eq!(r.shard_id.as_deref(), Some("shardId-000000000006"));
        assert_eq!(
            r.event_source_arn.as_deref(),
            Some("arn:aws:kinesis:us-east-1:1:stream/s")
        );
        let ms = r
            .approximate_arrival
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert_eq!(ms, 1_545_084_650_987);
        assert_eq!(&r.decode_data().unwrap()[..], b"hi");
    }

    #[test]
    fn records_share_their_shard_and_stream_but_keep_their_own_when_they_differ() {
        let rec = |shard: u8, stream: &str| {
            format!(
                r#"{{"kinesis":{{"sequenceNumber":"1","data":""}},"eventID":"shardId-{shard}:1","eventSourceARN":"arn:{stream}"}}"#
            )
        };
        let (a, b) = (rec(1, "a"), rec(2, "b"));
        let json = format!(r#"{{"Records":[{a},{a},{b},{a}]}}"#);
        let fast = KinesisEvent::from_slice(json.as_bytes()).unwrap();
        let serde = serde_json::from_str::<KinesisEvent>(&json).unwrap();
        for event in [fast, serde] {
            let r = &event.records;
            let got: Vec<_> = r
                .iter()
                .map(|r| (r.shard_id.as_deref(), r.event_source_arn.as_deref()))
                .collect();
            let (one, two) = (
                (Some("shardId-1"), Some("arn:a")),
                (Some("shardId-2"), Some("arn:b")),
            );
            assert_eq!(got, [one, one, two, one]);
            let same = |i: usize, j: usize| {
                Arc::ptr_eq(
                    r[i].shard_id.as_ref().unwrap(),
                    r[j].shard_id.as_ref().unwrap(),
                )
            };
            assert!(same(0, 1) && !same(1, 2));
        }
    }

    #[test]
    fn an_owned_bodys_records_keep_their_strings_in_it_without_a_copy() {
        use base64::Engine;
        // A big record first, so that the body is cut in pieces (see `from_owned_each`).
        let big = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 2 * EARLY_MIN]);
        let record = |seq: &str, data: &str| {
            format!(
                r#"{{"kinesis":{{"sequenceNumber":"{seq}","partitionKey":"k{seq}","data":"{data}"}}}}"#
            )
        };
        let json = format!(
            r#"{{"Records":[{},{}]}}"#,
            record("1", &big),
            record("2", "aGk=")
        );
        let body = json.clone().into_bytes();
        let within = body.as_ptr_range();
        let owned = KinesisEvent::from_owned(Bytes::from(body)).unwrap();
        let copied = KinesisEvent::from_slice(json.as_bytes()).unwrap();
        assert_eq!(owned, copied);
        for (r, (seq, pk)) in owned.records.iter().zip([("1", "k1"), ("2", "k2")]) {
            assert_eq!((&*r.sequence_number, &*r.partition_key), (seq, pk));
            for s in [&r.sequence_number, &r.partition_key] {
                assert!(within.contains(&s.as_ptr()), "{s} was copied");
            }
        }
    }

    #[test]
    fn get_records_output_is_read_too() {
        let r = one(r#"{"SequenceNumber":"7","PartitionKey":"k","Data":"aGk="}"#).unwrap();
        assert_eq!((&*r.sequence_number, &*r.partition_key), ("7", "k"));
        assert_eq!(r.shard_id, None);
        assert_eq!(&r.decode_data().unwrap()[..], b"hi");
    }

    #[test]
    fn strange_fields_are_the_records_problem_not_the_events() {
        let r = one(
            r#"{"kinesis":{"sequenceNumber":"1","data":"aGk","encryptionType":"QUANTUM",
            "approximateArrivalTimestamp":1545084650.98712345}}"#,
        )
        .unwrap();
        // Unpadded base64 still decodes; a long fraction is still a time.
        assert_eq!(&r.decode_data().unwrap()[..], b"hi");
        assert!(r.approximate_arrival.is_some());
        let r = one(r#"{"kinesis":{"sequenceNumber":"1","data":"!!not base64!!"}}"#).unwrap();
        assert!(r.decode_data().unwrap_err().contains("not valid base64"));
        let r = one(r#"{"kinesis":{"sequenceNumber":"1","data":42,"partitionKey":[]}}"#).unwrap();
        assert_eq!(
            r.decode_data().unwrap_err(),
            "`data` is not a string but a number"
        );
        assert_eq!(&*r.partition_key, "");
        let r = one(r#"{"kinesis":{"sequenceNumber":"1"}}"#).unwrap();
        assert_eq!(r.decode_data().unwrap_err(), "no `data` field");
        // A time before 1970 or past year 33658 is none at all.
        let arrival = |ts: &str| {
            let json = format!(
                r#"{{"kinesis":{{"sequenceNumber":"1","approximateArrivalTimestamp":{ts}}}}}"#
            );
            one(&json).unwrap().approximate_arrival
        };
        for ts in ["-1", "1e12", "1.5e15"] {
            assert_eq!(arrival(ts), None, "{ts}");
        }
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_545_084_650_987);
        assert_eq!(arrival("1545084650.987"), Some(at));
    }

    #[test]
    fn a_record_without_a_sequence_number_fails_the_event_naming_it() {
        let err = one(r#"{"kinesis":{"data":"aGk="}}"#).unwrap_err();
        assert!(
            err.contains("record 0") && err.contains("sequenceNumber"),
            "{err}"
        );
        let err = one(r#"{"kinesis":{"sequenceNumber":12}}"#).unwrap_err();
        assert!(err.contains("not a non-empty string"), "{err}");
        assert!(one("5").unwrap_err().contains("SequenceNumber"));
        // The same for a record serde refuses (a field twice), read for its sequence number.
        for seq in [r#""""#, "12"] {
            let json = format!(r#"{{"kinesis":{{"sequenceNumber":{seq},"data":"","data":""}}}}"#);
            let err = one(&json).unwrap_err();
            assert!(err.contains("not a non-empty string"), "{err}");
        }
    }

    #[test]
    fn what_is_not_a_kinesis_event_is_an_error() {
        for bad in [&b"not json"[..], b"{}", br#"{"Records":5}"#, b"[]", b""] {
            let err = KinesisEvent::from_slice(bad).unwrap_err().to_string();
            assert!(err.starts_with("not a Kinesis event"), "{err}");
        }
        let err = KinesisEvent::from_slice(br#"{"Records":5}"#).unwrap_err();
        assert!(
            err.to_string().contains("expected an array of records"),
            "{err}"
        );
        assert_eq!(
            KinesisEvent::from_slice(br#"{"Records":[]}"#)
                .unwrap()
                .records
                .len(),
            0
        );
    }
}
