"""What run_cli sets up for every script besides the compilation cache (that one is
tests/test_compilation_cache.py's): a heap that keeps a step's freed temporaries. A setting of the
host's, so these run on any backend."""

import platform
import subprocess
import sys

import pytest

from test_train import REPO


HEAP_PROBE = """
import ctypes, sys
import cli
libc = ctypes.CDLL(None)
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "run_cli":
    cli.run_cli(lambda: None)
size = 20 << 20  # a step's temporaries at shakespeare_char_cpu are ~25 MB
block = libc.malloc(size)
ctypes.memset(block, 1, size)
mapped = libc.mallinfo2().hblkhd >= size
libc.free(ctypes.c_void_p(block))
print(mapped, libc.mallinfo2().arena >= size)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("setup", ["run_cli", "none"])
def test_every_script_serves_a_steps_temporaries_from_the_heap_and_keeps_them(setup):
    """A block the size of a step's temporaries comes from the heap and stays there when freed, so
    the next step does not page-fault it in again (BENCHMARKS.md, "round 7"); without run_cli's
    setting glibc maps it apart and unmaps it on free (the probe can tell the two apart)."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE, setup], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == (["False", "True"] if setup == "run_cli" else ["True", "False"])
