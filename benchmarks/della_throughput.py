"""Train-step cost of DELLA and of the Transformer models it is compared with (METHODS.md §4).

  python benchmarks/della_throughput.py --data_dir=../shared/data --output=della.json

Every variant of experiments/configs/della.py — the Transformer LM, the single-latent VAEs with
embedding / memory / softmax injection, DELLA with additive fusion, with a single latent, and
DELLA itself — is built at one size (`--size`, a variant of that config: by default `ptb`, 4
layers, width 256, d = 32 per layer, batch 32) by the experiment code itself (`configs.read`,
`build.build_model` / `build_task`, so the loss and optimiser are the ones a run uses), and its
jitted train step is timed round-robin on the same real PTB batches
(`common.time_train_steps`). Reported per variant: median step time, real tokens per second
(padding excluded, EOS counted), compile time and the time ratio to the Transformer LM's step,
all from one run.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from vae_jax import build, configs  # noqa: E402
from vae_jax.data import corpora, encoding, pipeline  # noqa: E402
from vae_jax.data.vocab import Vocab  # noqa: E402
from vae_jax.training import mesh as mesh_lib  # noqa: E402

flags.DEFINE_string("data_dir", "../shared/data", "Folder with ptb/.")
flags.DEFINE_integer("steps", 20, "Timed rounds (one step of every variant per round).")
flags.DEFINE_string("size", "ptb", "Base variant of experiments/configs/della.py (e.g. smoke).")
flags.DEFINE_list("variants", ["lm", "embedding", "memory", "softmax", "nofusion", "single",
                               "della"], "Variants to time ('della': no extra variant).")
flags.DEFINE_string("output", None, "Write the JSON result here too.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variants: str):
  spec = importlib.util.spec_from_file_location(
      "della_config", os.path.join(ROOT, "experiments", "configs", "della.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variants)


def main(argv):
  del argv
  base = load_config(FLAGS.size)
  examples = corpora.load_split("ptb", "train", os.path.join(FLAGS.data_dir, "ptb"))
  vocab = Vocab.build(ex.tokens for ex in examples)
  data = encoding.encode(examples, vocab, base.data.max_length, "truncate")
  mesh = mesh_lib.make_mesh()
  it = pipeline.TrainIterator(data, base.data.batch_size, seed=0,
                              pad_multiple=base.data.pad_multiple)
  batches = [mesh_lib.to_global(next(it), mesh) for _ in range(FLAGS.steps)]
  real_tokens = sum(float(np.sum(np.asarray(b["tokens"]) != 0)) for b in batches)
  tasks = {}
  for name in FLAGS.variants:
    cfg = configs.read(load_config(FLAGS.size if name == "della" else f"{FLAGS.size},{name}"))
    model = build.build_model(cfg.model, len(vocab))
    tasks[name] = build.build_task(cfg, model, vocab, 1000, 100)
  timed = common.time_train_steps(tasks, batches, mesh, configs.read(base).optimizer)
  reference = sum(timed[FLAGS.variants[0]]["times_s"])
  result = {"environment": common.environment(), "size": FLAGS.size,
            "batch_size": base.data.batch_size, "rounds": FLAGS.steps, "variants": {}}
  print(f"{FLAGS.size} size, batch {base.data.batch_size}, {FLAGS.steps} rounds on ptb/train")
  print(f"{'variant':>10}  {'median ms':>9}  {'tokens/s':>8}  {'compile s':>9}  "
        f"{'x ' + FLAGS.variants[0]:>10}")
  for name, t in timed.items():
    total = sum(t["times_s"])
    row = {"median_step_ms": 1e3 * float(np.median(t["times_s"])),
           "tokens_per_second": real_tokens / total, "compile_seconds": t["compile_s"],
           "time_ratio": total / reference}
    result["variants"][name] = row
    print(f"{name:>10}  {row['median_step_ms']:9.1f}  {row['tokens_per_second']:8.0f}  "
          f"{row['compile_seconds']:9.1f}  {row['time_ratio']:10.3f}")
  common.write_json(result, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
