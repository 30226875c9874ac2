"""The pooling-encoder VAE (Long et al. 2019, METHODS.md §1): the plain VAE of vae.py:vanilla
with the encoder's last state replaced by a pooling of all its (masked) states before the
posterior heads. Nothing else changes: constant beta = 1, no annealing, no free bits.

  python experiments/pooling_vae.py --workdir=runs/pooling_vae                 # mean pooling
  python experiments/pooling_vae.py --config=experiments/configs/pooling_vae.py:ptb,max \
      --workdir=runs/ptb_max_pool

Variants: the pooling, `mean` (default), `max` or `mean_max` (both concatenated), combined with
any data/size/schedule variant of vae.py (smoke, ptb, yahoo, yelp, anneal, cyclical, ...),
which are applied first. The dispersion of the pooled feature (its variance across the data,
Long et al.'s diagnostic) is logged during training and reported by evaluation.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import vae  # noqa: E402

POOLINGS = ("mean", "max", "mean_max")


def get_config(variants: str = ""):
  names = [v.strip() for v in (variants or "").split(",") if v.strip()]
  pooling = [n for n in names if n in POOLINGS]
  if len(pooling) > 1:
    raise ValueError(f"choose one pooling of {POOLINGS}, got {pooling}")
  c = vae.get_config(",".join(["vanilla"] + [n for n in names if n not in POOLINGS]))
  c.model.pooling = pooling[0] if pooling else "mean"
  return c
