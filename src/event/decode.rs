//! Base64 decoding of the records' `data`: in place in a body the event owns, or into one
//! buffer that the records share. Either way one allocation per event at most, never one per
//! record.

use std::mem::MaybeUninit;
use std::ops::Range;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;

use super::{BadData, EventRecord, vbmi};

/// Base64 characters decoded at a time, through a buffer on the stack (a multiple of 4).
const CHUNK: usize = 4096;

/// Decodes `json[at]` where it stands (its bytes then start where its text started), or, when
/// the fast decoder refuses it, leaves it as it was and says `None`: a refused text must stay
/// whole, to be explained or passed through, and for serde to read.
///
/// Why chunks: each is decoded into a buffer on the stack, which checks it, and only then
/// copied back over its own text, so no separate pass has to check every text before any is
/// overwritten. The chunks before a refused one are put back by encoding them again, which
/// gives the very same text: whole groups of 4 characters, no padding, and the decoder
/// accepts no other spelling of their bytes. With AVX-512 VBMI (`vbmi.rs`), a chunk's whole
/// blocks of 64 alphabet characters are decoded first, where they stand (no copy), and only
/// the rest goes through the buffer; a refused chunk's blocks are put back the same way.
///
/// Texts are decoded on this thread only: handing half of them to another core was no
/// faster on the bench machine's two vCPUs (W1 and W5).
pub(super) fn in_place(json: &mut [u8], at: Range<usize>) -> Option<Range<usize>> {
    in_place_by(json, at, CHUNK)
}

fn in_place_by(json: &mut [u8], at: Range<usize>, chunk: usize) -> Option<Range<usize>> {
    // Not zeroed: that would cost more than the decoding on short texts.
    let mut buffer = [const { MaybeUninit::uninit() }; CHUNK / 4 * 3];
    let mut end = at.start;
    for (i, text) in chunks(at.clone(), chunk).enumerate() {
        let engine = engine_of(&at, &text);
        // Whole blocks of alphabet characters where they stand (with VBMI), then the rest.
        let done = vbmi::decode_in_place(json, text.clone(), end);
        end += done / 4 * 3;
        let out = base64_simd::Out::from_uninit_slice(&mut buffer[..chunk / 4 * 3]);
        let Ok(bytes) = engine.decode(&json[text.start + done..text.end], out) else {
            put_back_by(json, at, i + 1, end, chunk);
            return None;
        };
        json[end..end + bytes.len()].copy_from_slice(bytes);
        end += bytes.len();
    }
    Some(at.start..end)
}

/// Puts back the text `json[at]` that [`in_place`] decoded into `json[at.start..end]`.
pub(super) fn put_back(json: &mut [u8], at: Range<usize>, end: usize) {
    put_back_by(json, at, usize::MAX, end, CHUNK);
}

/// Puts back the first `decoded` chunks of the text `json[at]`, decoded into
/// `json[at.start..end]` (the last of them perhaps only in part, from its start); the rest
/// of the text is still there.
fn put_back_by(json: &mut [u8], at: Range<usize>, decoded: usize, end: usize, chunk: usize) {
    let mut buffer = [const { MaybeUninit::uninit() }; CHUNK];
    let bytes = chunk / 4 * 3;
    // Back to front: chunk i's text reaches no further back than its bytes, so each chunk
    // overwrites only bytes already encoded again.
    for (i, text) in chunks(at.clone(), chunk).enumerate().take(decoded).rev() {
        let from = at.start + i * bytes;
        let to = (from + bytes).min(end);
        let out = base64_simd::Out::from_uninit_slice(&mut buffer[..text.len()]);
        let encoded = engine_of(&at, &text).encode(&json[from..to], out);
        json[text.start..][..encoded.len()].copy_from_slice(encoded);
    }
}

/// `at` cut into chunks of `chunk` characters; the last one (never empty unless `at` is) holds
/// what is left.
fn chunks(
    at: Range<usize>,
    chunk: usize,
) -> impl DoubleEndedIterator<Item = Range<usize>> + ExactSizeIterator {
    let full = at.len().saturating_sub(1) / chunk;
    (0..full + 1).map(move |i| {
        let from = at.start + i * chunk;
        from..if i == full { at.end } else { from + chunk }
    })
}

/// The engine for a chunk of the text at `at`: only the last may hold padding.
fn engine_of(at: &Range<usize>, chunk: &Range<usize>) -> &'static base64_simd::Base64 {
    if chunk.end == at.end {
        simd_engine(at.len())
    } else {
        &base64_simd::STANDARD_NO_PAD
    }
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
    let mut buffer = Vec::with_capacity(room(texts.clone().map(|(_, t)| t)));
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
                message: format!("`data` is not valid base64: {}", describe(&e)),
                raw: Bytes::copy_from_slice(text),
            }
        })
}

