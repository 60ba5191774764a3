//! The Lambda Kinesis event, read leniently, and per-record base64 decoding.
//!
//! `aws_lambda_events` deserializes the whole event at once, so one record with unpadded
//! base64, an unknown `encryptionType` or a timestamp with many fractional digits fails the
//! whole invocation, and a failed invocation blocks the shard. Here only the envelope must be
//! right (a JSON object with a `Records` array whose entries have a sequence number); every
//! other problem belongs to its record and gets the corrupt-input policy.
//!
//! The same types also read the output of `aws kinesis get-records` (`Records[].Data`,
//! `PartitionKey`, `SequenceNumber`), so the command line can inspect a live stream.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Standard alphabet; padding optional, since a producer's unpadded base64 is still
/// unambiguous and is not worth blocking a shard over.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

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
}

/// One Kinesis record of the event, with what Lambda tells about it.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    /// The record's sequence number: what a batch item failure names.
    pub sequence_number: Arc<str>,
    /// The outer partition key (`"a"` for KPL aggregates); empty when absent.
    pub partition_key: Arc<str>,
    /// The `data` field as given (base64 text), or why it is unusable.
    pub data: Result<String, String>,
    /// When Kinesis received the record.
    pub approximate_arrival: Option<SystemTime>,
    /// The shard id, from `eventID` (`shardId-...:<sequenceNumber>`).
    pub shard_id: Option<Arc<str>>,
    /// The stream ARN (`eventSourceARN`).
    pub event_source_arn: Option<Arc<str>>,
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
    /// number (Lambda could not be told which record failed, so the only safe answer is to
    /// fail the invocation).
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::event::KinesisEvent;
    /// let err = KinesisEvent::from_slice(br#"{"Items":[]}"#).unwrap_err();
    /// assert!(err.to_string().contains("Records"));
    /// ```
    pub fn from_slice(json: &[u8]) -> Result<Self, EventError> {
        Ok(serde_json::from_slice(json)?)
    }
}

impl<'de> Deserialize<'de> for KinesisEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Envelope {
            #[serde(rename = "Records")]
            records: Vec<Value>,
        }
        let envelope = Envelope::deserialize(deserializer)?;
        let records = envelope
            .records
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                EventRecord::from_value(v).map_err(|e| D::Error::custom(format!("record {i}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(KinesisEvent { records })
    }
}

impl EventRecord {
    /// Reads one record: `{"kinesis": {...}, "eventID", "eventSourceARN"}` from Lambda, or
    /// `{"Data", "PartitionKey", "SequenceNumber"}` from `get-records`.
    fn from_value(mut v: Value) -> Result<Self, String> {
        let lambda_shape = v.get("kinesis").is_some();
        let mut inner = if lambda_shape {
            v["kinesis"].take()
        } else {
            v.clone()
        };
        let [seq, pk, data, arrival] = if lambda_shape {
            [
                "sequenceNumber",
                "partitionKey",
                "data",
                "approximateArrivalTimestamp",
            ]
        } else {
            [
                "SequenceNumber",
                "PartitionKey",
                "Data",
                "ApproximateArrivalTimestamp",
            ]
        };
        let sequence_number = match inner.get(seq) {
            Some(Value::String(s)) if !s.is_empty() => Arc::from(s.as_str()),
            Some(other) => return Err(format!("`{seq}` is not a non-empty string: {other}")),
            None => return Err(format!("no `{seq}`, so no failure could ever name it")),
        };
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(Arc::from);
        let data = match inner.get_mut(data).map(Value::take) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("`{data}` is not a string but {}", kind(&other))),
            None => Err(format!("no `{data}` field")),
        };
        let approximate_arrival = inner
            .get(arrival)
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e12)
            // Kinesis stamps milliseconds; rounding keeps 1545084650.987 from becoming .986999.
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_millis((s * 1000.0).round() as u64));
        let shard_id = v
            .get("eventID")
            .and_then(Value::as_str)
            .and_then(|id| id.split_once(':'))
            .map(|(shard, _)| Arc::from(shard));
        Ok(EventRecord {
            sequence_number,
            partition_key: text(inner.get(pk)).unwrap_or_else(|| Arc::from("")),
            data,
            approximate_arrival,
            shard_id,
            event_source_arn: text(v.get("eventSourceARN")),
        })
    }

    /// Decodes the record's base64 `data`.
    ///
    /// # Errors
    ///
    /// A message saying what is wrong with the field: absent, not a string, or not base64.
    pub fn decode_data(&self) -> Result<Bytes, String> {
        let text = self.data.as_ref().map_err(Clone::clone)?;
        BASE64
            .decode(text)
            .map(Bytes::from)
            .map_err(|e| format!("`data` is not valid base64: {e}"))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

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
    }

    #[test]
    fn what_is_not_a_kinesis_event_is_an_error() {
        for bad in [&b"not json"[..], b"{}", br#"{"Records":5}"#, b"[]", b""] {
            let err = KinesisEvent::from_slice(bad).unwrap_err().to_string();
            assert!(err.starts_with("not a Kinesis event"), "{err}");
        }
        assert_eq!(
            KinesisEvent::from_slice(br#"{"Records":[]}"#)
                .unwrap()
                .records
                .len(),
            0
        );
    }
}
