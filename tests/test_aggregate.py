"""Seed sweeps: runs equal but for the seed are grouped and summarised as mean ± sd."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vae_jax import aggregate, errors

ROOT = Path(__file__).resolve().parents[1]


def fake_run(root: Path, name: str, seed: int, pooling: str, nll: float, mi: float) -> Path:
  workdir = root / name
  workdir.mkdir(parents=True)
  config = {"model": {"pooling": pooling, "latent_dim": 4}, "train": {"seed": seed}}
  (workdir / "config.json").write_text(json.dumps(config))
  metrics = {"nll": nll, "mi_per_batch": mi, "au": 3, "marginal_kl": [0.1, 0.2],
             "split": "test", "examples": {"samples": ["a"]}}
  (workdir / "eval_test.json").write_text(json.dumps(metrics))
  return workdir


def sweep(root: Path):
  r = np.random.default_rng(0)
  values = {"last": r.normal(100, 1, 3), "mean": r.normal(98, 0.5, 4)}
  dirs = [fake_run(root, f"{p}_s{s}", s, p, float(v), float(v) / 50)
          for p, vs in values.items() for s, v in enumerate(vs)]
  return values, dirs


def test_runs_equal_but_for_the_seed_are_summarised(tmp_path):
  values, dirs = sweep(tmp_path)
  records = aggregate.aggregate(aggregate.group_runs(
      [aggregate.read_run(str(d)) for d in dirs]))
  assert [r["label"] for r in records] == ["model.pooling=last", "model.pooling=mean"]
  for record, (pooling, v) in zip(records, values.items()):
    assert record["seeds"] == list(range(len(v)))
    nll = record["metrics"]["nll"]
    assert nll["n"] == len(v)
    np.testing.assert_allclose([nll["mean"], nll["sd"], nll["se"]],
                               [v.mean(), v.std(ddof=1), v.std(ddof=1) / np.sqrt(len(v))])
    assert set(record["metrics"]) == {"nll", "mi_per_batch", "au"}  # scalars only
    assert record["metrics"]["au"]["sd"] == 0.0
  table = aggregate.table(records, ["nll", "kl"])
  assert f"| model.pooling=mean | 4 | {values['mean'].mean():.3f} ± " in table
  assert table.splitlines()[2].endswith("| — |")  # no KL in these runs
  with pytest.raises(errors.WorkdirError, match="eval_valid.json not found"):
    aggregate.read_run(str(dirs[0]), "valid")


def test_the_command_takes_directories_as_arguments(tmp_path):
  values, _ = sweep(tmp_path / "runs")
  proc = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "aggregate.py"),
       *sorted(os.listdir(tmp_path / "runs")), "--out=out/seeds.json"],
      cwd=tmp_path / "runs", capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "model.pooling=last | 3 |" in proc.stdout
  saved = json.loads((tmp_path / "runs" / "out" / "seeds.json").read_text())
  np.testing.assert_allclose(saved[1]["metrics"]["mi_per_batch"]["mean"],
                             values["mean"].mean() / 50)
