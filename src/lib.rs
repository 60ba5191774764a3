#![doc = "kinesis-deagg"]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod event;
pub mod kpl;
pub mod settings;
pub mod transform;

pub use settings::Settings;
pub mod lambda;

pub use lambda::Processor;
