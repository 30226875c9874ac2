"""TFDS builder for the local corpora, written as array_record and read without TensorFlow.

`prepare(name, manual_dir, data_dir)` converts one corpus of the registry
(`vae_jax.data.corpora.CORPORA`) into a TFDS dataset once; later calls reuse it. `data_source`
opens a prepared split through `tfds.data_source` for random access (`len`, `ds[i]`), which is
what a grain-style or multi-host input pipeline needs. TensorFlow is never imported: the
`array_record` file format with `tfds.data_source` is TFDS's TF-free path (the `tfrecord` format
and `as_dataset` would need TensorFlow).

One `BuilderConfig` per corpus (`vae_jax_corpus/ptb`, `vae_jax_corpus/sst2`, ...).
`manual_dir` is the corpus directory (e.g. `../shared/data/ptb`; the folder holding all corpora
works too); the synthetic corpus needs none. Features:

  text     the tokens joined by single spaces (`text.split()` gives the tokens back)
  label    int64 class id, -1 where the corpus has no labels
  factors  int64 [k], `Example.factors` (synthetic latent factors, DailyDialog act and
           emotion), empty where there are none

Example order is the file order (shuffling at preparation time is disabled), so `ds[i]` is
example i of `corpora.load_split(name, split, ...)`. The sha256 of every source file is kept in
the dataset's metadata; `prepare` raises instead of silently reusing a dataset built from
different files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, overload

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from vae_jax.data import corpora
from vae_jax.data import synthetic
from vae_jax.data.readers import Example

BUILDER_NAME = 'vae_jax_corpus'
NO_LABEL = -1
FILE_FORMAT = 'array_record'

_INSTRUCTIONS = """\
Pass the local corpus directory as manual_dir (e.g. ../shared/data/ptb relative to the
checkout; see ../shared/data/README.md). Files may be plain or .xz compressed.
"""


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def source_checksums(name: str, manual_dir: os.PathLike[str] | str | None) -> dict[str, Any]:
  """{split: {file name: sha256}} of a corpus's source files.

  For the generated synthetic corpus: the version of its grammar.
  """
  corpus = corpora.get_corpus(name)
  if corpus.subdir is None:
    return {'grammar_version': synthetic.GRAMMAR_VERSION}
  return {split: {p.name: _sha256(p) for p in corpora.split_files(name, split, manual_dir)}
          for split in corpus.splits}


class VaeJaxCorpus(tfds.core.GeneratorBasedBuilder):
  """The local text corpora of vae_jax as a TFDS dataset (one config per corpus)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Text and label of the local corpora.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=name, description=c.description)
      for name, c in corpora.CORPORA.items()
  ]

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS locates the builder's source through importlib resources, which needs the
    # `importlib_resources` backport for installed packages; the file is known here.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    corpus = corpora.get_corpus(self.builder_config.name)
    labels = ('none' if corpus.label_names is None
              else ', '.join(f'{i}={n}' for i, n in enumerate(corpus.label_names)))
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{corpus.description}. Labels: {labels} (-1 = no label).',
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'label': tfds.features.Scalar(np.int64),
            'factors': tfds.features.Tensor(shape=(None,), dtype=np.int64),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    name = self.builder_config.name
    corpus = corpora.get_corpus(name)
    manual_dir = dl_manager.manual_dir if corpus.subdir is not None else None
    self.info.metadata['sources'] = source_checksums(name, manual_dir)
    return {
        split: self._generate_examples(split, corpora.split_files(name, split, manual_dir))
        for split in corpus.splits
    }

  def _generate_examples(self, split: str, paths: Sequence[epath.Path]):
    corpus = corpora.get_corpus(self.builder_config.name)
    for i, ex in enumerate(corpus.reader(split, paths)):
      yield i, {'text': ' '.join(ex.tokens),
                'label': NO_LABEL if ex.label is None else int(ex.label),
                'factors': np.asarray(ex.factors or (), dtype=np.int64)}


def _builder(name: str, data_dir: os.PathLike[str] | str) -> VaeJaxCorpus:
  corpora.get_corpus(name)  # Clear error for unknown names.
  return VaeJaxCorpus(config=name, data_dir=os.fspath(data_dir), file_format=FILE_FORMAT)


def prepare(name: str, manual_dir: os.PathLike[str] | str | None,
            data_dir: os.PathLike[str] | str) -> VaeJaxCorpus:
  """Builds the TFDS dataset of corpus `name` under `data_dir` unless it is already there.

  Args:
    name: a corpus of `corpora.CORPORA`.
    manual_dir: the corpus directory with the source files (None for `synthetic`). When the
      dataset is already prepared, its source checksums are compared with these files; pass
      None to reuse it without the check.
    data_dir: where TFDS datasets are written (`data_dir/vae_jax_corpus/<name>/<version>`).

  Returns:
    The prepared builder.

  Raises:
    ValueError: if a prepared dataset exists but was built from different source files.
  """
  corpus = corpora.get_corpus(name)
  has_files = corpus.subdir is not None
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    if has_files and manual_dir is None:
      return builder  # Nothing to compare with.
    built = dict(builder.info.metadata).get('sources')
    current = source_checksums(name, manual_dir)
    if built != current:
      raise ValueError(
          f'The prepared dataset in {builder.data_path} was built from different source files '
          f'than those in {manual_dir}. Delete {builder.data_path} to rebuild it, or use '
          'another data_dir.')
    return builder
  if has_files:
    corpora.corpus_dir(name, manual_dir)  # Clear error for a missing directory.
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=None if manual_dir is None else os.fspath(manual_dir)))
  return builder


@dataclasses.dataclass(frozen=True)
class CorpusSource(Sequence[Example]):
  """Random access to a prepared split: `len(src)`, `src[i] -> Example`, slices, iteration."""
  source: Any  # tfds ArrayRecordDataSource
  name: str
  split: str

  def __len__(self) -> int:
    return len(self.source)

  @staticmethod
  def _example(record: dict[str, Any]) -> Example:
    text = record['text']
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    label = int(record['label'])
    factors = tuple(int(f) for f in record['factors'])
    return Example(tuple(text.split()), None if label == NO_LABEL else label, factors or None)

  @overload
  def __getitem__(self, index: int) -> Example: ...

  @overload
  def __getitem__(self, index: slice) -> list[Example]: ...

  def __getitem__(self, index):
    if isinstance(index, slice):
      idx = list(range(len(self)))[index]
      return [self._example(r) for r in self.source.__getitems__(idx)] if idx else []
    n = len(self)
    i = int(index)
    if not -n <= i < n:
      raise IndexError(f'Index {index} out of range for {self.name}/{self.split} ({n}).')
    return self._example(self.source[i % n])

  def __iter__(self) -> Iterator[Example]:
    for i in range(len(self)):
      yield self[i]


def data_source(name: str, split: str, data_dir: os.PathLike[str] | str) -> CorpusSource:
  """Opens a split prepared by `prepare` for random access (no TensorFlow).

  Raises:
    FileNotFoundError: if the dataset has not been prepared under `data_dir`.
  """
  split = corpora.canonical_split(name, split)
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'No prepared {BUILDER_NAME}/{name} dataset in {data_dir}. Run '
        f'vae_jax.data.tfds_builder.prepare({name!r}, manual_dir, data_dir) first.')
  src = tfds.data_source(f'{BUILDER_NAME}/{name}', split=split, data_dir=os.fspath(data_dir),
                         download=False, builder_kwargs={'file_format': FILE_FORMAT})
  return CorpusSource(src, name, split)
