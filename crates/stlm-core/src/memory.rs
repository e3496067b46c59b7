//! Allocator tuning for training on the CPU.
//!
//! libtorch allocates CPU tensors with the C allocator. glibc serves large requests (a batch's
//! activations, the logits) with fresh `mmap`s and returns them with `munmap` when freed, so every
//! training step touches new pages and pays for a page fault per 4 KiB: measured on
//! `configs/bench-llama-4m.toml` (2 cores), about 100,000 faults and a quarter of a second of
//! kernel time per step, ~10% of the step (docs/results/training.md).

/// Makes the C allocator keep memory it frees for reuse instead of handing it back to the
/// system (glibc: no `mmap` for large blocks, no trimming of the heap). The process then stays
/// at its peak footprint, as a GPU caching allocator does. A no-op off Linux/glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before tensors exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
