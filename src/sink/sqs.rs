//! The SQS sink: one message per user record, with `SendMessageBatch`.
//!
//! SQS takes message bodies as XML-safe Unicode text. With `DEAGG_SINK_BODY=auto` (the
//! default) data that is such text is sent as it is, and anything else as base64 with the
//! message attribute `content-transfer-encoding` = `base64`; `base64` encodes every body.
//!
//! A FIFO queue (its URL ends in `.fifo`) gets, per message:
//! - `MessageGroupId`: the user record's partition key when it is 1 to 128 printable ASCII
//!   characters, else `md5-` and the key's MD5 in hex, so the order per partition key of the
//!   stream is the order per group of the queue;
//! - `MessageDeduplicationId`: the user record's idempotency key (`<sequence number>` or
//!   `<sequence number>:<sub-sequence number>`, `md5-` and its MD5 in hex beyond 128
//!   characters), so that a message sent again within SQS's 5-minute deduplication interval
//!   (a retry, or Lambda's retry of the batch) is not queued twice.
//!
//! A request holds at most one message per group, so that a refused message is sent again
//! before the next of its group. A standard queue keeps no order and may deliver twice.

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use base64::Engine;
use md5::{Digest, Md5};

use super::aws::classify;
use super::{Body, EntryOutcome, Limits, SendError, SendErrorKind, Sink, SinkSettings};
use crate::kpl::UserRecord;
use crate::transform::{Error, RecordContext};

/// `SendMessageBatch` takes at most 10 messages, and 1 MiB in all and per message.
const MAX_ENTRIES: usize = 10;
const MAX_BYTES: usize = 1 << 20;
/// The attribute marking a base64 body, and what it adds to a message's size (SQS counts the
/// name, the type and the value).
const ENCODING: &str = "content-transfer-encoding";
const ENCODING_BYTES: usize = ENCODING.len() + "String".len() + "base64".len();
/// The most characters of a group or deduplication id.
const MAX_ID: usize = 128;

/// One message.
#[derive(Clone, Debug)]
pub struct SqsEntry {
    body: String,
    base64: bool,
    group_id: Option<String>,
    deduplication_id: Option<String>,
}

/// Delivers to an SQS queue; see the [module docs](self).
#[derive(Debug)]
pub struct SqsSink {
    client: Client,
    queue_url: String,
    fifo: bool,
    body: Body,
    limits: Limits,
}

impl SqsSink {
    /// A sink for the queue whose URL is `settings.target`, with the AWS SDK's configuration
    /// from the environment (`AWS_ENDPOINT_URL_SQS` among it).
    ///
    /// # Errors
    ///
    /// When no target is set, or a limit is out of range.
    pub async fn from_settings(settings: &SinkSettings) -> Result<Self, String> {
        Self::new(Client::new(&super::aws::config().await), settings)
    }

    /// A sink with this client; see [`SqsSink::from_settings`].
    ///
    /// # Errors
    ///
    /// When no target is set, or a limit is out of range.
    pub fn new(client: Client, settings: &SinkSettings) -> Result<Self, String> {
        let queue_url = settings.target()?;
        let (max_request_bytes, max_entry_bytes) =
            settings.byte_limits((MAX_BYTES, MAX_BYTES), (MAX_BYTES, MAX_BYTES))?;
        Ok(SqsSink {
            client,
            fifo: queue_url.ends_with(".fifo"),
            queue_url,
            body: settings.body,
            limits: Limits {
                max_entries: MAX_ENTRIES,
                max_request_bytes,
                max_entry_bytes,
            },
        })
    }
}

