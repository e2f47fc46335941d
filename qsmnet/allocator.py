"""Keep large CPU buffers in the process heap, so that the FFT solvers do not page-fault.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB by default)
with a fresh ``mmap`` and returns it to the kernel on ``free``. The iterative solvers of qsmnet
(PDF, TV-ADMM, the total-field inversion, the refinement's CG) allocate and free buffers of the
padded grid at every iteration; on a whole-head grid those are above the threshold, so each
one is mapped anew and its pages are faulted in and zeroed by the kernel again, which can take
longer than the FFT that uses them. Raising the threshold (and the heap's trim threshold with
it) lets ``malloc`` reuse freed blocks instead. The gain is in the speed section of
``docs/benchmarks.md``; the peak resident memory there is measured with this setting.

The setting is process-wide, so only the entry points apply it (``qsmnet`` on the command
line, ``scripts/train.py`` and its data workers, ``scripts/benchmark.py``); a program that uses
qsmnet as a library may call :func:`keep_large_buffers_in_heap` itself. It does nothing where
it cannot or should not apply: outside glibc (macOS, Windows, musl), when the process already
runs under another allocator (``LD_PRELOAD`` of jemalloc, tcmalloc or mimalloc), when the user
set glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or its tunables, or
when ``QSMNET_ALLOCATOR=system``.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable

__all__ = ["HEAP_THRESHOLD_BYTES", "keep_large_buffers_in_heap", "release_free_memory"]

#: Requests up to this size come from the heap, and up to this much freed memory stays at its
#: top. It covers the solvers' per-iteration buffers on a whole-head grid (a padded 1 mm head
#: is about 9 M voxels: 35 MB a real buffer, 105 MB a gradient); larger arrays, which live
#: longer, keep their own mappings, so the heap's fragmentation does not hold on to them
#: after they are freed (the peak-memory figures of the speed section).
HEAP_THRESHOLD_BYTES = 128 << 20

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_applied: bool | None = None


def _stands_aside() -> bool:
    """Whether the setting must not apply here (module docstring)."""
    preload = os.environ.get("LD_PRELOAD", "").lower()
    return (os.environ.get("QSMNET_ALLOCATOR", "").strip().lower() == "system"
            or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
            or any(name in preload for name in _OTHER_ALLOCATORS)
            or any(os.environ.get(name) for name in _USER_SETTINGS))


def _libc_function(name: str, argtypes: tuple) -> Callable[..., int] | None:
    """``name`` from the C library the process runs on, typed; None where it has none."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def keep_large_buffers_in_heap(threshold_bytes: int = HEAP_THRESHOLD_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes`` (module docstring).

    Returns True when the setting is in force (applied now or by an earlier call), False where
    it does not apply (module docstring) or ``mallopt`` refused it. Safe to call more than once.
    """
    global _applied
    if _applied is None:
        mallopt = None if _stands_aside() else _libc_function("mallopt",
                                                               (ctypes.c_int, ctypes.c_int))
        value = int(min(threshold_bytes, 2**31 - 1))
        # mmap threshold first: were it refused, a raised trim threshold alone would only keep
        # freed memory resident
        _applied = (mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, value))
                    and bool(mallopt(_M_TRIM_THRESHOLD, value)))
    return _applied


def release_free_memory() -> bool:
    """Return the heap's free pages to the kernel (glibc's ``malloc_trim``).

    With :func:`keep_large_buffers_in_heap` in force, memory freed by one job stays resident
    for the next one to reuse; call this between jobs of different sizes (e.g. after building
    an input that the rest of the process does not need). Returns True when memory was
    released, False when there was none to release or this is not glibc.
    """
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,)) if _applied else None
    return trim is not None and bool(trim(0))
