"""Autoencoder pretraining (Li et al. 2019): the phase's settings and the decoder reset.

Before the run, the same model is trained with beta = 0 (reconstruction only, the KL term off)
in `<workdir>/pretrain`, a run directory like any other (resumable, with its own
`config.json`); its best checkpoint by validation reconstruction then gives the run's encoder,
while the decoder starts afresh. Both steps are pure functions: `pretraining_config` (typed
configs -> the phase's configs) and `reset_decoder` (parameters -> parameters); the runner runs
the phase (`vae_jax.runner`).
"""

from __future__ import annotations

import dataclasses

import jax

from vae_jax import configs, kl_terms
from vae_jax.models.vae import encoder_param_mask
from vae_jax.run_config import ExperimentConfig, PretrainConfig

PRETRAIN_DIR = "pretrain"


def phase_steps(pretrain: PretrainConfig, run_steps: int) -> int:
  """The pretraining steps: `pretrain.steps`, or as many as the run's when it is -1."""
  return run_steps if pretrain.steps < 0 else pretrain.steps


def pretraining_config(cfg: ExperimentConfig, steps: int) -> ExperimentConfig:
  """The pretraining phase of `cfg`: the same data, model and optimiser, trained `steps` steps
  with a constant beta of 0 and the plain KL term (no free bits, no density gap), without
  aggressive training, the best checkpoint chosen by validation `rec`, no final evaluation.
  Its `record` (the phase's `config.json`) says the same in the experiment config's fields."""
  kl = dataclasses.replace(
      cfg.kl, kind="kl", options=kl_terms.PlainKL(),
      schedule=dataclasses.replace(cfg.kl.schedule, name="constant", value=0.0, start=0.0))
  train = dataclasses.replace(cfg.train, num_steps=steps, num_epochs=0.0, aggressive=None,
                              best_metric="rec")
  record = configs.with_settings(cfg.record, {
      "pretrain.steps": 0, "kl.kind": "kl", "kl.schedule": "constant", "kl.value": 0.0,
      "kl.start": 0.0, "train.num_steps": steps, "train.num_epochs": 0.0,
      "train.aggressive": False, "train.best_metric": "rec", "eval.splits": "",
      **{f"kl.options.{field}": value for field, value in kl_terms.option_defaults().items()}})
  return dataclasses.replace(
      cfg, kl=kl, train=train, optimizer=dataclasses.replace(cfg.optimizer, param_labels=None),
      pretrain=PretrainConfig(steps=0), eval=dataclasses.replace(cfg.eval, splits=()),
      record=record)


def reset_decoder(fresh, pretrained):
  """Variables whose inference network (`encoder_param_mask`) and non-parameter collections
  come from `pretrained`, the rest (the decoder) from `fresh` (Li et al. 2019 reset it)."""
  variables = dict(fresh)
  mask = encoder_param_mask(variables["params"])
  variables["params"] = jax.tree.map(lambda enc, new, old: old if enc else new, mask,
                                     variables["params"], pretrained["params"])
  for name in variables:
    if name != "params":
      variables[name] = pretrained[name]
  return variables


def with_encoder(init_fn, pretrained):
  """`init_fn` followed by `reset_decoder`: a run's initialisation from the pretrained
  encoder."""
  return lambda rng, batch: reset_decoder(init_fn(rng, batch), pretrained)
