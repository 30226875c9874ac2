"""The LSTM language model: the VAE's decoder without z (METHODS.md §5).

  python experiments/lm.py --config=experiments/configs/lm.py:ptb \
      --config.data.dir=../shared/data/ptb --workdir=runs/ptb_lm
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
           if k in ("smoke", "ptb", "yahoo", "sgd")}
  apply_variants(c, variants, table)
  return c
