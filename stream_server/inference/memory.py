"""Keep a long-running server's resident memory flat under glibc's allocator.

A server that runs for weeks allocates audio buffers on the event-loop thread, features and
model scratch space on the inference thread, and small objects on a handful of executor and
library threads. glibc gives each thread that contends for the heap its own arena (up to 8 per
core) and hands freed memory back to the kernel only from the top of each heap, so a steady
load of differently sized buffers leaves RSS creeping upwards for hours although nothing is
leaked (measured: an 18-minute soak went from 234 MB to 775 MB; the Python objects and the
engine alone stayed flat). Two standard remedies, both no-ops where glibc is absent:

* :func:`limit_arenas` caps the number of arenas (``mallopt(M_ARENA_MAX, n)``, what the
  ``MALLOC_ARENA_MAX`` environment variable does), best called before threads start;
* :func:`trim` returns free pages of every arena to the kernel (``malloc_trim(0)``); the server
  calls it periodically from a worker thread.

The largest share of the creep turned out not to be malloc at all: CTranslate2's CPU GEMMs go
through oneDNN, which caches a compiled primitive for every distinct matrix shape, up to 1,024 of
them. Whisper's decoder meets a new shape for almost every (batch size, prompt length) pair, so
the cache fills over hours. :func:`limit_onednn_cache` bounds it (measured on the dev box, one
engine thread, 5 minutes of random batches: RSS 315 -> 396 MB with the default, 302 -> 326 MB
with 16 entries, at the same speed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class MemorySettings:
    """The ``memory`` section of the server's settings: this module's remedies, as the process applies them.

    Attributes:
        malloc_arenas: :func:`limit_arenas`'s ``count`` (0: glibc's default), applied before threads start.
        malloc_mmap_threshold_kb: :func:`fix_mmap_threshold` in KiB (0: glibc's dynamic threshold).
        memory_trim_s: how often the server calls :func:`trim` (and samples the resident size); 0 never.
    """

    malloc_arenas: int = 2
    malloc_mmap_threshold_kb: int = 256
    memory_trim_s: float = 60.0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - probe: only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at ``count``.

    Args:
        count: the most arenas; 0 leaves glibc's default (8 per core).

    Returns:
        True when the limit was applied, False without glibc or with ``count`` 0.
    """
    libc = _libc()
    if libc is None or count <= 0:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, ctypes.c_int(count)))


def fix_mmap_threshold(size: int) -> bool:
    """Serve allocations of at least ``size`` bytes with their own mmap, returned to the kernel on free.

    glibc starts at 128 KiB but raises the threshold (up to 32 MiB) each time such a block is freed,
    after which audio buffers and feature arrays of a few hundred KiB come from the heap and leave
    holes that RSS never gives back. Setting it fixes the threshold (and turns the raising off).

    Args:
        size: threshold in bytes; 0 leaves glibc's dynamic threshold.

    Returns:
        True when applied, False without glibc or with ``size`` 0.
    """
    libc = _libc()
    if libc is None or size <= 0:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(size)))


def limit_onednn_cache(entries: int) -> None:
    """Bound oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) unless the environment sets it.

    oneDNN reads the variable when it first builds a primitive, so call this before the first
    CTranslate2 computation in the process.

    Args:
        entries: cached primitives; 0 disables the cache.
    """
    import os

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(int(entries)))


def trim() -> bool:
    """Give free heap pages back to the kernel.

    Returns:
        True when memory was released, False when none could be (or without glibc).
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(ctypes.c_size_t(0)))


def rss_bytes() -> int:
    """This process's resident set size in bytes (0 where ``/proc`` is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except OSError:
        return 0


@functools.cache
def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")
