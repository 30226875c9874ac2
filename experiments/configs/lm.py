"""The LSTM language model: the VAE's decoder without z (METHODS.md §5).

  python experiments/lm.py --workdir=runs/quickstart_lm        # the quick start's reference
  python experiments/lm.py --config=experiments/configs/lm.py:ptb \
      --config.data.dir=../shared/data/ptb --workdir=runs/ptb_lm

The default is the language model matching the VAE quick start (experiments/configs/vae.py):
the same decoder (embedding 128, LSTM 256, no dropout), data (the embedded synthetic corpus,
batch 32), optimiser (Adam 1e-3) and budget (5 epochs, 3,125 steps), evaluated on the test
split. Its exact NLL is the number a VAE's IW-NLL is compared with: a VAE that beats it has
learned something from its code; a collapsed VAE (vae.py:vanilla) can at best equal it.
Variants: smoke, ptb, yahoo, yelp, sgd (as in vae.py; ptb and yahoo also take He et al.
2019's uniform initialisation, weights U(-0.01, 0.01) and embeddings U(-0.1, 0.1)).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from base import apply_variants, base_config  # noqa: E402
import vae as vae_variants  # noqa: E402


def get_config(variants: str = ""):
  c = base_config()
  c.model.kind = "lm"
  c.kl.warmup_epochs = 0.0
  c.model.embed_dim = 128
  c.train.num_epochs = 5.0
  c.eval.splits = "test"
  table = {k: v for k, v in vae_variants.VARIANTS.items()
           if k in ("smoke", "ptb", "yahoo", "yelp", "sgd")}
  apply_variants(c, variants, table)
  return c
