//! The sink settings (`DEAGG_SINK*`): which built-in sink, where to, and how hard it tries.

use std::time::Duration;

use clap::Args;

use super::outbox::Policy;
use crate::settings::Switch;

/// The built-in sinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// The transform's outputs go nowhere.
    None,
    /// Another Kinesis stream (`PutRecords`), re-aggregated per shard unless
    /// `DEAGG_SINK_AGGREGATE=off`.
    Kinesis,
    /// A Firehose stream (`PutRecordBatch`), one Firehose record per user record.
    Firehose,
    /// An SQS queue (`SendMessageBatch`), one message per user record; FIFO queues keep the
    /// order per partition key.
    Sqs,
}

/// How the SQS sink writes a user record's data into a message body (which SQS takes as
/// XML-safe Unicode text only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Body {
    /// As it is when it is valid text for SQS; otherwise base64, with the message attribute
    /// `content-transfer-encoding` = `base64`.
    Auto,
    /// Always base64, with the message attribute `content-transfer-encoding` = `base64`.
    Base64,
}

/// Where the transform's outputs go, and how hard delivery tries; see the README.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct SinkSettings {
    /// Where each user record the transform accepts is delivered: `none`, `kinesis`,
    /// `firehose` or `sqs`.
    #[arg(
        long = "sink",
        env = "DEAGG_SINK",
        value_enum,
        ignore_case = true,
        default_value = "none"
    )]
    pub kind: SinkKind,

    /// The destination: a stream name or ARN for `kinesis` and `firehose`, a queue URL for
    /// `sqs`.
    #[arg(long = "sink-target", env = "DEAGG_SINK_TARGET")]
    pub target: Option<String>,

    /// Re-aggregate user records in the KPL format, one aggregate per destination shard
    /// (`kinesis`); `off` puts each user record as a record of its own.
    #[arg(
        long = "sink-aggregate",
        env = "DEAGG_SINK_AGGREGATE",
        value_enum,
        ignore_case = true,
        default_value = "on"
    )]
    pub aggregate: Switch,

    /// Largest aggregate, in bytes, at most the record limit (a user record too large for one
    /// is put on its own). A request holds one aggregate per destination shard, so large
    /// aggregates make few requests.
    #[arg(
        long = "sink-aggregate-max-bytes",
        env = "DEAGG_SINK_AGGREGATE_MAX_BYTES",
        default_value_t = 1 << 20
    )]
    pub aggregate_max_bytes: usize,

    /// Largest record the destination accepts, in bytes. Default and most: `kinesis` 1 MiB
    /// (data plus partition key; up to 10 MiB for a stream whose maximum record size was
    /// raised), `firehose` 1,000 KiB, `sqs` 1 MiB (body plus attributes; lower it for a queue
    /// whose `MaximumMessageSize` is lower).
    #[arg(long = "sink-max-record-bytes", env = "DEAGG_SINK_MAX_RECORD_BYTES")]
    pub max_record_bytes: Option<usize>,

    /// Largest request, in bytes. Default: `kinesis` 5 MiB (within every `PutRecords` limit,
    /// old and new; up to 10 MiB), `firehose` 4 MiB, `sqs` 1 MiB (also the most).
    #[arg(long = "sink-max-request-bytes", env = "DEAGG_SINK_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,

    /// End each Firehose record with a newline (`on` for JSON lines in S3), unless it ends
    /// with one already.
    #[arg(
        long = "sink-newline",
        env = "DEAGG_SINK_NEWLINE",
        value_enum,
        ignore_case = true,
        default_value = "off"
    )]
    pub newline: Switch,

    /// How SQS message bodies hold the data: `auto` or `base64`.
    #[arg(
        long = "sink-body",
        env = "DEAGG_SINK_BODY",
        value_enum,
        ignore_case = true,
        default_value = "auto"
    )]
    pub body: Body,

    /// Sends of one entry before it is given up and its Kinesis record reported.
    #[arg(long = "sink-max-attempts", env = "DEAGG_SINK_MAX_ATTEMPTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// How long one request may take before it is sent again, in milliseconds.
    #[arg(long = "sink-timeout-ms", env = "DEAGG_SINK_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    /// The most the destination's shard map is trusted, in seconds, before it is read again
    /// (it is also read again when a put lands on an unexpected shard).
    #[arg(
        long = "sink-shard-map-max-age-s",
        env = "DEAGG_SINK_SHARD_MAP_MAX_AGE_S",
        default_value_t = 300
    )]
    pub shard_map_max_age_s: u64,
}

impl Default for SinkSettings {
    fn default() -> Self {
        SinkSettings {
            kind: SinkKind::None,
            target: None,
            aggregate: Switch::On,
            aggregate_max_bytes: 1 << 20,
            max_record_bytes: None,
            max_request_bytes: None,
            newline: Switch::Off,
            body: Body::Auto,
            max_attempts: 10,
            timeout_ms: 10_000,
            shard_map_max_age_s: 300,
        }
    }
}

impl SinkSettings {
    /// The target, or an error naming what the sink needs.
    #[cfg_attr(not(feature = "aws"), allow(dead_code))]
    pub(crate) fn target(&self) -> Result<String, String> {
        let (name, what) = match self.kind {
            SinkKind::None => ("none", "a destination"),
            SinkKind::Kinesis => ("kinesis", "the stream's name or ARN"),
            SinkKind::Firehose => ("firehose", "the Firehose stream's name or ARN"),
            SinkKind::Sqs => ("sqs", "the queue's URL"),
        };
        self.target
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("DEAGG_SINK={name} needs DEAGG_SINK_TARGET, {what}"))
    }

    /// The request and record limits: the settings, or the destination's `default`s, within
    /// its `most`s (`(request bytes, record bytes)` both).
    #[cfg_attr(not(feature = "aws"), allow(dead_code))]
    pub(crate) fn byte_limits(
        &self,
        default: (usize, usize),
        most: (usize, usize),
    ) -> Result<(usize, usize), String> {
        let check = |value: Option<usize>, default: usize, most: usize, name: &str| {
            let value = value.unwrap_or(default);
            if (1..=most).contains(&value) {
                Ok(value)
            } else {
                Err(format!("{name}={value} is not in 1..={most}"))
            }
        };
        Ok((
            check(
                self.max_request_bytes,
                default.0,
                most.0,
                "DEAGG_SINK_MAX_REQUEST_BYTES",
            )?,
            check(
                self.max_record_bytes,
                default.1,
                most.1,
                "DEAGG_SINK_MAX_RECORD_BYTES",
            )?,
        ))
    }

    pub(crate) fn policy(&self) -> Policy {
        Policy {
            max_attempts: self.max_attempts,
            request_timeout: Duration::from_millis(self.timeout_ms),
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_secs(2),
        }
    }
}
