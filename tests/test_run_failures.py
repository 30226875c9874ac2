"""A run's expected failures: caught before anything is written, reported in one line, and
never in the way of the corrected command; relative paths, however spelled, are one setting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiment_configs import run_experiment, smoke_config
from vae_jax import errors
from vae_jax.data import synthetic

ROOT = Path(__file__).resolve().parents[1]


def smoke_ptb_config(data_dir: str):
  """The smoke VAE on a tiny corpus in PTB's layout (every batch padded to max_length)."""
  cfg = smoke_config("vae")
  cfg.unlock()
  cfg.data.corpus, cfg.data.dir = "ptb", data_dir
  cfg.train.num_steps, cfg.train.eval_every, cfg.train.log_every = 2, 2, 2
  cfg.eval.splits, cfg.eval.max_examples, cfg.eval.num_reconstructions = "test", 16, 8
  return cfg


def write_corpus(directory: Path) -> Path:
  directory.mkdir(parents=True)
  for split, name in (("train", "train"), ("valid", "valid"), ("test", "test")):
    lines = [" ".join(ex.tokens) for ex in synthetic.generate(split)[:120]]
    (directory / f"ptb.{name}.txt").write_text("\n".join(lines) + "\n")
  return directory


def set_field(name, value):
  def change(cfg, _):
    section, field = name.split(".")
    cfg[section][field] = value
  return change


def damage(split, data: bytes):
  def change(_, directory):
    (directory / f"ptb.{split}.txt").write_bytes(data)
  return change


FAILURES = [
    ("missing data directory", set_field("data.dir", "no/such/dir"), errors.DataNotFoundError,
     r"--config.data.dir=.*no/such/dir.*not found"),
    ("negative latent size", set_field("model.latent_dim", -4), errors.ConfigError,
     r"^--config.model.latent_dim=-4: must be"),
    ("empty batch", set_field("data.batch_size", 0), errors.ConfigError,
     r"^--config.data.batch_size=0: must be"),
    ("bad dropout", set_field("model.dropout_in", 1.5), errors.ConfigError,
     r"^--config.model.dropout_in=1.5: dropout_in must be in \[0, 1\)"),
    ("empty training file", damage("train", b""), errors.DataError,
     r"ptb.train.txt is empty"),
    ("validation file not UTF-8", damage("valid", "a b\ncaf\xe9 c\n".encode("latin-1")),
     errors.DataError, r"ptb.valid.txt, line 2: not UTF-8"),
    ("NUL in the test split (read only after training today)",
     damage("test", b"a b\nc d\ne\x00f\n"), errors.DataError,
     r"--config.eval.splits=test .*ptb.test.txt, line 3: a NUL character"),
]


def test_failed_starts_write_nothing_and_the_corrected_command_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for i, (what, change, error, match) in enumerate(FAILURES):
    cfg = smoke_ptb_config(f"data_{i}/ptb/")
    change(cfg, write_corpus(tmp_path / f"data_{i}" / "ptb"))
    with pytest.raises(error, match=match) as info:
      run_experiment(cfg, "runs/x")
    assert "\n" not in str(info.value), what
    assert not (tmp_path / "runs").exists(), f"{what}: the failed start wrote files"

  # What an older failed start may have left (a config and vocabulary, no checkpoint) does not
  # block a fresh run: without a committed checkpoint the workdir is fresh.
  workdir = tmp_path / "runs" / "x"
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({"model": {"latent_dim": -4}}))
  (workdir / "vocab.json").write_text("{}")
  write_corpus(tmp_path / "data" / "ptb")
  first = run_experiment(smoke_ptb_config("./data/ptb/"), "runs/x")["test"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["dir"] == str(tmp_path / "data" / "ptb")  # resolved, normalised

  # The same corpus spelled another way is the same setting: the run resumes.
  cfg = smoke_ptb_config(str(tmp_path / "data" / "ptb"))
  cfg.train.num_steps = 3
  again = run_experiment(cfg, workdir)["test"]
  assert again["step"] == 3 and first["step"] == 2
  with pytest.raises(errors.ConfigError, match=r"--config.model.hidden_dim=8 \(trained with "
                                               r"24\).* fresh --workdir"):
    changed = smoke_ptb_config("data/ptb")
    changed.model.hidden_dim = 8
    run_experiment(changed, "runs/x")


def run_main(*args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "vae.py"), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_the_cli_ends_an_expected_failure_with_one_line(tmp_path):
  a_file = tmp_path / "not_a_dir"
  a_file.write_text("")
  args = ["--config=experiments/configs/vae.py:smoke", f"--workdir={a_file}"]
  proc = run_main(*args)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={a_file} is a file ({a_file}), not a directory: give a directory path "
      "(it is created if missing).")
  # The traceback is there for whoever asks.
  verbose = run_main(*args, "--verbosity=1")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr
  # A flag error is one line too.
  typo = run_main("--config=experiments/configs/vae.py:smoke", "--config.model.latnet_dim=3",
                  f"--workdir={tmp_path / 'w'}")
  assert typo.returncode == 2 and "Traceback" not in typo.stderr
  assert typo.stderr.strip().splitlines()[-1].startswith(
      "error: --config.model.latnet_dim: the config has no such field")
