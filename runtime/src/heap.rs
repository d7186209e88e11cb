//! Handing freed heap memory back to the system after loading.
//!
//! glibc's malloc keeps memory that was freed inside its heap instead of returning it, until
//! `malloc_trim` asks. Loading leaves much of it: the Llama-3 tokenizer parses its 280k merges into
//! about 560k small strings before building its tables and dropping them, which left 92 MiB resident
//! and unused (139 MiB of RSS for the tokenizer, 47 MiB after trimming), and graph loading copies
//! weights through buffers it frees. A server keeps a model loaded for its whole life, so that memory
//! would count against every request.

/// Returns the heap's free memory to the system (glibc; elsewhere nothing to do).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer; it only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
