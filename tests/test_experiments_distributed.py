"""The real command, `experiments/vae.py` on the smoke config, across processes, devices and a kill.

- 2 processes joined by jax.distributed (localhost coordinator, gloo, 2 CPU devices each, each
  reading its own rows of every batch) end where 1 process on 4 devices ends;
- a run killed (SIGKILL) after a checkpoint and rerun ends bit for bit where a run that never
  stopped ends;
- 8 simulated devices end where 1 device ends.

Every run is a subprocess (the device count is fixed when JAX starts) running the same command
line; the runs are module fixtures shared between tests and started side by side. They share
the test session's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, tests/conftest.py).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import writers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# More steps than the smoke default, so that a kill lands mid-run: checkpoints at 4, 8, ...,
# evaluations at 8, 16, 24. Every batch is padded to max_length (32), so each run compiles
# one train and one evaluation shape (process 1 of a multi-process run never reads the
# persistent compilation cache: JAX writes it from process 0 only, with per-process keys).
NUM_STEPS = 24
COMMAND = [sys.executable, str(ROOT / "experiments" / "vae.py"),
           "--config=experiments/configs/vae.py:smoke",
           f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=4",
           "--config.train.eval_every=8", "--config.eval.splits=test",
           "--config.data.pad_multiple=32",
           # Prior samples and interpolations are not compared here: not decoded.
           "--config.eval.num_prior_samples=0", "--config.eval.num_interpolations=0"]
TIMEOUT_S = 300          # per run: every process is killed after this
KILL_AFTER_STEP = 8      # SIGKILL once a checkpoint of this step (or later) is on disk
EVAL_FLOATS = ("nll", "ppl", "elbo", "kl", "mi")
EVAL_COUNTS = ("au", "k_samples", "n_sentences", "n_tokens", "step")
# Different device counts sum over the batch in a different order (float32).
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  # The cache directory comes from tests/conftest.py. Every program is cached, however quick
  # to compile: a run compiles ~100 small programs, a third of its CPU time when not cached.
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


class Run:
  """The command as `processes` processes with `devices` CPU devices each, in `root/workdir`.

  Each process leads its own process group (killed as a group); its stdout and stderr go to
  `root/launch<n>.process<p>.log`.
  """

  def __init__(self, root: Path, devices: int, processes: int = 1):
    self.root, self.workdir = root, root / "workdir"
    self.devices, self.processes = devices, processes
    self.procs: list[subprocess.Popen] = []
    self.logs: list[Path] = []
    self.launches = 0

  def start(self) -> "Run":
    args = [f"--workdir={self.workdir}"]
    port = _free_port() if self.processes > 1 else None
    self.procs, self.logs = [], []
    for p in range(self.processes):
      extra = ([f"--coordinator_address=localhost:{port}",
                f"--num_processes={self.processes}", f"--process_id={p}"] if port else [])
      log = self.root / f"launch{self.launches}.process{p}.log"
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(
            COMMAND + args + extra, cwd=ROOT, env=_env(self.devices), stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True))
      self.logs.append(log)
    self.launches += 1
    self.deadline = time.monotonic() + TIMEOUT_S
    return self

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      proc.wait()

  def running(self) -> bool:
    """Whether a process still runs; fails the test (all killed) if one failed or hangs."""
    codes = [proc.poll() for proc in self.procs]
    if any(c not in (None, 0) for c in codes) or time.monotonic() > self.deadline:
      self.kill()
      self.fail("failed" if time.monotonic() <= self.deadline
                else f"ran past {TIMEOUT_S} s")
    return any(c is None for c in codes)

  def finish(self) -> "Run":
    """Waits for the processes to exit successfully (else kills them all and fails)."""
    while self.running():
      time.sleep(0.1)
    return self

  def fail(self, what: str):
    tails = "\n".join(f"--- {log} (rc={proc.returncode})\n{log.read_text()[-4000:]}"
                      for proc, log in zip(self.procs, self.logs))
    pytest.fail(f"{self.root.name}: {what}\n{tails}")

  def log(self, process: int = 0) -> str:
    return self.logs[process].read_text()

  # Results.

  def state(self) -> dict:
    """The final TrainState (nested dicts of numpy arrays), from the latest checkpoint."""
    state, meta = checkpoint_lib.restore_latest(str(self.workdir))
    assert meta["step"] == NUM_STEPS
    return jax.device_get(state)

  def params(self):
    return self.state()["params"]

  def metrics(self, split: str) -> dict[int, dict]:
    return {r["step"]: r["metrics"] for r in writers.read_metrics(self.workdir)
            if r["split"] == split}

  def eval_results(self) -> dict:
    return json.loads((self.workdir / "eval_test.json").read_text())


def _launch(tmp_path_factory, name: str, devices: int, processes: int = 1):
  run = Run(tmp_path_factory.mktemp(name), devices, processes).start()
  yield run
  run.kill()


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  yield from _launch(tmp_path_factory, "one_device", 1)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  yield from _launch(tmp_path_factory, "four_devices", 4)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  yield from _launch(tmp_path_factory, "two_processes", 2, processes=2)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  yield from _launch(tmp_path_factory, "eight_devices", 8)


# Comparisons.


def _max_diff(a, b) -> float:
  """Max |a - b| over the leaves of two trees of the same structure."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  assert all(np.shape(x) == np.shape(y) for x, y in zip(leaves_a, leaves_b))
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(leaves_a, leaves_b))


