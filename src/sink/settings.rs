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
}

/// Where the transform's outputs go, and how hard delivery tries; see the README.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct SinkSettings {
    /// Where each user record the transform accepts is delivered: `none` or `kinesis`.
    #[arg(
        long = "sink",
        env = "DEAGG_SINK",
        value_enum,
        ignore_case = true,
        default_value = "none"
    )]
    pub kind: SinkKind,

    /// The destination: a stream name or ARN for `kinesis`.
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

    /// Largest record the destination accepts, in bytes (data plus partition key): 1 MiB,
    /// or up to 10 MiB for a stream whose maximum record size was raised.
    #[arg(long = "sink-max-record-bytes", env = "DEAGG_SINK_MAX_RECORD_BYTES", default_value_t = 1 << 20)]
    pub max_record_bytes: usize,

    /// Largest request, in bytes: 5 MiB is within every `PutRecords` limit, old (5 MiB) and
    /// new (10 MiB).
    #[arg(long = "sink-max-request-bytes", env = "DEAGG_SINK_MAX_REQUEST_BYTES", default_value_t = 5 << 20)]
    pub max_request_bytes: usize,

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
            max_record_bytes: 1 << 20,
            max_request_bytes: 5 << 20,
            max_attempts: 10,
            timeout_ms: 10_000,
            shard_map_max_age_s: 300,
        }
    }
}

impl SinkSettings {
    pub(crate) fn policy(&self) -> Policy {
        Policy {
            max_attempts: self.max_attempts,
            request_timeout: Duration::from_millis(self.timeout_ms),
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_secs(2),
        }
    }
}
