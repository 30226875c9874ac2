"""The data of a run, read from its config: every split, checked before anything is written.

`load_inputs` reads every split a run will touch — training (minus `data.exclude`), validation
and each of `eval.splits` — and builds the vocabulary from what training sees, so that a missing,
empty, non-UTF-8 or malformed file stops the run before it writes its first file or takes its
first step (not after hours of training, at the final evaluation). Errors are
`vae_jax.errors.UserError`s naming the config field, the file and the line.
"""

from __future__ import annotations

import dataclasses
import jax
from absl import logging

from vae_jax import errors
from vae_jax.data import bpe, corpora, dialogue, encoding, pipeline, synthetic
from vae_jax.data.vocab import Vocab
from vae_jax.run_config import DataConfig, ExperimentConfig


def cap(examples, n: int):
  """The first `n` examples (all when `n` is 0)."""
  return examples[:n] if n else examples


def load_examples(d: DataConfig, split: str):
  """The sentences of `split`; 'a+b' concatenates splits (e.g. 'valid+test')."""
  examples = []
  for part in split.split("+"):
    if d.corpus == "synthetic":
      examples += synthetic.generate(part, seed=d.synthetic_seed)
    else:
      examples += corpora.load_split(d.corpus, part, d.dir or None)
  return examples


def load_pairs(d: DataConfig, split: str) -> list[dialogue.DialoguePair]:
  """The (context, response) pairs of `split` ('a+b' concatenates splits)."""
  return [p for part in split.split("+")
          for p in dialogue.load_pairs(part, d.dir or None, d.context_window,
                                       lowercase=d.lowercase)]


def load_split_examples(d: DataConfig, split: str):
  """Sentences, or dialogue pairs for dialogue runs, of `split`."""
  return load_pairs(d, split) if d.dialogue else load_examples(d, split)


def load_train_examples(d: DataConfig):
  """The training examples, minus any sentence of `data.exclude` ('corpus:split'), e.g. the
  test set of a downstream task that must stay unseen. Returns (examples, number removed)."""
  examples = cap(_checked(_where(d, "data.train_split", d.train_split),
                          lambda: load_examples(d, d.train_split)),
                 d.max_train_examples)
  if not d.exclude:
    return examples, 0
  corpus, _, split = d.exclude.partition(":")
  if not split:
    raise errors.ConfigError(f"--config.data.exclude={d.exclude}: must be "
                             "'corpus:split', e.g. short_yelp:test.")
  held_out = {ex.tokens for ex in _checked(
      f"--config.data.exclude={d.exclude} (read from --config.data.exclude_dir="
      f"{d.exclude_dir or '(unset)'})",
      lambda: corpora.load_split(corpus, split, d.exclude_dir or None))}
  kept = [ex for ex in examples if ex.tokens not in held_out]
  logging.info("removed %d of %d training sentences that also occur in %s",
               len(examples) - len(kept), len(examples), d.exclude)
  return kept, len(examples) - len(kept)


def _where(d: DataConfig, field: str, split: str) -> str:
  """Names the config fields that chose a split, for error messages."""
  where = f"--config.{field}={split} of corpus {d.corpus}"
  if d.corpus != "synthetic":
    where += f" (read from --config.data.dir={d.dir or '(unset)'})"
  return where


def _checked(where: str, load):
  """`load()`, with `where` (the config fields that chose the data) in its error."""
  try:
    return load()
  except errors.UserError as e:
    raise type(e)(f"{where}: {e}") from e


def load_eval_split(d: DataConfig, split: str, max_examples: int,
                    field: str = "eval.splits"):
  """The first `max_examples` (`eval.max_examples`) examples of `split`; errors name
  `field`, the config field that chose it."""
  return cap(_checked(_where(d, field, split), lambda: load_split_examples(d, split)),
             max_examples)


def build_vocab(d: DataConfig, train_examples) -> Vocab:
  """The run's vocabulary: the words training sees (`encoding.training_tokens`; for dialogue,
  `dialogue.vocabulary_tokens`) capped by `data.max_vocab_size` / `data.min_count`, or GPT-2's
  BPE vocabulary from `data.tokenizer_dir` (else `model.pretrained_dir`) when
  `data.tokenizer` is 'gpt2'."""
  if d.tokenizer == "gpt2":
    directory = d.tokenizer_dir
    if not directory:
      raise errors.ConfigError(
          "--config.data.tokenizer=gpt2 needs the directory of GPT-2's vocab.json and "
          "merges.txt: set --config.data.tokenizer_dir or --config.model.pretrained_dir.")
    return _checked(f"--config.data.tokenizer_dir={directory}",
                    lambda: bpe.BPEVocab.from_dir(directory))
  if d.dialogue:
    tokens = dialogue.vocabulary_tokens(train_examples, d.max_length, d.max_context_length,
                                        d.overlong)
  else:
    tokens = encoding.training_tokens(train_examples, d.max_length, d.overlong)
  return Vocab.build(tokens, max_size=d.max_vocab_size or None, min_count=d.min_count)


def encoder(d: DataConfig, vocab: Vocab):
  """examples (sentences or dialogue pairs) -> the encoded, batchable data."""
  if d.dialogue:
    return lambda pairs: dialogue.encode_pairs(
        pairs, vocab, context_window=d.context_window, max_length=d.max_length,
        max_context_length=d.max_context_length, overlong=d.overlong,
        pad_context_to_max=True, pad_multiple=d.pad_multiple)
  return lambda ex: encoding.encode(ex, vocab, d.max_length, d.overlong)


def eval_iterator(d: DataConfig, data, batch_size: int):
  """Evaluation batches of `data`: sorted by length, padded to `data.pad_multiple`, this
  process's rows."""
  return pipeline.EvalIterator(data, batch_size, sort_by_length=True,
                               pad_multiple=d.pad_multiple,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())


@dataclasses.dataclass(frozen=True)
class RunInputs:
  """Everything a run reads, loaded and checked.

  Attributes:
    train: the training examples (after `data.max_train_examples` and `data.exclude`).
    excluded: how many training sentences `data.exclude` removed.
    valid: the validation examples (first `eval.max_examples`).
    evaluation: split -> examples (first `eval.max_examples`) of each of `eval.splits`.
    vocab: the vocabulary built from `train`.
  """
  train: list
  excluded: int
  valid: list
  evaluation: dict[str, list]
  vocab: Vocab


def load_inputs(cfg: ExperimentConfig) -> RunInputs:
  """Reads and checks every split of the run (see the module docstring)."""
  d = cfg.data
  if d.dialogue:
    train = cap(_checked(_where(d, "data.train_split", d.train_split),
                         lambda: load_pairs(d, d.train_split)), d.max_train_examples)
    excluded = 0
  else:
    train, excluded = load_train_examples(d)
  if not train:
    raise errors.DataError(f"the training split {d.train_split!r} of {d.corpus} has no "
                           "examples left (data.max_train_examples, data.exclude); check "
                           "the data settings.")

  max_examples = cfg.eval.max_examples
  valid = load_eval_split(d, d.valid_split, max_examples, "data.valid_split")
  evaluation = {name: load_eval_split(d, name, max_examples) for name in cfg.eval.splits}
  vocab = build_vocab(d, train)
  return RunInputs(train=train, excluded=excluded, valid=valid, evaluation=evaluation,
                   vocab=vocab)
