//! MD5 digests of many independent messages at once: the checksums of a batch's aggregates.
//!
//! One MD5 stream cannot go faster than one block after another (each block needs the state
//! the previous one left), but the aggregates of an event are independent. So this module runs
//! up to 8 of them side by side, one per 32-bit lane of a 256-bit register, as multi-buffer
//! hashing libraries do. A lane that finishes its message takes the next one: longest first
//! when all are known (`md5_many`), so that lanes drain together; as they come otherwise
//! (`md5_stream`), so that an aggregate decoded while others are hashed joins them at once.
//!
//! Kernels, chosen at run time: on x86_64 AVX-512VL (one-instruction rotates and boolean
//! functions), else AVX2; on aarch64 NEON (baseline there: two 128-bit vectors of 4 lanes
//! each make the 8 lanes); else (other CPUs, or a single message, where a lane is slower than
//! the scalar code) the `md-5` crate one message at a time. Every kernel is tested against
//! `md-5` on arbitrary message sets (`tests` below; the NEON one under qemu), and the
//! `md5_many` fuzz target compares the CPU's own choice with `md-5`. The NEON kernel's speed
//! has not been measured on hardware.
//!
//! Besides one `mallopt` call (`memory.rs`) and base64 decoding (`src/event/vbmi.rs`), this
//! is the crate's only `unsafe` code: SIMD intrinsics behind a CPU feature check, reads of
//! exactly 64 bytes from blocks that the scheduler takes from live slices, and an empty `asm!`
//! that keeps the compiler from lengthening each step (`opaque`).

// The lane scheduler below serves the SIMD kernels: on other architectures every message
// goes through `md-5`, and it is not used.
#![cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]

use md5::{Digest, Md5};

/// The MD5 of each message, in order.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::md5_many;
/// let digests = md5_many(&[b"", b"a"]);
/// assert_eq!(digests[1][..4], [0x0c, 0xc1, 0x75, 0xb9]); // MD5("a") = 0cc175b9...
/// assert_eq!(digests.len(), 2);
/// ```
pub fn md5_many(messages: &[&[u8]]) -> Vec<[u8; 16]> {
    let mut digests = vec![[0u8; 16]; messages.len()];
    md5_each(messages, &mut |i, digest| {
        digests[i] = digest;
        true
    });
    digests
}

/// The MD5 of each message, handed to `done(index, digest)` as soon as it is known, until
/// `done` says `false`. The longest start first, so that the lanes drain together: the
/// soonest end for all of them.
pub(crate) fn md5_each(messages: &[&[u8]], done: &mut dyn FnMut(usize, [u8; 16]) -> bool) {
    let mut sequence: Vec<usize> = (0..messages.len()).collect();
    sequence.sort_by_key(|&i| std::cmp::Reverse(messages[i].len()));
    let mut sequence = sequence.into_iter();
    let mut next = |_| {
        sequence
            .next()
            .map_or(Next::End, |i| Next::Message(i, messages[i]))
    };
    // One message goes faster through the scalar code than through a lane.
    if messages.len() > 1 {
        md5_stream(&mut next, done);
    } else {
        one_at_a_time(&mut next, done);
    }
}

/// What the source of [`md5_stream`] has.
pub(crate) enum Next<M> {
    /// A message, with the number `done` will name it by.
    Message(usize, M),
    /// Nothing yet (only when not asked to wait).
    NotYet,
    /// Nothing more.
    End,
}

/// The MD5 of each message `next` gives, handed to `done(number, digest)` as soon as it is
/// known, until `done` says `false`.
///
/// `next(wait)` is asked for a message whenever a lane is free (and every 64 blocks while
/// one is), waiting for one only when every lane is free: so messages that come one by one
/// (aggregates as an event is read) join those under way rather than waiting for them.
/// Once `next` says [`Next::End`], it is not asked again.
pub(crate) fn md5_stream<M: AsRef<[u8]>>(
    next: &mut dyn FnMut(bool) -> Next<M>,
    done: &mut dyn FnMut(usize, [u8; 16]) -> bool,
) {
    #[cfg(target_arch = "x86_64")]
    if x86::md5_stream(next, done) {
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        return neon::with_neon(next, done);
    }
    one_at_a_time(next, done);
}

