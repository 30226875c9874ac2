"""The batches both throughput benchmarks time: He et al. 2019's equal-length PTB batches.

Imported by `train_throughput.py` (ours) and by `reference_throughput.py` (which runs in a
PyTorch environment), so this module needs nothing but numpy and the standard library.

jxhe/vae-lagging-encoder (`data/text_data.py`, `MonoTextData.create_data_batch`) sorts the
sentences by length with `np.argsort`, cuts the sorted list where the length changes and
chunks each run of equal-length sentences into batches of at most `batch_size`: no padding,
and a smaller last batch per length. `equal_length_batches` reproduces that grouping (the same
numpy call on the same lengths gives the same order), and `timed_batches` draws the benchmark's
batches from it with a fixed seed, so both programs time exactly the same sentences.
"""

from __future__ import annotations

import lzma
import os

import numpy as np


def read_sentences(data_dir: str, split: str, limit: int | None = None) -> list[list[str]]:
  """The whitespace-split non-empty lines of `ptb.{split}.txt(.xz)` (MonoTextData's rule)."""
  base = os.path.join(data_dir, "ptb", f"ptb.{split}.txt")
  opener = (lambda: lzma.open(base + ".xz", "rt")) if os.path.exists(base + ".xz") else (
      lambda: open(base))
  sentences = []
  with opener() as f:
    for line in f:
      words = line.split()
      if words:
        sentences.append(words)
      if limit is not None and len(sentences) == limit:
        break
  return sentences


def equal_length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Sentence indices of He et al.'s batches: equal lengths, at most `batch_size` each."""
  lengths = np.asarray(lengths)
  order = np.argsort(lengths)  # the reference's call, default kind: the same order
  sorted_lengths = lengths[order]
  change = [i for i in range(1, len(order)) if sorted_lengths[i] != sorted_lengths[i - 1]]
  batches, start = [], 0
  for end in change + [len(order)]:
    for i in range(start, end, batch_size):
      batches.append(order[i:min(i + batch_size, end)])
    start = end
  return batches


def timed_batches(sentences: list[list[str]], batch_size: int, steps: int,
                  seed: int = 0) -> list[np.ndarray]:
  """`steps` batches drawn without replacement from `equal_length_batches` (seeded)."""
  batches = equal_length_batches(np.array([len(s) for s in sentences]), batch_size)
  pick = np.random.default_rng(seed).choice(len(batches), size=steps, replace=False)
  return [batches[i] for i in pick]


def tokens_of(sentences: list[list[str]], batches: list[np.ndarray]) -> int:
  """Predicted tokens of `batches`: words + EOS per sentence (no BOS), as PPL counts them."""
  return int(sum(len(sentences[i]) + 1 for b in batches for i in b))
