#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod event;
pub mod kpl;
pub mod lambda;
pub mod memory;
pub mod metrics;
pub mod settings;
pub mod transform;

pub use lambda::Processor;
pub use settings::Settings;
