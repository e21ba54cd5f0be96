"""Keep freed memory in the process for reuse: glibc malloc settings that make CPU training much faster.

glibc's malloc hands out blocks above its mmap threshold (32 MiB at most) as fresh pages from the system and gives them
back on free, so each such tensor pays a page fault per 4 KiB page when it is first written. A GC ViT training step
at batch 16 allocates and frees hundreds of them (stage 0's activations and gradients are 38-51 MB in fp32): on this
project's 2-core VM, cloning a 51 MB tensor took 23 ms that way and 3 ms with freed memory kept, and a gcvit_tiny
training step at batch 16 went from 6.2 s to 4.7 s, for 3.5% more peak resident memory. The `gcvit` command applies
this on start; library users call `keep_freed_memory()` themselves. Other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap (no mmap) and never trim the heap, so that memory freed by
    one tensor is reused by later ones that fit in it, without page faults. Process-wide and lasting: the process
    keeps what it has used until it exits. Returns whether the settings took effect (False off Linux or off glibc)."""
    global _kept
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only; other libcs read mallopt differently
    except (OSError, AttributeError):
        return False
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory()` has taken effect in this process."""
    return _kept
