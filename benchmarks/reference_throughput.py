"""Train-step throughput and evaluation times of the field's PyTorch code, for side-by-side runs.

  REF=/path/to/vae-lagging-encoder   # a clone of github.com/jxhe/vae-lagging-encoder
  /path/to/torch-venv/bin/python benchmarks/reference_throughput.py \
      --reference_dir=$REF --data_dir=../shared/data --output=reference.json

Runs in a Python environment with PyTorch (no JAX needed) and imports the reference's own
modules from `--reference_dir` (nothing of it is copied here): its `VAE`, `LSTMEncoder`,
`LSTMDecoder`, `MonoTextData` and, for evaluation, `text.py`'s `calc_iwnll`, `calc_mi` and
`calc_au`. The timed train step is the body of `text.py`'s training loop without aggressive
training: `vae.loss(batch, kl_weight=1.0)`, mean over the batch, backward, gradient clipping
at 5, and the encoder's and decoder's SGD steps (lr 1.0, momentum 0), with the decoder's
dropout on its input and output (`--dropout`, 0.5 in the Yahoo configuration), initialised as
`text.py` does (U(-0.01, 0.01) parameters, U(-0.1, 0.1) embeddings).

The batches are those of `ptb_batches.timed_batches`: the reference's equal-length PTB train
batches (`create_data_batch`, batch size 32), `--steps` of them drawn with a fixed seed, the
same ones `train_throughput.py --batching=reference` times. Tokens are counted as the
reference counts them (`(sent_len - 1) * batch_size`: words + EOS, no BOS). Each timed pass
goes once over the batches after one untimed warm-up pass; `--rounds` passes are timed and
their median and range reported.

Evaluation (`--eval_sentences`): the importance-weighted NLL with K = `--k_samples` of the
first N PTB test sentences the way `text.py --eval` runs it (one sentence per batch, 100
samples at a time), and `calc_mi` / `calc_au` over the whole PTB test set in batches of 32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ptb_batches  # noqa: E402

SIZES = {  # METHODS.md §0: PTB size; He et al.'s Yahoo model size, on PTB batches
    "ptb": dict(ni=256, enc_nh=256, dec_nh=256),
    "yahoo_on_ptb": dict(ni=512, enc_nh=1024, dec_nh=1024),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reference_dir", required=True,
                 help="A clone of github.com/jxhe/vae-lagging-encoder.")
  p.add_argument("--data_dir", default="../shared/data", help="Folder with ptb/.")
  p.add_argument("--sizes", default="ptb,yahoo_on_ptb", help="Comma-separated model sizes.")
  p.add_argument("--steps", type=int, default=30, help="Batches per timed pass.")
  p.add_argument("--rounds", type=int, default=3, help="Timed passes over the batches.")
  p.add_argument("--dropout", type=float, default=0.5, help="Decoder dropout in and out.")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads.")
  p.add_argument("--eval_sentences", type=int, default=200,
                 help="PTB test sentences of the IW-NLL timing (0: skip evaluation).")
  p.add_argument("--k_samples", type=int, default=500, help="IW-NLL importance samples.")
  p.add_argument("--seed", type=int, default=0, help="Seed of the batch draw and the model.")
  p.add_argument("--output", default=None, help="Write the JSON result here too.")
  return p.parse_args(argv)


def import_reference(reference_dir: str):
  """The reference's modules (its repository root on sys.path, as its scripts run)."""
  reference_dir = os.path.abspath(reference_dir)
  if not os.path.exists(os.path.join(reference_dir, "modules", "vae.py")):
    raise SystemExit(f"--reference_dir={reference_dir} is not a clone of "
                     "jxhe/vae-lagging-encoder (no modules/vae.py).")
  sys.path.insert(0, reference_dir)
  import data  # noqa: F401  (the reference's data package)
  import modules
  import text
  return data, modules, text


def write_lines(sentences, directory: str, name: str) -> str:
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    for words in sentences:
      f.write(" ".join(words) + "\n")
  return path


def build_model(torch, modules, vocab, size: dict, dropout: float, seed: int):
  """The reference VAE as `text.py` builds it (LSTM encoder and decoder, d = 32)."""
  torch.manual_seed(seed)
  args = argparse.Namespace(nz=32, dec_dropout_in=dropout, dec_dropout_out=dropout,
                            device=torch.device("cpu"), **size)
  model_init = lambda t: torch.nn.init.uniform_(t, -0.01, 0.01)
  emb_init = lambda t: torch.nn.init.uniform_(t, -0.1, 0.1)
  encoder = modules.LSTMEncoder(args, len(vocab), model_init, emb_init)
  decoder = modules.LSTMDecoder(args, vocab, model_init, emb_init)
  return modules.VAE(encoder, decoder, args)


