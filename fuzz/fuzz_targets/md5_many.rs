//! `md5_many` against the `md-5` crate on arbitrary message sets: the SIMD lanes, their
//! refilling and the padding of every length must give the same digests.
//!
//! The input is cut into messages at each byte that equals the first byte (the separator), so
//! the fuzzer controls how many messages there are and how long each is.
#![no_main]

use kinesis_deagg::kpl::md5_many;
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};

fuzz_target!(|input: &[u8]| {
    let Some((&separator, rest)) = input.split_first() else {
        return;
    };
    let messages: Vec<&[u8]> = rest.split(|&b| b == separator).collect();
    let expected: Vec<[u8; 16]> = messages.iter().map(|m| Md5::digest(m).into()).collect();
    assert_eq!(md5_many(&messages), expected);
});
