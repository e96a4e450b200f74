//! What goms asks of its allocator (mimalloc, set in `main.rs`): to give free pages back
//! after a burst, and how much it has committed and reserved. Called where memory was just released in
//! bulk: the memory guard's relief, and the end of a spool replay.

/// Asks the allocator to give the pages it holds free back to the system.
pub fn return_free_memory() {
    // SAFETY: mi_collect takes no pointer and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// The allocator's committed memory now and at its peak, in bytes (mimalloc's
/// `mi_process_info`); zero where mimalloc is not the process's allocator.
pub fn committed() -> (u64, u64) {
    let (mut elapsed, mut user, mut system, mut rss, mut peak_rss) = (0, 0, 0, 0, 0);
    let (mut commit, mut peak_commit, mut faults) = (0usize, 0usize, 0usize);
    // SAFETY: every pointer is to a live local of the type mimalloc writes.
    unsafe {
        libmimalloc_sys::mi_process_info(
            &mut elapsed,
            &mut user,
            &mut system,
            &mut rss,
            &mut peak_rss,
            &mut commit,
            &mut peak_commit,
            &mut faults,
        );
    }
    (commit as u64, peak_commit as u64)
}

/// The address space the allocator has reserved from the system, in bytes: committed memory
/// plus what it keeps ready to commit (mimalloc's `reserved` statistic). `None` where
/// mimalloc does not report it.
pub fn reserved() -> Option<u64> {
    // SAFETY: with no buffer given, mimalloc allocates one (with its own allocator) and
    // returns it, NUL-terminated, or null; it is freed with mi_free below.
    let json = unsafe { libmimalloc_sys::mi_stats_get_json(0, std::ptr::null_mut()) };
    if json.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string mimalloc wrote, alive until mi_free.
    let text = unsafe { std::ffi::CStr::from_ptr(json) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: the buffer mi_stats_get_json allocated, freed once.
    unsafe { libmimalloc_sys::mi_free(json.cast()) };
    let stats: serde_json::Value = serde_json::from_str(&text).ok()?;
    stats.get("reserved")?.get("current")?.as_u64()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_reserved_figure_is_read_when_mimalloc_reports_it() {
        // The test binary's allocator is the system's, but mimalloc's statistics exist as
        // soon as it is linked: the figure parses, whatever its value.
        assert!(super::reserved().is_some());
    }
}
