"""The host allocator: memory a step frees stays mapped for the next step (Linux, glibc).

XLA's CPU runtime mallocs each step's temporary buffer (6.6 GB for a ModernBERT-base step
at batch 8 x 512) and frees it when the step ends. glibc serves an allocation that large
with mmap (from a thread's own arena, always) and unmaps it on free, so every step faults
the whole buffer in and the kernel zeroes it again: 1.6 M page faults and ~4 s of system
time in a 24 s step on 2 cores (docs/performance.md). One arena, no mmap and no trimming
keep it: the step is ~12% faster and the process holds its peak, which it reaches anyway
each step. `FLAXBERT_CLS_HOST_MALLOC=system` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os

from flaxbert_cls.errors import UserError

ENV = "FLAXBERT_CLS_HOST_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>
# mallopt takes an int; glibc stores the trim threshold as size_t, so -1 is "never trim".
_KEEP = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


def _glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError, AttributeError):  # not Linux, or not glibc (musl, macOS)
    return False


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory mapped; True if set.

  Call it before the threads that allocate start (the console entry does, before JAX
  loads): a thread that already has its own arena keeps it.
  """
  choice = os.environ.get(ENV, "keep")
  if choice not in ("keep", "system"):
    raise UserError(f"{ENV}={choice!r}: expected 'keep' or 'system'")
  if choice == "system" or not _glibc():
    return False
  libc = ctypes.CDLL(None)  # the C library this process already runs on
  return all([libc.mallopt(option, value) == 1 for option, value in _KEEP])