def _assert_params_close(run, reference, rtol=RTOL, atol=ATOL) -> tuple[float, float]:
  """Leaf by leaf allclose; returns the max |difference| and the largest fraction of the
  tolerance `atol + rtol * |reference|` that a difference uses."""
  params, expected = run.params(), reference.params()
  diff, used = _max_diff(params, expected), 0.0
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))
    used = max(used, float(np.max(np.abs(x - y) / (atol + rtol * np.abs(y)))))
  return diff, used


def _assert_bitwise_equal(a, b) -> None:
  leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for (path, x), y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), (jax.tree_util.keystr(path), np.max(np.abs(x - y)))


def _assert_metrics_close(run, reference, split, names, rtol=RTOL) -> float:
  """Same steps logged, `names` close at each; returns the max |difference| of `names`."""
  got, expected = run.metrics(split), reference.metrics(split)
  assert sorted(got) == sorted(expected) and got
  worst = 0.0
  for step in expected:
    for name in names:
      a, b = got[step][name], expected[step][name]
      assert a == pytest.approx(b, rel=rtol, abs=ATOL), (split, step, name)
      worst = max(worst, abs(a - b))
  return worst


def _assert_eval_close(run, reference, rtol=RTOL) -> dict:
  got, expected = run.eval_results(), reference.eval_results()
  for name in EVAL_COUNTS:
    assert got[name] == expected[name], name
  for name in EVAL_FLOATS:
    assert got[name] == pytest.approx(expected[name], rel=rtol, abs=1e-5), name
  return {name: abs(got[name] - expected[name]) for name in EVAL_FLOATS}


def _report(title: str, **diffs) -> None:
  print(f"{title}: " + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))


# The tests.


def test_two_processes_equal_one_process_on_four_devices(two_processes, four_devices):
  two_processes.finish()
  four_devices.finish()
  # Both trained on 4 devices; the 2 processes split every global batch of 16 rows.
  for run in (two_processes, four_devices):
    assert "on 4 devices" in run.log()
  assert "process 0 of 1 reads rows [0, 16) of every global batch of 16" in four_devices.log()
  assert "process 0 of 2 reads rows [0, 8) of every global batch of 16" in two_processes.log(0)
  assert "process 1 of 2 reads rows [8, 16) of every global batch of 16" in two_processes.log(1)
  # Only process 0 reports (it alone writes metrics.jsonl and eval_test.json).
  assert "[test] samples:" in two_processes.log(0)
  assert "[test] samples:" not in two_processes.log(1)

  params, used = _assert_params_close(two_processes, four_devices)
  loss = _assert_metrics_close(two_processes, four_devices, "train", ("loss", "neg_elbo", "kl"))
  valid = _assert_metrics_close(two_processes, four_devices, "valid", ("neg_elbo", "kl"))
  evals = _assert_eval_close(two_processes, four_devices)
  # Every test sentence evaluated once: the processes read disjoint rows.
  assert two_processes.eval_results()["n_sentences"] == 48
  _report("2 processes x 2 devices vs 1 process x 4 devices", params_max_abs=params,
          params_tolerance_used=used, train_max_abs=loss, valid_max_abs=valid, **evals)


def test_killed_and_resumed_run_equals_a_run_that_never_stopped(tmp_path, one_device):
  killed = Run(tmp_path, devices=1).start()
  latest = killed.workdir / "checkpoints" / "latest"
  try:
    saved = []
    while not saved:
      assert killed.running(), "the run finished before it could be killed"
      if latest.is_dir():
        saved = [int(d.name) for d in latest.iterdir()
                 if d.name.isdigit() and int(d.name) >= KILL_AFTER_STEP]
      time.sleep(0.02)
  finally:
    killed.kill()
  assert killed.procs[0].returncode == -signal.SIGKILL

  killed.start().finish()  # The same command, in the same workdir.
  resumed = re.search(r"Resumed from step (\d+)", killed.log())
  assert resumed, killed.log()[-3000:]
  resumed_from = int(resumed.group(1))
  assert KILL_AFTER_STEP <= resumed_from < NUM_STEPS
  one_device.finish()

  # Bit for bit: the whole train state (parameters, optimiser, rng, step), every logged train
  # and valid metric, the final evaluation.
  _assert_bitwise_equal(killed.state(), one_device.state())
  for split in ("train", "valid"):
    got, want = killed.metrics(split), one_device.metrics(split)
    assert sorted(got) == sorted(want)
    assert any(step > resumed_from for step in got)
    for step in want:
      for name, value in want[step].items():
        if name != "steps_per_sec":
          assert got[step][name] == value, (split, step, name)
  got, want = killed.eval_results(), one_device.eval_results()
  for name in EVAL_FLOATS + EVAL_COUNTS:
    assert got[name] == want[name], name
  _report(f"killed after checkpoint {max(saved)}, resumed from {resumed_from}",
          params_max_abs=0.0)


def test_eight_devices_equal_one_device(eight_devices, one_device):
  eight_devices.finish()
  one_device.finish()
  assert "on 8 devices" in eight_devices.log() and "on 1 devices" in one_device.log()
  params, used = _assert_params_close(eight_devices, one_device)
  loss = _assert_metrics_close(eight_devices, one_device, "train", ("loss", "neg_elbo", "kl"))
  valid = _assert_metrics_close(eight_devices, one_device, "valid", ("neg_elbo", "kl"))
  evals = _assert_eval_close(eight_devices, one_device)
  _report("8 devices vs 1 device", params_max_abs=params, params_tolerance_used=used,
          train_max_abs=loss, valid_max_abs=valid, **evals)
