"""The host allocator setting: freed memory stays mapped, so a second buffer faults no pages.

Each case runs in a fresh interpreter: the setting is per process and must come before
the threads that allocate.
"""

import os
import subprocess
import sys

import pytest

from flaxbert_cls.training import host_memory

# A 64 MiB buffer malloc'ed and written in a worker thread (as XLA's runtime threads do),
# freed, then again; prints whether the setting took and the page faults of the second.
_PROBE = """
import ctypes, resource, threading
from flaxbert_cls.training import host_memory
kept = host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():
  buffer = libc.malloc(64 << 20); ctypes.memset(buffer, 1, 64 << 20); libc.free(buffer)
faults = []
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t = threading.Thread(target=step); t.start(); t.join()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, faults[1])
"""
_PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def _probe(choice: str) -> tuple[bool, int]:
  env = dict(os.environ, **{host_memory.ENV: choice})
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not host_memory._glibc(), reason="glibc's mallopt")  # pylint: disable=protected-access
def test_keep_stops_refaulting_a_freed_buffer():
  kept, faults = _probe("keep")
  assert kept and faults < _PAGES // 10, faults
  kept, faults = _probe("system")  # glibc's default unmaps it: every page faults again
  assert not kept and faults >= _PAGES // 2, faults


def test_unknown_choice_is_one_line(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "never")
  with pytest.raises(Exception, match=f"{host_memory.ENV}='never': expected 'keep' or 'system'"):
    host_memory.keep_freed_memory()


def test_the_command_names_a_bad_choice_in_one_line():
  env = dict(os.environ, **{host_memory.ENV: "never"})
  command = os.path.join(os.path.dirname(sys.executable), "flaxbert-cls")
  out = subprocess.run([command, "train"], env=env, capture_output=True, text=True, check=False)
  assert out.returncode == 2
  assert out.stderr.strip() == (f"flaxbert-cls: error: {host_memory.ENV}='never': "
                                "expected 'keep' or 'system'")
