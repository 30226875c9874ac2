"""The typed configs of a run, and the library objects they give once the data are known.

`vae_jax.configs.read` turns an experiment's ConfigDict into an `ExperimentConfig`: frozen
dataclasses of its data, model, KL, optimiser, training, pretraining and evaluation settings,
which the run's data, building, running, evaluation and reporting take. The functions here are
pure functions of them: the KL weight's schedule, the number of steps and the loop's
`TrainConfig`, once the steps per epoch are known.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vae_jax import kl_terms, schedules
from vae_jax.models.cvae import CVAEConfig
from vae_jax.models.della import DellaConfig
from vae_jax.models.vae import VAEConfig
from vae_jax.nn.transformer import TransformerConfig
from vae_jax.training import loop, optim
from vae_jax.training.aggressive import AggressiveConfig

LM_KINDS = ("lm", "transformer_lm")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The corpus, its splits, the vocabulary and the batches (the `data` section).

  `dialogue` says that examples are (context, response) pairs (model.kind 'cvae');
  `tokenizer_dir` is GPT-2's tokenizer folder (`data.tokenizer_dir`, else
  `model.pretrained_dir`).
  """
  corpus: str = "synthetic"      # a name of vae_jax.data.corpora.CORPORA
  dir: str = ""                  # its folder (absolute); unused for the embedded corpus
  train_split: str = "train"     # 'a+b' concatenates splits
  valid_split: str = "valid"
  max_vocab_size: int = 0        # 0: no cap
  min_count: int = 1
  max_length: int = 100          # tokens with EOS; longer sentences follow `overlong`
  overlong: str = "truncate"     # or 'drop'
  batch_size: int = 32           # global, over every device and process
  eval_batch_size: int = 64      # the loop's validation batches
  bucket_window: int = 100       # batches per length-sorting window
  pad_multiple: int = 8          # batch widths are multiples of it
  max_train_examples: int = 0    # 0: all
  exclude: str = ""              # 'corpus:split' whose sentences training never sees
  exclude_dir: str = ""          # that corpus's folder
  tokenizer: str = "word"        # or 'gpt2' (BPE)
  tokenizer_dir: str = ""        # GPT-2's vocab.json and merges.txt
  synthetic_seed: int = 0        # the embedded corpus's sentences
  dialogue: bool = False         # (context, response) pairs; the fields below apply to them
  context_window: int = 10       # utterances of context
  max_context_length: int = 40   # tokens per context utterance
  lowercase: bool = False


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The model section: its kind, the model's config (read for `CHECK_VOCAB_SIZE` words;
  `sized` gives it for the run's vocabulary) and GPT-2 weights to start from."""
  kind: str = "vae"
  config: VAEConfig | CVAEConfig | DellaConfig | TransformerConfig | None = None
  pretrained_dir: str = ""

  def sized(self, vocab_size: int):
    """The model's config for a vocabulary of `vocab_size` ids."""
    if isinstance(self.config, DellaConfig):
      return dataclasses.replace(self.config, transformer=dataclasses.replace(
          self.config.transformer, vocab_size=vocab_size))
    return dataclasses.replace(self.config, vocab_size=vocab_size)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The KL weight schedule (`schedules.from_name`); `warmup_epochs` > 0 replaces
  `warmup_steps` once the steps per epoch are known."""
  name: str = "constant"         # constant | linear | sigmoid | cyclical | della_cyclical
  value: float = 1.0             # the final (or constant) weight
  start: float = 0.0             # the first weight of a ramp
  warmup_steps: int = 0          # linear / sigmoid
  warmup_epochs: float = 0.0
  num_cycles: int = 4            # cyclical
  ratio: float = 0.5             # cyclical: the rising fraction of a cycle
  cycle_epochs: int = 2          # della_cyclical: epochs per cycle


@dataclasses.dataclass(frozen=True)
class KLConfig:
  """How the KL enters the loss (the `kl` section): the term `kind` (an entry of
  `kl_terms.KL_TERMS`) with its `options`, its weight's schedule, and the weights of the
  amortised regulariser and of the dialogue CVAE's bag of words."""
  kind: str = "kl"
  options: Any = kl_terms.PlainKL()
  smoothness_weight: float = 0.0
  schedule: ScheduleConfig = ScheduleConfig()
  bow_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The run's training settings (the `train` section); `loop_config` turns them into the
  loop's `TrainConfig` once the steps per epoch are known."""
  seed: int = 0                  # initialisation, the data order, every step's randomness
  num_epochs: float = 10.0       # used when num_steps is 0
  num_steps: int = 0
  log_every: int = 100
  eval_every: int = 0            # 0: once per epoch
  checkpoint_every: int = 0      # 0: at every evaluation
  best_metric: str = "neg_elbo"  # the validation metric of the best checkpoint (lower wins)
  progress_bar: bool = False
  aggressive: AggressiveConfig | None = None  # He et al. 2019; None: off
  reload_best_on_decay: bool = False  # a plateau decay continues from the best parameters


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Autoencoder pretraining (Li et al. 2019) before the run: `steps` steps, -1 as many as
  the run, 0 none (`vae_jax.pretraining`)."""
  steps: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The final evaluation (the `eval` section): `splits` are evaluated with the best
  checkpoint; the dialogue fields (`num_response_samples`, `beam_size`,
  `probe_train_examples`) apply to the dialogue CVAE."""
  k_samples: int = 500           # importance samples of the IW-NLL
  batch_size: int = 16           # sentences per batch (global)
  chunk_size: int = 32           # samples decoded at once
  max_examples: int = 0          # the first examples of a split; 0: all
  splits: tuple[str, ...] = ("valid", "test")
  num_reconstructions: int = 1000  # first sentences reconstructed greedily (BLEU)
  num_print: int = 5             # examples shown
  max_decode_length: int = 40
  mi_max_examples: int = 1000    # flow posteriors: the MI's random subset; 0: all
  hole_samples: int = 10_000     # prior samples of the hole estimate
  num_prior_samples: int = 1000  # decoded prior samples (Self-BLEU, Distinct, NLL)
  num_interpolations: int = 100  # sentence pairs interpolated
  interpolation_steps: int = 10
  num_response_samples: int = 10  # dialogue: sampled responses per context
  beam_size: int = 5             # dialogue: beam search's width
  probe_train_examples: int = 0  # dialogue: training pairs of the act / emotion probes


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A run's typed config. `record` is the ConfigDict it was read from, as JSON with its
  paths resolved: what the run saves as `config.json`."""
  data: DataConfig = DataConfig()
  model: ModelSpec = ModelSpec()
  kl: KLConfig = KLConfig()
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  train: TrainSettings = TrainSettings()
  pretrain: PretrainConfig = PretrainConfig()
  eval: EvalConfig = EvalConfig()
  record: str = "{}"



# The library objects of a run's settings.


def kl_schedule(schedule: ScheduleConfig, total_steps: int, steps_per_epoch: int):
  """The KL weight as an optax schedule of the step."""
  warmup = schedule.warmup_steps
  if schedule.warmup_epochs:
    warmup = int(round(schedule.warmup_epochs * steps_per_epoch))
  return schedules.from_name(schedule.name, total_steps=total_steps, warmup_steps=warmup,
                             value=schedule.value, num_cycles=schedule.num_cycles,
                             ratio=schedule.ratio, start=schedule.start,
                             steps_per_epoch=steps_per_epoch,
                             cycle_epochs=schedule.cycle_epochs)


def total_steps(train: TrainSettings, steps_per_epoch: int) -> int:
  """`num_steps`, or `num_epochs` of `steps_per_epoch` when it is 0."""
  return train.num_steps or int(math.ceil(train.num_epochs * steps_per_epoch))


def loop_config(train: TrainSettings, optimizer: optim.OptimizerConfig, num_steps: int,
                steps_per_epoch: int) -> loop.TrainConfig:
  """The loop's settings; evaluation (and checkpoints) once per epoch unless set."""
  eval_every = train.eval_every or steps_per_epoch
  return loop.TrainConfig(
      num_steps=num_steps, log_every=train.log_every, eval_every=eval_every,
      checkpoint_every=train.checkpoint_every or eval_every, seed=train.seed,
      best_metric=train.best_metric, progress_bar=train.progress_bar, optimizer=optimizer,
      aggressive=train.aggressive, reload_best_on_decay=train.reload_best_on_decay,
      plateau_start_step=int(math.ceil(optimizer.plateau.min_epochs * steps_per_epoch)))
