"""Test-wide settings: a persistent XLA compilation cache shared by the test processes.

Many tests compile the same small programs (the smoke config's train and evaluation steps, in
this process and in the subprocesses of the CLI and multi-process tests); the on-disk cache
lets each compile once per test session.
"""

import gc
import os
from pathlib import Path

# Tests compile hundreds of small programs and run each for milliseconds: LLVM's optimisation
# passes cost more than they save, and XLA:CPU's newer fusion emitters take about twice as long
# to compile a program as the classic elemental emitters (an eager op: ~50 ms against ~27 ms;
# the flow smoke run's 45 programs: 22 s against 9 s). Set before JAX starts its backend;
# inherited by the subprocesses of the CLI tests.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
     "--xla_cpu_use_fusion_emitters=false"]).strip()

import jax  # noqa: E402

from vae_jax.training import host_memory  # noqa: E402

# As every entry point does: keep freed memory mapped, so that XLA:CPU's per-execution
# temporaries do not page-fault afresh (before the backend starts its threads). Subprocesses
# that do not go through an entry point get the same setting from the environment.
host_memory.retain_freed_memory()
os.environ.setdefault("GLIBC_TUNABLES", host_memory.TUNABLES)

CACHE_DIR = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_collection_finish(session):
  """Moves everything alive after collection (JAX, Flax, the test modules) out of the garbage
  collector's reach: later collections, automatic or explicit (a checkpoint restore collects
  after each read), then scan only what the tests create."""
  gc.collect()
  gc.freeze()
