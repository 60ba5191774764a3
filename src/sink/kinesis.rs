//! The Kinesis sink.
