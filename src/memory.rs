//! Keeping freed memory in the process between invocations.
//!
//! By default glibc gives every allocation of 128 KiB or more its own `mmap`, and returns it
//! to the kernel on `free`; the threshold then grows, but heap memory above 128 KiB is also
//! trimmed. A Lambda execution environment handles one 6 MB event after another, so each
//! invocation paid again for the same pages: about 2,400 page faults (zeroed pages) per event,
//! 7 ms of the 22 ms W1 took (`make bench`, measured with `GLIBC_TUNABLES` before this
//! existed). Keeping the memory costs nothing: it is the function's configured memory anyway.

/// Serves allocations of up to 32 MiB (glibc's maximum threshold) from the heap and trims the
/// heap only beyond 256 MiB free, so memory freed after one invocation serves the next.
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
