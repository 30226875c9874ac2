"""The worked examples of docs/extending.md, run as written: every ```python block of a
section, in order, in one namespace per section. Registries the examples extend are restored
afterwards."""

import os
import re
import sys

import pytest

from vae_jax.nn import flows

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "extending.md")
TESTS = os.path.dirname(__file__)


def sections() -> dict[str, list[str]]:
  """Section title -> its python blocks."""
  text = open(DOC, encoding="utf-8").read()
  out = {}
  for part in re.split(r"^## ", text, flags=re.M)[1:]:
    title, body = part.split("\n", 1)
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    if blocks:
      out[title.strip()] = blocks
  return out


SECTIONS = sections()


def test_every_example_has_code():
  assert set(SECTIONS) >= {"A new KL term", "A new flow", "A new model"}, set(SECTIONS)


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_example_runs(title, monkeypatch):
  registries = [flows.FLOWS]
  try:
    from vae_jax import kl_terms
    registries.append(kl_terms.KL_TERMS)
  except ImportError:
    pass
  saved = [dict(r) for r in registries]  # entries an example adds are removed afterwards
  monkeypatch.syspath_prepend(os.path.join(TESTS, "nn"))
  monkeypatch.syspath_prepend(TESTS)
  namespace = {"__name__": f"extending_{title.replace(' ', '_')}"}
  try:
    for block in SECTIONS[title]:
      exec(compile(block, f"{DOC}:{title}", "exec"), namespace)
  finally:
    for registry, before in zip(registries, saved):
      registry.clear()
      registry.update(before)
    sys.modules.pop("test_flows", None)
