"""The glibc allocator tuning for CPU training (`keep_freed_cpu_memory`)."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

MAPPED_BLOCKS_FOR_AN_ACTIVATION = """
import ctypes, sys, torch
from sourcelm.train.device import keep_freed_cpu_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert keep_freed_cpu_memory()
before = libc.mallinfo2().hblks
x = torch.ones(5 << 20)  # 20 MB: an activation-sized block
print(libc.mallinfo2().hblks - before)
"""


def _glibc_with_mallinfo2() -> bool:
    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(),
                    reason="the tuning is glibc's mallopt; the check reads mallinfo2 (2.33+)")
def test_keep_freed_cpu_memory_serves_activations_from_the_heap():
    """By default glibc serves a 20 MB block with its own mmap (unmapped again on free, so the next step
    faults its pages in afresh); tuned, the block comes from the heap, which keeps freed memory."""
    def mapped_blocks(mode):
        out = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS_FOR_AN_ACTIVATION, mode], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[2])
        return int(out.stdout.split()[-1])
    assert mapped_blocks("default") == 1
    assert mapped_blocks("tuned") == 0