/// [`md5_stream`] with the `md-5` crate, one message after another.
fn one_at_a_time<M: AsRef<[u8]>>(
    next: &mut dyn FnMut(bool) -> Next<M>,
    done: &mut dyn FnMut(usize, [u8; 16]) -> bool,
) {
    while let Next::Message(number, message) = next(true) {
        if !done(number, Md5::digest(message.as_ref()).into()) {
            return;
        }
    }
}

/// The initial MD5 state (RFC 1321, 3.3).
const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// The final block(s) of a message: its last `len % 64` bytes, 0x80, zeros, and the length in
/// bits (RFC 1321, 3.1 and 3.2). One block, or two when fewer than 9 bytes are left.
fn padding(message: &[u8]) -> ([u8; 128], usize) {
    let rest = message.len() % 64;
    let mut tail = [0u8; 128];
    tail[..rest].copy_from_slice(&message[message.len() - rest..]);
    tail[rest] = 0x80;
    let blocks = if rest < 56 { 1 } else { 2 };
    let bits = (message.len() as u64).wrapping_mul(8);
    tail[blocks * 64 - 8..blocks * 64].copy_from_slice(&bits.to_le_bytes());
    (tail, blocks * 64)
}

/// One message's progress through a lane: its full blocks in place, then its padded tail.
struct Cursor<M> {
    number: usize,
    message: M,
    /// The message's full blocks end here.
    full: usize,
    tail: [u8; 128],
    /// The next block starts here: in the message, then (from `full` on) in the tail.
    at: usize,
    end: usize,
}

impl<M: AsRef<[u8]>> Cursor<M> {
    fn new(number: usize, message: M) -> Self {
        let bytes = message.as_ref();
        let full = bytes.len() / 64 * 64;
        let (tail, len) = padding(bytes);
        Cursor {
            number,
            message,
            full,
            tail,
            at: 0,
            end: full + len,
        }
    }

    /// The next 64-byte block; only called while [`Cursor::done`] is false.
    fn block(&self) -> &[u8] {
        match self.at.checked_sub(self.full) {
            None => &self.message.as_ref()[self.at..self.at + 64],
            Some(t) => &self.tail[t..t + 64],
        }
    }

    fn done(&self) -> bool {
        self.at == self.end
    }
}

/// Runs the messages of `next` through 8 lanes of `kernel`, which compresses one block per
/// lane into a transposed state (`state[word][lane]`), handing each digest to `done` when its
/// message is through (see [`md5_stream`]).
fn lanes<M: AsRef<[u8]>>(
    next: &mut dyn FnMut(bool) -> Next<M>,
    done: &mut dyn FnMut(usize, [u8; 16]) -> bool,
    kernel: impl Fn(&mut [[u32; 8]; 4], [&[u8]; 8]),
) {
    const IDLE: [u8; 64] = [0; 64];
    /// How often (in blocks) a free lane asks again for a message that has not come yet.
    const ASK_EVERY: usize = 64;
    let mut state = [[0u32; 8]; 4];
    let mut lanes: [Option<Cursor<M>>; 8] = Default::default();
    let (mut ended, mut freed) = (false, true);
    for round in 0usize.. {
        if !ended && (freed || round.is_multiple_of(ASK_EVERY)) {
            freed = false;
            for lane in 0..lanes.len() {
                if lanes[lane].is_some() {
                    continue;
                }
                match next(lanes.iter().all(Option::is_none)) {
                    Next::Message(number, message) => {
                        lanes[lane] = Some(Cursor::new(number, message));
                        for (word, init) in state.iter_mut().zip(INIT) {
                            word[lane] = init;
                        }
                    }
                    Next::NotYet => break,
                    Next::End => {
                        ended = true;
                        break;
                    }
                }
            }
        }
        if lanes.iter().all(Option::is_none) {
            return;
        }
        let blocks =
            std::array::from_fn(|lane| lanes[lane].as_ref().map_or(&IDLE[..], Cursor::block));
        kernel(&mut state, blocks);
        for (lane, slot) in lanes.iter_mut().enumerate() {
            let Some(cursor) = slot else { continue };
            cursor.at += 64;
            if let Some(cursor) = slot.take_if(|c| c.done()) {
                freed = true;
                let mut digest = [0u8; 16];
                for (word, out) in digest.chunks_exact_mut(4).enumerate() {
                    out.copy_from_slice(&state[word][lane].to_le_bytes());
                }
                if !done(cursor.number, digest) {
                    return;
                }
            }
        }
    }
}

