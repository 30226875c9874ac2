"""The documentation is executable.

1. README's quick start runs as written: its command, word for word, from a fresh current
   directory with the relative `--workdir` it names (shrunk to a few steps only by `--config.*`
   overrides appended to it), then `experiments/evaluate.py` and `experiments/classify.py` on
   that workdir, then the training command again, which must resume, not fail.
2. Every `python experiments/...` command in README.md and docs/*.md parses: the script exists,
   every `:variant` exists, every flag and `--config.x.y` field exists, the values pass the
   run's config checks, and the corpus files it names are there.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

from absl import flags
import pytest

from doc_commands import ROOT, Command, documented_commands, readme_quick_start
from vae_jax import configs, errors
from vae_jax.data import corpora

# Appended to README's command: a few steps of a small model, every batch padded to one width
# (one compiled train and evaluation program); everything else as written.
SHRINK = ["--config.train.num_steps=6", "--config.train.num_epochs=0",
          "--config.train.eval_every=3", "--config.train.log_every=3",
          "--config.data.max_train_examples=96", "--config.data.batch_size=16",
          "--config.data.max_length=32", "--config.data.pad_multiple=32",
          "--config.model.embed_dim=16", "--config.model.hidden_dim=24",
          "--config.model.latent_dim=4", "--config.model.flow.hidden_dim=16",
          "--config.model.flow.context_dim=16", "--config.eval.k_samples=4",
          "--config.eval.chunk_size=4", "--config.eval.max_examples=32",
          "--config.eval.num_reconstructions=16", "--config.eval.hole_samples=200",
          "--config.eval.num_prior_samples=8", "--config.eval.num_interpolations=2",
          "--config.eval.interpolation_steps=3", "--config.eval.max_decode_length=12",
          "--config.eval.mi_max_examples=32", "--config.train.progress_bar=False"]


def run_in(cwd, argv, expect_ok=True):
  """Runs a documented command (`python experiments/...`) in `cwd` with this interpreter."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True,
                        timeout=900, env=env)
  if expect_ok:
    assert proc.returncode == 0, (f"{' '.join(argv)} failed in {cwd}:\n"
                                  + proc.stdout[-3000:] + proc.stderr[-3000:])
  return proc


@pytest.fixture()
def user_dir(tmp_path):
  """A fresh current directory holding the checkout's `experiments/` (as a new user's clone
  does), nothing else."""
  (tmp_path / "experiments").symlink_to(ROOT / "experiments", target_is_directory=True)
  return tmp_path


def test_readme_quick_start_runs_as_written(user_dir):
  commands = readme_quick_start()
  assert commands, "README's quick start holds no experiment command"
  train = commands[0]
  workdirs = [a.split("=", 1)[1] for a in train.args if a.startswith("--workdir=")]
  assert workdirs and not os.path.isabs(workdirs[0]), train
  workdir = user_dir / workdirs[0]
  argv = [*train.argv, *SHRINK]

  first = run_in(user_dir, argv)
  result = json.loads((workdir / "eval_test.json").read_text())
  assert result["step"] == 6 and result["n_sentences"] == 32 and result["k_samples"] == 4
  assert -result["nll"] >= result["elbo"] - 1e-3  # the IW bound is at least the ELBO
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["posterior"] == "flow" and saved["model"]["latent_to_output"]
  assert "Traceback" not in first.stderr

  evaluated = run_in(user_dir, ["python", "experiments/evaluate.py",
                                f"--workdir={workdirs[0]}", "--config.eval.splits=valid"])
  valid = json.loads((workdir / "eval_valid.json").read_text())
  assert valid["split"] == "valid" and valid["step"] == 6 and "valid" in evaluated.stdout

  probes_file = "runs/probes.json"
  run_in(user_dir, ["python", "experiments/classify.py", f"--workdir={workdirs[0]}",
                    "--corpus=synthetic", "--train_splits=train_40", "--test_split=test",
                    f"--out={probes_file}"])
  probes = json.loads((user_dir / probes_file).read_text())[workdirs[0]]
  assert set(probes) == {f"{f}/train_40" for f in ("topic", "sentiment", "tense", "number")}
  for r in probes.values():
    assert 0.0 <= r["accuracy"] <= 1.0 and r["n_train"] == 40 and r["n_test"] == 2000

  again = run_in(user_dir, argv)  # finished: resumes from its checkpoint, trains nothing
  assert "Resumed from step 6" in again.stderr
  assert json.loads((workdir / "eval_test.json").read_text())["nll"] == result["nll"]


