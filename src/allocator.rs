//! What goms asks of its allocator (mimalloc, set in `main.rs`): to give free pages back
//! after a burst, and how much it has committed. Called where memory was just released in
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
