//! How the process uses memory between invocations (glibc's malloc).
//!
//! A Lambda execution environment handles one event of up to 6 MB after another. By default
//! glibc gives allocations of 128 KiB or more their own `mmap` and then raises that threshold
//! to the largest block freed, and trims the heap top when more than twice the threshold is
//! free. Measured with `make bench` (2026-11-26):
//!
//! - in-process (the event body allocated once), each event's user-record tables and decoded
//!   records went back to the kernel and came back as fresh zeroed pages: about 2,400 page
//!   faults per event and 7 ms of W1's 22;
//! - through the Runtime API, the body (6 MB, read by lambda_runtime) ended up in the heap, where
//!   it and the next bodies fragment it: W5's peak RSS reached 27.7 MB.
//!
//! So: blocks of 1 MiB or more (the body, a big aggregate's table of user records) get their
//! own `mmap` and go back to the kernel when freed, which keeps the heap small and unfragmented
//! (W5 peak 20.8 to 22.8 MB); everything smaller stays in the heap, which is never trimmed below
//! 256 MiB free, so its pages are reused, not faulted in again (W3 through the Runtime API:
//! 338 to 965 page faults per invocation before, ~1,500 after, all of them the body's).

/// Sets glibc's mmap threshold to 1 MiB (fixed, not adaptive) and its trim threshold to
/// 256 MiB: see the module documentation for why and what it measured.
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
        const MMAP_THRESHOLD: libc::c_int = 1 << 20;
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
