//! The serde path's records, each read from its own JSON text, so that a record serde
//! refuses is that record's problem, not the event's.
//!
//! A record with a field twice (`partitionKey`, `data`, `eventID`, ...), a lone surrogate
//! escape (`"\ud800"`) or a number out of range fails serde's reading of it; read as part of
//! the whole event, that failed the invocation, and so blocked the shard. Here each record
//! is first taken as raw JSON text (serde_json's `RawValue`, which only checks the syntax),
//! then read; when that fails, only its sequence number is looked for, and the record becomes
//! one whose `data` is unusable ([`BadData`]), with what serde said: the corrupt-input policy
//! then applies, as to invalid base64. A sequence number that is absent, repeated or itself
//! unreadable leaves no name for the record, so it still fails the event.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::{BadData, Borrowed, EventRecord, Lenient, Loose, RawRecord, Repeated, Str};

/// serde_json's name for a raw value (`serde_json::value::RawValue`): a deserializer that
/// knows it hands the value's text over instead of the value.
const RAW_VALUE: &str = "$serde_json::private::RawValue";

/// One element of `Records`: its JSON text when the deserializer gives it (serde_json's do),
/// else the record as read by any other deserializer.
pub(super) enum Slot<'de> {
    Borrowed(&'de str),
    Owned(String),
    /// Boxed: rare (no serde_json), and big.
    Parsed(Box<Lenient<RawRecord<'de>>>),
}

impl<'de> Deserialize<'de> for Slot<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_newtype_struct(RAW_VALUE, SlotVisitor)
    }
}

struct SlotVisitor;

impl<'de> Visitor<'de> for SlotVisitor {
    type Value = Slot<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record")
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Slot<'de>, D::Error> {
        Lenient::deserialize(d).map(|raw| Slot::Parsed(Box::new(raw)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot<'de>, A::Error> {
        match map.next_key::<Cow<str>>()? {
            Some(key) if key == RAW_VALUE => map.next_value::<RawText>().map(|t| t.0),
            _ => Err(A::Error::custom(
                "a deserializer gave a map for a raw value",
            )),
        }
    }
}

/// The text of a raw value, borrowed when it can be.
struct RawText<'de>(Slot<'de>);

