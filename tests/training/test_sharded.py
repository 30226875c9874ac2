"""The train step on 8 simulated CPU devices equals the 1-device step."""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def test_eight_devices_match_one_device(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, 'sharded_check.py'), str(tmp_path)],
      cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8 and report['loss_sharding_devices'] == 8
  np.testing.assert_allclose(report['losses8'], report['losses1'], rtol=1e-6)
  for key in ('params_diff', 'model_state_diff', 'opt_state_diff', 'loop_params_diff'):
    assert report[key] < 1e-5, (key, report[key])
  # Eval sums (of NLLs over a batch) are compared relative to their size: the 8-device sum
  # adds its float32 terms in another order.
  assert report['eval_sums_diff'] < 1e-6, report['eval_sums_diff']
  assert '12 rows' in report['indivisible_error']
  assert 'multiple of 8' in report['indivisible_error']
