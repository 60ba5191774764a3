//! Base64 decoding with AVX-512 VBMI: 64 characters in a handful of instructions.
//!
//! Why: after the JSON scan, base64 is the largest cost of reading plain records with
//! `base64_simd`'s AVX2 path (W3: 16% of the instructions, about 1.2 per character). With
//! VBMI one byte permutation translates 64 characters at once (and flags every one outside
//! the alphabet), two multiply-adds pack them, and a second permutation gathers the 48 bytes
//! (Muła and Lemire, "Base64 encoding and decoding at almost the speed of a memory copy",
//! 2019).
//!
//! Only whole blocks of 64 characters that are all in the standard alphabet are decoded here;
//! the caller decodes the rest (the last characters, padding, anything refused) with
//! `base64_simd`, so what is accepted and what is refused does not change: whole groups of
//! four alphabet characters decode the same however the text is cut.

use std::ops::Range;

/// Characters per block, and the bytes they decode to.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // The tests use it everywhere.
const BLOCK: usize = 64;
#[cfg(target_arch = "x86_64")]
const BYTES: usize = 48;

/// Decodes, in place, the longest run of whole 64-character blocks at the start of
/// `json[text]` that hold only characters of the standard alphabet (no padding): their bytes,
/// 48 per block, go to `json[out..]`, which may overlap the text, since each block is read
/// before its bytes are written and they never reach past it. Gives the characters decoded
/// (a multiple of 64); what follows them is left as it was. Without VBMI (or on another
/// architecture) it decodes nothing.
///
/// # Panics
///
/// When `text` is not within `json` or `out` is after its start.
pub(super) fn decode_in_place(json: &mut [u8], text: Range<usize>, out: usize) -> usize {
    assert!(
        text.end <= json.len() && out <= text.start,
        "not a text of `json`"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let blocks = text.len() / BLOCK;
        if blocks > 0 && has_vbmi() {
            // SAFETY: the CPU has the features `decode_vbmi` is compiled for (checked just
            // above); `blocks` whole blocks from `text.start` are within `json`, and the bytes
            // of the blocks, from `out <= text.start`, end before the blocks' own end
            // (asserted above).
            return unsafe { x86::decode_vbmi(json.as_mut_ptr(), text.start, out, blocks) } * BLOCK;
        }
    }
    0
}

/// Whether this CPU can run `x86::decode_vbmi` (std caches the answer).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // The tests ask everywhere.
fn has_vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, BYTES};

    /// The value of each ASCII character in the standard alphabet, `0x80` for the others.
    const TABLE: [u8; 128] = {
        let mut table = [0x80; 128];
        let mut i = 0;
        while i < 64 {
            let c = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i];
            table[c as usize] = i as u8;
            i += 1;
        }
        table
    };

    /// Where each decoded byte is in the packed 32-bit lanes: lane `i` holds the 24 bits of
    /// group `i` little-endian, so output bytes `3i, 3i+1, 3i+2` are its bytes 2, 1, 0.
    const GATHER: [u8; 64] = {
        let mut gather = [0; 64];
        let mut i = 0;
        while i < 16 {
            gather[3 * i] = 4 * i as u8 + 2;
            gather[3 * i + 1] = 4 * i as u8 + 1;
            gather[3 * i + 2] = 4 * i as u8;
            i += 1;
        }
        gather
    };

    /// Decodes up to `blocks` blocks from `json + text` to `json + out`, stopping before the
    /// first block with a character outside the alphabet; returns the blocks decoded.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512 F, BW and VBMI; `json` must be valid for reads of `blocks`
    /// blocks from `text` and for writes of `blocks * 48` bytes from `out <= text`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn decode_vbmi(
        json: *mut u8,
        text: usize,
        out: usize,
        blocks: usize,
    ) -> usize {
        debug_assert!(out <= text);
        // SAFETY (loads): both tables are 64-byte halves of arrays the loads stay inside.
        let (low, high, gather) = unsafe {
            (
                _mm512_loadu_si512(TABLE.as_ptr().cast()),
                _mm512_loadu_si512(TABLE[64..].as_ptr().cast()),
                _mm512_loadu_si512(GATHER.as_ptr().cast()),
            )
        };
        // a * 64 + b in each 16-bit half, then (ab) * 4096 + (cd) in each 32-bit lane.
        let (pairs, quads) = (
            _mm512_set1_epi32(0x0140_0140),
            _mm512_set1_epi32(0x0001_1000),
        );
        for block in 0..blocks {
            // SAFETY: block < blocks, and `json` holds `blocks` whole blocks from `text`.
            let chars = unsafe { _mm512_loadu_si512(json.add(text + block * BLOCK).cast()) };
            // Bits 0-6 of each character pick its value from the two halves of the table;
            // a character of 128 or more, or one the table marks, has bit 7 set.
            let values = _mm512_permutex2var_epi8(low, chars, high);
            if _mm512_movepi8_mask(_mm512_or_si512(values, chars)) != 0 {
                return block;
            }
            let packed = _mm512_madd_epi16(_mm512_maddubs_epi16(values, pairs), quads);
            let bytes = _mm512_permutexvar_epi8(gather, packed);
            // SAFETY: `json` is valid for `blocks * 48` bytes from `out`; the mask writes the
            // first 48 of the 64. They end at `out + 48 * (block + 1)`, not after the end of
            // this block's characters (`out <= text`), and so before any block still to read.
            unsafe {
                _mm512_mask_storeu_epi8(
                    json.add(out + block * BYTES).cast(),
                    (1 << BYTES) - 1,
                    bytes,
                )
            };
        }
        blocks
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Every whole block of alphabet characters is decoded, as the `base64` crate decodes
        /// it, up to the first block holding anything else (a character outside the
        /// alphabet, padding, a byte of 128 or more), which is left as it was, with
        /// everything after it.
        #[test]
        fn blocks_decode_as_the_base64_crate_decodes_them(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            damage in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
            (before, gap) in (0usize..3, 0usize..70),
        ) {
            let mut text = STANDARD.encode(&bytes).into_bytes();
            if let Some((at, byte)) = damage.filter(|_| !text.is_empty()) {
                let at = at.index(text.len());
                text[at] = byte;
            }
            // The text after `before + gap` bytes, decoded to `before`.
            let json = [vec![b'"'; before + gap], text.clone(), b"\"}".to_vec()].concat();
            let at = before + gap..before + gap + text.len();
            let mut decoded = json.clone();
            let chars = decode_in_place(&mut decoded, at.clone(), before);
            prop_assert_eq!(chars % BLOCK, 0);
            let clean = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
            let whole_clean = text.chunks_exact(BLOCK).take_while(|b| b.iter().all(clean)).count();
            if has_vbmi() {
                prop_assert_eq!(chars, whole_clean * BLOCK);
            }
            let bytes = STANDARD.decode(&text[..chars]).unwrap();
            prop_assert_eq!(&decoded[before..before + bytes.len()], &bytes[..]);
            prop_assert_eq!(&decoded[..before], &json[..before]);
            prop_assert_eq!(&decoded[at.start + chars..], &json[at.start + chars..]);
        }
    }
}