/// Whether SQS takes `c` in a body: `#x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD |
/// #x10000-#x10FFFF` (a `char` is never a surrogate).
fn allowed(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// `id` when it is a valid group or deduplication id, else `md5-` and its MD5 in hex.
fn id(id: &str) -> String {
    if (1..=MAX_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()) {
        return id.to_string();
    }
    let digest = Md5::digest(id.as_bytes());
    let mut hex = String::with_capacity(4 + 32);
    hex.push_str("md5-");
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// What a failed message says: SQS marks the sender's faults, which the same message repeats.
fn entry_outcome(code: &str, message: &str, sender_fault: bool) -> EntryOutcome {
    match code {
        "RequestThrottled" | "ThrottlingException" | "KmsThrottled" => {
            EntryOutcome::throttled(code)
        }
        _ if sender_fault => EntryOutcome::failed(code, message),
        _ => EntryOutcome::retry(code),
    }
}

impl Sink for SqsSink {
    type Entry = SqsEntry;

    fn limits(&self) -> Limits {
        self.limits
    }

    fn entry(&self, record: UserRecord, context: &RecordContext) -> Result<SqsEntry, Error> {
        let text = match self.body {
            Body::Auto => std::str::from_utf8(record.data())
                .ok()
                .filter(|s| s.chars().all(allowed)),
            Body::Base64 => None,
        };
        let (body, base64) = match text {
            Some(s) => (s.to_string(), false),
            None => (
                base64::engine::general_purpose::STANDARD.encode(record.data()),
                true,
            ),
        };
        let (group_id, deduplication_id) = if self.fifo {
            (
                Some(id(record.partition_key())),
                Some(id(&context.idempotency_key())),
            )
        } else {
            (None, None)
        };
        Ok(SqsEntry {
            body,
            base64,
            group_id,
            deduplication_id,
        })
    }

    fn size(&self, entry: &SqsEntry) -> usize {
        entry.body.len() + if entry.base64 { ENCODING_BYTES } else { 0 }
    }

    /// A FIFO queue's message group.
    fn order_key<'e>(&self, entry: &'e SqsEntry) -> Option<&'e [u8]> {
        entry.group_id.as_deref().map(str::as_bytes)
    }

    async fn send(&self, entries: &[SqsEntry]) -> Result<Vec<EntryOutcome>, SendError> {
        let invalid = |e: aws_sdk_sqs::error::BuildError| {
            SendError::new(SendErrorKind::Permanent, e.to_string())
        };
        let encoding = MessageAttributeValue::builder()
            .data_type("String")
            .string_value("base64")
            .build()
            .map_err(invalid)?;
        let messages = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let message = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&e.body)
                    .set_message_group_id(e.group_id.clone())
                    .set_message_deduplication_id(e.deduplication_id.clone());
                let message = if e.base64 {
                    message.message_attributes(ENCODING, encoding.clone())
                } else {
                    message
                };
                message.build().map_err(invalid)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(messages))
            .send()
            .await
            .map_err(|e| classify(&e, "SendMessageBatch"))?;
        // Answers name their message by id; one named by neither list is sent again.
        let mut outcomes = vec![EntryOutcome::retry("NoResult"); entries.len()];
        let mut place = |id: &str, outcome| {
            if let Some(slot) = id.parse::<usize>().ok().and_then(|i| outcomes.get_mut(i)) {
                *slot = outcome;
            }
        };
        for ok in output.successful() {
            place(ok.id(), EntryOutcome::Delivered);
        }
        for failed in output.failed() {
            let outcome = entry_outcome(
                failed.code(),
                failed.message().unwrap_or(""),
                failed.sender_fault(),
            );
            place(failed.id(), outcome);
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink for `url`, with a client that is never called.
    fn sink(url: &str) -> SqsSink {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .build();
        let settings = SinkSettings {
            target: Some(url.into()),
            ..SinkSettings::default()
        };
        SqsSink::new(Client::from_conf(config), &settings).unwrap()
    }

    #[test]
    fn a_message_counts_its_body_and_attribute_and_a_fifo_queue_orders_by_group() {
        let entry = |body: &str, base64, group: Option<&str>| SqsEntry {
            body: body.into(),
            base64,
            group_id: group.map(Into::into),
            deduplication_id: None,
        };
        let sink = sink("http://127.0.0.1/1/q.fifo");
        assert_eq!(sink.size(&entry("h\u{e9}llo", false, None)), 6);
        // SQS counts the attribute's name, type and value:
        // "content-transfer-encoding", "String", "base64".
        assert_eq!(sink.size(&entry("aGk=", true, None)), 4 + 25 + 6 + 6);
        let grouped = entry("x", false, Some("pk-1"));
        assert_eq!(sink.order_key(&grouped), Some(&b"pk-1"[..]));
        assert_eq!(sink.order_key(&entry("x", false, None)), None);
    }

    #[test]
    fn bodies_take_only_what_sqs_allows() {
        assert!("a\tb\nc\r é 😀".chars().all(allowed));
        for c in ['\0', '\u{1}', '\u{1f}', '\u{FFFE}', '\u{FFFF}'] {
            assert!(!allowed(c), "{c:?}");
        }
        assert!(allowed('\u{FFFD}') && allowed('\u{E000}') && allowed('\u{10FFFF}'));
    }

    #[test]
    fn ids_are_kept_when_valid_and_hashed_otherwise() {
        assert_eq!(id("user-17"), "user-17");
        assert_eq!(id("4963:2"), "4963:2");
        let long = "1".repeat(129);
        // MD5 of the empty string, of "a b" and of 129 ones, from Python's hashlib.
        assert_eq!(id(""), "md5-d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(id("a b"), "md5-0cc9cd4dd26c5137b675a0d819cb9ab0");
        assert_eq!(id(&long).len(), 36);
        assert_eq!(id(&"1".repeat(128)), "1".repeat(128));
    }

    #[test]
    fn failed_messages_are_final_only_for_the_senders_faults() {
        assert!(matches!(
            entry_outcome("InternalError", "", false),
            EntryOutcome::Retry {
                throttled: false,
                ..
            }
        ));
        assert!(matches!(
            entry_outcome("RequestThrottled", "", false),
            EntryOutcome::Retry {
                throttled: true,
                ..
            }
        ));
        assert!(matches!(
            entry_outcome("InvalidParameterValue", "bad", true),
            EntryOutcome::Failed { .. }
        ));
    }
}
