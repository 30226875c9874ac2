"""The config boundary: an ml_collections config -> the library's typed, checked configs.

The experiment configs (experiments/configs/) are ConfigDicts. This module is the only one that
reads them: `read` turns a run's config into an `ExperimentConfig` (`vae_jax.run_config`),
frozen dataclasses of its data, model, KL, optimiser, training, pretraining and evaluation
settings, which everything below the command line (run data, building, running, evaluation,
reporting) takes. Before that
the config is checked: `resolve_paths` makes its path fields absolute, `check_config` raises a
one-line `ConfigError` naming the first bad field (`--config.model.latent_dim=-4: ...`).

A run's `config.json` stays the ConfigDict's JSON (`ExperimentConfig.record`), so a saved run
reads back through `read` (`from_json`) however old it is; fields added since default here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any, Mapping

import ml_collections

from vae_jax import errors, kl_terms, posteriors, workdir as workdir_lib
from vae_jax.data import corpora
from vae_jax.models.cvae import CVAEConfig
from vae_jax.models.della import DellaConfig
from vae_jax.models.vae import VAEConfig, param_groups
from vae_jax.nn.flows import FlowConfig
from vae_jax.nn.transformer import TransformerConfig
from vae_jax.run_config import (LM_KINDS, DataConfig, EvalConfig, ExperimentConfig, KLConfig,
                                ModelSpec, PretrainConfig, ScheduleConfig, TrainSettings,
                                kl_schedule, loop_config)
from vae_jax.training import aggressive, optim

# The vocabulary size the model section is read (and checked) with before the run's
# vocabulary exists; `ModelSpec.sized` sets the real one.
CHECK_VOCAB_SIZE = 1000


# ---------------------------------------------------------------------------------------------
# ConfigDict -> typed configs.
# ---------------------------------------------------------------------------------------------


def _fields(section: ml_collections.ConfigDict, cls, **values):
  """`cls` from the fields of `section` it has (the dataclass defaults stand for the others),
  with `values` taking precedence."""
  names = [f.name for f in dataclasses.fields(cls) if f.name in section and f.name not in values]
  return cls(**{name: section[name] for name in names}, **values)


def flow_config(cfg: ml_collections.ConfigDict) -> FlowConfig | None:
  """The flow of a posterior family that needs one (`posteriors.POSTERIORS`), else None."""
  if not posteriors.family(cfg.model.posterior).needs_flow:
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


def model_spec(cfg: ml_collections.ConfigDict) -> ModelSpec:
  readers = {"vae": model_config, "lm": model_config, "cvae": cvae_config,
             "della": della_config, "transformer_lm": transformer_config}
  kind = cfg.model.kind
  if kind not in readers:
    raise ValueError(f"unknown model.kind {kind!r}; choose one of {sorted(readers)}")
  return ModelSpec(kind=kind, config=readers[kind](cfg, CHECK_VOCAB_SIZE),
                   pretrained_dir=cfg.model.get("pretrained_dir", ""))


def kl_term_config(cfg: ml_collections.ConfigDict):
  """The options of the KL term `cfg.kl.kind` (an entry of `kl_terms.KL_TERMS`), built from
  its own fields of `cfg.kl.options`. `kl.options` holds every entry's fields
  (`kl_terms.option_defaults`), so that any of them can be set on the command line; a field of
  another entry must stay at its default, or it would be silently ignored.

  Raises:
    ConfigError: an unknown `kl.kind`, or another entry's option changed.
    ValueError: a bad option value (its message starts with the field's name), or
      `kl.smoothness_weight` > 0 without `model.smoothness_dropout`.
  """
  k = cfg.kl
  if k.smoothness_weight > 0 and cfg.model.smoothness_dropout <= 0:
    raise ValueError("kl.smoothness_weight > 0 needs model.smoothness_dropout > 0 (the token "
                     "dropout rate of the corrupted copy x~), e.g. 0.1")
  if "options" not in k:
    raise errors.ConfigError("config.kl has no options (a config written before KL terms were "
                             "chosen by kl.kind and kl.options): set both as "
                             "experiments/configs/base.py does.")
  if k.kind not in kl_terms.KL_TERMS:
    raise errors.ConfigError(f"--config.kl.kind={k.kind}: not a KL term; choose one of "
                             f"{', '.join(kl_terms.KL_TERMS)}.")
  own, defaults = kl_terms.option_fields(k.kind), kl_terms.option_defaults()
  for field, value in k.options.items():
    if field not in defaults:
      raise errors.ConfigError(f"--config.kl.options.{field}={value}: no KL term has this "
                               f"option; the options are {', '.join(defaults)}.")
    if field not in own and value != defaults[field]:
      owners = kl_terms.owners(field)
      which = "it" if len(owners) == 1 else "one of them"
      raise errors.ConfigError(
          f"--config.kl.options.{field}={value}: an option of {' and '.join(owners)}, not read "
          f"by kl.kind={k.kind}; set --config.kl.kind to {which}, or leave the option at "
          f"{defaults[field]}.")
  return kl_terms.entry(k.kind).options(**{field: k.options[field] for field in own})


def kl_config(cfg: ml_collections.ConfigDict) -> KLConfig:
  k = cfg.kl
  schedule = ScheduleConfig(
      name=k.schedule, value=k.value, start=k.start, warmup_steps=k.warmup_steps,
      warmup_epochs=k.get("warmup_epochs", 0.0), num_cycles=k.num_cycles, ratio=k.ratio,
      cycle_epochs=k.get("cycle_epochs", 2))  # 2: older runs
  return KLConfig(kind=k.kind, options=kl_term_config(cfg),
                  smoothness_weight=k.smoothness_weight, schedule=schedule,
                  bow_weight=k.get("bow_weight", 0.0))


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
                                  max_decays=o.max_decays or None,
                                  min_epochs=o.get("plateau_min_epochs", 0.0)),  # 0: older runs
      param_labels=param_groups if aggressive_config(cfg) is not None else None)


def train_settings(cfg: ml_collections.ConfigDict) -> TrainSettings:
  t = cfg.train
  return _fields(t, TrainSettings, progress_bar=t.progress_bar or False,
                 best_metric=t.best_metric or ("nll" if cfg.model.kind in LM_KINDS
                                               else "neg_elbo"),
                 aggressive=aggressive_config(cfg))


def split_names(spec: str) -> tuple[str, ...]:
  """'valid,test' -> ('valid', 'test') (the format of `eval.splits`)."""
  return tuple(s.strip() for s in spec.split(",") if s.strip())


def data_config(cfg: ml_collections.ConfigDict) -> DataConfig:
  d = cfg.data
  return _fields(d, DataConfig, dialogue=cfg.model.kind == "cvae",
                 tokenizer_dir=d.get("tokenizer_dir", "") or cfg.model.get("pretrained_dir", ""))


def eval_config(cfg: ml_collections.ConfigDict) -> EvalConfig:
  """Runs saved before a field existed get its default (no holes for dialogue runs)."""
  e = cfg.eval
  return _fields(e, EvalConfig, splits=split_names(e.splits),
                 hole_samples=e.get("hole_samples", 0 if cfg.model.kind == "cvae" else 10_000))


def read(cfg: ml_collections.ConfigDict) -> ExperimentConfig:
  """The typed config of a run: `cfg` (unchanged) with its paths resolved
  (`resolve_paths`), checked (`check_config`) and read section by section."""
  cfg = resolve_paths(copy.deepcopy(cfg))
  return ExperimentConfig(**_sections(cfg), record=cfg.to_json_best_effort(sort_keys=True))


def from_json(record: Mapping[str, Any] | str) -> ml_collections.ConfigDict:
  """The ConfigDict of a saved `config.json` (a dict, or its text)."""
  return ml_collections.ConfigDict(json.loads(record) if isinstance(record, str) else record)


def with_settings(record: str, settings: Mapping[str, Any]) -> str:
  """`record` (a config's JSON) with the dotted fields of `settings` set."""
  tree = json.loads(record)
  for name, value in settings.items():
    *sections, field = name.split(".")
    node = tree
    for section in sections:
      node = node.setdefault(section, {})
    node[field] = value
  return json.dumps(tree, sort_keys=True)


def eval_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The `--config.eval.*` overrides of a saved run's config (dotted names below `config.`,
  as `config_flags.get_override_values` gives them) as eval field -> value; an override of
  any other field is a one-line ConfigError."""
  fields = {}
  for name, value in overrides.items():
    section, _, field = name.partition(".")
    if section != "eval" or not field or "." in field:
      raise errors.ConfigError(
          f"--config.{name}: evaluation may change only the eval settings of the run's saved "
          "config (e.g. --config.eval.k_samples=50, --config.eval.splits=test); the model "
          "and data stay those the run was trained with.")
    fields[field] = value
  return fields


def with_eval_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                        data_dir: str | None = None) -> ml_collections.ConfigDict:
  """A copy of a saved run's config with `eval_overrides` applied (a field the run's `eval`
  section lacks, or a value of another type, is a one-line ConfigError) and the corpus read
  from `data_dir` when it moved since training."""
  cfg = copy.deepcopy(cfg)
  for field, value in eval_overrides(overrides).items():
    if field not in cfg.eval:
      raise errors.ConfigError(f"--config.eval.{field}={value}: the run's config has no such "
                               f"field; choose one of {', '.join(sorted(cfg.eval))}.")
    try:
      cfg.eval[field] = value
    except TypeError as e:
      raise errors.ConfigError(
          f"--config.eval.{field}={value}: {errors.one_line(str(e))}") from None
  if data_dir:
    cfg.data.dir = data_dir
  return cfg


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


def _check_values(cfg: ml_collections.ConfigDict) -> None:
  """The number ranges, choices and corpus settings `check_config` checks first."""
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


def _sections(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every section of `cfg` read into its typed config, after `_check_values`; an error of a
  section's reader becomes a ConfigError naming the field (`_named`)."""
  _check_values(cfg)
  out = {}

  def section(name: str, read):
    try:
      return read()
    except errors.UserError:
      raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      raise _named(cfg, name, e) from e

  out["data"] = section("data", lambda: data_config(cfg))
  out["model"] = section("model", lambda: model_spec(cfg))
  out["kl"] = section("kl", lambda: kl_config(cfg))
  section("kl", lambda: kl_schedule(out["kl"].schedule, 100, 10))
  out["optimizer"] = section("optimizer", lambda: optimizer_config(cfg))
  out["train"] = section("train", lambda: train_settings(cfg))
  section("train", lambda: loop_config(out["train"], out["optimizer"], 100, 10))
  out["pretrain"] = section("pretrain", lambda: _fields(cfg.get("pretrain", {}), PretrainConfig))
  out["eval"] = section("eval", lambda: eval_config(cfg))
  return out


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Checks every config value a run uses, without reading data or writing anything.

  Raises:
    ConfigError: one line naming the first bad field (`--config.x.y=value`) and what is wrong.
  """
  _sections(cfg)
