"""The config boundary: an ml_collections config -> the library's typed, checked objects.

The experiment configs (experiments/configs/) are ConfigDicts. This module is where they are
read, field by field, into the frozen dataclasses of the library (model, KL term, schedule,
optimiser, loop settings), and where a run's config is checked before anything is read or
written: `resolve_paths` makes its path fields absolute, `check_config` raises a one-line
`ConfigError` naming the first bad field (`--config.model.latent_dim=-4: ...`).
"""

from __future__ import annotations

import re

import ml_collections

from vae_jax import errors, losses, schedules, workdir as workdir_lib
from vae_jax.data import corpora
from vae_jax.models.cvae import CVAE, CVAEConfig
from vae_jax.models.della import Della, DellaConfig
from vae_jax.models.transformer_lm import TransformerLM
from vae_jax.models.vae import LSTMLanguageModel, SeqVAE, VAEConfig, param_groups
from vae_jax.nn.flows import FlowConfig
from vae_jax.nn.transformer import TransformerConfig
from vae_jax.training import aggressive, loop, optim


# ---------------------------------------------------------------------------------------------
# Config -> typed objects.
# ---------------------------------------------------------------------------------------------


def flow_config(cfg: ml_collections.ConfigDict) -> FlowConfig | None:
  if cfg.model.posterior == "gaussian":
    return None
  f = cfg.model.flow
  return FlowConfig(kind=f.kind, num_layers=f.num_layers, hidden_dim=f.hidden_dim,
                    amortized=f.amortized, context_dim=f.context_dim,
                    max_log_scale=f.max_log_scale)


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> VAEConfig:
  m = cfg.model
  return VAEConfig(
      vocab_size=vocab_size, embed_dim=m.embed_dim, hidden_dim=m.hidden_dim,
      encoder_hidden_dim=m.encoder_hidden_dim or None,
      latent_dim=0 if m.kind == "lm" else m.latent_dim, pooling=m.pooling,
      dropout_in=m.dropout_in, dropout_out=m.dropout_out, word_dropout=m.word_dropout,
      share_embedding=m.share_embedding, posterior=m.posterior, flow=flow_config(cfg),
      kl_samples=m.kl_samples, latent_to_output=m.latent_to_output,
      smoothness_dropout=m.smoothness_dropout, mean_batch_norm=m.get("mean_batch_norm", 0.0),
      mean_batch_norm_epsilon=m.get("mean_batch_norm_epsilon", 1e-5),
      init=m.get("init", "default"), init_scale=m.get("init_scale", 0.01),
      embed_init_scale=m.get("embed_init_scale", 0.1),
      matmul_dtype=m.get("matmul_dtype", "float32"))


def cvae_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> CVAEConfig:
  m = cfg.model
  return CVAEConfig(
      vocab_size=vocab_size, embed_dim=m.embed_dim, utterance_dim=m.utterance_dim,
      context_dim=m.context_dim, response_dim=m.encoder_hidden_dim or m.hidden_dim,
      hidden_dim=m.hidden_dim, latent_dim=m.latent_dim, prior_hidden_dim=m.prior_hidden_dim,
      bow_hidden_dim=m.bow_hidden_dim, pooling=m.pooling, dropout_in=m.dropout_in,
      dropout_out=m.dropout_out, word_dropout=m.word_dropout,
      share_embedding=m.share_embedding, posterior=m.posterior, flow=flow_config(cfg),
      kl_samples=m.kl_samples)


def transformer_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> TransformerConfig:
  t = cfg.model.transformer
  return TransformerConfig(
      vocab_size=vocab_size, num_layers=t.num_layers, num_heads=t.num_heads,
      model_dim=t.model_dim, mlp_dim=t.mlp_dim or None, max_length=t.max_length,
      embed_dropout=t.embed_dropout, attention_dropout=t.attention_dropout,
      residual_dropout=t.residual_dropout, fusion_init=t.fusion_init)


def della_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> DellaConfig:
  d = cfg.model.della
  return DellaConfig(transformer=transformer_config(cfg, vocab_size),
                     latent_dim=cfg.model.latent_dim, injection=d.injection, fusion=d.fusion,
                     fusion_rank=d.fusion_rank, layer_wise=d.layer_wise, prior=d.prior,
                     clamp=d.clamp)


