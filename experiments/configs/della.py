"""DELLA and the Transformer VAEs it is compared with (METHODS.md §4; Hu et al., NAACL 2022).

  python experiments/della.py --workdir=runs/ptb_della                      # DELLA on PTB
  python experiments/della.py --config=experiments/configs/della.py:ptb,lm --workdir=runs/ptb_tlm
  python experiments/della.py --config=experiments/configs/della.py:ptb,memory ...
  python experiments/della.py --config=experiments/configs/della.py:smoke --workdir=/tmp/della

`ptb` (the default) trains from scratch at a small, CPU-feasible size: a GPT-2-style Transformer
of 4 layers, 4 heads, width 256, MLP 1,024, learned positions for 96 tokens, dropout 0.1,
shared by the encoder (non-causal) and the decoder (causal); one latent of d = 32 per layer,
fused into each layer's attention values by the rank-4 low-rank tensor product; the KL of
the joint, Σ_l KL(q(z_l|z_<l,x) || p(z_l|z_<l)), under cyclical annealing (Fu et al. 2019: 4
cycles, rising for half of each); Adam 5e-4 (clip 1), batch 32, 10 epochs; IW-NLL with K = 500.

Variants, applied left to right:
- cpu: width 128 and 1 epoch, the budget of docs/results.md on a 2-core CPU.
- smoke: seconds, for tests.
- gpt2: GPT-2 small (117M) from a local checkpoint (--config.model.pretrained_dir), its BPE
  tokenizer, Adam 5e-5: for a GPU or TPU.
- The paper's comparisons, all at the same size and budget:
  - lm: the Transformer language model (no z).
  - embedding | memory | softmax: a Transformer VAE with one latent injected into the input
    embeddings, as a memory vector per layer (Optimus), or at the softmax, with prior N(0, I).
  - nofusion: DELLA with z_l added to the values instead of the low-rank fusion.
  - single: DELLA with one latent (from the last layer) fused into every layer.
- official_kl: the official code's objective, the mean of the per-layer KLs instead of their
  sum.
- official_schedule: the official code's epoch-based cyclical KL weight (`--cycle_annealing`,
  `--cycle_iters 2`): cycles of 2 epochs, beta = 1e-5 for the first epoch, a linear ramp to 1
  over the next half epoch, then 1 (schedules.della_cyclical).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))

from base import apply_variants, base_config, set_kl_term  # noqa: E402


def ptb(c):
  c.data.corpus = "ptb"
  c.data.dir = "../shared/data/ptb"
  c.data.max_length = 96
  c.data.batch_size = 32
  c.data.eval_batch_size = 32
  t = c.model.transformer
  t.num_layers, t.num_heads, t.model_dim, t.mlp_dim, t.max_length = 4, 4, 256, 1024, 96
  c.model.latent_dim = 32
  c.train.num_epochs = 10.0
  c.train.log_every = 200
  c.eval.k_samples = 500
  c.eval.batch_size = 8
  c.eval.chunk_size = 50


def cpu(c):
  """The 2-core CPU budget of docs/results.md: width 128 (MLP 512), 4 layers, 4 heads, d = 32
  per layer, 1 epoch; evaluation of the first 500 test sentences with K = 50."""
  t = c.model.transformer
  t.model_dim, t.mlp_dim = 128, 512
  c.train.num_epochs = 1.0
  c.eval.k_samples = 50
  c.eval.chunk_size = 50
  c.eval.batch_size = 16
  c.eval.max_examples = 500
  c.eval.num_prior_samples = 200
  c.eval.num_interpolations = 20
  c.eval.hole_samples = 1000


def smoke(c):
  c.data.corpus = "synthetic"
  c.data.dir = ""
  c.data.max_train_examples = 128
  c.data.batch_size = 8
  c.data.eval_batch_size = 16
  c.data.max_length = 24
  t = c.model.transformer
  t.num_layers, t.num_heads, t.model_dim, t.mlp_dim, t.max_length = 2, 2, 16, 32, 24
  c.model.latent_dim = 4
  c.train.num_steps = 8
  c.train.num_epochs = 0
  c.train.log_every = 4
  c.train.eval_every = 4
  c.train.progress_bar = False
  c.eval.k_samples = 8
  c.eval.batch_size = 8
  c.eval.chunk_size = 8
  c.eval.max_examples = 16
  c.eval.splits = "test"
  c.eval.num_print = 2
  c.eval.max_decode_length = 12
  c.eval.mi_max_examples = 16
  c.eval.hole_samples = 64
  c.eval.num_prior_samples = 8
  c.eval.num_interpolations = 0


def gpt2(c):
  """GPT-2 small (117M; Hu et al.'s starting point) from a local Hugging Face checkpoint
  directory holding config.json, model.safetensors, vocab.json and merges.txt:
  --config.model.pretrained_dir=/path/to/gpt2. Sentences are GPT-2 BPE ids (at most 128);
  the fusion factors start from N(0, 0.02²) like the rest of the official model; Adam 5e-5,
  batch 32. Sized for a GPU or TPU."""
  c.data.tokenizer = "gpt2"
  c.data.max_length = 128
  t = c.model.transformer
  t.num_layers, t.num_heads, t.model_dim, t.mlp_dim, t.max_length = 12, 12, 768, 3072, 1024
  t.fusion_init = "normal"
  c.optimizer.learning_rate = 5e-5
  c.eval.batch_size = 4
  c.eval.chunk_size = 25


def lm(c):
  c.model.kind = "transformer_lm"


def _single(c, injection: str, prior: str):
  c.model.della.layer_wise = False
  c.model.della.injection = injection
  c.model.della.prior = prior


def embedding(c):
  _single(c, "embedding", "standard")


def memory(c):
  _single(c, "memory", "standard")


def softmax(c):
  _single(c, "softmax", "standard")


def nofusion(c):
  c.model.della.fusion = "add"


def single(c):
  _single(c, "fusion", "chain")


def official_kl(c):
  c.kl.options.reduction = "mean"


def official_schedule(c):
  c.kl.schedule = "della_cyclical"
  c.kl.cycle_epochs = 2
  c.kl.start = 1e-5
  c.kl.value = 1.0


VARIANTS = {f.__name__: f for f in (ptb, cpu, smoke, gpt2, lm, embedding, memory, softmax, nofusion,
                                    single, official_kl, official_schedule)}


def get_config(variants: str = ""):
  c = base_config()
  c.model.kind = "della"
  c.model.transformer = ml_collections.ConfigDict(dict(
      num_layers=4, num_heads=4, model_dim=256, mlp_dim=0, max_length=128, embed_dropout=0.1,
      attention_dropout=0.1, residual_dropout=0.1, fusion_init="torch_linear"))
  c.model.della = ml_collections.ConfigDict(dict(
      injection="fusion", fusion="low_rank", fusion_rank=4, layer_wise=True, prior="chain",
      clamp=5.0))
  c.kl.schedule = "cyclical"
  c.kl.num_cycles = 4
  c.kl.ratio = 0.5
  # The KL of the joint, Σ_l KL_l; the hinge's per-sentence, per-layer threshold is 0, and the
  # layers are summed (the official code: their mean, `official_kl`).
  set_kl_term(c, "layer_hinge", threshold=0.0, reduction="sum")
  c.optimizer.learning_rate = 5e-4
  c.optimizer.grad_clip_norm = 1.0
  c.eval.splits = "test"
  ptb(c)
  apply_variants(c, variants, VARIANTS)
  return c
