"""Keep freed host memory in the process, so that XLA:CPU's buffers reuse touched pages.

XLA:CPU allocates each execution's temporaries as one block (about 109 MB for the PTB-size VAE
train step) with `posix_memalign` from one of its worker threads, and frees it when the
execution ends. glibc serves a request of that size from a thread arena by `mmap` and returns
it with `munmap`, so every step the kernel maps and zero-fills the block again: 26,600 page
faults and ~70 ms of system time per PTB-size step on a 2-core machine, a third of the step.

`retain_freed_memory` sets glibc's malloc to one arena that grows with `brk` only (no `mmap`,
no trimming), so a freed block stays mapped and the next execution reuses its pages: the same
step then takes ~1,300 page faults and ~7 ms of system time (measured with
`resource.getrusage` around 20 steps). The process keeps its peak heap for its lifetime, which
a training or evaluation process does anyway.

It must run before XLA's threads first allocate (before the first computation): the entry
points call it first thing (`experiments/main_lib.run`, the benchmarks, the test suite's
conftest). The same setting from outside the process, for any program:

  GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647

It changes nothing where the C library is not glibc (macOS, musl) and returns False there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["TUNABLES", "retain_freed_memory"]

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2 ** 31 - 1  # the largest int: keep up to 2 GiB of free heap at the top

TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            f"glibc.malloc.trim_threshold={_NEVER_TRIM}")

_done = False


def retain_freed_memory() -> bool:
  """One malloc arena, no mmap, no trimming (see the module docstring); True if applied.

  Idempotent. Set `VAE_JAX_KEEP_MALLOC=0` in the environment to leave malloc as it is.
  """
  global _done  # a process-wide setting, applied once
  if _done:
    return True
  if os.environ.get("VAE_JAX_KEEP_MALLOC", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    if not hasattr(libc, "gnu_get_libc_version"):
      return False
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  _done = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
  return _done
