//! Deaggregation of arbitrary bytes: never panics, every aggregate it accepts is whole, and
//! the batch forms (`deaggregate_all`, `deaggregate_each`) give what `deaggregate` gives.
//!
//! Half the inputs get a correct magic and MD5 around them, so the fuzzer reaches the
//! protobuf decoder instead of stopping at the checksum.
#![no_main]

use bytes::Bytes;
use kinesis_deagg::kpl::{Deaggregated, MAGIC, deaggregate, deaggregate_all, deaggregate_each};
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};

fuzz_target!(|input: &[u8]| {
    let Some((&first, body)) = input.split_first() else {
        return;
    };
    let data: Bytes = if first & 1 == 0 {
        [&MAGIC[..], body, &Md5::digest(body)].concat().into()
    } else {
        Bytes::copy_from_slice(body)
    };
    let one = deaggregate(data.clone());
    let batch = [data.clone()];
    assert_eq!(deaggregate_all(&batch, true), [one.clone()]);
    assert_eq!(deaggregate_each(&batch, true).collect::<Vec<_>>(), [one.clone()]);
    match one {
        Ok(Deaggregated::Plain(d)) | Ok(Deaggregated::ChecksumMismatch(d)) => assert_eq!(d, data),
        Ok(Deaggregated::Aggregated(users)) => {
            for (i, u) in users.enumerate() {
                assert_eq!(u.sub_sequence_number(), Some(i as u64));
                assert!(u.data().len() <= data.len());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
