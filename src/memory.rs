//! How the process uses memory between invocations (glibc's malloc).
//!
//! A Lambda execution environment handles one event of up to 6 MB after another. By default
//! glibc gives allocations of 128 KiB or more their own `mmap` and then raises that threshold
//! to the largest block freed, and trims the heap top when more than twice the threshold is
//! free. Measured with `make bench` (2026-11-26), each event's user-record tables and decoded
//! records went back to the kernel and came back as fresh zeroed pages: in-process about 2,400
//! page faults per event and 7 ms of W1's 22.
//!
//! So blocks of up to 32 MiB (glibc's maximum threshold) come from the heap, and the heap is
//! never trimmed below 256 MiB free: memory freed after one invocation serves the next. W1
//! in-process: 22 -> 17.7 ms; W3 through the Runtime API: 338-965 -> 0-3 page faults per
//! invocation.
//!
//! The other way was measured too (`make bench`, 5 runs of each through the Runtime API): a
//! 1 MiB threshold hands the body and every big block back to the kernel, so the heap cannot
//! fragment (W5 peak RSS 21.3-22.8 MB instead of 22.4-26.6), but every invocation faults them
//! in again (~1,500 faults) and takes 25-45% longer (W5 19-22 ms instead of 13.5-17, W2 37-45
//! instead of 25-37). Time is what Lambda bills, so the heap keeps them.
//!
//! Fragmentation was then taken away at its source: [`run`](crate::run) reads every body into
//! the same buffer, the data is decoded inside it, and on one core the aggregates are split one
//! at a time. Through the Runtime API, peak RSS after 12 events of each workload: W1 15.8 MB,
//! W2 15.4, W3 15.2, W5 16.1 (it was 23 to 25).

/// Sets glibc's mmap threshold to 32 MiB and its trim threshold to 256 MiB (both fixed, not
/// adaptive): see the module documentation for why and what it measured.
///
/// Call it once, at start-up, before the first event. It only changes glibc's malloc (a no-op
/// elsewhere) and returns whether the settings took.
///
/// # Examples
///
/// ```
/// assert_eq!(kinesis_deagg::memory::retain_freed_memory(), cfg!(all(target_os = "linux", target_env = "gnu")));
/// ```
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 256 << 20;
        // SAFETY: mallopt only changes malloc's tuning parameters, takes plain integers and is
        // safe to call at any time (glibc serialises it with its own lock).
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
