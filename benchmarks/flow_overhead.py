"""Cost of the flow-based VRAE's building blocks relative to the Gaussian VAE's train step.

  python benchmarks/flow_overhead.py --data_dir=../shared/data --output=flow_overhead.json

At the PTB reference size (embedding 256, LSTM 256, d = 32, batch 32, METHODS.md §0) it builds
the training loop's own jitted train step (model, loss, Adam) for each posterior variant of
experiments/configs/flow_vrae.py — Gaussian, planar / IAF / coupling flow posteriors (4
amortised layers), the KL-preserving flow, and IAF + skip connection + amortised
regulariser — and times them round-robin on the same real PTB batches, so machine noise hits
all alike. Reported: median step time, real tokens per second, compile time and the ratio to
the Gaussian step, all from one run.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from train_throughput import SIZES, load_sentences  # noqa: E402
from vae_jax import run_config  # noqa: E402
from vae_jax.data import pipeline  # noqa: E402
from vae_jax.models.vae import VAEConfig  # noqa: E402
from vae_jax.nn.flows import FlowConfig  # noqa: E402
from vae_jax.training import mesh as mesh_lib, optim  # noqa: E402

# --data_dir, --steps (timed rounds: one step of every variant per round) and --output are
# the flags of train_throughput.py, whose data loading this benchmark shares.
FLAGS = flags.FLAGS

BATCH = 32
AMORTISED = {k: FlowConfig(kind=k, num_layers=4, hidden_dim=64) for k in
             ("planar", "iaf", "coupling")}
VARIANTS = {
    "gaussian": dict(),
    "planar": dict(posterior="flow", flow=AMORTISED["planar"]),
    "iaf": dict(posterior="flow", flow=AMORTISED["iaf"]),
    "coupling": dict(posterior="flow", flow=AMORTISED["coupling"]),
    "kl_preserving": dict(posterior="kl_preserving",
                          flow=dataclasses.replace(AMORTISED["iaf"], amortized=False)),
    "iaf_skip_reg": dict(posterior="flow", flow=AMORTISED["iaf"], latent_to_output=True,
                         smoothness_dropout=0.1),
}


def build_task(vocab, base: VAEConfig, overrides: dict):
  """The run's Task of the variant (`common.vae_task`); the amortised regulariser's weight is
  1 where the variant corrupts its input."""
  kl = run_config.KLConfig(smoothness_weight=1.0 if overrides.get("smoothness_dropout")
                           else 0.0)
  return common.vae_task(vocab, dataclasses.replace(base, **overrides), kl)


def main(argv):
  del argv
  size = SIZES["ptb"]
  data, vocab, source = load_sentences(size, FLAGS.data_dir)
  base = VAEConfig(vocab_size=len(vocab), embed_dim=size["embed_dim"],
                   hidden_dim=size["hidden_dim"], latent_dim=32)
  mesh = mesh_lib.make_mesh()
  it = pipeline.TrainIterator(data, BATCH, seed=0)
  batches = [mesh_lib.to_global(next(it), mesh) for _ in range(FLAGS.steps)]
  real_tokens = [float(np.sum(np.asarray(b["tokens"]) != 0)) for b in batches]
  opt_cfg = optim.OptimizerConfig(name="adam", learning_rate=1e-3, grad_clip_norm=5.0)
  timed = common.time_train_steps({name: build_task(vocab, base, overrides)
                                   for name, overrides in VARIANTS.items()},
                                  batches, mesh, opt_cfg)
  times = {name: t["times_s"] for name, t in timed.items()}
  compile_s = {name: t["compile_s"] for name, t in timed.items()}
  names = list(VARIANTS)
  total_tokens = sum(real_tokens)
  result = {"environment": common.environment(), "data": source, "batch_size": BATCH,
            "rounds": FLAGS.steps, "variants": {}}
  gaussian_s = sum(times["gaussian"])
  print(f"PTB size, batch {BATCH}, {FLAGS.steps} rounds on {source}")
  print(f"{'variant':>14}  {'median ms':>9}  {'tokens/s':>8}  {'compile s':>9}  {'x gaussian':>10}")
  for name in names:
    total = sum(times[name])
    row = {"median_step_ms": 1e3 * float(np.median(times[name])),
           "tokens_per_second": total_tokens / total, "compile_seconds": compile_s[name],
           "time_ratio_to_gaussian": total / gaussian_s}
    result["variants"][name] = row
    print(f"{name:>14}  {row['median_step_ms']:9.1f}  {row['tokens_per_second']:8.0f}  "
          f"{row['compile_seconds']:9.1f}  {row['time_ratio_to_gaussian']:10.3f}")
  common.write_json(result, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
