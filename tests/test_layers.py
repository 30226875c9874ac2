"""What may import what (docs/design.md, "Layers"): each module of vae_jax belongs to a layer,
and imports only modules of its own layer or of the layers it builds on. Read from the source
(the import statements), so a new module is checked as soon as it exists."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "vae_jax")

# Layer -> its modules (dotted, below vae_jax; a trailing '.' is a package prefix).
LAYERS = {
    "base": ("errors", "fileio", "workdir"),
    "math": ("objectives", "metrics", "mutual_information", "holes", "marginal_holes",
             "text_metrics", "schedules"),
    "data": ("data.",),
    "nn": ("nn.",),
    "models": ("posteriors", "models."),
    "objective": ("kl_terms", "losses"),
    "training": ("training.",),
    "evaluation": ("generation", "evaluation", "dialogue_evaluation", "della_metrics", "probe",
                   "aggregate", "plots"),
    "run": ("configs", "run_config", "run_data", "build", "pretraining", "runner",
            "run_evaluation", "reporting"),
}

# Layer -> the layers it may import (besides itself).
ALLOWED = {
    "base": set(),
    "math": {"base"},
    "data": {"base"},
    "nn": {"base", "math", "data"},
    "models": {"base", "math", "data", "nn"},
    "objective": {"base", "math"},
    "training": {"base"},
    "evaluation": {"base", "math", "data", "nn", "models"},
    "run": {"base", "math", "data", "nn", "models", "objective", "training", "evaluation"},
}

def layer_of(module: str) -> str:
  for layer, members in LAYERS.items():
    for m in members:
      if module == m or (m.endswith(".") and module.startswith(m)) or module == m.rstrip("."):
        return layer
  raise AssertionError(f"vae_jax.{module} belongs to no layer: add it to LAYERS "
                       "(tests/test_layers.py) and to docs/design.md")


def modules():
  for root, _, files in os.walk(ROOT):
    for f in sorted(files):
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__").removesuffix("__init__")


def imports(module: str):
  path = os.path.join(ROOT, *module.split(".")) if module else ROOT
  path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vae_jax"):
      if node.module == "vae_jax":
        yield from (a.name for a in node.names)
      else:
        yield node.module.removeprefix("vae_jax.")
    elif isinstance(node, ast.Import):
      yield from (a.name.removeprefix("vae_jax.") for a in node.names
                  if a.name.startswith("vae_jax."))


MODULES = [m for m in modules() if m]  # the package's own __init__ re-exports every layer


@pytest.mark.parametrize("module", MODULES)
def test_imports_follow_the_layers(module):
  mine = layer_of(module)
  for dep in imports(module):
    theirs = layer_of(dep)
    if theirs == mine or theirs in ALLOWED[mine]:
      continue
    raise AssertionError(f"vae_jax.{module} ({mine}) imports vae_jax.{dep} ({theirs}); "
                         f"{mine} may import {sorted(ALLOWED[mine] | {mine})}")