def to_tensors(torch, dataset, batches):
  """The reference's own padding (`_to_tensor`: <s> ... </s>), one tensor per batch."""
  return [dataset._to_tensor([dataset.data[i] for i in b], True, torch.device("cpu"))[0]
          for b in batches]


def bench_train(torch, modules, dataset, sentences, size_name: str, args) -> dict:
  batches = ptb_batches.timed_batches(sentences, 32, args.steps, args.seed)
  tensors = to_tensors(torch, dataset, batches)
  tokens = sum((t.size(1) - 1) * t.size(0) for t in tensors)
  assert tokens == ptb_batches.tokens_of(sentences, batches)
  vae = build_model(torch, modules, dataset.vocab, SIZES[size_name], args.dropout, args.seed)
  vae.train()
  enc_opt = torch.optim.SGD(vae.encoder.parameters(), lr=1.0, momentum=0)
  dec_opt = torch.optim.SGD(vae.decoder.parameters(), lr=1.0, momentum=0)

  def step(batch):  # text.py's training-loop body (not aggressive, kl_weight 1)
    enc_opt.zero_grad()
    dec_opt.zero_grad()
    loss, _, _ = vae.loss(batch, 1.0, nsamples=1)
    loss.mean(dim=-1).backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 5.0)
    enc_opt.step()
    dec_opt.step()

  for b in tensors:  # warm-up pass: allocator and kernels
    step(b)
  times = []
  for _ in range(args.rounds):
    start = time.perf_counter()
    for b in tensors:
      step(b)
    times.append(time.perf_counter() - start)
  rates = [tokens / t for t in times]
  return {"size": size_name, "steps": args.steps, "tokens": tokens,
          "tokens_per_second": statistics.median(rates), "tokens_per_second_range":
          [min(rates), max(rates)], "pass_seconds": times, "dropout": args.dropout,
          "optimizer": "sgd lr 1.0, clip 5"}


def bench_eval(torch, modules, text, data_mod, vocab, tmp: str, args) -> dict:
  test = ptb_batches.read_sentences(args.data_dir, "test")
  vae = build_model(torch, modules, vocab, SIZES["ptb"], 0.0, args.seed)
  vae.eval()
  first = data_mod.MonoTextData(write_lines(test[:args.eval_sentences], tmp, "first.txt"),
                                vocab=vocab)
  whole = data_mod.MonoTextData(write_lines(test, tmp, "test.txt"), vocab=vocab)
  cpu = torch.device("cpu")
  one_each = first.create_data_batch(batch_size=1, device=cpu, batch_first=True)
  of_32 = whole.create_data_batch(batch_size=32, device=cpu, batch_first=True)
  iw_args = argparse.Namespace(iw_nsamples=args.k_samples)
  out = {"sentences": args.eval_sentences, "k_samples": args.k_samples}
  with torch.no_grad():
    start = time.perf_counter()
    text.calc_iwnll(vae, one_each, iw_args)
    out["iw_nll_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    text.calc_mi(vae, of_32)
    out["mi_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    text.calc_au(vae, of_32)
    out["au_seconds"] = time.perf_counter() - start
  out["test_sentences"] = len(test)
  return out


def main(argv=None):
  args = parse_args(argv)
  data_mod, modules, text = import_reference(args.reference_dir)
  import torch
  torch.set_num_threads(args.threads)
  np.random.seed(args.seed)  # calc_iwnll permutes the batch order
  sentences = ptb_batches.read_sentences(args.data_dir, "train")
  result = {"program": "reference (jxhe/vae-lagging-encoder)", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "train": []}
  with tempfile.TemporaryDirectory() as tmp:
    dataset = data_mod.MonoTextData(write_lines(sentences, tmp, "train.txt"))
    for name in args.sizes.split(","):
      result["train"].append(bench_train(torch, modules, dataset, sentences, name, args))
      print(json.dumps(result["train"][-1]), flush=True)
    if args.eval_sentences:
      result["eval"] = bench_eval(torch, modules, text, data_mod, dataset.vocab, tmp, args)
  text_out = json.dumps(result, indent=2)
  print(text_out)
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      f.write(text_out + "\n")


if __name__ == "__main__":
  main()
