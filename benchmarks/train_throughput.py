"""Train-step throughput and evaluation times of the LSTM VAE, beside the hardware ceiling.

  python benchmarks/train_throughput.py --data_dir=../shared/data --output=ours.json

Set beside the PyTorch reference (jxhe/vae-lagging-encoder, `reference_throughput.py`) by
`side_by_side.sh`, like for like:

- the same batches: `--batching=reference` (default) times `ptb_batches.timed_batches`, the
  reference's own equal-length PTB train batches (no padding, at most 32 sentences), the same
  `--steps` of them drawn with the same seed; a batch of fewer than 32 sentences gets padding
  rows of weight 0, as the training pipeline makes them. `--batching=pipeline` times the
  training pipeline's length-bucketed batches instead;
- the same step: SGD with lr 1.0 and gradient clipping at 5 (the reference's optimiser), with
  the decoder's dropout 0.5 on its input and output (`--dropout`); Adam (lr 1e-3, clip 5) is
  timed beside it (`--optimizers`);
- the same model sizes: `ptb` (embedding 256, LSTM 256) and `yahoo_on_ptb` (He et al.'s Yahoo
  model, embedding 512 and LSTM 1024, on the same PTB batches); `yahoo` times that model on
  real Yahoo validation batches (from the pipeline; not comparable with the reference);
- the same token count: words + EOS per sentence, no BOS, padding excluded.

For each (size, optimiser) the exact jitted train step of the training loop (model, loss,
update) is compiled for every shape in one untimed warm-up pass over the batches (its time and
the number of distinct shapes are reported), then `--rounds` passes are timed; the median and
range of tokens/s are reported with the model FLOPs per token (`common.lstm_vae_flops_per_token`)
and the fraction of this machine's measured fp32 matmul ceiling they reach.

Evaluation (`--eval_sentences`): the time of the K = 500 importance-weighted NLL of the first
200 PTB test sentences, and of MI (He et al.'s per-batch estimator) and AU over the whole PTB
test set, at PTB size.

Like every entry point, it first sets malloc to keep freed memory
(`vae_jax.training.host_memory`). Compiled programs are cached in `--compilation_cache`, so
repeated runs skip compilation.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import ptb_batches  # noqa: E402
from vae_jax import evaluation, metrics, mutual_information  # noqa: E402
from vae_jax.data import corpora, encoding, pipeline  # noqa: E402
from vae_jax.data.readers import Example  # noqa: E402
from vae_jax.data.vocab import Vocab  # noqa: E402
from vae_jax.models.vae import SeqVAE, VAEConfig  # noqa: E402
from vae_jax.training import host_memory, mesh as mesh_lib, optim, steps  # noqa: E402

flags.DEFINE_string("data_dir", "../shared/data", "Folder with ptb/ (and yahoo/).")
flags.DEFINE_list("sizes", ["ptb", "yahoo_on_ptb"], "Model sizes: ptb, yahoo_on_ptb, yahoo.")
flags.DEFINE_list("optimizers", ["sgd", "adam"], "sgd (lr 1, clip 5) and/or adam (1e-3, clip 5).")
flags.DEFINE_list("matmul_dtypes", ["float32"],
                  "float32 and/or bfloat16 (model.matmul_dtype; named e.g. 'sgd_bf16').")
flags.DEFINE_enum("batching", "reference", ["reference", "pipeline"],
                  "The reference's equal-length batches, or the training pipeline's.")
flags.DEFINE_float("dropout", 0.5, "Decoder dropout on its input and output.")
flags.DEFINE_integer("steps", 30, "Batches per timed pass.")
flags.DEFINE_integer("rounds", 3, "Timed passes over the batches.")
flags.DEFINE_integer("seed", 0, "Seed of the batch draw and the model.")
flags.DEFINE_integer("eval_sentences", 200, "PTB test sentences of the IW-NLL timing (0: skip).")
flags.DEFINE_integer("k_samples", 500, "Importance samples of the IW-NLL timing.")
flags.DEFINE_integer("eval_batch_size", 4, "Sentences per IW-NLL batch.")
flags.DEFINE_integer("chunk_size", 125, "Importance samples decoded at once.")
flags.DEFINE_string("compilation_cache", "/tmp/vae_jax_benchmark_cache",
                    "Persistent compilation cache ('' for none).")
flags.DEFINE_string("output", None, "Write the JSON result here too.")
FLAGS = flags.FLAGS

SIZES = {
    # model sizes (METHODS.md §0) and, for the pipeline's batches, corpus and typical length
    "ptb": dict(corpus="ptb", split="train", embed_dim=256, hidden_dim=256, vocab=10_002,
                length=22),
    "yahoo_on_ptb": dict(corpus="ptb", split="train", embed_dim=512, hidden_dim=1024,
                         vocab=10_002, length=22),
    "yahoo": dict(corpus="yahoo", split="valid", embed_dim=512, hidden_dim=1024, vocab=20_001,
                  length=80, max_length=200),
}
BATCH, LATENT = 32, 32
OPTIMIZERS = {
    "sgd": optim.OptimizerConfig(name="sgd", learning_rate=1.0, grad_clip_norm=5.0),
    "adam": optim.OptimizerConfig(name="adam", learning_rate=1e-3, grad_clip_norm=5.0),
}


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
  data = encoding.encode(examples[:limit], vocab, size.get("max_length", 100), "truncate")
  return data, vocab, source


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reference_batches(seed: int) -> tuple[list, Vocab, str]:
  """The reference's equal-length PTB batches (`ptb_batches.timed_batches`) as train batches
  (padding rows of weight 0 up to 32 sentences), and the vocabulary."""
  sentences = ptb_batches.read_sentences(FLAGS.data_dir, "train")
  vocab = Vocab.build(sentences)
  data = encoding.encode([Example(tuple(s)) for s in sentences], vocab)
  batches = []
  for rows in ptb_batches.timed_batches(sentences, BATCH, FLAGS.steps, seed):
    padded = np.full(BATCH, -1, np.int64)
    padded[:len(rows)] = rows
    batches.append(pipeline.make_batch(data, padded, int(data.lengths[rows].max())))
  return batches, vocab, "ptb/train, the reference's equal-length batches"


def pipeline_batches(size: dict, seed: int) -> tuple[list, Vocab, str]:
  """The training pipeline's length-bucketed batches (window 32, lengths padded to 8)."""
  data, vocab, source = load_sentences(size, FLAGS.data_dir)
  it = pipeline.TrainIterator(data, BATCH, seed=seed)
  return [next(it) for _ in range(FLAGS.steps)], vocab, source + ", pipeline batches"


