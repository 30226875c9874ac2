"""experiments/report.py and vae_jax.plots on one tiny flow run: the figures have the expected
panels, the command writes decodable PNGs from a relative --workdir (and the comparison of
two runs), a run without a best checkpoint falls back to the latest, and a missing workdir is
one `error:` line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from matplotlib import image
import numpy as np
import pytest

from experiment_configs import run_experiment, smoke_config
from vae_jax import errors, plots
from vae_jax.data import synthetic
from vae_jax.training import writers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import report  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
  """An 8-step flow VRAE run on the embedded corpus (valid at steps 4 and 8), no final
  evaluation."""
  cfg = smoke_config("flow_vrae")
  cfg.unlock()
  cfg.train.num_steps, cfg.train.log_every, cfg.train.eval_every = 8, 4, 4
  cfg.eval.splits = ""
  workdir = tmp_path_factory.mktemp("report") / "flow"
  run_experiment(cfg, workdir)
  return workdir


def titles(fig) -> list[str]:
  return [ax.get_title() for ax in fig.axes]


def test_curves_have_a_panel_per_logged_quantity(run_dir):
  fig = plots.curves_figure(writers.read_metrics(run_dir), title="flow")
  by_key = dict(plots.CURVES)
  expected = ["loss", "neg_elbo", "rec", "kl", "beta", "au", "learning_rate"]
  assert titles(fig) == [by_key[k] for k in expected]
  lines = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes}
  assert lines[by_key["kl"]] == ["train", "valid"] and lines[by_key["beta"]] == ["train"]
  assert all(ax.get_xlabel() == "step" for ax in fig.axes)
  # A language model's log: no KL, β or AU panel; text samples are skipped.
  lm = [{"step": 4, "split": "train", "metrics": {"loss": 3.0, "nll": 3.0, "ppl": 9.0,
                                                  "learning_rate": 1e-3}},
        {"step": 4, "split": "valid", "metrics": {"nll": 2.5, "ppl": 8.0}},
        {"step": 4, "split": "samples", "texts": ["a b"]}]
  assert titles(plots.curves_figure(lm)) == [by_key["loss"], by_key["nll"],
                                             by_key["learning_rate"]]


def test_posterior_figures_of_a_flow_run(run_dir):
  out = report.posterior_report(str(run_dir), "flow", split="test", which="best",
                                max_examples=64, data_dir=None, seed=0)
  assert out["codes"].shape == (64, 4) and out["kl_dims"].shape == (4,)
  assert not out["kl_exact"] and "base Gaussian" in out["kl_label"]
  assert np.all(out["kl_dims"] >= 0) and out["au"] == int(np.sum(out["au_variance"] > 0.01))
  figures = report.posterior_figures(out, "test")
  assert sorted(figures) == ["latent_dims_test.png", "pca_test.png"]
  kl_ax, au_ax = figures["latent_dims_test.png"].axes
  assert len(kl_ax.patches) == len(au_ax.patches) == 4
  assert kl_ax.get_title().startswith(out["kl_label"]) and au_ax.get_yscale() == "log"
  assert any(np.allclose(line.get_ydata(), 0.01) for line in au_ax.get_lines())
  pca = figures["pca_test.png"]
  assert titles(pca) == [f"E_q[z|x] by {name}" for name in synthetic.FACTOR_NAMES]
  for ax in pca.axes:
    assert "% of variance" in ax.get_xlabel() and "% of variance" in ax.get_ylabel()
    assert sum(len(c.get_offsets()) for c in ax.collections) == 64


def test_pca_projection_explains_the_variance():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 3)) * np.array([3.0, 1.0, 0.1])
  coords, explained = plots.pca_projection(x)
  assert coords.shape == (500, 2)
  assert explained == pytest.approx([9.0 / 10.01, 1.0 / 10.01], abs=0.03)
  np.testing.assert_allclose(coords.var(axis=0) / x.var(axis=0).sum(), explained, rtol=1e-9)


def test_checkpoint_fallbacks_and_missing_log(run_dir, tmp_path):
  latest_only = tmp_path / "latest_only"
  shutil.copytree(run_dir, latest_only)
  shutil.rmtree(latest_only / "checkpoints" / "best")
  os.remove(latest_only / "checkpoints" / "best.json")
  assert report.restore(str(latest_only), "best")[1] == "latest"
  shutil.rmtree(latest_only / "checkpoints")
  assert report.restore(str(latest_only), "best") == (None, None)
  os.remove(latest_only / "metrics.jsonl")
  with pytest.raises(errors.WorkdirError, match="metrics.jsonl not found"):
    report.scalar_records(str(latest_only))


def read_png(path: Path) -> np.ndarray:
  assert path.stat().st_size > 0, path
  pixels = image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape
  assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 2, path
  return pixels


def run_report(cwd: Path, *args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "report.py"), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_command_writes_figures_and_comparison(run_dir):
  parent = run_dir.parent
  # A second run that has logged metrics but saved no checkpoint yet: curves only.
  shutil.copytree(run_dir, parent / "training", ignore=shutil.ignore_patterns("checkpoints",
                                                                              "figures"))
  proc = run_report(parent, "--workdir=flow", "--workdir=./training/", "--max_examples=32")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  for figure in ("curves.png", "latent_dims_test.png", "pca_test.png"):
    read_png(parent / "flow" / "figures" / figure)
  assert sorted(os.listdir(parent / "training" / "figures")) == ["curves.png"]
  assert "no checkpoint yet" in proc.stderr
  read_png(parent / report.COMPARE_FILE)
  # A missing workdir: one line, exit status 2, no traceback, nothing written.
  proc = run_report(parent, "--workdir=no_such_run")
  errors_shown = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors_shown) == 1, proc.stderr[-2000:]
  assert "no_such_run" in errors_shown[0] and "Traceback" not in proc.stderr
