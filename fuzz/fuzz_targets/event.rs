//! The event parser and the whole batch on arbitrary bytes: never panics, never reports an
//! empty identifier, and `from_slice` and `from_owned` (fast path first) read what serde
//! alone reads.
#![no_main]

use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::settings::Switch;
use kinesis_deagg::transform::{Builtin, BuiltinTransform};
use kinesis_deagg::{Processor, Settings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let read = KinesisEvent::from_slice(input);
    // `Deserialize` is the serde path alone: the fast path must never disagree with it.
    let serde = serde_json::from_slice::<KinesisEvent>(input);
    assert_eq!(read.as_ref().ok(), serde.as_ref().ok());
    let in_place = KinesisEvent::from_owned(input);
    assert_eq!(in_place.as_ref().ok(), serde.as_ref().ok());
    let Ok(event) = read else {
        return;
    };
    // Metrics off: an EMF line per execution would only slow the fuzzer down.
    let settings = Settings {
        metrics: Switch::Off,
        ..Settings::default()
    };
    let processor = Processor::new(BuiltinTransform::new(Builtin::Json, 0), settings);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let outcome = rt.block_on(processor.handle(&event, None)).unwrap();
    for item in outcome.response().batch_item_failures {
        assert!(item.item_identifier.is_some_and(|id| !id.is_empty()));
    }
});
