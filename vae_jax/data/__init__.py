"""Data: vocabulary, corpus readers and registry, the synthetic corpus, batching.

    from vae_jax import data
    train = data.load_split('synthetic', 'train')
    vocab = data.Vocab.build(ex.tokens for ex in train)
    it = data.TrainIterator(data.encode(train, vocab), batch_size=64, seed=0)
    batch = next(it)   # {'tokens': int32 [64, L], 'weights': float32 [64], 'labels': int32 [64]}

Dialogue (context, response) pairs for conditional models are in `vae_jax.data.dialogue`:

    pairs = data.load_pairs('train', data_dir, context_window=5)
    vocab = data.Vocab.build(data.vocabulary_tokens(pairs))
    it = data.TrainIterator(data.encode_pairs(pairs, vocab, context_window=5, max_length=40,
                                              max_context_length=40), batch_size=64, seed=0)

The TFDS builder (`vae_jax.data.tfds_builder`) is not imported here, so that importing the
package does not import tensorflow_datasets.
"""

from vae_jax.data.corpora import available_corpora
from vae_jax.data.corpora import CORPORA
from vae_jax.data.corpora import Corpus
from vae_jax.data.corpora import get_corpus
from vae_jax.data.corpora import load_split
from vae_jax.data.dialogue import dialogue_pairs
from vae_jax.data.dialogue import DialoguePair
from vae_jax.data.dialogue import encode_pairs
from vae_jax.data.dialogue import EncodedDialogues
from vae_jax.data.dialogue import load_pairs
from vae_jax.data.dialogue import vocabulary_tokens
from vae_jax.data.pipeline import Batch
from vae_jax.data.pipeline import BatchSource
from vae_jax.data.encoding import encode
from vae_jax.data.encoding import encode_tokens
from vae_jax.data.encoding import EncodedCorpus
from vae_jax.data.pipeline import EvalIterator
from vae_jax.data.pipeline import TrainIterator
from vae_jax.data.readers import Dialogue
from vae_jax.data.readers import Example
from vae_jax.data.readers import Turn
from vae_jax.data.vocab import BOS
from vae_jax.data.vocab import EOS
from vae_jax.data.vocab import PAD
from vae_jax.data.vocab import UNK
from vae_jax.data.vocab import Vocab
from vae_jax.data.vocab import VocabMismatchError

__all__ = [
    'available_corpora', 'CORPORA', 'Corpus', 'get_corpus', 'load_split', 'dialogue_pairs',
    'DialoguePair', 'encode_pairs', 'EncodedDialogues', 'load_pairs', 'vocabulary_tokens',
    'Batch', 'BatchSource', 'encode',
    'encode_tokens', 'EncodedCorpus', 'EvalIterator', 'TrainIterator', 'Dialogue', 'Example',
    'Turn', 'BOS', 'EOS', 'PAD', 'UNK', 'Vocab', 'VocabMismatchError',
]
