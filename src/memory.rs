//! How the process uses memory between invocations (glibc's malloc).
//!
//! A Lambda execution environment handles one event of up to 6 MB after another. By default
//! glibc gives allocations of 128 KiB or more their own `mmap`, raises that threshold to the
//! largest block freed, and trims the heap top when more than twice the threshold is free:
//! each event's user-record tables and decoded records went back to the kernel and came back
//! as fresh zeroed pages, thousands of page faults per event.
//!
//! So blocks of up to 32 MiB (glibc's maximum threshold) come from the heap, and the heap is
//! never trimmed below 256 MiB free: memory freed after one invocation serves the next.
//! Handing big blocks back instead keeps the heap from fragmenting, but every invocation
//! faults them in again and took 25-45% longer in `make bench`; time is what Lambda bills.
//! Fragmentation is avoided at its source: [`run`](crate::run) reads every body into
//! the same buffer, the data is decoded inside it, and on one core the aggregates are split
//! one at a time.

/// Sets glibc's mmap threshold to 32 MiB and its trim threshold to 256 MiB (both fixed, not
/// adaptive): see the module documentation for why.
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