LM_KINDS = ("lm", "transformer_lm")


def kl_term_config(cfg: ml_collections.ConfigDict) -> losses.KLTermConfig:
  k = cfg.kl
  if k.smoothness_weight > 0 and cfg.model.smoothness_dropout <= 0:
    raise ValueError("kl.smoothness_weight > 0 needs model.smoothness_dropout > 0 (the token "
                     "dropout rate of the corrupted copy x~), e.g. 0.1")
  return losses.KLTermConfig(free_bits=k.free_bits,
                             free_bits_per_dimension=k.free_bits_per_dimension,
                             free_bits_per_sentence=k.get("free_bits_per_sentence", False),
                             smoothness_weight=k.smoothness_weight,
                             kind=k.get("kind", "kl"),
                             density_gap_samples=k.get("density_gap_samples", 32),
                             density_gap_chunk=k.get("density_gap_chunk", 0),
                             layer_reduction=k.get("layer_reduction", "sum"),
                             layer_threshold=k.get("layer_threshold", 0.0))


def build_model(cfg: ml_collections.ConfigDict, vocab_size: int):
  builders = {
      "vae": lambda: SeqVAE(model_config(cfg, vocab_size)),
      "lm": lambda: LSTMLanguageModel(model_config(cfg, vocab_size)),
      "cvae": lambda: CVAE(cvae_config(cfg, vocab_size)),
      "della": lambda: Della(della_config(cfg, vocab_size)),
      "transformer_lm": lambda: TransformerLM(transformer_config(cfg, vocab_size)),
  }
  if cfg.model.kind not in builders:
    raise ValueError(f"unknown model.kind {cfg.model.kind!r}; choose one of {sorted(builders)}")
  return builders[cfg.model.kind]()


def aggressive_config(cfg: ml_collections.ConfigDict) -> aggressive.AggressiveConfig | None:
  t = cfg.train
  if not t.get("aggressive", False):
    return None
  if cfg.model.kind != "vae":
    raise ValueError("train.aggressive applies to VAEs (model.kind='vae')")
  return aggressive.AggressiveConfig(max_inner_steps=t.aggressive_max_inner_steps,
                               check_every=t.aggressive_check_every,
                               stop_metric=t.aggressive_stop_metric)


def optimizer_config(cfg: ml_collections.ConfigDict) -> optim.OptimizerConfig:
  """Aggressive runs keep separate encoder and decoder optimiser states (`param_groups`)."""
  o = cfg.optimizer
  return optim.OptimizerConfig(
      name=o.name, learning_rate=o.learning_rate, grad_clip_norm=o.grad_clip_norm or None,
      plateau=optim.PlateauConfig(patience=o.plateau_patience or None, factor=o.plateau_factor,
                                  max_decays=o.max_decays or None),
      param_labels=param_groups if aggressive_config(cfg) is not None else None)


