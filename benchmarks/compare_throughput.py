"""The side-by-side table from `train_throughput.py` and `reference_throughput.py` results.

  python benchmarks/compare_throughput.py --ours=out/ours_*.json --reference=out/reference_*.json

Each JSON file is one round (one process) of one program. For every workload the table shows
the median over rounds of each round's median tokens/s, with the range over rounds, and the
ratio of the medians; evaluation rows show seconds and the reference/ours speed-up. The
fraction of the matmul ceiling uses the model FLOPs per token and the ceiling measured by
`train_throughput.py` (the same count for both programs).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics


def load(patterns: list[str]) -> list[dict]:
  files = sorted({f for p in patterns for f in glob.glob(p)})
  if not files:
    raise SystemExit(f"no result files match {patterns}")
  out = []
  for f in files:
    with open(f) as fh:
      out.append(json.load(fh))
  return out


def _stat(values: list[float]) -> tuple[float, float, float]:
  return statistics.median(values), min(values), max(values)


def _fmt(stat: tuple[float, float, float], digits: int = 0) -> str:
  m, lo, hi = stat
  return f"{m:,.{digits}f} ({lo:,.{digits}f}–{hi:,.{digits}f})"


def train_table(ours: list[dict], reference: list[dict]) -> list[str]:
  sizes = [r["size"] for r in reference[0]["train"]]
  optimizers = sorted({r["optimizer"] for o in ours for r in o["train"]},
                      key=lambda name: (name != "sgd", name))
  head = ["workload", "reference tok/s"]
  for name in optimizers:
    head += [f"ours {name} tok/s", f"ours {name} / ref"]
  head += ["% of matmul ceiling (ref / ours sgd)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  ceiling = statistics.median(o["matmul_ceiling_gflops"] for o in ours)
  for size in sizes:
    ref = _stat([r["tokens_per_second"] for run in reference for r in run["train"]
                 if r["size"] == size])
    row = [size, _fmt(ref)]
    flops = None
    fractions = []
    for name in optimizers:
      recs = [r for run in ours for r in run["train"] if r["size"] == size
              and r["optimizer"] == name]
      if not recs:
        row += ["—", "—"]
        continue
      mine = _stat([r["tokens_per_second"] for r in recs])
      flops = recs[0]["flops_per_token"]
      row += [_fmt(mine), f"**{mine[0] / ref[0]:.2f}**"]
      if name == "sgd":
        fractions.append(mine[0] * flops / 1e9 / ceiling)
    if flops is not None and fractions:
      row.append(f"{ref[0] * flops / 1e9 / ceiling:.0%} / {fractions[0]:.0%}")
    else:
      row.append("—")
    lines.append("| " + " | ".join(row) + " |")
  return lines


def eval_table(ours: list[dict], reference: list[dict]) -> list[str]:
  if not all("eval" in o for o in ours) or not all("eval" in r for r in reference):
    return []
  first = reference[0]["eval"]
  rows = [("iw_nll_seconds", f"IW-NLL K = {first['k_samples']}, first "
           f"{first['sentences']} PTB test sentences"),
          ("mi_seconds", f"MI (per batch), {first['test_sentences']} PTB test sentences"),
          ("au_seconds", f"AU, {first['test_sentences']} PTB test sentences")]
  lines = ["| evaluation | reference s | ours s | speed-up |", "|---|---|---|---|"]
  for key, label in rows:
    ref = _stat([r["eval"][key] for r in reference])
    mine = _stat([o["eval"][key] for o in ours])
    lines.append(f"| {label} | {_fmt(ref, 1)} | {_fmt(mine, 1)} | **{ref[0] / mine[0]:.2f}×** |")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ours", nargs="+", required=True, help="train_throughput.py JSON files.")
  p.add_argument("--reference", nargs="+", required=True,
                 help="reference_throughput.py JSON files.")
  p.add_argument("--output", default=None, help="Also write the table (Markdown) here.")
  args = p.parse_args(argv)
  ours, reference = load(args.ours), load(args.reference)
  env = ours[0]["environment"]
  lines = [f"{len(reference)} reference rounds, {len(ours)} rounds of ours; jax {env['jax']}, "
           f"torch {reference[0]['torch']} ({reference[0]['threads']} threads), "
           f"{env['cpu_count']} CPUs, matmul ceiling "
           f"{statistics.median(o['matmul_ceiling_gflops'] for o in ours):.0f} GFLOP/s", ""]
  lines += train_table(ours, reference)
  evals = eval_table(ours, reference)
  if evals:
    lines += [""] + evals
  text = "\n".join(lines)
  print(text)
  if args.output:
    with open(args.output, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
