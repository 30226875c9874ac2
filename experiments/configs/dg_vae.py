"""DG-VAE (Zhang et al. 2022, METHODS.md §2): the plain VAE of vae.py:vanilla whose
per-sentence KL is replaced by the density-gap estimate of KL(q_agg(z) || p(z)), dimension-wise,
M = 32 samples per posterior over the whole batch, its weight annealed linearly from 0 to 1
over the first 10 epochs (the paper's schedule).

  python experiments/dg_vae.py --workdir=runs/dg_vae
  python experiments/dg_vae.py --config=experiments/configs/dg_vae.py:ptb,mean_pool \
      --workdir=runs/ptb_dg_vae_mean

Variants: any of vae.py (smoke, ptb, yahoo, yelp, mean_pool, max_pool, mean_max_pool, ...),
applied before the DG-VAE settings. Evaluation reports the hole metrics of every model
(KL(p || q_agg), the dimensions whose marginal aggregate posterior matches the prior) and
Self-BLEU / Distinct / own NLL of decoded prior samples and interpolations.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import vae  # noqa: E402


def get_config(variants: str = ""):
  names = [v.strip() for v in (variants or "").split(",") if v.strip()]
  return vae.get_config(",".join(["vanilla"] + names + ["dg_vae"]))
