"""Two processes joined by jax.distributed (gloo on CPU) train like one process.

Each process has 2 simulated CPU devices and reads only its half of every
global batch; the result must equal one process with 4 devices.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 90


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(args, devices, log_path):
  # The test session's XLA flags (tests/conftest.py: no backend optimisation) and its
  # compilation cache, with this process's device count.
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                 os.environ.get('XLA_FLAGS', ''))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}'.strip())
  log = open(log_path, 'w')
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'multihost_worker.py')]
                          + args, cwd=HERE, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  proc.log_path = log_path
  log.close()
  return proc


def _wait_all(procs):
  """Waits for every process; kills them all if one fails or time runs out."""
  try:
    for proc in procs:
      proc.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  failed = [p for p in procs if p.returncode != 0]
  if failed:
    logs = '\n\n'.join(f'--- {p.log_path} (rc={p.returncode})\n' +
                       open(p.log_path).read()[-3000:] for p in failed)
    pytest.fail(f'{len(failed)} worker process(es) failed:\n{logs}')


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  port = _free_port()
  common = ['--num_steps=6']
  procs = [
      _start(common + [f'--workdir={tmp_path / "multi"}', f'--out={tmp_path / "multi.json"}',
                       f'--coordinator_address=localhost:{port}', '--num_processes=2',
                       f'--process_id={p}'], 2, tmp_path / f'multi_{p}.log')
      for p in range(2)]
  procs.append(_start(common + [f'--workdir={tmp_path / "single"}',
                                f'--out={tmp_path / "single.json"}'],
                      4, tmp_path / 'single.log'))
  _wait_all(procs)
  multi = json.loads((tmp_path / 'multi.json').read_text())
  single = json.loads((tmp_path / 'single.json').read_text())
  assert (multi['process_count'], multi['device_count']) == (2, 4)
  assert (single['process_count'], single['device_count']) == (1, 4)
  assert len(multi['losses']) == 6
  np.testing.assert_allclose(multi['losses'], single['losses'], rtol=1e-5)
  np.testing.assert_allclose(multi['valid_nll'], single['valid_nll'], rtol=1e-5)
  for a, b in zip(multi['params'], single['params'], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
