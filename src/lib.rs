#![doc = "kinesis-deagg"]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod kpl;