def make_task(vocab: Vocab, size: dict, matmul_dtype: str = "float32") -> steps.Task:
  return common.vae_task(vocab, VAEConfig(
      vocab_size=len(vocab), embed_dim=size["embed_dim"], hidden_dim=size["hidden_dim"],
      latent_dim=LATENT, dropout_in=FLAGS.dropout, dropout_out=FLAGS.dropout, init="uniform",
      matmul_dtype=matmul_dtype))


def bench_train(name: str, ceiling: float) -> list[dict]:
  """One record per optimiser: tokens/s of `--rounds` timed passes over the same batches."""
  size = SIZES[name]
  if FLAGS.batching == "reference" and size["corpus"] == "ptb":
    host_batches, vocab, source = reference_batches(FLAGS.seed)
  else:
    host_batches, vocab, source = pipeline_batches(size, FLAGS.seed)
  mesh = mesh_lib.make_mesh()
  batches = [mesh_lib.to_global(b, mesh) for b in host_batches]
  real_tokens = float(sum(np.sum(b["tokens"] != 0) for b in host_batches))
  positions = float(sum(b["tokens"].size for b in host_batches))
  mean_len = real_tokens / sum(float(np.sum(b["weights"])) for b in host_batches)
  flops = common.lstm_vae_flops_per_token(size["embed_dim"], size["hidden_dim"], len(vocab),
                                          LATENT, mean_len, train=True)
  records = []
  variants = [(o, d) for d in FLAGS.matmul_dtypes for o in FLAGS.optimizers]
  for opt_name, dtype in variants:
    task = make_task(vocab, size, dtype)
    opt_cfg = OPTIMIZERS[opt_name]
    state = steps.init_train_state(task, opt_cfg, host_batches[0], FLAGS.seed, mesh)
    step = steps.make_train_step(task, optim.make_optimizer(opt_cfg), mesh)
    start = time.perf_counter()
    for b in batches:  # untimed: compiles every shape, warms caches and the allocator
      state, out = step(state, b)
    jax.block_until_ready(out)
    warmup_s = time.perf_counter() - start
    times, cpu = [], []
    for _ in range(FLAGS.rounds):
      start, cpu_start = time.perf_counter(), time.process_time()
      for b in batches:
        state, out = step(state, b)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
      cpu.append(time.process_time() - cpu_start)
    rates = [real_tokens / t for t in times]
    tps = statistics.median(rates)
    records.append({
        "size": name, "optimizer": opt_name + ("" if dtype == "float32" else "_bf16"),
        "matmul_dtype": dtype, "dropout": FLAGS.dropout, "data": source,
        "vocab_size": len(vocab), "batch_size": BATCH, "steps": FLAGS.steps,
        "tokens": real_tokens, "padding_fraction": 1.0 - real_tokens / positions,
        "distinct_shapes": len({b["tokens"].shape for b in host_batches}),
        "mean_real_tokens_per_sentence": mean_len,
        "tokens_per_second": tps, "tokens_per_second_range": [min(rates), max(rates)],
        "pass_seconds": times, "cpu_utilisation": statistics.median(cpu) / statistics.median(
            times), "warmup_seconds": warmup_s, "peak_rss_mib": peak_rss_mib(),
        "flops_per_token": flops, "gflops_per_second": tps * flops / 1e9,
        "fraction_of_matmul_ceiling": tps * flops / 1e9 / ceiling,
    })
    print(records[-1], flush=True)
  return records


