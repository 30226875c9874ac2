"""Wall-clock per epoch of aggressive training vs the pooling VAE vs the vanilla VAE (Long et al.
2019's speed claim, METHODS.md §1), plus the DG-VAE and BN-VAE steps, from one run.

  python benchmarks/epoch_time.py --data_dir=../shared/data --steps=20 --output=epoch_time.json

At the PTB reference size (embedding 256, LSTM 256, d = 32, batch 32) it builds, with the
Task a run trains (`common.vae_task`) and the training loop's own jitted programs, the step of:
the vanilla VAE (last-state encoder); the pooling VAE (mean pooling); aggressive training (He
et al. 2019) in its aggressive phase, i.e. encoder-only inner steps on fresh batches until the
encoder's loss stops falling (at most 100, checked every 15), then a decoder step
(`training.aggressive.aggressive_inner_steps`, exactly what the loop runs); DG-VAE (density
gap, M = 32); BN-VAE. The methods take their outer steps round-robin on the same PTB batches,
so machine noise hits all alike. Reported per method: median and mean
outer-step time, encoder inner steps per outer step, and the time of one PTB epoch (1,315
outer steps of 32 sentences) as the mean outer step x steps per epoch, with its ratio to the
vanilla VAE. Aggressive training runs at this cost only while its aggressive phase lasts (until
the validation MI stops rising), then at the vanilla cost; the whole-run ratio therefore
depends on how long the phase lasts (see docs/results.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from train_throughput import SIZES, load_sentences  # noqa: E402
from vae_jax.data import pipeline  # noqa: E402
from vae_jax.models.vae import VAEConfig, param_groups  # noqa: E402
from vae_jax.training import aggressive as aggressive_lib  # noqa: E402
from vae_jax.training import mesh as mesh_lib, optim, steps  # noqa: E402

# --data_dir, --steps (timed rounds: one outer step of every method per round) and --output
# are the flags of train_throughput.py, whose data loading this benchmark shares.
FLAGS = flags.FLAGS

BATCH = 32
METHODS = {
    "vanilla": (dict(), "kl", False),
    "pooling_mean": (dict(pooling="mean"), "kl", False),
    "aggressive": (dict(), "kl", True),
    "dg_vae": (dict(), "density_gap", False),
    "bn_vae": (dict(mean_batch_norm=0.5), "kl", False),
}


class _Runner:
  """One method's state and its outer step (with inner encoder steps for aggressive)."""

  def __init__(self, vocab, base, overrides, kl_term, aggressive, batch, data, mesh):
    task = common.vae_task(vocab, dataclasses.replace(base, **overrides), kl_term)
    opt = optim.OptimizerConfig(name="adam", learning_rate=1e-3, grad_clip_norm=5.0,
                                param_labels=param_groups if aggressive else None)
    tx = optim.make_optimizer(opt)
    self.state = steps.init_train_state(task, opt, jax.device_get(batch), 0, mesh)
    self.mesh, self.aggressive = mesh, aggressive
    if aggressive:
      self.encoder_step = steps.make_group_step(task, tx, param_groups, "encoder", mesh)
      self.step = steps.make_group_step(task, tx, param_groups, "decoder", mesh)
      self.encoder_iter = mesh_lib.Prefetcher(pipeline.TrainIterator(data, BATCH, seed=1),
                                              mesh)
      self.config = aggressive_lib.AggressiveConfig()
    else:
      self.step = steps.make_train_step(task, tx, mesh)
    self.times, self.inner = [], []

  def outer_step(self, batch):
    taken = 0
    if self.aggressive:
      self.state, taken = aggressive_lib.aggressive_inner_steps(
          self.encoder_step, self.state, batch, self.encoder_iter, self.config, self.mesh)
    self.state, out = self.step(self.state, batch)
    jax.block_until_ready(out)
    return taken


def main(argv):
  del argv
  size = SIZES["ptb"]
  data, vocab, source = load_sentences(size, FLAGS.data_dir)
  base = VAEConfig(vocab_size=len(vocab), embed_dim=size["embed_dim"],
                   hidden_dim=size["hidden_dim"], latent_dim=32)
  mesh = mesh_lib.make_mesh()
  it = pipeline.TrainIterator(data, BATCH, seed=0)
  steps_per_epoch = it.steps_per_epoch
  warmup = [mesh_lib.to_global(next(it), mesh) for _ in range(4)]
  batches = [mesh_lib.to_global(next(it), mesh) for _ in range(FLAGS.steps)]
  runners = {name: _Runner(vocab, base, o, k, a, warmup[0], data, mesh)
             for name, (o, k, a) in METHODS.items()}
  for runner in runners.values():  # warm-up: compile the padded shapes, start training
    for b in warmup:
      runner.outer_step(b)
  names = list(runners)
  for r, b in enumerate(batches):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      taken = runners[name].outer_step(b)
      runners[name].times.append(time.perf_counter() - start)
      runners[name].inner.append(taken)
  vanilla_s = float(np.mean(runners["vanilla"].times))
  result = {"environment": common.environment(), "data": source, "batch_size": BATCH,
            "rounds": FLAGS.steps, "steps_per_epoch": steps_per_epoch, "methods": {}}
  print(f"PTB size, batch {BATCH}, {FLAGS.steps} rounds on {source}; "
        f"{steps_per_epoch} outer steps per epoch")
  print(f"{'method':>13}  {'median ms':>9}  {'inner/outer':>11}  {'epoch min':>9}  "
        f"{'x vanilla':>9}")
  for name in names:
    run = runners[name]
    mean_s = float(np.mean(run.times))
    row = {"median_step_ms": 1e3 * float(np.median(run.times)), "mean_step_ms": 1e3 * mean_s,
           "inner_steps_per_outer": float(np.mean(run.inner)),
           "epoch_minutes": mean_s * steps_per_epoch / 60.0,
           "epoch_ratio_to_vanilla": mean_s / vanilla_s}
    result["methods"][name] = row
    print(f"{name:>13}  {row['median_step_ms']:9.1f}  {row['inner_steps_per_outer']:11.1f}  "
          f"{row['epoch_minutes']:9.1f}  {row['epoch_ratio_to_vanilla']:9.2f}")
  common.write_json(result, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
