#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod event;
pub mod kpl;
pub mod lambda;
pub mod logging;
mod lookahead;
pub mod memory;
pub mod metrics;
pub mod runtime_api;
pub mod settings;
pub mod transform;

pub use lambda::Processor;
pub use runtime_api::run;
pub use settings::Settings;
