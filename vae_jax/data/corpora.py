"""Registry of the local corpora: name -> split files + reader.

The corpora live as `.xz` files in a data directory laid out as `../shared/data` (one
sub-directory per corpus; see the README there for sources, sizes and what is missing). Pass
that directory as `data_dir`; `load_split` finds each split's files, reads them with the right
reader and returns `Example`s. The embedded `synthetic` corpus needs no files.

Split names are `train`, `valid` and `test` for every corpus (`dev`, `validation` and `val` are
accepted for `valid`); each corpus maps them to its own file names (SST `dev.txt`, DailyDialog
`*_validation.txt`, Shen et al. Yelp `sentiment.dev.{0,1}`). Only the splits whose files exist
are registered, e.g. Yahoo has only `valid`; asking for another gives an error that lists the
available ones. short_yelp also has its labelled training subsets `train_100` ... `train_10000`.

Labels are 0-based class ids (`Corpus.label_names`); corpora without labels give None.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

from etils import epath

from vae_jax import errors
from vae_jax.data import readers
from vae_jax.data import synthetic
from vae_jax.data.readers import Example
from vae_jax.data.vocab import UNK_MARKERS

SPLIT_ALIASES: Mapping[str, str] = {'dev': 'valid', 'validation': 'valid', 'val': 'valid'}

Reader = Callable[[str, Sequence[epath.Path]], list[Example]]


@dataclasses.dataclass(frozen=True)
class Corpus:
  """How to read one corpus.

  Attributes:
    name: registry key.
    description: one line: what it is and where it comes from.
    subdir: directory under `data_dir` holding the files (None: no files, e.g. synthetic).
    files: split -> file names inside `subdir` (without `.xz`; either form is read).
    reader: `reader(split, paths) -> list[Example]`, paths resolved in `files` order.
    label_names: class names (index = label) or None when there are no labels.
    factor_names: names of `Example.factors` entries, or None.
    missing: split -> why that standard split is not available.
  """
  name: str
  description: str
  subdir: str | None
  files: Mapping[str, tuple[str, ...]]
  reader: Reader
  label_names: tuple[str, ...] | None = None
  factor_names: tuple[str, ...] | None = None
  missing: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.files)

  @property
  def num_classes(self) -> int | None:
    return None if self.label_names is None else len(self.label_names)


def _plain(split: str, paths: Sequence[epath.Path]) -> list[Example]:
  del split
  return [ex for p in paths for ex in readers.read_lines(p)]


def _labeled(split: str, paths: Sequence[epath.Path]) -> list[Example]:
  del split
  return [ex for p in paths for ex in readers.read_labeled_lines(p)]


def _label_per_file(split: str, paths: Sequence[epath.Path]) -> list[Example]:
  del split
  return readers.read_label_per_file(dict(enumerate(paths)))


def _sst(binary: bool) -> Reader:
  def read(split: str, paths: Sequence[epath.Path]) -> list[Example]:
    del split
    return [ex for p in paths for ex in readers.read_sst_trees(p, binary=binary)]
  return read


def _dailydialog(split: str, paths: Sequence[epath.Path]) -> list[Example]:
  del split
  # The official training file has one dialogue whose turn and label counts differ (line
  # 7852); it is left out rather than guessing the alignment.
  dialogues = readers.read_dailydialog(*paths, on_mismatch='skip')
  return readers.dialogue_utterances(dialogues)


def _synthetic(split: str, paths: Sequence[epath.Path]) -> list[Example]:
  del paths
  return synthetic.generate(split)


def _text_corpus(name: str, splits: Sequence[str], description: str, *, reader: Reader = _plain,
                 more_files: Mapping[str, tuple[str, ...]] | None = None, **fields) -> Corpus:
  """A corpus whose split s is the file `<name>.<s>.txt` in the folder `<name>` (the layout of
  the data of He et al. 2019 and Li et al. 2019), plus `more_files` (split -> file names)."""
  return Corpus(
      name=name,
      description=description,
      subdir=name,
      files={**{split: (f'{name}.{split}.txt',) for split in splits}, **(more_files or {})},
      reader=reader,
      **fields)


def _sst_corpus(name: str, description: str, *, binary: bool,
                label_names: tuple[str, ...]) -> Corpus:
  """A corpus read from the SST trees (one folder, one file per split), fine-grained or binary."""
  return Corpus(
      name=name,
      description=description,
      subdir='sst',
      files={'train': ('train.txt',), 'valid': ('dev.txt',), 'test': ('test.txt',)},
      reader=_sst(binary=binary),
      label_names=label_names)


_NEG_POS = ('negative', 'positive')
_NOT_OFFLINE = 'not available offline (see the data README)'

CORPORA: Mapping[str, Corpus] = {
    c.name: c for c in (
        _text_corpus('ptb', ('train', 'valid', 'test'),
                     'Penn Treebank, Mikolov et al. preprocessing (10k vocabulary); the test '
                     'split is held out for final evaluation'),
        _text_corpus('yahoo', ('valid',),
                     'Yahoo Answers documents (Yang et al. 2017), `_UNK` for unknown words',
                     missing={'train': _NOT_OFFLINE, 'test': 'held out'}),
        _text_corpus('snli', ('valid', 'test'),
                     'SNLI sentences, 100k/10k/10k split of Li et al. 2019',
                     missing={'train': _NOT_OFFLINE}),
        _text_corpus('short_yelp', ('valid', 'test'),
                     'short Yelp reviews with binary sentiment (Li et al. 2019); labelled '
                     'training subsets train_100 ... train_10000',
                     reader=_labeled, label_names=_NEG_POS,
                     more_files={f'train_{n}': (f'short_yelp.train.{n}.txt',)
                                 for n in (100, 500, 1000, 2000, 10000)},
                     missing={'train': _NOT_OFFLINE + '; use the labelled subsets train_100 ... '
                                                      'train_10000'}),
        Corpus(
            name='yelp_style_transfer',
            description='Yelp sentiment sentences of Shen et al. 2017 (label from the file name)',
            subdir='yelp_style_transfer',
            files={'valid': ('sentiment.dev.0', 'sentiment.dev.1'),
                   'test': ('sentiment.test.0', 'sentiment.test.1')},
            reader=_label_per_file,
            label_names=_NEG_POS,
            missing={'train': _NOT_OFFLINE}),
        _sst_corpus('sst', 'Stanford Sentiment Treebank sentences, fine-grained root label '
                           '(SST-5, Socher et al. 2013); original casing',
                    binary=False,
                    label_names=('very negative', 'negative', 'neutral', 'positive',
                                 'very positive')),
        _sst_corpus('sst2', 'SST-2: SST sentences without neutral ones, binary root label',
                    binary=True, label_names=_NEG_POS),
        Corpus(
            name='dailydialog',
            description='DailyDialog utterances as sentences (Li et al. 2017); label = '
                        'dialogue act, factors = (act, emotion); original casing',
            subdir='dailydialog',
            files={s: (f'dialogues_{f}.txt', f'dialogues_act_{f}.txt',
                       f'dialogues_emotion_{f}.txt')
                   for s, f in (('train', 'train'), ('valid', 'validation'),
                                ('test', 'test'))},
            reader=_dailydialog,
            label_names=readers.DAILYDIALOG_ACTS,
            factor_names=('act', 'emotion')),
        Corpus(
            name='synthetic',
            description='embedded grammar corpus with 4 latent factors (vae_jax.data.synthetic); '
                        'label = combined factors (32 classes)',
            subdir=None,
            files={s: () for s in synthetic.SPLITS},
            reader=_synthetic,
            label_names=tuple('/'.join(synthetic.describe(synthetic.factors_from_label(c))
                                       .values()) for c in range(synthetic.NUM_LABELS)),
            factor_names=synthetic.FACTOR_NAMES),
    )
}


def get_corpus(name: str) -> Corpus:
  """The registry entry for `name`, with an error listing the known corpora."""
  try:
    return CORPORA[name]
  except KeyError:
    raise errors.ConfigError(f'Unknown corpus {name!r}; available: {", ".join(CORPORA)}.') from None


def canonical_split(name: str, split: str) -> str:
  """Maps aliases (`dev`, `validation`, `val` -> `valid`) and checks the split exists."""
  corpus = get_corpus(name)
  canon = SPLIT_ALIASES.get(split, split)
  if canon not in corpus.files:
    why = corpus.missing.get(canon)
    note = f' ({canon} is {why})' if why else ''
    raise errors.ConfigError(
        f'Corpus {name!r} has no split {split!r}{note}. Available splits: '
        f'{", ".join(corpus.splits)}.')
  return canon


def corpus_dir(name: str, data_dir: os.PathLike[str] | str | None) -> epath.Path:
  """The directory holding corpus `name`'s files.

  `data_dir` is normally the folder with one sub-directory per corpus (`../shared/data` in a
  checkout); the corpus directory itself (e.g. `../shared/data/ptb`) is accepted too.
  """
  corpus = get_corpus(name)
  if corpus.subdir is None:
    raise ValueError(f'Corpus {name!r} is generated in code and has no directory.')
  if data_dir is None:
    raise errors.ConfigError(
        f'Corpus {name!r} is read from files: pass data_dir, the directory that holds '
        f'{corpus.subdir}/ (in a checkout: ../shared/data).')
  root = epath.Path(data_dir)
  if not root.is_dir():
    raise errors.DataNotFoundError(
        f'Data directory not found: {root}. Pass the folder of all corpora (the one holding '
        f'{corpus.subdir}/; in a checkout ../shared/data) or the {corpus.subdir}/ folder itself.')
  sub = root / corpus.subdir
  if sub.is_dir():
    return sub
  first = next(iter(corpus.files.values()))[0]
  if root.name == corpus.subdir or any(
      (root / n).exists() for n in (first, first + readers.XZ_SUFFIX)):
    return root
  raise errors.DataNotFoundError(
      f'Corpus directory not found: {sub}. data_dir must hold one sub-directory per corpus '
      f'({corpus.subdir}/ for {name!r}); in a checkout that is ../shared/data.')


def split_files(name: str, split: str,
                data_dir: os.PathLike[str] | str | None) -> list[epath.Path]:
  """The existing files (plain or `.xz`) of one split, in the order its reader expects."""
  corpus = get_corpus(name)
  split = canonical_split(name, split)
  if corpus.subdir is None:
    return []
  root = corpus_dir(name, data_dir)
  paths = []
  for f in corpus.files[split]:
    try:
      paths.append(readers.resolve_path(root / f))
    except errors.DataNotFoundError:
      raise errors.DataNotFoundError(
          f'Missing file for {name}/{split}: expected {root / f} or '
          f'{root / (f + readers.XZ_SUFFIX)}. Expected files of this split: '
          f'{", ".join(corpus.files[split])} (plain or .xz) in {root}.') from None
  return paths


def load_split(name: str, split: str, data_dir: os.PathLike[str] | str | None = None,
               *, lowercase: bool = False) -> list[Example]:
  """Reads one split of a registered corpus.

  Args:
    name: a key of `CORPORA`.
    split: `train`, `valid` (or `dev`/`validation`/`val`), `test`, or a corpus-specific split.
    data_dir: the folder with one sub-directory per corpus (`../shared/data` in a checkout);
      not needed for `synthetic`.
    lowercase: lower-case every token (SST and DailyDialog keep the original casing);
      unknown markers such as Yahoo's `_UNK` are kept as they are so they still map to UNK.

  Returns:
    The examples in file order.
  """
  corpus = get_corpus(name)
  canon = canonical_split(name, split)
  examples = corpus.reader(canon, split_files(name, canon, data_dir))
  if lowercase:
    examples = [dataclasses.replace(ex, tokens=tuple(
        t if t in UNK_MARKERS else t.lower() for t in ex.tokens)) for ex in examples]
  return examples


def available_corpora() -> tuple[str, ...]:
  """Registered corpus names."""
  return tuple(CORPORA)
