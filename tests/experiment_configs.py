"""The experiment configs of experiments/configs/, loaded as the mains load them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, variants: str = ""):
  """`get_config(variants)` of experiments/configs/<name>.py."""
  spec = importlib.util.spec_from_file_location(
      f"cfg_{name}", ROOT / "experiments" / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variants)


def one_shape(cfg):
  """Pads every batch to `data.max_length` (`data.pad_multiple` = max_length): one compiled
  train and evaluation program per run instead of one per padded width (8, 16, 24, ...)."""
  with cfg.unlocked():
    cfg.data.pad_multiple = cfg.data.max_length
  return cfg


def smoke_config(name: str, variants: str = "smoke"):
  """`load_config(name, variants)` (a smoke variant) with every batch padded to one shape."""
  return one_shape(load_config(name, variants))


def run_experiment(cfg, workdir):
  """Trains and evaluates `cfg` (a ConfigDict) in `workdir`, as an experiment main does."""
  from vae_jax import configs, runner  # noqa: PLC0415
  return runner.run(configs.read(cfg), str(workdir))
