"""The worked examples of docs/extending.md, run as written: every ```python block of a
section, in order, in one namespace per section. Registries the examples extend are restored
afterwards."""

import importlib
import os
import re

import pytest

from vae_jax import kl_terms
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
  monkeypatch.syspath_prepend(os.path.join(TESTS, "nn"))
  monkeypatch.syspath_prepend(TESTS)
  contract_tables = (importlib.import_module("test_kl_terms").ROWS,
                     importlib.import_module("test_flows").TABLE)
  # What an example adds to a registry or a contract table is removed afterwards.
  tables = (flows.FLOWS, kl_terms.KL_TERMS, *contract_tables)
  saved = [dict(t) for t in tables]
  namespace = {"__name__": f"extending_{title.replace(' ', '_')}"}
  try:
    for block in SECTIONS[title]:
      exec(compile(block, f"{DOC}:{title}", "exec"), namespace)
  finally:
    for table, before in zip(tables, saved):
      table.clear()
      table.update(before)
