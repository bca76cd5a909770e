"""lit_meta.allocator: freed tensor memory stays in the process (no munmap / re-fault per step) where it applies."""

import os
import subprocess
import sys

import pytest

CHILD = """
import os, sys, torch
from lit_meta.allocator import keep_freed_memory
kept = keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
x = torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
before_free = rss()
del x
print(kept, (before_free - rss()) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options: Linux only")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_freed_tensor_memory_stays_in_the_process_unless_switched_off(setting):
    env = {**os.environ, "LIT_META_KEEP_FREED_MEMORY": setting}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    kept, released_mib = out.split()
    if setting == "1":
        assert kept == "True" and float(released_mib) < 1
    else:  # glibc's default: the 64 MiB block was mmap'ed and goes back to the OS when freed
        assert kept == "False" and float(released_mib) > 60
