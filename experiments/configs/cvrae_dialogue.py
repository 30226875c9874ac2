"""The conditional VRAE for dialogue on DailyDialog (METHODS.md §3; Zhao et al. 2017).

  python experiments/cvrae_dialogue.py --workdir=runs/dd_cvae            # Gaussian CVAE + BoW
  python experiments/cvrae_dialogue.py --config=experiments/configs/cvrae_dialogue.py:seq2seq ...
  python experiments/cvrae_dialogue.py --config=experiments/configs/cvrae_dialogue.py:iaf ...
  python experiments/cvrae_dialogue.py --config=experiments/configs/cvrae_dialogue.py:smoke ...

`dailydialog` (the default) follows Zhao et al.'s kgCVAE sizes: (context, response) pairs of
every DailyDialog dialogue with up to 10 previous turns, lowercased, utterances cut at 40 tokens,
the 10,000 most frequent training words; embedding 200 shared by the encoders and the decoder,
utterance LSTM 300, context LSTM 600, response encoder 300, decoder 400, z of 200 dimensions,
prior network with a 400-unit hidden layer, bag-of-words head with 400 units, KL annealed
linearly from 0 to 1 over 10,000 steps, Adam 1e-3, batch 30; evaluation of the test split with
N = 10 sampled responses per context, K = 50 importance samples.

Variants (applied left to right): smoke (seconds, for tests), seq2seq (no z: the hierarchical
encoder-decoder baseline), gaussian (the CVAE without the bag-of-words loss), bow (with it, the
default), iaf | coupling | planar (the recognition network with an amortised flow of that kind,
z_K = f_{x,c}(z_0), KL by Monte Carlo against p(z|c)), kl_preserving (one global IAF on both
prior and posterior), cpu (the smaller model and 2-core budget of docs/results.md).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from base import apply_variants, base_config  # noqa: E402


def dailydialog(c):
  c.data.corpus = "dailydialog"
  c.data.dir = "../shared/data/dailydialog"
  c.data.context_window = 10
  c.data.max_context_length = 40
  c.data.max_length = 40
  c.data.lowercase = True
  c.data.max_vocab_size = 10000
  c.data.batch_size = 30
  c.data.eval_batch_size = 60
  c.model.embed_dim = 200
  c.model.utterance_dim = 300
  c.model.context_dim = 600
  c.model.encoder_hidden_dim = 300  # the response encoder
  c.model.hidden_dim = 400
  c.model.latent_dim = 200
  c.model.prior_hidden_dim = 400
  c.model.bow_hidden_dim = 400
  c.model.share_embedding = True
  c.kl.schedule = "linear"
  c.kl.start = 0.0
  c.kl.warmup_steps = 10000
  c.kl.bow_weight = 1.0
  c.train.num_epochs = 10.0
  c.eval.k_samples = 50
  c.eval.batch_size = 30
  c.eval.chunk_size = 25


def cpu(c):
  """The 2-core CPU budget of docs/results.md: a smaller model, 5 turns of context."""
  c.data.context_window = 5
  c.model.embed_dim = 128
  c.model.utterance_dim = 128
  c.model.context_dim = 256
  c.model.encoder_hidden_dim = 256
  c.model.hidden_dim = 256
  c.model.latent_dim = 64
  c.model.prior_hidden_dim = 128
  c.model.bow_hidden_dim = 256


def smoke(c):
  c.data.context_window = 3
  c.data.max_context_length = 16
  c.data.max_length = 16
  c.data.max_train_examples = 256
  c.data.max_vocab_size = 500
  c.data.batch_size = 16
  c.data.eval_batch_size = 16
  c.model.embed_dim = 16
  c.model.utterance_dim = 16
  c.model.context_dim = 16
  c.model.encoder_hidden_dim = 16
  c.model.hidden_dim = 24
  c.model.latent_dim = 4
  c.model.prior_hidden_dim = 16
  c.model.bow_hidden_dim = 16
  c.model.flow.hidden_dim = 16
  c.model.flow.context_dim = 8
  c.model.flow.num_layers = 2
  c.kl.warmup_steps = 6
  c.train.num_steps = 12
  c.train.num_epochs = 0
  c.train.log_every = 4
  c.train.eval_every = 6
  c.train.progress_bar = False
  c.eval.max_examples = 24
  c.eval.k_samples = 4
  c.eval.chunk_size = 4
  c.eval.batch_size = 8
  c.eval.num_print = 2
  c.eval.num_response_samples = 3
  c.eval.max_decode_length = 8
  c.eval.beam_size = 2
  c.eval.probe_train_examples = 64
  c.eval.splits = "test"


def seq2seq(c):
  c.model.latent_dim = 0
  c.model.bow_hidden_dim = 0


def gaussian(c):
  c.model.posterior = "gaussian"
  c.model.bow_hidden_dim = 0


def bow(c):
  c.model.bow_hidden_dim = max(c.model.bow_hidden_dim, c.model.hidden_dim)


def flow_kind(kind):
  def variant(c):
    c.model.posterior = "flow"
    c.model.flow.kind = kind
    c.model.flow.amortized = True
  return variant


def kl_preserving(c):
  c.model.posterior = "kl_preserving"
  c.model.flow.kind = "iaf"
  c.model.flow.amortized = False


VARIANTS = {"dailydialog": dailydialog, "cpu": cpu, "smoke": smoke, "seq2seq": seq2seq,
            "gaussian": gaussian, "bow": bow, "iaf": flow_kind("iaf"),
            "coupling": flow_kind("coupling"), "planar": flow_kind("planar"),
            "kl_preserving": kl_preserving}


def get_config(variants: str = ""):
  c = base_config()
  c.model.kind = "cvae"
  c.model.pooling = "last"
  c.model.utterance_dim = 300
  c.model.context_dim = 600
  c.model.prior_hidden_dim = 400
  c.model.bow_hidden_dim = 400
  c.data.context_window = 10
  c.data.max_context_length = 40
  c.data.lowercase = True
  c.kl.bow_weight = 1.0
  c.eval.num_response_samples = 10  # N sampled responses per context (Zhao et al. 2017)
  c.eval.beam_size = 5
  c.eval.probe_train_examples = 10000  # training pairs of the act/emotion probes; 0: none
  c.eval.splits = "test"
  c.eval.hole_samples = 0
  c.train.best_metric = "neg_elbo"
  dailydialog(c)
  apply_variants(c, variants, VARIANTS)
  return c
