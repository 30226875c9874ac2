"""Shared benchmark helpers: matmul ceiling, compile-separated timing, LSTM-VAE FLOP counts.

Conventions used by every benchmark in this directory:
  * A matmul [m, k] @ [k, n] costs 2 m n k FLOPs; a training step (forward + backward) costs
    3x the forward FLOPs (the backward of a matmul is two matmuls of the same size).
  * Compile time is measured separately (`jax.jit(f).lower(...).compile()`), never inside a
    timed step; timed calls run the compiled executable after warm-up and block until ready.
  * The machine is shared and small, so variants are timed interleaved (A, B, A, B, ...) within
    one process and compared by ratios of medians.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp


def block(tree: Any) -> Any:
  """Blocks until every array in `tree` is computed."""
  return jax.block_until_ready(tree)


def compile_fn(fn: Callable[..., Any], *args: Any,
               compiler_options: Mapping[str, Any] | None = None, **jit_kwargs: Any):
  """AOT-compiles `fn` for `args`; returns (compiled executable, compile seconds).

  Lowering (tracing to StableHLO) and XLA compilation are both included in the time.
  `compiler_options` are XLA debug options for this executable only (the per-compile
  equivalent of `XLA_FLAGS`, e.g. `{"xla_cpu_multi_thread_eigen": False}`).
  """
  start = time.perf_counter()
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile(
      compiler_options=dict(compiler_options or {}))
  return compiled, time.perf_counter() - start


def _time_once(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[float, float]:
  """(wall seconds, process CPU seconds over all threads) of one blocking call."""
  wall, cpu = time.perf_counter(), time.process_time()
  block(fn(*args))
  return time.perf_counter() - wall, time.process_time() - cpu


@dataclasses.dataclass
class Timing:
  """Wall-clock and process-CPU statistics of one compiled function (seconds).

  CPU time (summed over threads) is far less sensitive than wall time to other processes on a
  shared machine; it does not show the benefit of running on several cores at once.
  """
  compile_s: float
  times_s: list[float] = dataclasses.field(default_factory=list)
  cpu_times_s: list[float] = dataclasses.field(default_factory=list)

  def add(self, wall_cpu: tuple[float, float]) -> None:
    self.times_s.append(wall_cpu[0])
    self.cpu_times_s.append(wall_cpu[1])

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    return min(self.times_s)

  @property
  def cpu_median_s(self) -> float:
    return statistics.median(self.cpu_times_s)

  def as_dict(self) -> dict[str, Any]:
    return {"compile_s": self.compile_s, "median_s": self.median_s, "min_s": self.min_s,
            "cpu_median_s": self.cpu_median_s, "times_s": self.times_s}


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 5,
            compiler_options: Mapping[str, Any] | None = None, **jit_kwargs: Any) -> Timing:
  """Compiles `fn` (timed separately), warms up, then times `repeats` calls."""
  compiled, compile_s = compile_fn(fn, *args, compiler_options=compiler_options,
                                   **jit_kwargs)
  for _ in range(warmup):
    block(compiled(*args))
  timing = Timing(compile_s)
  for _ in range(repeats):
    timing.add(_time_once(compiled, args))
  return timing


def time_interleaved(fns: Mapping[str, tuple[Any, ...]],
                     warmup: int = 2, repeats: int = 5,
                     max_seconds: float | None = None) -> dict[str, Timing]:
  """Times several functions round-robin so that machine noise hits all of them alike.

  Args:
    fns: name -> (function, args) or (function, args, compiler_options). Each is compiled
      once (compile time recorded).
    warmup: untimed calls of each compiled function before timing.
    repeats: timed rounds; each round calls every function once, in rotating order.
    max_seconds: stop after the round that exceeds this budget (at least one round).

  Returns:
    name -> Timing.
  """
  compiled = {}
  timings = {}
  for name, (fn, args, *options) in fns.items():
    compiled[name], compile_s = compile_fn(fn, *args,
                                           compiler_options=options[0] if options else None)
    timings[name] = Timing(compile_s)
    for _ in range(warmup):
      block(compiled[name](*args))
  names = list(fns)
  start = time.perf_counter()
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      timings[name].add(_time_once(compiled[name], fns[name][1]))
    if max_seconds is not None and time.perf_counter() - start > max_seconds:
      break
  return timings


def time_train_steps(tasks: Mapping[str, Any], batches: list, mesh, opt_cfg) -> dict[str, Any]:
  """The training loop's own jitted train steps (model, loss, optimiser) of several tasks
  (`steps.Task`s), compiled once each (timed) on `batches[0]`, warmed up on every batch (so each
  padded shape is compiled), then timed round-robin, one step of every task per batch in
  rotating order, so that machine noise hits all alike. The state is threaded through the
  steps (they donate it). Returns name -> {'compile_s', 'times_s'}."""
  from vae_jax.training import optim, steps as steps_lib  # only where a benchmark needs it

  compiled, states, out = {}, {}, {}
  for name, task in tasks.items():
    states[name] = steps_lib.init_train_state(task, opt_cfg, jax.device_get(batches[0]), 0, mesh)
    compiled[name] = steps_lib.make_train_step(task, optim.make_optimizer(opt_cfg), mesh)
    start = time.perf_counter()
    compiled[name].lower(states[name], batches[0]).compile()
    out[name] = {"compile_s": time.perf_counter() - start, "times_s": []}
    for b in batches:
      states[name], result = compiled[name](states[name], b)
    block(result)
  names = list(tasks)
  for r, b in enumerate(batches):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      states[name], result = compiled[name](states[name], b)
      block(result)
      out[name]["times_s"].append(time.perf_counter() - start)
  return out


def vae_task(vocab, model_config, kl=None):
  """The Task a run trains (`vae_jax.build.build_task`) for an LSTM VAE of `model_config`
  (a `VAEConfig`) on `vocab`, with a constant KL weight of 1 and `kl` (a
  `run_config.KLConfig`; default the plain KL)."""
  from vae_jax import build, run_config  # only where a benchmark needs it

  cfg = run_config.ExperimentConfig(
      model=run_config.ModelSpec(kind="vae", config=model_config),
      kl=kl or run_config.KLConfig())
  return build.build_task(cfg, build.build_model(cfg.model, len(vocab)), vocab, 1, 1)


def measure_matmul_ceiling(n: int = 2048, repeats: int = 7,
                           dtype: Any = jnp.float32) -> float:
  """fp32 GFLOP/s of a jitted `[n, n] @ [n, n]` matmul: the best of `repeats` runs."""
  return matmul_gflops(n, n, n, repeats=repeats, dtype=dtype)


def matmul_gflops(m: int, k: int, n: int, repeats: int = 7, dtype: Any = jnp.float32) -> float:
  """Best GFLOP/s of a jitted `[m, k] @ [k, n]` matmul (2 m n k FLOPs)."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (m, k), dtype)
  b = jax.random.normal(key_b, (k, n), dtype)
  timing = time_fn(jnp.matmul, a, b, warmup=1, repeats=repeats)
  return 2.0 * m * n * k / timing.min_s / 1e9


