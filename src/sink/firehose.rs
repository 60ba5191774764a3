//! The Firehose sink: one Firehose record per user record, with `PutRecordBatch`.
//!
//! Firehose reading a Kinesis stream as its source deaggregates KPL records itself: this sink
//! is for functions that transform or filter first. Firehose keeps no order and may deliver a
//! record twice (it is at least once); `DEAGG_SINK_NEWLINE=on` ends each record with a
//! newline, as S3 destinations of JSON lines need.

use aws_sdk_firehose::Client;
use aws_sdk_firehose::primitives::Blob;
use aws_sdk_firehose::types::Record;
use bytes::Bytes;

use super::aws::classify;
use super::{EntryOutcome, Limits, SendError, SendErrorKind, Sink, SinkSettings};
use crate::kpl::UserRecord;
use crate::settings::Switch;
use crate::transform::{Error, RecordContext};

/// `PutRecordBatch` takes at most 500 records, 4 MiB, and records of 1,000 KiB.
const MAX_ENTRIES: usize = 500;
const MAX_REQUEST_BYTES: usize = 4 << 20;
const MAX_RECORD_BYTES: usize = 1_000 << 10;

/// One Firehose record: the user record's data, and whether a newline follows it.
#[derive(Clone, Debug)]
pub struct FirehoseEntry {
    data: Bytes,
    newline: bool,
}

/// Delivers to a Firehose stream; see the [module docs](self).
#[derive(Debug)]
pub struct FirehoseSink {
    client: Client,
    /// The Firehose stream's name (an ARN's last part).
    name: String,
    newline: bool,
    limits: Limits,
}

impl FirehoseSink {
    /// A sink for the Firehose stream `settings.target` (a name or an ARN), with the AWS
    /// SDK's configuration from the environment (`AWS_ENDPOINT_URL_FIREHOSE` among it).
    ///
    /// # Errors
    ///
    /// When no target is set, or a limit is out of range.
    pub async fn from_settings(settings: &SinkSettings) -> Result<Self, String> {
        Self::new(Client::new(&super::aws::config().await), settings)
    }

    /// A sink with this client; see [`FirehoseSink::from_settings`].
    ///
    /// # Errors
    ///
    /// When no target is set, or a limit is out of range.
    pub fn new(client: Client, settings: &SinkSettings) -> Result<Self, String> {
        let target = settings.target()?;
        // PutRecordBatch names the stream; an ARN ends with `deliverystream/<name>`.
        let name = match target.strip_prefix("arn:") {
            Some(_) => match target.rsplit_once(":deliverystream/") {
                Some((_, name)) if !name.is_empty() => name.to_string(),
                _ => {
                    return Err(format!(
                        "DEAGG_SINK_TARGET={target} is not a Firehose stream's ARN"
                    ));
                }
            },
            None => target,
        };
        let (max_request_bytes, max_entry_bytes) = settings.byte_limits(
            (MAX_REQUEST_BYTES, MAX_RECORD_BYTES),
            (MAX_REQUEST_BYTES, MAX_RECORD_BYTES),
        )?;
        Ok(FirehoseSink {
            client,
            name,
            newline: settings.newline == Switch::On,
            limits: Limits {
                max_entries: MAX_ENTRIES,
                max_request_bytes,
                max_entry_bytes,
            },
        })
    }
}

/// Per-entry codes: `ServiceUnavailableException` is Firehose's throttle.
fn entry_outcome(code: &str, message: &str) -> EntryOutcome {
    match code {
        "ServiceUnavailableException" => EntryOutcome::throttled(code),
        "InternalFailure" | "InternalFailureException" => EntryOutcome::retry(code),
        _ => EntryOutcome::failed(code, message),
    }
}

impl Sink for FirehoseSink {
    type Entry = FirehoseEntry;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn entry(&self, record: UserRecord, _: &RecordContext) -> Result<FirehoseEntry, Error> {
        let data = record.into_data();
        let newline = self.newline && !data.ends_with(b"\n");
        Ok(FirehoseEntry { data, newline })
    }

    fn size(&self, entry: &FirehoseEntry) -> usize {
        entry.data.len() + usize::from(entry.newline)
    }

    async fn send(&self, entries: &[FirehoseEntry]) -> Result<Vec<EntryOutcome>, SendError> {
        let records = entries
            .iter()
            .map(|e| {
                let mut data = Vec::with_capacity(self.size(e));
                data.extend_from_slice(&e.data);
                if e.newline {
                    data.push(b'\n');
                }
                Record::builder()
                    .data(Blob::new(data))
                    .build()
                    .map_err(|e| SendError::new(SendErrorKind::Permanent, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .put_record_batch()
            .delivery_stream_name(&self.name)
            .set_records(Some(records))
            .send()
            .await
            .map_err(|e| classify(&e, "PutRecordBatch"))?;
        Ok(output
            .request_responses()
            .iter()
            .map(|r| match r.error_code() {
                Some(code) => entry_outcome(code, r.error_message().unwrap_or("")),
                None => EntryOutcome::Delivered,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_counts_the_newline_added_to_it() {
        let config = aws_sdk_firehose::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_firehose::config::Region::new("us-east-1"))
            .build();
        let settings = SinkSettings {
            target: Some("lines".into()),
            ..SinkSettings::default()
        };
        let sink = FirehoseSink::new(Client::from_conf(config), &settings).unwrap();
        let entry = |newline| FirehoseEntry {
            data: Bytes::from_static(b"abc"),
            newline,
        };
        assert_eq!(sink.size(&entry(true)), 4);
        assert_eq!(sink.size(&entry(false)), 3);
    }

    #[test]
    fn per_entry_codes_are_throttled_retried_or_final() {
        assert!(matches!(
            entry_outcome("ServiceUnavailableException", ""),
            EntryOutcome::Retry {
                throttled: true,
                ..
            }
        ));
        assert!(matches!(
            entry_outcome("InternalFailure", ""),
            EntryOutcome::Retry {
                throttled: false,
                ..
            }
        ));
        assert!(matches!(
            entry_outcome("KMS.AccessDeniedException", "no"),
            EntryOutcome::Failed { .. }
        ));
    }
}
