//! Kinesis consumers for AWS Lambda in Rust: each record of a Kinesis event decoded, KPL
//! aggregates verified (MD5) and split into their user records, your transform run on each,
//! and Lambda told exactly which record to retry from (`batchItemFailures`).
//!
//! A complete function, which also runs outside Lambda on an event file
//! (`my-consumer events/aggregated.json`):
//!
//! ```no_run
//! use kinesis_deagg::prelude::*;
//!
//! #[derive(serde::Deserialize)]
//! struct Order {
//!     id: u64,
//! }
//!
//! async fn store(order: Order, ctx: RecordContext) -> Result<(), Error> {
//!     // An `Err` fails this user record; the key is the same on every retry.
//!     tracing::info!(order = order.id, key = %ctx.idempotency_key(), "stored");
//!     Ok(())
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     kinesis_deagg::main(json(store))
//! }
//! ```
//!
//! Start with [`main`] (the entry point), [`transform`] (what a transform is, the typed
//! [`json`](transform::json) adapter), [`testing`] (events built in code for unit tests),
//! [`sink`] (delivering what a transform accepts onward: the `Sink` trait, the Kinesis sink
//! behind the default `sink-kinesis` feature) and [`Settings`]. The README covers
//! configuration, failure semantics and delivery guarantees;
//! `docs/your-own-function.md` goes from `cargo new` to a deployed function.
//!
//! What is public and not named here (the event reader, the KPL codec, the batch's types)
//! is stable too; items marked hidden serve the project's own binary, benchmarks and fuzz
//! targets and may change.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod entry;
pub mod event;
pub mod kpl;
pub mod lambda;
pub mod logging;
mod lookahead;
pub mod memory;
pub mod metrics;
pub mod runtime_api;
pub mod settings;
pub mod sink;
pub mod testing;
pub mod transform;
pub mod window;

pub use entry::{main, main_windowed, main_with};
pub use lambda::Processor;
pub use runtime_api::run;
pub use settings::Settings;

/// The names a consumer's code uses: `use kinesis_deagg::prelude::*;`.
pub mod prelude {
    pub use crate::kpl::UserRecord;
    pub use crate::transform::{Error, Output, RecordContext, Transform, json};
    pub use crate::{Processor, Settings};
}

// The README's Rust examples are tested with the crate's doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