/// Room for the bytes of base64 `texts`, so that one buffer holds them without growing: 3
/// bytes for each 4 characters, and 3 more for a last group without padding.
fn room<'t>(texts: impl Iterator<Item = &'t [u8]>) -> usize {
    texts.map(|t| t.len() / 4 * 3 + 3).sum()
}

/// What is wrong with the text, in words (the `base64` crate says `Invalid symbol 37`).
fn describe(e: &base64::DecodeError) -> String {
    use base64::DecodeError::*;
    let shown = |byte: u8| match byte {
        0x20..=0x7E => format!("'{}'", byte as char),
        _ => format!("byte 0x{byte:02X}"),
    };
    match *e {
        InvalidByte(at, byte) => format!(
            "{} at character {at} is not a base64 character",
            shown(byte)
        ),
        InvalidLength(n) => format!("{n} characters (without padding) cannot be base64"),
        InvalidLastSymbol { offset, symbol, .. } => format!(
            "the last character, {} at {offset}, encodes bits that must be zero",
            shown(symbol)
        ),
        InvalidPadding => "its `=` padding is wrong".into(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_buffer_has_room_for_every_text_and_at_most_5_bytes_more_each() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        let data: Vec<u8> = (0..=255).collect();
        for engine in [&STANDARD, &STANDARD_NO_PAD] {
            let texts: Vec<String> = (0..200).map(|n| engine.encode(&data[..n])).collect();
            let decoded: usize = (0..200).sum();
            let room = room(texts.iter().map(|t| t.as_bytes()));
            // 2 for the padding of a padded text's last group, 3 for an unpadded one's.
            assert!(
                room >= decoded && room <= decoded + 5 * texts.len(),
                "{room}"
            );
        }
    }

    #[test]
    fn what_is_wrong_with_a_text_is_said_in_words() {
        let said = |text: &[u8]| describe(&BASE64.decode(text).unwrap_err());
        assert_eq!(
            said(b"ab!d"),
            "'!' at character 2 is not a base64 character"
        );
        assert_eq!(
            said(b"ab\x01d"),
            "byte 0x01 at character 2 is not a base64 character"
        );
        assert_eq!(
            said(b"abcde"),
            "5 characters (without padding) cannot be base64"
        );
        assert_eq!(
            said(b"ab="),
            "the last character, 'b' at 1, encodes bits that must be zero"
        );
    }

    proptest! {
        /// Whatever the fast decoder accepts, the `base64` crate (padding optional) accepts
        /// too, with the same bytes: the fast path changes no outcome.
        #[test]
        fn simd_and_scalar_decoders_agree(s in "[A-Za-z0-9+/=]{0,12}|[A-Za-z0-9+/]{0,12}") {
            let mut fast = b"kept".to_vec();
            let fast = decode_append(s.as_bytes(), &mut fast).map(|()| fast).map_err(|e| e.message);
            let slow = BASE64.decode(&s).map(|d| [&b"kept"[..], &d].concat()).map_err(|e| format!("`data` is not valid base64: {}", describe(&e)));
            prop_assert_eq!(fast, slow);
        }

        /// Decoding in place, chunk by chunk, gives what decoding the whole text gives, and
        /// leaves a refused text (and everything around any text) as it was; a decoded text
        /// is put back exactly.
        #[test]
        fn chunked_in_place_decoding_equals_whole_decoding(
            bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..40), prop::collection::vec(any::<u8>(), 40..400)],
            padded in any::<bool>(),
            damage in prop::option::of((any::<prop::sample::Index>(), prop::sample::select(&b"=!A/\"\n\xc3"[..]))),
            cut in 0usize..3,
            chunk in prop::sample::select(&[4usize, 8, 12, 64, 100, 128, CHUNK][..]),
        ) {
            let engine = if padded { &base64_simd::STANDARD } else { &base64_simd::STANDARD_NO_PAD };
            let mut text = engine.encode_to_string(&bytes).into_bytes();
            if let Some((at, byte)) = damage.filter(|_| !text.is_empty()) {
                let at = at.index(text.len());
                text[at] = byte;
            }
            text.truncate(text.len().saturating_sub(cut));
            let json = [&b"{\"data\": \""[..], &text, b"\"}"].concat();
            let at = 10..10 + text.len();
            let whole = simd_engine(text.len()).decode_to_vec(&text).ok();

            let mut decoded = json.clone();
            let span = in_place_by(&mut decoded, at.clone(), chunk);
            prop_assert_eq!(span.clone().map(|s| decoded[s].to_vec()), whole);
            prop_assert_eq!(&decoded[at.end..], &json[at.end..]);
            match span {
                None => prop_assert_eq!(&decoded, &json),
                Some(span) => {
                    prop_assert_eq!(span.start, at.start);
                    put_back_by(&mut decoded, at, usize::MAX, span.end, chunk);
                    prop_assert_eq!(&decoded, &json);
                }
            }
        }
    }
}