# ---------------------------------------------------------------------------------------------
# Every documented command parses.
# ---------------------------------------------------------------------------------------------


@functools.cache
def script_module(script: str):
  """An experiments/ main imported without running it (its `define_flags` and `main`)."""
  path = ROOT / script
  if str(ROOT / "experiments") not in sys.path:
    sys.path.insert(0, str(ROOT / "experiments"))
  spec = importlib.util.spec_from_file_location(f"doc_main_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def check_command(command: Command) -> None:
  """Raises (flags.Error, UserError, AssertionError) unless `command` would start as written
  from the checkout's root (the current directory)."""
  path = ROOT / command.script
  assert path.is_file(), f"{command}: no such script {command.script}"
  module = script_module(command.script)
  assert hasattr(module, "define_flags"), f"{command.script} defines no define_flags"
  values = flags.FlagValues()
  argv = [command.script, *command.args]
  # config_flags reads the `--config.*` overrides from sys.argv (when the default config is
  # parsed at definition, and again when --config is given).
  saved_argv, sys.argv = sys.argv, argv
  try:
    module.define_flags(values)
    values(argv)
  except (KeyError, AttributeError, ValueError) as e:  # as the mains report them
    raise errors.ConfigError(script_module("experiments/main_lib.py").flag_error(e, argv))
  finally:
    sys.argv = saved_argv
  if hasattr(module, "check_flags"):  # evaluate.py: overrides of a saved run's config
    module.check_flags(values)
  elif "config" in values:
    cfg = configs.resolve_paths(values["config"].value)
    configs.check_config(cfg)
    if corpora.get_corpus(cfg.data.corpus).subdir is not None:
      for split in {cfg.data.train_split, cfg.data.valid_split}:
        corpora.split_files(cfg.data.corpus, split, cfg.data.dir)
  for name in ("data_dir",):
    if name in values and values[name].value:
      assert os.path.isdir(values[name].value), f"{command}: --{name} is not a directory"


COMMANDS = documented_commands()


def test_the_docs_hold_commands():
  scripts = {c.script for c in COMMANDS}
  assert {"experiments/flow_vrae.py", "experiments/vae.py", "experiments/evaluate.py",
          "experiments/classify.py"} <= scripts, scripts


@pytest.mark.shared_data
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where}:{c.script[12:]}")
def test_documented_command_parses(command, monkeypatch):
  monkeypatch.chdir(ROOT)
  try:
    check_command(command)
  except (flags.Error, errors.UserError) as e:
    pytest.fail(f"{command}\n  {type(e).__name__}: {e}")


@pytest.mark.parametrize("argv, match", [
    (["python", "experiments/no_such.py", "--workdir=x"], "no such script"),
    (["python", "experiments/vae.py", "--config=experiments/configs/vae.py:nonsense",
      "--workdir=x"], "unknown config variant 'nonsense'"),
    (["python", "experiments/vae.py", "--config.model.no_such_field=3", "--workdir=x"],
     "no_such_field"),
    (["python", "experiments/vae.py", "--no_such_flag=1", "--workdir=x"], "no_such_flag"),
    (["python", "experiments/vae.py", "--config.model.latent_dim=-4", "--workdir=x"],
     "latent_dim=-4"),
    (["python", "experiments/evaluate.py", "--config.eval.splits=test"], "workdir"),
    (["python", "experiments/evaluate.py", "--workdir=x", "--config.data.dir=y"],
     r"--config.data.dir: evaluation may change only the eval settings"),
])
def test_the_check_rejects_broken_commands(argv, match, monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises((flags.Error, errors.UserError, AssertionError), match=match):
    check_command(Command("test", tuple(argv)))
