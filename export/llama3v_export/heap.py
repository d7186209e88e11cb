"""Giving freed heap back to the system between the graphs an export validates.

glibc keeps freed blocks below its mmap threshold in its arenas for reuse, and the reference's activations (and
ONNX Runtime's) are many such blocks: after validating SigLIP-so400m's 27 layers the process held 2.2 GiB it had
freed (RSS 3.01 GiB; 0.82 GiB after `malloc_trim`), and that sat under the decoder's session at full size (19.32
GiB against a bound of 19.48; docs/PERFORMANCE.md, "The real model, measured").
"""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_heap() -> None:
    """Return the allocator's free pages to the system (glibc's `malloc_trim`; nothing elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