def kl_schedule(cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
  k = cfg.kl
  warmup = k.warmup_steps
  if k.get("warmup_epochs", 0.0):
    warmup = int(round(k.warmup_epochs * steps_per_epoch))
  return schedules.from_name(k.schedule, total_steps=total_steps, warmup_steps=warmup,
                             value=k.value, num_cycles=k.num_cycles, ratio=k.ratio,
                             start=k.start, steps_per_epoch=steps_per_epoch,
                             cycle_epochs=k.get("cycle_epochs", 2))  # 2: older runs


def train_config(cfg: ml_collections.ConfigDict, total_steps: int,
                 steps_per_epoch: int) -> loop.TrainConfig:
  """The loop's settings; evaluation (and checkpoints) once per epoch unless set."""
  t = cfg.train
  eval_every = t.eval_every or steps_per_epoch
  return loop.TrainConfig(
      num_steps=total_steps, log_every=t.log_every, eval_every=eval_every,
      checkpoint_every=t.checkpoint_every or eval_every, seed=t.seed,
      best_metric=t.best_metric or ("nll" if cfg.model.kind in LM_KINDS else "neg_elbo"),
      progress_bar=t.progress_bar or False, optimizer=optimizer_config(cfg),
      aggressive=aggressive_config(cfg))


# ---------------------------------------------------------------------------------------------
# Checks at the boundary: paths and config values, before anything is read or written.
# ---------------------------------------------------------------------------------------------


# The config fields that hold paths; `resolve_paths` makes them absolute.
PATH_FIELDS = ("data.dir", "data.exclude_dir", "data.tokenizer_dir", "model.pretrained_dir")



def resolve_paths(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Makes every non-empty path field of `cfg` (`PATH_FIELDS`) a normal absolute path, in
  place, relative to the current directory; returns `cfg`. Idempotent, so `../data/ptb/`,
  `../data/ptb` and the absolute path are the same setting."""
  for field in PATH_FIELDS:
    section, name = field.split(".")
    if section in cfg and cfg[section].get(name):
      cfg[section][name] = workdir_lib.resolve_path(cfg[section][name])
  return cfg


# Fields that must be positive integers, and fields that must not be negative, where present.
_POSITIVE = ("data.batch_size", "data.eval_batch_size", "data.bucket_window",
             "data.pad_multiple", "data.min_count", "model.embed_dim", "model.hidden_dim",
             "eval.k_samples", "eval.batch_size", "eval.chunk_size", "eval.max_decode_length",
             "train.log_every")
_NON_NEGATIVE = ("data.max_vocab_size", "data.max_train_examples", "model.latent_dim",
                 "model.encoder_hidden_dim", "train.num_steps", "train.num_epochs",
                 "train.eval_every", "train.checkpoint_every", "eval.max_examples",
                 "eval.num_print", "eval.mi_max_examples", "eval.num_reconstructions",
                 "eval.hole_samples", "eval.num_prior_samples", "eval.num_interpolations")


def _field(cfg: ml_collections.ConfigDict, dotted: str):
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def _named(cfg: ml_collections.ConfigDict, section: str, error: Exception) -> errors.ConfigError:
  """A ConfigError naming the field of `cfg.<section>` that `error`'s message mentions first."""
  message = str(error)
  fields = []

  def collect(node, prefix):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        collect(value, f"{prefix}{key}.")
      else:
        found = re.search(rf"\b{re.escape(key)}\b", message)
        if found:
          fields.append((found.start(), -len(key), f"{prefix}{key}", value))

  collect(cfg[section], f"{section}.")
  if not fields:
    return errors.ConfigError(f"config.{section}: {message}")
  _, _, name, value = min(fields)
  return errors.ConfigError(f"--config.{name}={value}: {message}")


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Checks every config value a run uses, without reading data or writing anything.

  Raises:
    ConfigError: one line naming the first bad field (`--config.x.y=value`) and what is wrong.
  """
  for name in _POSITIVE + _NON_NEGATIVE:
    value = _field(cfg, name)
    if value is None:
      continue
    floor = 1 if name in _POSITIVE else 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < floor:
      raise errors.ConfigError(f"--config.{name}={value}: must be a number >= {floor}.")
  d = cfg.data
  if d.max_length < 2:
    raise errors.ConfigError(f"--config.data.max_length={d.max_length}: must be >= 2 (one "
                             "word plus the end-of-sentence token).")
  for name, value, choices in (("data.overlong", d.overlong, ("truncate", "drop")),
                               ("data.tokenizer", d.get("tokenizer", "word"), ("word", "gpt2"))):
    if value not in choices:
      raise errors.ConfigError(f"--config.{name}={value}: choose one of {', '.join(choices)}.")
  try:
    corpus = corpora.get_corpus(d.corpus)
  except ValueError as e:
    raise errors.ConfigError(f"--config.data.corpus={d.corpus}: {e}") from None
  if corpus.subdir is not None and not d.dir:
    raise errors.ConfigError(f"--config.data.corpus={d.corpus} is read from files: set "
                             f"--config.data.dir to its folder (../shared/data/{corpus.subdir} "
                             "in a checkout).")
  for section, build in (
      ("model", lambda: build_model(cfg, 1000)), ("kl", lambda: kl_term_config(cfg)),
      ("kl", lambda: kl_schedule(cfg, 100, 10)), ("optimizer", lambda: optimizer_config(cfg)),
      ("train", lambda: train_config(cfg, 100, 10))):
    try:
      build()
    except errors.UserError:
      raise
    except (ValueError, TypeError, KeyError) as e:
      raise _named(cfg, section, e) from e
