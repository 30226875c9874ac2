"""Results over seeds: runs that differ only in `train.seed`, summarised as mean ± sd.

A claim that rests on a difference between methods needs the run-to-run spread beside it. A
seed sweep is several workdirs trained with `--config.train.seed=0,1,2,...`; `group_runs`
puts together the runs whose saved configs are equal but for the seed, and `summarize` gives,
for every numeric scalar of their `eval_<split>.json`, the mean, the standard deviation over
seeds (ddof = 1), the standard error of the mean and the number of seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from vae_jax import errors, workdir as workdir_lib

# Config fields that may differ between the runs of one group.
SEED_FIELDS = ("train.seed",)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested mapping (a config's JSON) as {'section.field': value}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def read_run(workdir: str, split: str = "test") -> dict[str, Any]:
  """A run's flattened config and its `eval_<split>.json` metrics (scalars only)."""
  config_path = os.path.join(workdir, "config.json")
  eval_path = os.path.join(workdir, f"eval_{split}.json")
  for path in (config_path, eval_path):
    if not os.path.exists(path):
      raise errors.WorkdirError(f"{path} not found: aggregate finished runs (evaluate one with "
                                f"experiments/evaluate.py --workdir={workdir} --split={split}).")
  config = flatten(workdir_lib.read_json(config_path, "the run's config"))
  metrics = workdir_lib.read_json(eval_path, "the run's evaluation")
  return {"workdir": workdir, "config": config, "metrics": scalars(metrics)}


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The numeric scalars of an `eval_<split>.json` (no flags, lists or texts), as floats."""
  return {k: float(v) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def group_runs(runs: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
  """Runs whose configs are equal except for `SEED_FIELDS`, in order of first appearance."""
  groups: dict[str, list] = {}
  for run in runs:
    key = json.dumps({k: v for k, v in run["config"].items() if k not in SEED_FIELDS},
                     sort_keys=True, default=str)
    groups.setdefault(key, []).append(run)
  return list(groups.values())


def group_label(group: Sequence[Mapping[str, Any]],
                groups: Sequence[Sequence[Mapping[str, Any]]]) -> str:
  """What sets a group apart: the config fields on which the groups disagree (with this
  group's values), or its first workdir's name when there is one group."""
  configs = [g[0]["config"] for g in groups]
  keys = sorted({k for c in configs for k in c})
  differing = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1
               and k not in SEED_FIELDS]
  if not differing:
    return os.path.basename(os.path.normpath(group[0]["workdir"]))
  return ", ".join(f"{k}={group[0]['config'].get(k)}" for k in differing)


def summarize(values: Sequence[float]) -> dict[str, float]:
  """mean, sd (ddof = 1; 0 for one value), se = sd / sqrt(n) and n of per-seed values."""
  n = len(values)
  mean = sum(values) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return {"mean": mean, "sd": sd, "se": sd / math.sqrt(n), "n": n}


def aggregate(groups: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
  """One record per group: label, workdirs, seeds and `summarize` of every metric all of its
  runs report."""
  out = []
  for group in groups:
    names = set.intersection(*(set(run["metrics"]) for run in group))
    out.append({
        "label": group_label(group, groups),
        "workdirs": [run["workdir"] for run in group],
        "seeds": [run["config"].get("train.seed") for run in group],
        "metrics": {k: summarize([run["metrics"][k] for run in group]) for k in sorted(names)},
    })
  return out


def table(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """Markdown: one row per group, `mean ± sd` per column (sd over seeds), and the seeds."""
  header = ["runs", "seeds", *columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in records:
    cells = [r["label"], str(len(r["seeds"]))]
    for c in columns:
      m = r["metrics"].get(c)
      cells.append("—" if m is None else f"{m['mean']:.3f} ± {m['sd']:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
