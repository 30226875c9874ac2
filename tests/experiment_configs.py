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
