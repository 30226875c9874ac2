"""Dialogue (context, response) pairs for conditional VAEs on DailyDialog (Li et al. 2017).

    from vae_jax.data import dialogue
    train = dialogue.load_pairs('train', data_dir, context_window=5)
    vocab = Vocab.build(dialogue.vocabulary_tokens(train))
    data = dialogue.encode_pairs(train, vocab, context_window=5, max_length=40,
                                 max_context_length=40)
    it = pipeline.TrainIterator(data, batch_size=64, seed=0)

Pairs. Every turn t >= 1 of a dialogue is the response of exactly one pair, whose context is
the `context_window` (W) previous turns `turns[max(0, t - W):t]`, oldest first; a dialogue of
n turns gives n - 1 pairs. The pair keeps the response turn's dialogue act (0-3: the file's
1-4 minus 1, names in `readers.DAILYDIALOG_ACTS`) and emotion (0-6,
`readers.DAILYDIALOG_EMOTIONS`). DailyDialog dialogues are between two speakers who take turns,
so context turn j was said by the speaker of the response t iff t - j is even; `speakers` holds
1 for those turns and 0 for the other speaker's (the last context turn is always 0).

Vocabulary. `vocabulary_tokens(pairs)` yields every turn of the pairs' dialogues once (the first
turn from its context, the others as responses), so word counts are the corpus counts and not
multiplied by the window size. Build the vocabulary from the training pairs only.

Encoding (`encode_pairs`). Responses are encoded like `encoding.encode`: `w_1 ... w_n EOS`, with
its `max_length` / `overlong` rules; with `overlong='drop'` the whole pair is removed. Context
utterances are `w_1 ... w_n EOS` too, and one of more than `max_context_length` tokens keeps its
first `max_context_length - 1` words and its EOS: a long context turn only loses its end and
never removes a pair. The overlapping windows of a dialogue share their utterances, which are
stored once.

Batch format (extends the one of `vae_jax.data.pipeline`): a dict of numpy arrays
  tokens            int32   [B, L]      response `w_1 ... w_n EOS PAD ...` (no BOS)
  weights           float32 [B]         1 for a real pair, 0 for a padding row
  context           int32   [B, W, Lc]  context utterances `w_1 ... w_n EOS PAD ...`
  context_speakers  int32   [B, W]      1 = said by the speaker of the response, else 0
  act               int32   [B]         dialogue act of the response, 0-3
  emotion           int32   [B]         emotion of the response, 0-6
W is the context window. The slots are left-aligned: slot 0 holds the oldest kept turn, slot
`count - 1` the turn just before the response, and the empty slots after them (fewer than W
previous turns) are all PAD. Every utterance holds at least its EOS, so `any(context != PAD,
-1)` is the slot mask and an LSTM over the slots of one example sees ordinary right padding;
`context != PAD` is the token mask. Padding rows are all PAD (tokens and context) and 0 in every
other array. Empty slots have speaker 0. There is no `labels` key: act and emotion have their
own keys. L is chosen by the iterators from the response lengths (`lengths`, EOS included) as
for sentences. Lc is `round_up(max_context_length, pad_multiple)` for every batch when
`pad_context_to_max` (one shape, so fewer compilations), else `round_up` of the longest context
utterance in the batch's real rows. The iterators build every global batch whole on every
process and slice it, so Lc is the same on all processes either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Literal

from absl import logging
import numpy as np

from vae_jax.data import corpora
from vae_jax.data import encoding
from vae_jax.data import pipeline
from vae_jax.data import readers
from vae_jax.data.readers import Dialogue, Example
from vae_jax.data.vocab import EOS, PAD, UNK_MARKERS, Vocab

CORPUS = 'dailydialog'


@dataclasses.dataclass(frozen=True)
class DialoguePair:
  """One response turn with the turns before it.

  Attributes:
    context: the kept previous turns' tokens, oldest first (at most the context window).
    speakers: per context turn, 1 if the speaker of the response said it, else 0.
    response: the response turn's tokens.
    act: the response's dialogue act, 0-based (0-3).
    emotion: the response's emotion (0-6).
    dialogue: the dialogue's index (`Dialogue.index`, its 0-based line in the split's file).
    turn: the index of the response turn in its dialogue (>= 1).
  """
  context: tuple[tuple[str, ...], ...]
  speakers: tuple[int, ...]
  response: tuple[str, ...]
  act: int
  emotion: int
  dialogue: int
  turn: int


def _lower(tokens: Sequence[str]) -> tuple[str, ...]:
  """Lower-cased tokens; unknown markers are kept so they still map to UNK (as in corpora)."""
  return tuple(t if t in UNK_MARKERS else t.lower() for t in tokens)


def _check_window(context_window: int) -> None:
  if not isinstance(context_window, (int, np.integer)) or context_window < 1:
    raise ValueError(f'context_window must be an integer >= 1, got {context_window!r}.')


def dialogue_pairs(dialogues: Iterable[Dialogue], context_window: int,
                   lowercase: bool = False) -> list[DialoguePair]:
  """The (context, response) pairs of every turn t >= 1 of every dialogue.

  Args:
    dialogues: e.g. from `readers.read_dailydialog` or `load_dialogues`.
    context_window: W >= 1; the context of turn t is `turns[max(0, t - W):t]`.
    lowercase: lower-case every token (DailyDialog keeps the original casing).

  Returns:
    The pairs, by dialogue then response turn (n - 1 per dialogue of n turns).
  """
  _check_window(context_window)
  norm = _lower if lowercase else tuple
  pairs = []
  for d in dialogues:
    turns = [norm(turn.tokens) for turn in d.turns]
    for t in range(1, len(d.turns)):
      first = max(0, t - context_window)
      pairs.append(DialoguePair(
          context=tuple(turns[first:t]),
          speakers=tuple(int((t - j) % 2 == 0) for j in range(first, t)),
          response=turns[t],
          act=d.turns[t].act - 1,
          emotion=d.turns[t].emotion,
          dialogue=d.index,
          turn=t))
  return pairs


def load_dialogues(split: str, data_dir: os.PathLike[str] | str) -> list[Dialogue]:
  """The dialogues of one DailyDialog split through the corpus registry's files.

  Args:
    split: `train`, `valid` (or `dev`/`validation`/`val`) or `test`.
    data_dir: the folder with one sub-directory per corpus (`../shared/data` in a checkout) or
      the `dailydialog/` folder itself.

  Returns:
    The dialogues in file order. As in the registry, a dialogue whose turn and label counts
    differ (one in the official training file) is left out.
  """
  return readers.read_dailydialog(*corpora.split_files(CORPUS, split, data_dir),
                                  on_mismatch='skip')


def load_pairs(split: str, data_dir: os.PathLike[str] | str, context_window: int,
               lowercase: bool = False) -> list[DialoguePair]:
  """`dialogue_pairs` of one DailyDialog split (see `load_dialogues`)."""
  _check_window(context_window)
  return dialogue_pairs(load_dialogues(split, data_dir), context_window, lowercase)


def vocabulary_tokens(pairs: Iterable[DialoguePair], max_length: int | None = None,
                      max_context_length: int | None = None,
                      overlong: Literal['truncate', 'drop'] = 'truncate'
                      ) -> list[tuple[str, ...]]:
  """Every turn of the pairs' dialogues once: the token lists to build a `Vocab` from.

  A turn is identified by (dialogue, turn index); it appears in up to W contexts and as one
  response, and is counted once, so the counts are those of the corpus. The first turn of a
  dialogue comes from its first pair's context. The pairs must come from one split (dialogue
  indices are line numbers within a split's file).

  Only the words training sees enter (the limits of `encode_pairs`): a response keeps its first
  `max_length - 1` words, a context utterance its first `max_context_length - 1`, and with
  `overlong='drop'` a pair whose response is too long contributes nothing. A turn seen several
  times contributes its longest visible prefix.
  """
  keep = lambda limit: None if limit is None else limit - 1
  visible: dict[tuple[int, int], tuple[str, ...]] = {}
  for p in pairs:
    if (overlong == 'drop' and max_length is not None
        and len(p.response) + 1 > max_length):
      continue
    first = p.turn - len(p.context)
    seen = [(j, tokens[:keep(max_context_length)]) for j, tokens in enumerate(p.context, first)]
    seen.append((p.turn, p.response[:keep(max_length)]))
    for j, tokens in seen:
      key = (p.dialogue, j)
      if key not in visible or len(tokens) > len(visible[key]):
        visible[key] = tokens
  return list(visible.values())


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedDialogues:
  """Encoded pairs, batched by `pipeline.TrainIterator` / `EvalIterator` (see module docstring).

  Pair i's response is `responses[i]`; its context utterances, oldest first, are
  `contexts[context_start[i] + k]` for k < `context_count[i]`.

  Attributes:
    responses: the responses as `w_1 ... w_n EOS` (max_length / overlong as in
      `encoding.encode`); its `source_indices` are the pairs' indices in the input list.
    contexts: the context utterances as `w_1 ... w_n EOS`, at most `max_context_length`
      tokens (`contexts.num_truncated` were cut); the turns shared by the overlapping windows
      of a dialogue are stored once.
    context_start: int64 [N], index in `contexts` of each pair's first context utterance.
    context_count: int64 [N], number of context turns (<= context_window).
    speakers: int32 [N, W], left-aligned like the context slots (0 in empty slots).
    acts: int32 [N], the responses' dialogue acts (0-3).
    emotions: int32 [N], the responses' emotions (0-6).
    dialogues: int64 [N], `DialoguePair.dialogue` of each pair.
    turns: int64 [N], `DialoguePair.turn` of each pair.
    context_window: W, the number of context slots of a batch.
    max_context_length: the context utterance limit (EOS included), or None.
    pad_context_to_max: pad every batch's contexts to the same length (see `context_length`).
    pad_multiple: context lengths are padded to a multiple of this.
  """
  responses: encoding.EncodedCorpus
  contexts: encoding.EncodedCorpus
  context_start: np.ndarray
  context_count: np.ndarray
  speakers: np.ndarray
  acts: np.ndarray
  emotions: np.ndarray
  dialogues: np.ndarray
  turns: np.ndarray
  context_window: int
  max_context_length: int | None
  pad_context_to_max: bool = True
  pad_multiple: int = 8

  def __len__(self) -> int:
    return len(self.responses)

  @property
  def lengths(self) -> np.ndarray:
    """int64 [N] response token counts, EOS included (bucketing and the padded length)."""
    return self.responses.lengths

  @property
  def num_tokens(self) -> int:
    """Total response tokens, EOS included (the denominator of per-token NLL)."""
    return self.responses.num_tokens

  @property
  def source_indices(self) -> np.ndarray:
    """int64 [N], index of each pair in the list given to `encode_pairs`."""
    return self.responses.source_indices

  @property
  def context_length(self) -> int:
    """Lc of every batch when `pad_context_to_max`: the limit (or else the longest stored
    utterance) rounded up to `pad_multiple`."""
    if self.max_context_length is not None:
      longest = self.max_context_length
    else:
      longest = int(self.contexts.lengths.max()) if len(self.contexts) else 1
    return pipeline.round_up(longest, self.pad_multiple)

  def fingerprint(self) -> str:
    """sha256 over responses, contexts, their layout and labels (identifies the data for
    resuming; the batch layout options are included as they change the batches)."""
    h = hashlib.sha256()
    h.update(self.responses.fingerprint().encode())
    h.update(self.contexts.fingerprint().encode())
    for array, dtype in ((self.context_start, np.int64), (self.context_count, np.int64),
                         (self.speakers, np.int32), (self.acts, np.int32),
                         (self.emotions, np.int32)):
      h.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    h.update(json.dumps([self.context_window, self.max_context_length,
                         self.pad_context_to_max, self.pad_multiple]).encode())
    return h.hexdigest()

  def summary(self) -> str:
    limit = ('no limit' if self.max_context_length is None else
             f'max_context_length {self.max_context_length}: {self.contexts.num_truncated} '
             'truncated')
    return (f'{len(self)} pairs, context window {self.context_window}; responses: '
            f'{self.responses.summary()}; contexts: {len(self.contexts)} distinct utterances, '
            f'{self.contexts.num_tokens} tokens, {limit}')

  def batch(self, rows: np.ndarray, length: int) -> pipeline.Batch:
    """Batch of the given pair indices (-1 = padding row), responses padded to `length`."""
    rows = np.asarray(rows, dtype=np.int64)
    batch = pipeline.make_batch(self.responses, rows, length)  # tokens, weights.
    real = rows >= 0
    pairs = rows[real]
    size, slots = len(rows), np.arange(self.context_window)
    count = np.zeros(size, dtype=np.int64)
    count[real] = self.context_count[pairs]
    first = np.zeros(size, dtype=np.int64)
    first[real] = self.context_start[pairs]
    filled = slots < count[:, None]  # [B, W]
    utt = np.where(filled, first[:, None] + slots, 0)
    utt_lengths = np.zeros(filled.shape, dtype=np.int64)
    utt_lengths[filled] = self.contexts.lengths[utt[filled]]
    longest = int(utt_lengths.max(initial=0))
    if self.pad_context_to_max:
      context_length = self.context_length
      if longest > context_length:
        raise ValueError(f'A context utterance has {longest} tokens, more than the context '
                         f'length {context_length}.')
    else:
      context_length = pipeline.round_up(longest, self.pad_multiple)
    pos = np.arange(context_length)
    mask = pos < utt_lengths[..., None]  # [B, W, Lc]
    context = np.full(mask.shape, PAD, dtype=np.int32)
    context[mask] = self.contexts.tokens[(self.contexts.offsets[utt][..., None] + pos)[mask]]
    batch['context'] = context
    batch['context_speakers'] = np.zeros(filled.shape, dtype=np.int32)
    batch['context_speakers'][real] = self.speakers[pairs]
    for key, values in (('act', self.acts), ('emotion', self.emotions)):
      batch[key] = np.zeros(size, dtype=np.int32)
      batch[key][real] = values[pairs]
    return batch


def _flatten(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(int32 concatenated ids, int64 [len + 1] offsets) of id sequences."""
  offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
  np.cumsum([len(s) for s in seqs], out=offsets[1:])
  flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
  return flat, offsets