impl<'de> Deserialize<'de> for RawText<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = RawText<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("the text of a raw value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<RawText<'de>, E> {
                Ok(RawText(Slot::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawText<'de>, E> {
                Ok(RawText(Slot::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<RawText<'de>, E> {
                Ok(RawText(Slot::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

impl<'de> Slot<'de> {
    /// The record, and what it borrows; `Err` says why the event cannot be read.
    pub(super) fn read(
        self,
        repeated: &mut Repeated,
    ) -> Result<(EventRecord, Borrowed<'de>), String> {
        match self {
            Slot::Borrowed(json) => read(json, repeated),
            Slot::Owned(json) => read(&json, repeated).map(|(r, b)| (r, b.into_owned())),
            Slot::Parsed(raw) => EventRecord::from_raw(*raw, repeated),
        }
    }
}

/// Reads the record whose text is `json`.
fn read<'a>(json: &'a str, repeated: &mut Repeated) -> Result<(EventRecord, Borrowed<'a>), String> {
    match serde_json::from_str::<Lenient<RawRecord<'a>>>(json) {
        Ok(raw) => {
            EventRecord::from_raw(raw, repeated).map_err(|e| other_source(json).unwrap_or(e))
        }
        Err(e) => salvage(json, &e).map_err(|e| other_source(json).unwrap_or(e)),
    }
}

/// When the record says it comes from another event source than Kinesis (SQS, DynamoDB
/// Streams, ...), a message saying so.
fn other_source(json: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Source {
        #[serde(rename = "eventSource")]
        event_source: String,
    }
    let source = serde_json::from_str::<Source>(json).ok()?.event_source;
    (source != "aws:kinesis").then(|| {
        format!("`eventSource` is {source}: only Kinesis events (aws:kinesis) are handled")
    })
}

/// What is left of a record serde refused (`error`): a record with its sequence number and
/// unusable data, or why not even that.
fn salvage<'a>(
    json: &'a str,
    error: &serde_json::Error,
) -> Result<(EventRecord, Borrowed<'a>), String> {
    let names = serde_json::from_str::<Names<'a>>(json).map_err(|e| {
        format!(
            "its sequence number cannot be read: {}",
            without_position(&e)
        )
    })?;
    let (name, found) = match names.kinesis {
        0 => ("SequenceNumber", names.get_records),
        1 => ("sequenceNumber", names.lambda),
        _ => return Err("`kinesis` appears more than once".into()),
    };
    let mut found = found.into_iter();
    let sequence_number = match (found.next(), found.next()) {
        (Some(Loose::Str(Str(s))), None) if !s.is_empty() => s,
        (Some(other), None) => {
            return Err(format!(
                "`{name}` is not a non-empty string but {}",
                other.kind()
            ));
        }
        (None, _) => return Err(format!("no `{name}`, so no failure could ever name it")),
        (Some(_), Some(_)) => return Err(format!("`{name}` appears more than once")),
    };
    let record = EventRecord {
        sequence_number: super::ByteString::new(),
        partition_key: super::ByteString::new(),
        data: Err(BadData {
            message: format!("the record cannot be read: {}", reason(error)),
            raw: Bytes::new(),
        }),
        approximate_arrival: None,
        shard_id: None,
        event_source_arn: None,
    };
    let borrowed = Borrowed {
        sequence_number,
        partition_key: Cow::Borrowed(&[]),
        data: None,
    };
    Ok((record, borrowed))
}

/// What serde_json says is wrong, in words a user knows: its surrogate messages (`unexpected
/// end of hex escape` for `"\ud800"`) name the lone surrogate.
fn reason(e: &serde_json::Error) -> String {
    let why = without_position(e);
    match why.contains("surrogate") || why.contains("hex escape") {
        true => format!("a string holds a lone surrogate escape ({why})"),
        false => why,
    }
}

/// serde_json's message without its ` at line 1 column 80`: the place is in the record's text,
/// not the event's.
fn without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let place = format!(" at line {} column {}", e.line(), e.column());
    message
        .strip_suffix(&place)
        .map_or_else(|| message.clone(), str::to_owned)
}

/// The sequence numbers of a record, read from nothing else: every other key and value is
/// skipped (keys as bytes, so that not even a lone surrogate in one is a problem).
struct Names<'a> {
    /// How many `kinesis` objects it has.
    kinesis: usize,
    /// Their `sequenceNumber`s.
    lambda: Vec<Loose<Str<'a>>>,
    /// `SequenceNumber`s at the top (`get-records`' shape).
    get_records: Vec<Loose<Str<'a>>>,
}

/// A key, as bytes.
struct Key<'a>(Cow<'a, [u8]>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_vec())))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v.as_bytes())))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.as_bytes().to_vec())))
            }
        }
        deserializer.deserialize_bytes(KeyVisitor)
    }
}

/// The `sequenceNumber`s of a `kinesis` object (none when it is not an object).
struct KinesisNames<'a>(Vec<Loose<Str<'a>>>);

impl<'de> Deserialize<'de> for KinesisNames<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KinesisVisitor;
        impl<'de> Visitor<'de> for KinesisVisitor {
            type Value = KinesisNames<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = Vec::new();
                while let Some(Key(key)) = map.next_key()? {
                    match &*key {
                        b"sequenceNumber" => found.push(map.next_value()?),
                        _ => drop(map.next_value::<IgnoredAny>()?),
                    }
                }
                Ok(KinesisNames(found))
            }
        }
        deserializer.deserialize_map(KinesisVisitor)
    }
}

impl<'de> Deserialize<'de> for Names<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamesVisitor;
        impl<'de> Visitor<'de> for NamesVisitor {
            type Value = Names<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a record")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut names = Names {
                    kinesis: 0,
                    lambda: Vec::new(),
                    get_records: Vec::new(),
                };
                while let Some(Key(key)) = map.next_key()? {
                    match &*key {
                        b"kinesis" => match map.next_value::<Lenient<KinesisNames>>()? {
                            Lenient::Object(KinesisNames(found)) => {
                                names.kinesis += 1;
                                names.lambda.extend(found);
                            }
                            // As the record's reader: `kinesis: null` is no `kinesis`, one
                            // of another type leaves none to name the record.
                            Lenient::Not("null") => {}
                            Lenient::Not(kind) => {
                                return Err(A::Error::custom(format!("`kinesis` is {kind}")));
                            }
                        },
                        b"SequenceNumber" => names.get_records.push(map.next_value()?),
                        _ => drop(map.next_value::<IgnoredAny>()?),
                    }
                }
                Ok(names)
            }
        }
        deserializer.deserialize_map(NamesVisitor)
    }
}
