#![doc = include_str!("../README.md")]
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
pub mod testing;
pub mod transform;

pub use entry::{main, main_with};
pub use lambda::Processor;
pub use runtime_api::run;
pub use settings::Settings;

/// The names a consumer's code uses: `use kinesis_deagg::prelude::*;`.
pub mod prelude {
    pub use crate::kpl::UserRecord;
    pub use crate::transform::{Error, RecordContext, Transform};
    pub use crate::{Processor, Settings};
}
