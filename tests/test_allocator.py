"""The heap setting of :mod:`qsmnet.allocator`, checked against glibc's own accounting of
memory mapped outside the heap (``mallinfo2().hblkhd``), in fresh processes."""

import os
import platform
import subprocess
import sys

import pytest

import qsmnet.allocator as allocator

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc only")

_PROBE = """
import ctypes
import numpy as np
from qsmnet.allocator import keep_large_buffers_in_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = keep_large_buffers_in_heap()
before = libc.mallinfo2().hblkhd
block = np.ones(96 * 2**20, dtype=np.uint8)   # 96 MiB, three times glibc's largest default
after = libc.mallinfo2().hblkhd
print(int(applied), after - before)
"""


def _probe(**env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("QSMNET_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                         "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**full, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1])


@glibc
def test_a_large_buffer_comes_from_the_heap_with_the_setting_and_from_mmap_without():
    applied, mapped = _probe()
    assert applied == 1
    assert mapped == 0
    applied, mapped = _probe(QSMNET_ALLOCATOR="system")
    assert applied == 0
    assert mapped >= 96 * 2**20


@pytest.mark.parametrize("env", [{"QSMNET_ALLOCATOR": "system"},
                                 {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
                                 {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_the_setting_stands_aside_for_the_users_own_allocator_settings(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.keep_large_buffers_in_heap() is False
