"""What bfloat16 matmuls do to training: the same run in float32 and with matmul_dtype=bfloat16.

  python benchmarks/mixed_precision.py --data_dir=../shared/data --steps=600 --output=mp.json

Trains the PTB-size LSTM VAE (embedding 256, LSTM 256, d = 32; SGD lr 1.0, clipping 5, dropout
0.5, KL weight 1, U(±0.01) initialisation) twice from the same initial parameters on the same
batches (the training pipeline's, seeded) and the same dropout and latent draws: once with
float32 matmuls, once with `model.matmul_dtype='bfloat16'` (bf16 operands, float32
accumulation; everything else float32). Every `--eval_every` steps both are evaluated on the
first `--eval_sentences` PTB validation sentences with the loop's own evaluation function
(one-sample negative ELBO per sentence, its reconstruction and KL; deterministic), and the
steps/s of each is reported. The difference of the two curves is the effect of the bf16
rounding on the loss.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import ptb_batches  # noqa: E402
from vae_jax.data import encoding, pipeline  # noqa: E402
from vae_jax.data.readers import Example  # noqa: E402
from vae_jax.data.vocab import Vocab  # noqa: E402
from vae_jax.models.vae import VAEConfig  # noqa: E402
from vae_jax.training import host_memory, mesh as mesh_lib, optim, steps  # noqa: E402

flags.DEFINE_string("data_dir", "../shared/data", "Folder with ptb/.")
flags.DEFINE_integer("steps", 600, "Train steps of each run.")
flags.DEFINE_integer("eval_every", 200, "Evaluate every this many steps.")
flags.DEFINE_integer("eval_sentences", 1000, "PTB validation sentences evaluated.")
flags.DEFINE_integer("seed", 0, "Seed of the batches, the initialisation and the draws.")
flags.DEFINE_string("output", None, "Write the JSON result here too.")
FLAGS = flags.FLAGS


def make_task(vocab: Vocab, matmul_dtype: str) -> steps.Task:
  return common.vae_task(vocab, VAEConfig(vocab_size=len(vocab), dropout_in=0.5,
                                          dropout_out=0.5, init="uniform",
                                          matmul_dtype=matmul_dtype))


def main(argv):
  del argv
  train = [Example(tuple(s)) for s in ptb_batches.read_sentences(FLAGS.data_dir, "train")]
  valid = [Example(tuple(s)) for s in ptb_batches.read_sentences(
      FLAGS.data_dir, "valid", FLAGS.eval_sentences)]
  vocab = Vocab.build(ex.tokens for ex in train)
  train_data, valid_data = encoding.encode(train, vocab, 100), encoding.encode(valid, vocab, 100)
  mesh = mesh_lib.make_mesh()
  opt_cfg = optim.OptimizerConfig(name="sgd", learning_rate=1.0, grad_clip_norm=5.0)
  valid_batches = lambda: iter(pipeline.EvalIterator(valid_data, 50, fixed_length=True))
  runs = {}
  for dtype in ("float32", "bfloat16"):
    task = make_task(vocab, dtype)
    it = pipeline.TrainIterator(train_data, 32, seed=FLAGS.seed)
    first = next(it)
    state = steps.init_train_state(task, opt_cfg, first, FLAGS.seed, mesh)
    step = steps.make_train_step(task, optim.make_optimizer(opt_cfg), mesh)
    eval_step = steps.make_eval_step(task, mesh)
    batch, curve, train_seconds = mesh_lib.to_global(first, mesh), [], 0.0
    for s in range(1, FLAGS.steps + 1):
      start = time.perf_counter()
      state, out = step(state, batch)
      jax.block_until_ready(out)
      train_seconds += time.perf_counter() - start
      batch = mesh_lib.to_global(next(it), mesh)
      if s % FLAGS.eval_every == 0 or s == FLAGS.steps:
        summary = steps.evaluate(eval_step, state, valid_batches, task.summarize,
                                jax.random.PRNGKey(FLAGS.seed), mesh)
        curve.append({"step": s, **{k: float(v) for k, v in summary.items()
                                    if np.ndim(v) == 0}})
        print(dtype, curve[-1], flush=True)
    runs[dtype] = {"curve": curve, "steps_per_second": FLAGS.steps / train_seconds}
  diffs = [{k: b[k] - a[k] for k in a if k != "step" and k in b} | {"step": a["step"]}
           for a, b in zip(runs["float32"]["curve"], runs["bfloat16"]["curve"])]
  common.write_json({"environment": common.environment(), "steps": FLAGS.steps,
                     "eval_sentences": len(valid_data), "runs": runs,
                     "bfloat16_minus_float32": diffs}, FLAGS.output)


if __name__ == "__main__":
  host_memory.retain_freed_memory()
  app.run(main)
