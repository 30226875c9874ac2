"""Train-step throughput and IW-NLL evaluation time of the LSTM VAE, with the hardware ceiling.

  python benchmarks/train_throughput.py --data_dir=../shared/data --output=throughput.json

For each model size (PTB: embedding 256, LSTM 256; Yahoo: embedding 512, LSTM 1024; d = 32,
batch 32, METHODS.md §0) it times the exact jitted train step the training loop runs (model,
loss, Adam update), on real batches of the corpus when `--data_dir` holds it (PTB train, Yahoo
valid; otherwise random sentences with the corpus's typical lengths), and reports:

- real tokens per second (padding excluded; EOS counted, as in PPL),
- compile time (lower + compile of the step),
- peak memory of the step as XLA plans it (arguments + outputs + temporaries) and the
  process's peak resident memory,
- model FLOPs per real token (forward + backward, `common.lstm_vae_flops_per_token`) and the
  fraction of this machine's measured fp32 matmul ceiling that the step reaches;

and the time of the 500-sample importance-weighted NLL of the first 200 PTB test sentences
(the number the field's PyTorch code takes ~160 s for on a 2-core machine), with its fraction
of the ceiling. Results are printed and written as JSON; ratios within one run are the numbers
to compare.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from vae_jax import evaluation, losses, schedules  # noqa: E402
from vae_jax.data import corpora, pipeline  # noqa: E402
from vae_jax.data.readers import Example  # noqa: E402
from vae_jax.data.vocab import Vocab  # noqa: E402
from vae_jax.models.vae import SeqVAE, VAEConfig  # noqa: E402
from vae_jax.training import loop, mesh as mesh_lib, optim  # noqa: E402

flags.DEFINE_string("data_dir", "../shared/data", "Folder with ptb/ and yahoo/ (optional).")
flags.DEFINE_list("sizes", ["ptb", "yahoo"], "Model sizes to benchmark.")
flags.DEFINE_integer("steps", 30, "Timed train steps per size (after warm-up).")
flags.DEFINE_integer("eval_sentences", 200, "PTB test sentences of the IW-NLL timing (0: skip).")
flags.DEFINE_integer("k_samples", 500, "Importance samples of the IW-NLL timing.")
flags.DEFINE_integer("eval_batch_size", 16, "Sentences per IW-NLL batch.")
flags.DEFINE_integer("chunk_size", 32, "Importance samples decoded at once.")
flags.DEFINE_string("output", None, "Write the JSON result here too.")
FLAGS = flags.FLAGS

SIZES = {
    # corpus, split used for batches, sizes (METHODS.md §0), typical length incl. EOS
    "ptb": dict(corpus="ptb", split="train", embed_dim=256, hidden_dim=256, vocab=10_002,
                length=22),
    "yahoo": dict(corpus="yahoo", split="valid", embed_dim=512, hidden_dim=1024, vocab=20_001,
                  length=80, max_length=200),
}
BATCH, LATENT = 32, 32


def load_sentences(size: dict, data_dir: str, limit: int | None = None):
  """(encoded corpus, vocab, source) from the real corpus if present, else random text."""
  try:
    examples = corpora.load_split(size["corpus"], size["split"], data_dir)
    vocab = Vocab.build((ex.tokens for ex in examples), max_size=size["vocab"])
    source = f"{size['corpus']}/{size['split']}"
  except (FileNotFoundError, ValueError):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(size["vocab"] - 4)]
    lengths = rng.poisson(size["length"] - 1, 4000).clip(1, 150)
    examples = [Example(tuple(rng.choice(words, n))) for n in lengths]
    vocab = Vocab.from_words(words)
    source = "random"
  data = pipeline.encode(examples[:limit], vocab, size.get("max_length", 100), "truncate")
  return data, vocab, source


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_train(name: str, ceiling: float) -> dict:
  size = SIZES[name]
  data, vocab, source = load_sentences(size, FLAGS.data_dir)
  cfg = VAEConfig(vocab_size=len(vocab), embed_dim=size["embed_dim"],
                  hidden_dim=size["hidden_dim"], latent_dim=LATENT)
  model = SeqVAE(cfg)
  task = loop.Task(
      init_fn=lambda rng, b: model.init({"params": rng, "latent": rng}, b["tokens"]),
      loss_fn=losses.make_vae_loss(model, schedules.constant(1.0)),
      eval_fn=losses.make_vae_eval(model), summarize=losses.summarize)
  opt_cfg = optim.OptimizerConfig(name="adam", learning_rate=1e-3, grad_clip_norm=5.0)
  mesh = mesh_lib.make_mesh()
  it = pipeline.TrainIterator(data, BATCH, seed=0)
  batches = [mesh_lib.to_global(next(it), mesh) for _ in range(FLAGS.steps + 3)]
  state = loop.init_train_state(task, opt_cfg, jax.device_get(batches[0]), 0, mesh)
  step = loop.make_train_step(task, optim.make_optimizer(opt_cfg), mesh)

  # Compile time and XLA's memory plan for the most common padded shape.
  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  planned = None
  if mem is not None:
    planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes
               + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 20

  for b in batches[:3]:  # warm-up: every shape compiled before timing
    state, out = step(state, b)
  jax.block_until_ready(out)
  shapes = {b["tokens"].shape for b in batches[3:]}
  for b in batches[3:]:
    if b["tokens"].shape in shapes:
      state, out = step(state, b)
      shapes.discard(b["tokens"].shape)
  jax.block_until_ready(out)

  real_tokens = 0.0
  start, cpu = time.perf_counter(), time.process_time()
  for b in batches[3:]:
    state, out = step(state, b)
    real_tokens += float(np.sum(np.asarray(b["tokens"]) != 0))
  jax.block_until_ready(out)
  wall = time.perf_counter() - start
  cpu = time.process_time() - cpu

  mean_len = real_tokens / (BATCH * FLAGS.steps)
  flops = common.lstm_vae_flops_per_token(size["embed_dim"], size["hidden_dim"], len(vocab),
                                          LATENT, mean_len, train=True)
  tps = real_tokens / wall
  return {
      "size": name, "data": source, "batch_size": BATCH, "steps": FLAGS.steps,
      "mean_real_tokens_per_sentence": mean_len,
      "tokens_per_second": tps,
      "step_seconds": wall / FLAGS.steps,
      "cpu_utilisation": cpu / wall,
      "compile_seconds": compile_s,
      "planned_step_memory_mib": planned,
      "peak_rss_mib": peak_rss_mib(),
      "flops_per_token": flops,
      "gflops_per_second": tps * flops / 1e9,
      "fraction_of_matmul_ceiling": tps * flops / 1e9 / ceiling,
  }


def bench_iw_nll(ceiling: float) -> dict:
  """Time of the K-sample IW-NLL of the first N PTB test sentences at PTB size."""
  size = SIZES["ptb"]
  try:
    train = corpora.load_split("ptb", "train", FLAGS.data_dir)
    test = corpora.load_split("ptb", "test", FLAGS.data_dir)[:FLAGS.eval_sentences]
    vocab = Vocab.build(ex.tokens for ex in train)
    data, source = pipeline.encode(test, vocab, 100), "ptb/test"
  except (FileNotFoundError, ValueError):
    data, vocab, source = load_sentences(size, FLAGS.data_dir, FLAGS.eval_sentences)
  cfg = VAEConfig(vocab_size=len(vocab), embed_dim=size["embed_dim"],
                  hidden_dim=size["hidden_dim"], latent_dim=LATENT)
  model = SeqVAE(cfg)
  batches = list(pipeline.EvalIterator(data, FLAGS.eval_batch_size, sort_by_length=True))
  variables = model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                         batches[0]["tokens"])
  batch_eval = evaluation.make_vae_batch_eval(model, FLAGS.k_samples, FLAGS.chunk_size)
  rng = jax.random.PRNGKey(0)

  start = time.perf_counter()
  seen = set()
  for b in batches:  # compile every padded length once, untimed
    if b["tokens"].shape not in seen:
      seen.add(b["tokens"].shape)
      jax.block_until_ready(batch_eval.lower(variables, b["tokens"], rng).compile())
  compile_s = time.perf_counter() - start
  jax.block_until_ready(batch_eval(variables, batches[0]["tokens"], rng))

  start = time.perf_counter()
  for i, b in enumerate(batches):
    out = batch_eval(variables, b["tokens"], jax.random.fold_in(rng, i))
  jax.block_until_ready(out)
  wall = time.perf_counter() - start

  real = sum(float(np.sum(np.asarray(b["tokens"]) != 0)) for b in batches)
  # Decoder forward per (token, sample): LSTM + softmax; encoder once per token.
  dec = (common.lstm_flops_per_token(size["embed_dim"], size["hidden_dim"])
         + 2.0 * size["hidden_dim"] * len(vocab))
  enc = common.lstm_flops_per_token(size["embed_dim"], size["hidden_dim"])
  flops = real * (FLAGS.k_samples * dec + enc)
  result = {
      "data": source, "sentences": len(data), "real_tokens": real,
      "k_samples": FLAGS.k_samples, "batch_size": FLAGS.eval_batch_size,
      "chunk_size": FLAGS.chunk_size, "seconds": wall, "compile_seconds": compile_s,
      "distinct_shapes": len(seen),
      "gflops_per_second": flops / wall / 1e9,
      "fraction_of_matmul_ceiling": flops / wall / 1e9 / ceiling,
  }
  if FLAGS.k_samples == 500 and len(data) == 200 and source == "ptb/test":
    # The field's PyTorch reference code: ~160 s for this evaluation on a 2-core machine.
    result.update(reference_pytorch_seconds=160.0, speedup_vs_reference=160.0 / wall)
  return result


def main(argv):
  del argv
  ceiling = common.measure_matmul_ceiling()
  result = {"environment": common.environment(), "matmul_ceiling_gflops": ceiling,
            "train": [bench_train(name, ceiling) for name in FLAGS.sizes]}
  if FLAGS.eval_sentences:
    result["iw_nll"] = bench_iw_nll(ceiling)
  result["matmul_ceiling_gflops_after"] = common.measure_matmul_ceiling()
  common.write_json(result, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