/// The sine table of MD5 (RFC 1321, 3.4), one constant per step.
#[rustfmt::skip]
const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{K, Next, lanes};

    /// [`super::md5_stream`] with the fastest SIMD kernel this CPU has; `false` when it has
    /// none (then nothing was done).
    pub(super) fn md5_stream<M: AsRef<[u8]>>(
        next: &mut dyn FnMut(bool) -> Next<M>,
        done: &mut dyn FnMut(usize, [u8; 16]) -> bool,
    ) -> bool {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
            with_avx512(next, done);
        } else if is_x86_feature_detected!("avx2") {
            with_avx2(next, done);
        } else {
            return false;
        }
        true
    }

    /// Panics unless the CPU has AVX-512F and AVX-512VL (callers check).
    pub(super) fn with_avx512<M: AsRef<[u8]>>(
        next: &mut dyn FnMut(bool) -> Next<M>,
        done: &mut dyn FnMut(usize, [u8; 16]) -> bool,
    ) {
        assert!(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl"));
        // SAFETY: the features the kernel is compiled for are present (asserted above).
        lanes(next, done, |state, blocks| unsafe {
            avx512::compress(state, blocks)
        })
    }

    /// Panics unless the CPU has AVX2 (callers check).
    pub(super) fn with_avx2<M: AsRef<[u8]>>(
        next: &mut dyn FnMut(bool) -> Next<M>,
        done: &mut dyn FnMut(usize, [u8; 16]) -> bool,
    ) {
        assert!(is_x86_feature_detected!("avx2"));
        // SAFETY: the features the kernel is compiled for are present (asserted above).
        lanes(next, done, |state, blocks| unsafe {
            avx2::compress(state, blocks)
        })
    }

    /// Loads word `w..w+8` of 8 blocks, one block per lane, transposed so that vector `j`
    /// holds word `w + j` of every lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load_transposed(blocks: &[&[u8]; 8], w: usize) -> [__m256i; 8] {
        // SAFETY: every block is a 64-byte slice (the scheduler's `Cursor` and `IDLE` only hand
        // out 64-byte slices, asserted here) and w is 0 or 8, so the 32 bytes read from
        // offset 4 * w lie inside it. loadu has no alignment requirement.
        let r: [__m256i; 8] = std::array::from_fn(|lane| {
            assert!(blocks[lane].len() == 64 && w <= 8);
            unsafe { _mm256_loadu_si256(blocks[lane].as_ptr().add(4 * w).cast()) }
        });
        let t: [__m256i; 8] = std::array::from_fn(|i| {
            let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_epi32(x, y)
            } else {
                _mm256_unpackhi_epi32(x, y)
            }
        });
        // u[0..4]: words 0-3 (low half) and 4-7 (high half) of lanes 0-3; u[4..8]: lanes 4-7.
        let u: [__m256i; 8] = std::array::from_fn(|i| {
            let base = i / 4 * 4;
            let (x, y) = (t[base + (i % 4) / 2], t[base + (i % 4) / 2 + 2]);
            if i % 2 == 0 {
                _mm256_unpacklo_epi64(x, y)
            } else {
                _mm256_unpackhi_epi64(x, y)
            }
        });
        std::array::from_fn(|j| {
            if j < 4 {
                _mm256_permute2x128_si256::<0x20>(u[j], u[j + 4])
            } else {
                _mm256_permute2x128_si256::<0x31>(u[j - 4], u[j])
            }
        })
    }

    /// `x`, as a value the compiler cannot see through: it then cannot reorder the sum
    /// around it. Each MD5 step adds four terms, three of them known early (the message word,
    /// the constant, the register from four steps back) and one, the boolean function of the
    /// register just computed, last. Left to itself, LLVM adds the constant after that one,
    /// which puts an extra add on the chain that every step waits for (5 instructions instead
    /// of 4): without `opaque` the AVX-512 kernel took 1.90 ms for five 1 MiB messages
    /// instead of 1.60 (`cargo bench --bench deaggregate -- md5_many`, one core).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn opaque(mut x: __m256i) -> __m256i {
        // SAFETY: the assembly is empty (an assembler comment naming the register): it reads
        // and writes nothing but `x`'s register, which it leaves as it is, and touches no
        // memory, stack or flags, as the options declare. ymm registers exist: avx2 is enabled.
        unsafe {
            std::arch::asm!("/* {0} */", inout(ymm_reg) x, options(pure, nomem, nostack, preserves_flags));
        }
        x
    }

    /// The 64 steps of MD5 on transposed words, given the four boolean functions and the
    /// rotation of a kernel (RFC 1321, 3.4).
    macro_rules! md5_block {
        ($state:ident, $blocks:ident, $f:ident, $g:ident, $h:ident, $i:ident, $rotl:ident) => {{
            let lo = load_transposed(&$blocks, 0);
            let hi = load_transposed(&$blocks, 8);
            let m: [__m256i; 16] = std::array::from_fn(|j| if j < 8 { lo[j] } else { hi[j - 8] });
            let v: [__m256i; 4] = std::array::from_fn(|w| {
                // SAFETY: `$state[w]` is 8 u32 = 32 bytes; loadu has no alignment requirement.
                unsafe { _mm256_loadu_si256($state[w].as_ptr().cast()) }
            });
            let [mut a, mut b, mut c, mut d] = v;
            macro_rules! step {
                ($fun:ident, $a:ident, $b:ident, $c:ident, $d:ident, $k:expr, $word:expr, $s:literal) => {
                    // Everything but the boolean function first (see `opaque`).
                    let early = opaque(_mm256_add_epi32(
                        $a,
                        _mm256_add_epi32(_mm256_set1_epi32(K[$k] as i32), m[$word]),
                    ));
                    let sum = _mm256_add_epi32(early, $fun($b, $c, $d));
                    $a = _mm256_add_epi32($b, $rotl::<$s, { 32 - $s }>(sum));
                };
            }
            macro_rules! four {
                ($fun:ident, $k:expr, [$w0:expr, $w1:expr, $w2:expr, $w3:expr], [$s0:literal, $s1:literal, $s2:literal, $s3:literal]) => {
                    step!($fun, a, b, c, d, $k, $w0, $s0);
                    step!($fun, d, a, b, c, $k + 1, $w1, $s1);
                    step!($fun, c, d, a, b, $k + 2, $w2, $s2);
                    step!($fun, b, c, d, a, $k + 3, $w3, $s3);
                };
            }
            four!($f, 0, [0, 1, 2, 3], [7, 12, 17, 22]);
            four!($f, 4, [4, 5, 6, 7], [7, 12, 17, 22]);
            four!($f, 8, [8, 9, 10, 11], [7, 12, 17, 22]);
            four!($f, 12, [12, 13, 14, 15], [7, 12, 17, 22]);
            four!($g, 16, [1, 6, 11, 0], [5, 9, 14, 20]);
            four!($g, 20, [5, 10, 15, 4], [5, 9, 14, 20]);
            four!($g, 24, [9, 14, 3, 8], [5, 9, 14, 20]);
            four!($g, 28, [13, 2, 7, 12], [5, 9, 14, 20]);
            four!($h, 32, [5, 8, 11, 14], [4, 11, 16, 23]);
            four!($h, 36, [1, 4, 7, 10], [4, 11, 16, 23]);
            four!($h, 40, [13, 0, 3, 6], [4, 11, 16, 23]);
            four!($h, 44, [9, 12, 15, 2], [4, 11, 16, 23]);
            four!($i, 48, [0, 7, 14, 5], [6, 10, 15, 21]);
            four!($i, 52, [12, 3, 10, 1], [6, 10, 15, 21]);
            four!($i, 56, [8, 15, 6, 13], [6, 10, 15, 21]);
            four!($i, 60, [4, 11, 2, 9], [6, 10, 15, 21]);
            for (w, x) in [a, b, c, d].into_iter().enumerate() {
                let sum = _mm256_add_epi32(v[w], x);
                // SAFETY: as the load above.
                unsafe { _mm256_storeu_si256($state[w].as_mut_ptr().cast(), sum) };
            }
        }};
    }

    mod avx2 {
        use std::arch::x86_64::*;

        use super::{K, load_transposed, opaque};

        #[inline]
        #[target_feature(enable = "avx2")]
        fn f(x: __m256i, y: __m256i, z: __m256i) -> __m256i {
            _mm256_xor_si256(z, _mm256_and_si256(x, _mm256_xor_si256(y, z)))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn g(x: __m256i, y: __m256i, z: __m256i) -> __m256i {
            _mm256_xor_si256(y, _mm256_and_si256(z, _mm256_xor_si256(x, y)))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn h(x: __m256i, y: __m256i, z: __m256i) -> __m256i {
            _mm256_xor_si256(_mm256_xor_si256(x, y), z)
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn i(x: __m256i, y: __m256i, z: __m256i) -> __m256i {
            let not_z = _mm256_xor_si256(z, _mm256_set1_epi32(-1));
            _mm256_xor_si256(y, _mm256_or_si256(x, not_z))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn rotl<const L: i32, const R: i32>(x: __m256i) -> __m256i {
            _mm256_or_si256(_mm256_slli_epi32::<L>(x), _mm256_srli_epi32::<R>(x))
        }

        #[target_feature(enable = "avx2")]
        pub(super) fn compress(state: &mut [[u32; 8]; 4], blocks: [&[u8]; 8]) {
            md5_block!(state, blocks, f, g, h, i, rotl)
        }
    }

    mod avx512 {
        use std::arch::x86_64::*;

        use super::{K, load_transposed, opaque};

        // Truth tables for vpternlogd, whose operands x, y, z index the table as bits 2, 1, 0.
        const X: i32 = 0xF0;
        const Y: i32 = 0xCC;
        const Z: i32 = 0xAA;

        #[inline]
        #[target_feature(enable = "avx2,avx512f,avx512vl")]
        fn f(x: __m256i, y: __m256i, z: __m256i) -> __m256i {
            _mm256_ternarylogic_epi32::<{ (X & Y) | (!X & Z) & 0xFF }>(x, y, z)
        }
        #[inline]
        #[target_feature(enable = "avx2,avx512f,avx512vl")]
        fn g(x: __m256i, y: __m256i, z: __m256i) -> __m256i {
            _mm256_ternarylogic_epi32::<{ (X & Z) | (Y & !Z) & 0xFF }>(x, y, z)
        }
        #[inline]
        #[target_feature(enable = "avx2,avx512f,avx512vl")]
        fn h(x: __m256i, y: __m256i, z: __m256i) -> __m256i {
            _mm256_ternarylogic_epi32::<{ X ^ Y ^ Z }>(x, y, z)
        }
        #[inline]
        #[target_feature(enable = "avx2,avx512f,avx512vl")]
        fn i(x: __m256i, y: __m256i, z: __m256i) -> __m256i {
            _mm256_ternarylogic_epi32::<{ (Y ^ (X | !Z)) & 0xFF }>(x, y, z)
        }
        #[inline]
        #[target_feature(enable = "avx2,avx512f,avx512vl")]
        fn rotl<const L: i32, const R: i32>(x: __m256i) -> __m256i {
            _mm256_rol_epi32::<L>(x)
        }

        #[target_feature(enable = "avx2,avx512f,avx512vl")]
        pub(super) fn compress(state: &mut [[u32; 8]; 4], blocks: [&[u8]; 8]) {
            md5_block!(state, blocks, f, g, h, i, rotl)
        }
    }
}

/// The NEON kernel. The 8 lanes are two vectors of 4, run step by step side by side (two
/// independent dependency chains). NEON has no rotate: shift right, then shift left and
/// insert (`vsli`).
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{K, Next, lanes};

    /// Panics unless the CPU has NEON (callers check; every aarch64 CPU Lambda runs has it).
    pub(super) fn with_neon<M: AsRef<[u8]>>(
        next: &mut dyn FnMut(bool) -> Next<M>,
        done: &mut dyn FnMut(usize, [u8; 16]) -> bool,
    ) {
        assert!(std::arch::is_aarch64_feature_detected!("neon"));
        // SAFETY: the feature the kernel is compiled for is present (asserted above).
        lanes(next, done, |state, blocks| unsafe {
            compress(state, blocks)
        })
    }

    /// Words `w..w + 4` of 4 blocks, transposed: vector `j` holds word `w + j` of each block.
    #[inline]
    #[target_feature(enable = "neon")]
    fn load_transposed(blocks: &[&[u8]], w: usize) -> [uint32x4_t; 4] {
        // SAFETY: every block is a 64-byte slice (the scheduler only hands out 64-byte slices,
        // asserted here) and w <= 12, so the 16 bytes read from offset 4 * w lie inside it.
        // The load is of bytes (vld1q_u8), which needs no alignment.
        let r: [uint32x4_t; 4] = std::array::from_fn(|lane| {
            assert!(blocks[lane].len() == 64 && w <= 12);
            unsafe { vreinterpretq_u32_u8(vld1q_u8(blocks[lane].as_ptr().add(4 * w))) }
        });
        let t0 = vtrn1q_u32(r[0], r[1]);
        let t1 = vtrn2q_u32(r[0], r[1]);
        let t2 = vtrn1q_u32(r[2], r[3]);
        let t3 = vtrn2q_u32(r[2], r[3]);
        [
            pair::<true>(t0, t2),
            pair::<true>(t1, t3),
            pair::<false>(t0, t2),
            pair::<false>(t1, t3),
        ]
    }

    /// The low (or high) 64-bit halves of `x` and `y`, together.
    #[inline]
    #[target_feature(enable = "neon")]
    fn pair<const LOW: bool>(x: uint32x4_t, y: uint32x4_t) -> uint32x4_t {
        let (x, y) = (vreinterpretq_u64_u32(x), vreinterpretq_u64_u32(y));
        vreinterpretq_u32_u64(if LOW {
            vtrn1q_u64(x, y)
        } else {
            vtrn2q_u64(x, y)
        })
    }

    #[inline]
    #[target_feature(enable = "neon")]
    fn f(x: uint32x4_t, y: uint32x4_t, z: uint32x4_t) -> uint32x4_t {
        vbslq_u32(x, y, z)
    }
    #[inline]
    #[target_feature(enable = "neon")]
    fn g(x: uint32x4_t, y: uint32x4_t, z: uint32x4_t) -> uint32x4_t {
        vbslq_u32(z, x, y)
    }
    #[inline]
    #[target_feature(enable = "neon")]
    fn h(x: uint32x4_t, y: uint32x4_t, z: uint32x4_t) -> uint32x4_t {
        veorq_u32(veorq_u32(x, y), z)
    }
    #[inline]
    #[target_feature(enable = "neon")]
    fn i(x: uint32x4_t, y: uint32x4_t, z: uint32x4_t) -> uint32x4_t {
        veorq_u32(y, vornq_u32(x, z))
    }

    /// One block for each of the 8 lanes (RFC 1321, 3.4), on the transposed state.
    #[target_feature(enable = "neon")]
    pub(super) fn compress(state: &mut [[u32; 8]; 4], blocks: [&[u8]; 8]) {
        let mut m = [[vdupq_n_u32(0); 16]; 2];
        let mut v = [[vdupq_n_u32(0); 4]; 2];
        for half in 0..2 {
            let four = &blocks[4 * half..4 * half + 4];
            for w in [0, 4, 8, 12] {
                m[half][w..w + 4].copy_from_slice(&load_transposed(four, w));
            }
            for (w, words) in state.iter().enumerate() {
                // SAFETY: `words` is 8 u32: lanes 0-3 and 4-7 are 4 u32 each, read in place.
                v[half][w] = unsafe { vld1q_u32(words.as_ptr().add(4 * half)) };
            }
        }
        let [
            [mut a0, mut b0, mut c0, mut d0],
            [mut a1, mut b1, mut c1, mut d1],
        ] = v;
        macro_rules! step {
            ($fun:ident, $a:ident, $b:ident, $c:ident, $d:ident, $half:expr, $k:expr, $word:expr, $s:literal) => {
                let sum = vaddq_u32(
                    vaddq_u32($a, vaddq_u32(vdupq_n_u32(K[$k]), m[$half][$word])),
                    $fun($b, $c, $d),
                );
                let rotated = vsliq_n_u32::<$s>(vshrq_n_u32::<{ 32 - $s }>(sum), sum);
                $a = vaddq_u32($b, rotated);
            };
        }
        macro_rules! four {
            ($fun:ident, $k:expr, [$w0:expr, $w1:expr, $w2:expr, $w3:expr], [$s0:literal, $s1:literal, $s2:literal, $s3:literal]) => {
                step!($fun, a0, b0, c0, d0, 0, $k, $w0, $s0);
                step!($fun, a1, b1, c1, d1, 1, $k, $w0, $s0);
                step!($fun, d0, a0, b0, c0, 0, $k + 1, $w1, $s1);
                step!($fun, d1, a1, b1, c1, 1, $k + 1, $w1, $s1);
                step!($fun, c0, d0, a0, b0, 0, $k + 2, $w2, $s2);
                step!($fun, c1, d1, a1, b1, 1, $k + 2, $w2, $s2);
                step!($fun, b0, c0, d0, a0, 0, $k + 3, $w3, $s3);
                step!($fun, b1, c1, d1, a1, 1, $k + 3, $w3, $s3);
            };
        }
        four!(f, 0, [0, 1, 2, 3], [7, 12, 17, 22]);
        four!(f, 4, [4, 5, 6, 7], [7, 12, 17, 22]);
        four!(f, 8, [8, 9, 10, 11], [7, 12, 17, 22]);
        four!(f, 12, [12, 13, 14, 15], [7, 12, 17, 22]);
        four!(g, 16, [1, 6, 11, 0], [5, 9, 14, 20]);
        four!(g, 20, [5, 10, 15, 4], [5, 9, 14, 20]);
        four!(g, 24, [9, 14, 3, 8], [5, 9, 14, 20]);
        four!(g, 28, [13, 2, 7, 12], [5, 9, 14, 20]);
        four!(h, 32, [5, 8, 11, 14], [4, 11, 16, 23]);
        four!(h, 36, [1, 4, 7, 10], [4, 11, 16, 23]);
        four!(h, 40, [13, 0, 3, 6], [4, 11, 16, 23]);
        four!(h, 44, [9, 12, 15, 2], [4, 11, 16, 23]);
        four!(i, 48, [0, 7, 14, 5], [6, 10, 15, 21]);
        four!(i, 52, [12, 3, 10, 1], [6, 10, 15, 21]);
        four!(i, 56, [8, 15, 6, 13], [6, 10, 15, 21]);
        four!(i, 60, [4, 11, 2, 9], [6, 10, 15, 21]);
        for (half, regs) in [[a0, b0, c0, d0], [a1, b1, c1, d1]].into_iter().enumerate() {
            for (w, x) in regs.into_iter().enumerate() {
                let sum = vaddq_u32(v[half][w], x);
                // SAFETY: as the load above.
                unsafe { vst1q_u32(state[w].as_mut_ptr().add(4 * half), sum) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn messages() -> impl Strategy<Value = Vec<Vec<u8>>> {
        // Up to 20 messages of 0 to 299 bytes: every padding case (55, 56, 63, 64, 119, 120...)
        // in up to five blocks, and lanes that finish at different times.
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20)
    }

    /// What `run` hands to its `done`, by message: each digest exactly once.
    fn collect(
        len: usize,
        run: impl FnOnce(&mut dyn FnMut(usize, [u8; 16]) -> bool),
    ) -> Vec<[u8; 16]> {
        let mut got = vec![None; len];
        run(&mut |i, digest| {
            assert!(got[i].replace(digest).is_none(), "message {i} twice");
            true
        });
        got.into_iter().map(Option::unwrap).collect()
    }

    /// The digests of `kernel` on `messages` given backwards, and coming late: a lane that
    /// asks without waiting gets one only every third time, as aggregates come while an
    /// event is read.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn coming_late<'a>(
        messages: &[&'a [u8]],
        kernel: impl Fn(&mut dyn FnMut(bool) -> Next<&'a [u8]>, &mut dyn FnMut(usize, [u8; 16]) -> bool),
    ) -> Vec<[u8; 16]> {
        let mut backwards = (0..messages.len()).rev();
        let (mut asked, mut ended) = (0, false);
        let mut next = |wait: bool| {
            assert!(!ended, "asked again after the end");
            asked += 1;
            if !wait && asked % 3 != 0 {
                return Next::NotYet;
            }
            let next = backwards.next();
            ended = next.is_none();
            next.map_or(Next::End, |i| Next::Message(i, messages[i]))
        };
        collect(messages.len(), |done| kernel(&mut next, done))
    }

    /// `md5_many`, `md5_each` and every SIMD kernel this CPU has (in yet
    /// another order) give what `md-5` gives.
    fn check(messages: &[Vec<u8>]) {
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        let expected: Vec<[u8; 16]> = refs.iter().map(|m| Md5::digest(m).into()).collect();
        assert_eq!(md5_many(&refs), expected);
        let each = collect(refs.len(), |done| md5_each(&refs, done));
        assert_eq!(each, expected);
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert_eq!(coming_late(&refs, one_at_a_time), expected);
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                assert_eq!(coming_late(&refs, x86::with_avx2), expected);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                assert_eq!(coming_late(&refs, x86::with_avx512), expected);
            }
        }
        // Every aarch64 CPU has NEON: the kernel is always tested there.
        #[cfg(target_arch = "aarch64")]
        assert_eq!(coming_late(&refs, neon::with_neon), expected);
    }

    /// `done` saying `false` stops the work: nothing more is handed over.
    #[test]
    fn done_stops_it() {
        let messages: Vec<&[u8]> = vec![b"abc"; 20];
        let mut calls = 0;
        md5_each(&messages, &mut |_, _| {
            calls += 1;
            calls < 3
        });
        assert_eq!(calls, 3);
    }

    #[test]
    fn every_length_up_to_three_blocks() {
        let data: Vec<u8> = (0..=200u8).collect();
        let all: Vec<Vec<u8>> = (0..=200).map(|n| data[..n].to_vec()).collect();
        check(&all);
    }

    #[test]
    fn rfc_1321_test_suite() {
        let digests = md5_many(&[b"", b"abc", b"message digest"]);
        let hex: Vec<String> = digests
            .iter()
            .map(|d| d.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        assert_eq!(
            hex,
            [
                "d41d8cd98f00b204e9800998ecf8427e",
                "900150983cd24fb0d6963f7d28e17f72",
                "f96b697d7cb7938d525a2f31aaf161d0"
            ]
        );
    }

    proptest! {
        #[test]
        fn same_as_md5_crate(messages in messages()) {
            check(&messages);
        }
    }
}
