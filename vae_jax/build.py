"""Building a run's parts from its typed config: the model, its loss and evaluation functions,
and the `Task` the training loop trains.

Experiments, benchmarks and tests build through here, so that what a benchmark times or a test
checks is what a run trains.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from vae_jax import generation, losses
from vae_jax.data.vocab import Vocab
from vae_jax.models.cvae import CVAE
from vae_jax.models.della import Della
from vae_jax.models.transformer_lm import TransformerLM
from vae_jax.models.vae import LSTMLanguageModel, SeqVAE
from vae_jax.nn import gpt2
from vae_jax.run_config import LM_KINDS, ExperimentConfig, ModelSpec, kl_schedule
from vae_jax.training import steps

MODELS = {"vae": SeqVAE, "lm": LSTMLanguageModel, "cvae": CVAE, "della": Della,
          "transformer_lm": TransformerLM}


def build_model(spec: ModelSpec, vocab_size: int) -> nn.Module:
  """The model of `spec` for a vocabulary of `vocab_size` ids."""
  if spec.kind not in MODELS:
    raise ValueError(f"unknown model.kind {spec.kind!r}; choose one of {sorted(MODELS)}")
  return MODELS[spec.kind](spec.sized(vocab_size))


def loss_functions(cfg: ExperimentConfig, model: nn.Module, total_steps: int,
                   steps_per_epoch: int):
  """(loss_fn, eval_fn) of the model: a language model's NLL, or a VAE's loss with the
  configured KL term, KL weight schedule and bag-of-words weight."""
  if cfg.model.kind in LM_KINDS:
    return losses.make_lm_loss(model), losses.make_lm_eval(model)
  weight = kl_schedule(cfg.kl.schedule, total_steps, steps_per_epoch)
  return (losses.make_vae_loss(model, weight, cfg.kl.kind, cfg.kl.options,
                               smoothness_weight=cfg.kl.smoothness_weight,
                               bow_weight=cfg.kl.bow_weight),
          losses.make_vae_eval(model, cfg.kl.kind, cfg.kl.options))


def build_task(cfg: ExperimentConfig, model: nn.Module, vocab: Vocab, total_steps: int,
               steps_per_epoch: int) -> steps.Task:
  """The loop's Task of the run: initialisation (GPT-2 weights first where
  `model.pretrained_dir` names them), loss and evaluation functions, and prior samples (or a
  language model's samples) logged at every evaluation."""
  is_vae = cfg.model.kind not in LM_KINDS
  max_len = cfg.eval.max_decode_length

  def init_fn(rng, batch):
    params_rng, latent_rng = jax.random.split(rng)
    return model.init({"params": params_rng, "latent": latent_rng},
                      *losses.model_inputs(model, batch), deterministic=True)

  def warm_start(params):  # GPT-2 weights for the Transformer (METHODS.md §4)
    _, pretrained = gpt2.load_gpt2_params(cfg.model.pretrained_dir)
    return gpt2.merge_pretrained(params, pretrained, at="transformer")[0]

  def sample_fn(params, model_state, rng):
    variables = {"params": params, **model_state}
    n = max(cfg.eval.num_print, 1)
    if is_vae:
      ids = generation.sample_prior(model, variables, rng, n, model.code_dim, max_len)
    else:
      ids = generation.generate(model, variables, None, rng, max_length=max_len, greedy=False,
                                batch_size=n)
    return [" ".join(vocab.decode(row)) for row in np.asarray(ids)]

  loss_fn, eval_fn = loss_functions(cfg, model, total_steps, steps_per_epoch)
  # Dialogue responses need contexts: evaluation prints them (`run_evaluation`).
  return steps.Task(init_fn=init_fn, loss_fn=loss_fn, eval_fn=eval_fn,
                    summarize=losses.summarize,
                    sample_fn=None if cfg.data.dialogue else sample_fn,
                    warm_start=warm_start if cfg.model.pretrained_dir else None)
