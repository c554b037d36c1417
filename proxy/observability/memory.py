"""Giving the memory of big messages back to the system (issue 15 part 3).

glibc serves an allocation above its mmap threshold with its own mapping, which goes back
to the system the moment it is freed. The threshold moves up, though, to the size of every
mapped block freed (up to 32 MB): after the first 25 MB message every later one comes from
the heap, where freed memory stays with the process, and 20 concurrent big messages left
1.4 GB behind. Fixing the threshold (``mallopt``) keeps big buffers mapped, and a
``malloc_trim`` after a big transaction returns what smaller objects left in the heaps.

Only on glibc; elsewhere (musl, macOS) these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ("BIG_MESSAGE", "release_memory", "tune_allocator")

log = logging.getLogger("sendguard")

#: Above this, an allocation gets its own mapping (glibc's default starting threshold).
MMAP_THRESHOLD = 128 * 1024
#: After a transaction of at least this many bytes, the heaps are trimmed.
BIG_MESSAGE = 4 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # malloc.h

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name:
            return None
        try:
            libc = ctypes.CDLL(name)
            libc.mallopt  # noqa: B018 - glibc only: AttributeError elsewhere
            libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold, once, at start (for ``sendguard serve``). True when done."""
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; big messages may keep memory after they are sent")
    return done


def release_memory(size: int) -> None:
    """After a transaction of ``size`` bytes: trim the heaps when it was a big one."""
    if size < BIG_MESSAGE:
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
