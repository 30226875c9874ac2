"""Tests for vae_jax.data.tfds_builder: prepare + random access, without TensorFlow.

Runs in a subprocess so that the check `'tensorflow' not in sys.modules` is not affected by
other tests of the session, on a tiny corpus written to tmp_path.
"""

import json
import lzma
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from vae_jax.data import corpora, tfds_builder
    manual_dir, data_dir = sys.argv[1], sys.argv[2]
    tfds_builder.prepare('short_yelp', manual_dir, data_dir)
    builder = tfds_builder.prepare('short_yelp', manual_dir, data_dir)  # Reused.
    src = tfds_builder.data_source('short_yelp', 'dev', data_dir)
    expected = corpora.load_split('short_yelp', 'valid', manual_dir)
    out = {
        'tensorflow_imported': 'tensorflow' in sys.modules,
        'len': len(src),
        'same_as_reader': list(src) == expected and src[-1] == expected[-1],
        'slice': [ex.label for ex in src[1:3]],
        'first': [list(src[0].tokens), src[0].label],
        'splits': sorted(builder.info.splits),
    }
    print('RESULT' + json.dumps(out))
""")


def _write_corpus(root):
  d = root / 'short_yelp'
  d.mkdir(parents=True)
  with lzma.open(d / 'short_yelp.valid.txt.xz', 'wt') as f:
    f.write('1\tgreat food !\n0\tcold <unk> soup .\n1\tnice\n0\tbad\n')
  (d / 'short_yelp.test.txt').write_text('1\tok .\n')
  for n in (100, 500, 1000, 2000, 10000):
    (d / f'short_yelp.train.{n}.txt').write_text('0\tmeh\n')
  return d


@pytest.mark.slow
def test_prepare_and_read_without_tensorflow(tmp_path):
  manual_dir = _write_corpus(tmp_path / 'corpora')
  proc = subprocess.run(
      [sys.executable, '-c', SCRIPT, str(manual_dir), str(tmp_path / 'tfds')],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT'))
  out = json.loads(line[len('RESULT'):])
  assert out == {
      'tensorflow_imported': False,
      'len': 4,
      'same_as_reader': True,
      'slice': [0, 1],
      'first': [['great', 'food', '!'], 1],
      'splits': ['test', 'train_100', 'train_1000', 'train_10000', 'train_2000', 'train_500',
                 'valid'],
  }


def test_changed_sources_and_missing_dataset_are_reported(tmp_path):
  from vae_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  manual_dir = _write_corpus(tmp_path / 'corpora')
  data_dir = tmp_path / 'tfds'
  with pytest.raises(FileNotFoundError, match='Run vae_jax.data.tfds_builder.prepare'):
    tfds_builder.data_source('short_yelp', 'valid', data_dir)
  with pytest.raises(FileNotFoundError, match='directory not found'):
    tfds_builder.prepare('short_yelp', tmp_path / 'elsewhere', data_dir)
  tfds_builder.prepare('short_yelp', manual_dir, data_dir)
  (manual_dir / 'short_yelp.test.txt').write_text('0\tchanged .\n')
  with pytest.raises(ValueError, match='built from different source files'):
    tfds_builder.prepare('short_yelp', manual_dir, data_dir)
  # Without a manual_dir the prepared dataset is reused as it is.
  tfds_builder.prepare('short_yelp', None, data_dir)
  assert tfds_builder.data_source('short_yelp', 'test', data_dir)[0].tokens == ('ok', '.')
