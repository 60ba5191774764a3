//! Base64 decoding of the records' `data`: in place in a body the event owns, or into one
//! buffer that the records share. Either way one allocation per event at most, never one per
//! record.

use std::ops::Range;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;

use super::{BadData, EventRecord};

/// Whether the fast decoder accepts `text`: a text it refuses is left for
/// [`into_one_buffer`], which explains it.
pub(super) fn accepts(text: &[u8]) -> bool {
    simd_engine(text.len()).check(text).is_ok()
}

/// Decodes each text (all [`accepts`]ed) where it stands: its bytes then start where its text
/// started.
///
/// (Decoding the second half of the texts on another core was measured: no faster on the
/// two vCPUs of the bench machine, W1 and W5 in-process.)
pub(super) fn in_place(
    json: &mut [u8],
    texts: &[(usize, Range<usize>)],
) -> Vec<Result<Range<usize>, BadData>> {
    texts
        .iter()
        .map(
            |(_, at)| match simd_engine(at.len()).decode_inplace(&mut json[at.clone()]) {
                Ok(decoded) => Ok(at.start..at.start + decoded.len()),
                // Checked, so never; but not silently empty if it were.
                Err(e) => Err(BadData {
                    message: format!("`data` is not valid base64: {e}"),
                    raw: Bytes::new(),
                }),
            },
        )
        .collect()
}

/// Standard alphabet; padding optional, since a producer's unpadded base64 is still
/// unambiguous and is not worth blocking a shard over. Only used to explain a failure: valid
/// data is decoded by `base64_simd`, several times faster.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes the `data` texts (each with the index of its record) into one buffer, which the
/// records then share: one allocation per event rather than one per record.
pub(super) fn into_one_buffer<'t>(
    records: &mut [EventRecord],
    texts: impl Iterator<Item = (usize, &'t [u8])> + Clone,
) {
    // Base64 is 4 characters for 3 bytes; the last group may be short.
    let capacity = texts.clone().map(|(_, t)| t.len() / 4 * 3 + 3).sum();
    let mut buffer = Vec::with_capacity(capacity);
    let mut spans = Vec::new();
    for (i, text) in texts {
        let start = buffer.len();
        match decode_append(text, &mut buffer) {
            Ok(()) => spans.push((i, start..buffer.len())),
            Err(bad) => records[i].data = Err(bad),
        }
    }
    let buffer = Bytes::from(buffer);
    for (i, span) in spans {
        records[i].data = Ok(buffer.slice(span));
    }
}

/// The fast decoder for a text of `len` characters: padding is optional.
fn simd_engine(len: usize) -> &'static base64_simd::Base64 {
    if len.is_multiple_of(4) {
        &base64_simd::STANDARD
    } else {
        &base64_simd::STANDARD_NO_PAD
    }
}

/// Appends the bytes that `text` encodes to `buffer`, or says why it cannot (leaving
/// `buffer` as it was).
fn decode_append(text: &[u8], buffer: &mut Vec<u8>) -> Result<(), BadData> {
    let simd = simd_engine(text.len());
    // What the fast decoder rejects goes to the `base64` crate, which accepts a few odd
    // paddings more (the two agree on everything else: tested below) and says what is
    // wrong, and where.
    let start = buffer.len();
    simd.decode_append(text, buffer)
        .or_else(|_| BASE64.decode_vec(text, buffer))
        .map_err(|e| {
            buffer.truncate(start);
            BadData {
                message: format!("`data` is not valid base64: {e}"),
                raw: Bytes::copy_from_slice(text),
            }
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the fast decoder accepts, the `base64` crate (padding optional) accepts
        /// too, with the same bytes: the fast path changes no outcome.
        #[test]
        fn simd_and_scalar_decoders_agree(s in "[A-Za-z0-9+/=]{0,12}|[A-Za-z0-9+/]{0,12}") {
            let mut fast = b"kept".to_vec();
            let fast = decode_append(s.as_bytes(), &mut fast).map(|()| fast).map_err(|e| e.message);
            let slow = BASE64.decode(&s).map(|d| [&b"kept"[..], &d].concat()).map_err(|e| format!("`data` is not valid base64: {e}"));
            prop_assert_eq!(fast, slow);
        }
    }
}