def _timed(fn, *args):
  """(result, seconds) of one call, blocking on its result."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def bench_eval(ceiling: float) -> dict:
  """IW-NLL (K samples) of the first N PTB test sentences; MI and AU of the whole test set.

  As `reference_throughput.py` times `calc_iwnll`, `calc_mi` and `calc_au`: an untrained
  PTB-size model (the times do not depend on the weights), MI with He et al.'s per-batch
  estimator over their equal-length batches of 32, each timing including its encoder pass.
  Compilation is timed separately (one untimed call on every shape first).
  """
  size = SIZES["ptb"]
  vocab = Vocab.build(ptb_batches.read_sentences(FLAGS.data_dir, "train"))
  test = [Example(tuple(s)) for s in ptb_batches.read_sentences(FLAGS.data_dir, "test")]
  first = encoding.encode(test[:FLAGS.eval_sentences], vocab)
  whole = encoding.encode(test, vocab)
  cfg = VAEConfig(vocab_size=len(vocab), embed_dim=size["embed_dim"],
                  hidden_dim=size["hidden_dim"], latent_dim=LATENT, init="uniform")
  model = SeqVAE(cfg)
  # Sorted by length and padded to even lengths: ~2 % padding (multiples of 8: ~16 %).
  iw_batches = [b["tokens"] for b in pipeline.EvalIterator(first, FLAGS.eval_batch_size,
                                                            sort_by_length=True,
                                                            pad_multiple=2)]
  variables = model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                         iw_batches[0])
  batch_eval = evaluation.make_batch_eval(model, FLAGS.k_samples, FLAGS.chunk_size)
  rng = jax.random.PRNGKey(0)

  def iw_nll():
    return [batch_eval(variables, t, jax.random.fold_in(rng, i))["log_px"]
            for i, t in enumerate(iw_batches)]

  encode = jax.jit(lambda v, t: model.apply(v, t, method="encode"))
  test_batches = [b["tokens"] for b in pipeline.EvalIterator(whole, 32, sort_by_length=True)]

  def posteriors():
    posts = [encode(variables, t) for t in test_batches]
    return (jnp.concatenate([p.mean for p in posts]), jnp.concatenate([p.logvar for p in posts]))

  lengths = np.concatenate([np.sum(np.asarray(t) != 0, axis=1) for t in test_batches])
  mi_batches = mutual_information.length_sorted_batches(lengths, 32)

  def mi():
    mean, logvar = posteriors()
    return mutual_information.gaussian_mutual_information_per_batch(rng, mean, logvar, 32,
                                                                    batches=mi_batches)

  def active_units():
    return metrics.active_units(posteriors()[0])

  compile_s = {}
  for name, fn in (("iw_nll", iw_nll), ("mi", mi), ("au", active_units)):
    compile_s[name] = _timed(fn)[1]  # the first call compiles every shape
  _, iw_s = _timed(iw_nll)
  _, mi_s = _timed(mi)
  _, au_s = _timed(active_units)
  real = float(sum(np.sum(np.asarray(t) != 0) for t in iw_batches))
  # Decoder forward per (token, sample): LSTM + softmax; encoder once per token.
  dec = (common.lstm_flops_per_token(size["embed_dim"], size["hidden_dim"])
         + 2.0 * size["hidden_dim"] * len(vocab))
  enc = common.lstm_flops_per_token(size["embed_dim"], size["hidden_dim"])
  flops = real * (FLAGS.k_samples * dec + enc)
  return {
      "sentences": len(first), "real_tokens": real, "k_samples": FLAGS.k_samples,
      "batch_size": FLAGS.eval_batch_size, "chunk_size": FLAGS.chunk_size,
      "iw_nll_seconds": iw_s, "mi_seconds": mi_s, "au_seconds": au_s,
      "test_sentences": len(whole), "first_call_seconds": compile_s,
      "iw_nll_gflops_per_second": flops / iw_s / 1e9,
      "iw_nll_fraction_of_matmul_ceiling": flops / iw_s / 1e9 / ceiling,
  }


def main(argv):
  del argv
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  ceiling = common.measure_matmul_ceiling()
  result = {"program": "vae_jax", "environment": common.environment(),
            "matmul_ceiling_gflops": ceiling,
            "train": [r for name in FLAGS.sizes for r in bench_train(name, ceiling)]}
  if FLAGS.eval_sentences:
    result["eval"] = bench_eval(ceiling)
  result["matmul_ceiling_gflops_after"] = common.measure_matmul_ceiling()
  common.write_json(result, FLAGS.output)


if __name__ == "__main__":
  host_memory.retain_freed_memory()
  app.run(main)
