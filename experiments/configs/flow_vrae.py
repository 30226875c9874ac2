"""The flow-based variational recurrent autoencoder (METHODS.md §3).

  python experiments/flow_vrae.py --workdir=runs/flow_vrae          # embedded corpus (default)
  python experiments/flow_vrae.py --config=experiments/configs/flow_vrae.py:ptb \
      --workdir=runs/ptb_flow_vrae
  python experiments/flow_vrae.py --config=experiments/configs/flow_vrae.py:ptb,planar,no_skip ...
  python experiments/flow_vrae.py --config=experiments/configs/flow_vrae.py:yelp \
      --workdir=runs/yelp_flow_vrae && python experiments/classify.py --workdir=runs/yelp_flow_vrae

The default: the LSTM VAE of experiments/configs/vae.py (embedding 128, LSTM 256, d = 32, mean
pooling, shared embedding, 4-nat batch-level free bits, 5 epochs on the embedded corpus) with

- a flow posterior: z_K = f_x(z_0), z_0 ~ N(μ(x), σ²(x)), f_x 4 amortised IAF layers (MADE
  conditioners, 64 units, the encoder's context h(x) entering every conditioner), the KL by
  Monte Carlo from one sample per sentence;
- skip connections: z feeds the decoder's initial state, every input step and the output layer;
- amortised regularisation: λ · ‖μ(x) - μ(x̃)‖², λ = 1, x̃ with 10 % of the tokens set to UNK.

Each block is a switch (variants, applied left to right): gaussian | planar | iaf | coupling |
kl_preserving (the posterior), no_skip, no_reg, plus the data variants smoke, ptb (PTB at the
reference size: plain β = 1 objective, no pooling or free bits, so that the flow's own effect
is measured), yelp (yelp_style_transfer minus short_yelp test, for classification) and any
variant of experiments/configs/vae.py (e.g. anneal, free_bits).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from base import apply_variants  # noqa: E402
import vae as vae_configs  # noqa: E402


def gaussian(c):
  c.model.posterior = "gaussian"


def flow_kind(kind):
  def variant(c):
    c.model.posterior = "flow"
    c.model.flow.kind = kind
    c.model.flow.amortized = True
  return variant


def kl_preserving(c):
  """One global IAF applied to prior and posterior: the KL stays analytic."""
  c.model.posterior = "kl_preserving"
  c.model.flow.kind = "iaf"
  c.model.flow.amortized = False


def no_skip(c):
  c.model.latent_to_output = False


def no_reg(c):
  c.kl.smoothness_weight = 0.0
  c.model.smoothness_dropout = 0.0


def ptb(c):
  vae_configs.ptb(c)     # PTB sizes, plain β = 1 objective
  c.train.num_epochs = 30.0


VARIANTS = {**vae_configs.VARIANTS, "ptb": ptb, "gaussian": gaussian,
            "planar": flow_kind("planar"), "iaf": flow_kind("iaf"),
            "coupling": flow_kind("coupling"), "kl_preserving": kl_preserving,
            "no_skip": no_skip, "no_reg": no_reg}


def get_config(variants: str = ""):
  c = vae_configs.get_config("")
  c.model.posterior = "flow"
  c.model.flow.kind = "iaf"
  c.model.flow.num_layers = 4
  c.model.flow.hidden_dim = 64
  c.model.flow.amortized = True
  c.model.flow.context_dim = 64
  c.model.kl_samples = 1
  c.model.latent_to_output = True
  c.model.smoothness_dropout = 0.1
  c.kl.smoothness_weight = 1.0
  apply_variants(c, variants, VARIANTS)
  return c