def _check_pair(i: int, p: DialoguePair, context_window: int) -> None:
  if len(p.context) > context_window:
    raise ValueError(f'Pair {i} has {len(p.context)} context turns, more than context_window='
                     f'{context_window}; make the pairs with the same window.')
  if len(p.speakers) != len(p.context) or any(s not in (0, 1) for s in p.speakers):
    raise ValueError(f'Pair {i} needs one speaker flag (0 or 1) per context turn, got '
                     f'{p.speakers} for {len(p.context)} turns.')
  if not 0 <= p.act < len(readers.DAILYDIALOG_ACTS) or not (
      0 <= p.emotion < len(readers.DAILYDIALOG_EMOTIONS)):
    raise ValueError(f'Pair {i}: act must be 0-{len(readers.DAILYDIALOG_ACTS) - 1} (the '
                     f'file value minus 1) and emotion 0-{len(readers.DAILYDIALOG_EMOTIONS) - 1},'
                     f' got act {p.act}, emotion {p.emotion}.')


def encode_pairs(pairs: Sequence[DialoguePair], vocab: Vocab, *, context_window: int,
                 max_length: int | None, max_context_length: int | None,
                 overlong: Literal['truncate', 'drop'] = 'truncate',
                 pad_context_to_max: bool = True, pad_multiple: int = 8) -> EncodedDialogues:
  """Encodes pairs for `pipeline.TrainIterator` / `EvalIterator`.

  Args:
    pairs: from `dialogue_pairs` / `load_pairs` (at most `context_window` context turns each).
    vocab: the vocabulary (words outside it become UNK).
    context_window: W, the number of context slots of every batch.
    max_length: longest allowed response, EOS included (>= 2); None for no limit.
    max_context_length: longest context utterance, EOS included (>= 2); longer ones keep their
      first `max_context_length - 1` words and EOS. None for no limit.
    overlong: for responses, as in `encoding.encode`: 'truncate' or 'drop' (the whole pair).
    pad_context_to_max: True pads every batch's contexts to `round_up(max_context_length,
      pad_multiple)` (one shape; with no limit, the longest stored utterance); False to the
      longest context utterance of the batch.
    pad_multiple: context lengths are padded to a multiple of this.

  Returns:
    The encoded pairs.
  """
  _check_window(context_window)
  if max_context_length is not None and max_context_length < 2:
    raise ValueError(f'max_context_length={max_context_length} must be >= 2 (one word plus '
                     'EOS) or None.')
  if pad_multiple < 1:
    raise ValueError(f'pad_multiple must be >= 1, got {pad_multiple}.')
  for i, p in enumerate(pairs):
    _check_pair(i, p, context_window)
  responses = encoding.encode([Example(p.response) for p in pairs], vocab, max_length,
                              overlong)
  kept = responses.source_indices
  # Utterance storage. The context of pair t of a dialogue is the one of pair t - 1 shifted by
  # a turn, so the utterances already stored for the dialogue are reused when they form a
  # contiguous run that the missing ones can extend; otherwise the context is stored anew.
  # Keys include the tokens, so a stored utterance is only reused for the same text.
  stored: dict[tuple[int, int, tuple[str, ...]], int] = {}
  seqs: list[list[int]] = []
  truncated = 0
  starts = np.zeros(len(kept), dtype=np.int64)
  counts = np.zeros(len(kept), dtype=np.int64)
  speakers = np.zeros((len(kept), context_window), dtype=np.int32)
  for row, i in enumerate(kept):
    p = pairs[i]
    first = p.turn - len(p.context)
    keys = [(p.dialogue, first + k, tuple(u)) for k, u in enumerate(p.context)]
    found = [stored.get(key) for key in keys]
    known = next((k for k, f in enumerate(found) if f is None), len(found))
    reuse = (known > 0 and all(f is None for f in found[known:])
             and found[:known] == list(range(found[0], found[0] + known))
             and (known == len(found) or found[known - 1] == len(seqs) - 1))
    start = found[0] if reuse else len(seqs)
    for key, tokens in list(zip(keys, p.context))[known if reuse else 0:]:
      ids = vocab.encode(tokens)
      if max_context_length is not None and len(ids) + 1 > max_context_length:
        ids = ids[:max_context_length - 1]
        truncated += 1
      stored[key] = len(seqs)
      seqs.append(ids + [EOS])
    starts[row], counts[row] = start, len(p.context)
    speakers[row, :len(p.speakers)] = p.speakers
  flat, offsets = _flatten(seqs)
  contexts = encoding.EncodedCorpus(
      tokens=flat, offsets=offsets, labels=None,
      source_indices=np.arange(len(seqs), dtype=np.int64), num_truncated=truncated,
      max_length=max_context_length)
  if truncated:
    logging.info('Over-long context utterances (more than %d tokens with EOS): %d of %d '
                 'truncated.', max_context_length, truncated, len(seqs))

  def field(name: str, dtype: type[np.generic]) -> np.ndarray:
    return np.asarray([getattr(pairs[i], name) for i in kept], dtype=dtype)

  return EncodedDialogues(
      responses=responses,
      contexts=contexts,
      context_start=starts,
      context_count=counts,
      speakers=speakers,
      acts=field('act', np.int32),
      emotions=field('emotion', np.int32),
      dialogues=field('dialogue', np.int64),
      turns=field('turn', np.int64),
      context_window=int(context_window),
      max_context_length=max_context_length,
      pad_context_to_max=pad_context_to_max,
      pad_multiple=pad_multiple)