def lstm_flops_per_token(input_dim: int, hidden: int) -> float:
  """Forward FLOPs per step of one LSTM layer: x W_x and h W_hh, each with 4H outputs.

  Elementwise gate work (O(H)) is ignored next to the O(D H + H^2) matmuls.
  """
  return 2.0 * (input_dim + hidden) * 4 * hidden


def lstm_vae_flops_per_token(embed_dim: int, hidden_dim: int, vocab_size: int,
                             latent_dim: int, tokens_per_sequence: float,
                             encoder_hidden_dim: int | None = None,
                             train: bool = True) -> float:
  """FLOPs per token of the LSTM VAE (encoder LSTM -> z -> decoder LSTM with z -> softmax).

  Forward, per token:
    encoder LSTM      2 (E + He) 4He
    decoder LSTM      2 (E + H) 4H
    softmax layer     2 H V
  and per sequence (divided by `tokens_per_sequence`): the posterior head He -> 2 Dz, z -> c_0
  (Dz -> H), and the latent's input projection z W_z (Dz -> 4H), which an efficient
  implementation computes once per sequence (a naive one pays it at every step; it is not
  counted per step here, so the count is that of the efficient computation).

  Args:
    embed_dim, hidden_dim, vocab_size, latent_dim: sizes E, H, V, Dz.
    tokens_per_sequence: average sequence length T (token positions per sequence).
    encoder_hidden_dim: He (defaults to H).
    train: forward + backward (3x forward) if True, forward only otherwise.
  """
  he = encoder_hidden_dim or hidden_dim
  per_token = (lstm_flops_per_token(embed_dim, he) + lstm_flops_per_token(embed_dim, hidden_dim)
               + 2.0 * hidden_dim * vocab_size)
  per_sequence = 2.0 * (he * 2 * latent_dim + latent_dim * hidden_dim
                        + latent_dim * 4 * hidden_dim)
  forward = per_token + per_sequence / tokens_per_sequence
  return 3.0 * forward if train else forward


def environment() -> dict[str, Any]:
  """What the numbers depend on: versions, devices, XLA flags, CPU count."""
  return {
      "jax": jax.__version__,
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "devices": [str(d) for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def write_json(result: Mapping[str, Any], output: str | None) -> None:
  """Prints `result` as JSON on stdout and writes it to `output` when given."""
  text = json.dumps(result, indent=2, sort_keys=False)
  print(text)
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      f.write(text + "\n")
