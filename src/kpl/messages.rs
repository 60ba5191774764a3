//! The protobuf messages of the KPL aggregation format, derived by hand with prost. The
//! [`Aggregator`](super::Aggregator) encodes with them; deaggregation reads the same wire
//! format in place (`wire.rs`) and is tested against them.
//!
//! See `messages.proto` beside this file for the wire format and why `string` fields are read
//! as `bytes` and `required` fields as `optional` here.

use bytes::Bytes;

/// `aws.kinesis.protobuf.AggregatedRecord`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct AggregatedRecord {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub partition_key_table: Vec<Bytes>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<Bytes>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

/// `aws.kinesis.protobuf.Record`: one user record inside an aggregate.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Record {
    #[prost(uint64, optional, tag = "1")]
    pub partition_key_index: Option<u64>,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub data: Option<Bytes>,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

/// `aws.kinesis.protobuf.Tag`. The KPL never writes tags; they are decoded and ignored.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Tag {
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub key: Option<Bytes>,
    #[prost(bytes = "bytes", optional, tag = "2")]
    pub value: Option<Bytes>,
}
