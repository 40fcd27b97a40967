"""nnunet_cl.memory: the glibc setting the trainers make in initialize(), and its effect on freed memory.

The effect is measured in a subprocess, so this test process keeps glibc's defaults."""
import platform
import subprocess
import sys
import textwrap

import pytest

from nnunet_cl.memory import fix_mmap_threshold

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")

# Frees one 16 MiB block (glibc then raises its mmap threshold to 16 MiB), allocates 50 blocks of 4 MiB,
# touches them, frees all but the last, and prints how many MiB the process still holds of them.
_HELD_AFTER_FREE = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    from nnunet_cl.memory import fix_mmap_threshold
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold(131072)
    big = libc.malloc(16 << 20); libc.memset(big, 1, 16 << 20); libc.free(big)
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    before = rss()
    blocks = [libc.malloc(4 << 20) for _ in range(50)]
    for b in blocks:
        libc.memset(b, 1, 4 << 20)
    for b in blocks[:-1]:
        libc.free(b)
    print((rss() - before) / 2**20)
""")


def _held_mib(mode: str) -> float:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_MMAP_THRESHOLD_ from the caller
    proc = subprocess.run([sys.executable, "-c", _HELD_AFTER_FREE, mode], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip())


def test_user_variable_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False


@glibc_only
def test_freed_blocks_go_back_to_the_system():
    """With glibc's defaults the 49 freed 4 MiB blocks (196 MiB) stay in the process; with the fix, they leave."""
    default, fixed = _held_mib("default"), _held_mib("fixed")
    assert default > 150, default
    assert fixed < 20, fixed
