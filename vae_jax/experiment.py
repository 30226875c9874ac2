"""The config boundary: an ml_collections config -> typed objects -> data, model, loop, report.

Every `experiments/*.py` main is a few lines around `run` (train, then evaluate the best
checkpoint) or `evaluate_workdir` (evaluate a finished run). Below this module nothing sees a
ConfigDict: it is read here once, field by field, into the frozen dataclasses of the library.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging as pylogging
import math
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from vae_jax import dialogue_evaluation, evaluation, losses, probe, schedules
from vae_jax.data import bpe, corpora, dialogue, pipeline, synthetic
from vae_jax.data.vocab import Vocab, VocabMismatchError
from vae_jax.models.cvae import CVAE, CVAEConfig
from vae_jax.models.della import Della, DellaConfig
from vae_jax.models.transformer_lm import TransformerLM
from vae_jax.models.vae import (LSTMLanguageModel, SeqVAE, VAEConfig, encoder_param_mask,
                                param_groups)
from vae_jax.nn import gpt2
from vae_jax.nn.flows import FlowConfig
from vae_jax.nn.transformer import TransformerConfig
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import loop, mesh as mesh_lib, optim

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


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
      mean_batch_norm_epsilon=m.get("mean_batch_norm_epsilon", 1e-5))


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


def is_dialogue(cfg: ml_collections.ConfigDict) -> bool:
  """Dialogue runs (model.kind 'cvae') read (context, response) pairs instead of sentences."""
  return cfg.model.kind == "cvae"


def kl_term_config(cfg: ml_collections.ConfigDict) -> losses.KLTermConfig:
  k = cfg.kl
  if k.smoothness_weight > 0 and cfg.model.smoothness_dropout <= 0:
    raise ValueError("kl.smoothness_weight > 0 needs model.smoothness_dropout > 0 (the token "
                     "dropout rate of the corrupted copy x~), e.g. 0.1")
  return losses.KLTermConfig(free_bits=k.free_bits,
                             free_bits_per_dimension=k.free_bits_per_dimension,
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


def aggressive_config(cfg: ml_collections.ConfigDict) -> loop.AggressiveConfig | None:
  t = cfg.train
  if not t.get("aggressive", False):
    return None
  if cfg.model.kind != "vae":
    raise ValueError("train.aggressive applies to VAEs (model.kind='vae')")
  return loop.AggressiveConfig(max_inner_steps=t.aggressive_max_inner_steps,
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
                             start=k.start)


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def load_examples(cfg: ml_collections.ConfigDict, split: str):
  """The examples of `split`; 'a+b' concatenates splits (e.g. 'valid+test')."""
  d = cfg.data
  examples = []
  for part in split.split("+"):
    if d.corpus == "synthetic":
      examples += synthetic.generate(part, seed=d.get("synthetic_seed", 0))
    else:
      examples += corpora.load_split(d.corpus, part, d.dir or None)
  return examples


def load_train_examples(cfg: ml_collections.ConfigDict):
  """The training examples, minus any sentence of `data.exclude` ('corpus:split'), e.g. the
  test set of a downstream task that must stay unseen. Returns (examples, number removed)."""
  examples = _cap(load_examples(cfg, cfg.data.train_split), cfg.data.max_train_examples)
  if not cfg.data.exclude:
    return examples, 0
  corpus, _, split = cfg.data.exclude.partition(":")
  if not split:
    raise ValueError(f"data.exclude must be 'corpus:split', got {cfg.data.exclude!r}")
  held_out = {ex.tokens for ex in corpora.load_split(corpus, split, cfg.data.exclude_dir or None)}
  kept = [ex for ex in examples if ex.tokens not in held_out]
  logging.info("removed %d of %d training sentences that also occur in %s",
               len(examples) - len(kept), len(examples), cfg.data.exclude)
  return kept, len(examples) - len(kept)


def load_vocab(cfg: ml_collections.ConfigDict, token_lists, workdir: str) -> Vocab:
  """Builds the vocabulary from the training split's token lists (or reads GPT-2's tokenizer
  from `data.tokenizer_dir` when `data.tokenizer` is 'gpt2'); checks it against the workdir's
  copy."""
  if cfg.data.get("tokenizer", "word") == "gpt2":
    directory = cfg.data.tokenizer_dir or cfg.model.get("pretrained_dir")
    if not directory:
      raise ValueError("data.tokenizer='gpt2' needs the directory of GPT-2's vocab.json and "
                       "merges.txt: set data.tokenizer_dir or model.pretrained_dir")
    vocab = bpe.BPEVocab.from_dir(directory)
  else:
    vocab = Vocab.build(token_lists,
                        max_size=cfg.data.max_vocab_size or None, min_count=cfg.data.min_count)
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(path):
    saved = bpe.load_vocabulary(path)
    try:
      saved.assert_compatible(vocab)
    except VocabMismatchError as e:
      raise VocabMismatchError(
          f"{e}\nThe vocabulary built from the training data now differs from {path}, "
          "which the checkpoints in this workdir were trained with. Use the same data and "
          "vocabulary settings, or a fresh --workdir.") from None
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    vocab.save(path)
  return vocab


def load_pairs(cfg: ml_collections.ConfigDict, split: str) -> list[dialogue.DialoguePair]:
  """The (context, response) pairs of `split` ('a+b' concatenates splits)."""
  d = cfg.data
  return [p for part in split.split("+")
          for p in dialogue.load_pairs(part, d.dir or None, d.context_window,
                                       lowercase=d.lowercase)]


def encoder(cfg: ml_collections.ConfigDict, vocab: Vocab):
  """examples (sentences or dialogue pairs) -> the encoded, batchable data."""
  d = cfg.data
  if is_dialogue(cfg):
    return lambda pairs: dialogue.encode_pairs(
        pairs, vocab, context_window=d.context_window, max_length=d.max_length,
        max_context_length=d.max_context_length, overlong=d.overlong,
        pad_context_to_max=True, pad_multiple=d.pad_multiple)
  return lambda ex: pipeline.encode(ex, vocab, d.max_length, d.overlong)


def load_split_examples(cfg: ml_collections.ConfigDict, split: str):
  return load_pairs(cfg, split) if is_dialogue(cfg) else load_examples(cfg, split)


def eval_iterator(cfg, data, batch_size: int):
  return pipeline.EvalIterator(data, batch_size, sort_by_length=True,
                               pad_multiple=cfg.data.pad_multiple,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())


def _cap(examples, n: int):
  return examples[:n] if n else examples


# ---------------------------------------------------------------------------------------------
# The task the loop trains.
# ---------------------------------------------------------------------------------------------


def build_task(cfg, model, vocab: Vocab, total_steps: int, steps_per_epoch: int) -> loop.Task:
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
      ids = evaluation.sample_prior(model, variables, rng, n, evaluation.code_dim(model),
                                    max_len)
    else:
      ids = evaluation.generate(model, variables, None, rng, max_length=max_len, greedy=False,
                                batch_size=n)
    return [" ".join(vocab.decode(row)) for row in np.asarray(ids)]

  if is_vae:
    loss_fn = losses.make_vae_loss(model, kl_schedule(cfg, total_steps, steps_per_epoch),
                                   kl_term_config(cfg), bow_weight=cfg.kl.get("bow_weight", 0.0))
    eval_fn = losses.make_vae_eval(model)
  else:
    loss_fn, eval_fn = losses.make_lm_loss(model), losses.make_lm_eval(model)
  # Dialogue responses need contexts: evaluation prints them (`evaluate_workdir`).
  return loop.Task(init_fn=init_fn, loss_fn=loss_fn, eval_fn=eval_fn,
                   summarize=losses.summarize,
                   sample_fn=None if is_dialogue(cfg) else sample_fn,
                   warm_start=warm_start if cfg.model.get("pretrained_dir") else None)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def _save_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json once; a resumed run must keep the model and data settings."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(cfg.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for section in ("model", "data"):
      if saved.get(section) != current.get(section):
        raise ValueError(
            f"the {section} settings differ from those this workdir was trained with "
            f"({path}); resume with the same settings or use a fresh --workdir.")
    return
  if jax.process_index() == 0:
    # Via a temporary file: the other processes of a multi-process run may read it meanwhile.
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


class _DropLibraryInfo(pylogging.Filter):
  """Keeps checkpointing libraries' INFO chatter out of the experiment's log."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  logger = pylogging.getLogger("absl")
  if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
    logger.addFilter(_DropLibraryInfo())


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the configured model in `workdir` (resuming if possible), then evaluates the best
  checkpoint on `cfg.eval.splits`, writing `eval_<split>.json`; returns those metrics."""
  quiet_library_logs()
  os.makedirs(workdir, exist_ok=True)
  _save_config(cfg, workdir)
  if is_dialogue(cfg):
    train_examples = _cap(load_pairs(cfg, cfg.data.train_split), cfg.data.max_train_examples)
    vocab = load_vocab(cfg, dialogue.vocabulary_tokens(train_examples), workdir)
  else:
    train_examples, n_removed = load_train_examples(cfg)
    if cfg.data.exclude and jax.process_index() == 0:
      with open(os.path.join(workdir, "data_filter.json"), "w") as f:
        json.dump({"exclude": cfg.data.exclude, "removed": n_removed,
                   "kept": len(train_examples)}, f, indent=2)
    vocab = load_vocab(cfg, (ex.tokens for ex in train_examples), workdir)
  encode = encoder(cfg, vocab)
  train = encode(train_examples)
  valid = encode(_cap(load_split_examples(cfg, cfg.data.valid_split), cfg.eval.max_examples))
  logging.info("vocabulary %d; train %s; valid %s", len(vocab), train.summary(),
               valid.summary())

  train_iter = pipeline.TrainIterator(
      train, cfg.data.batch_size, seed=cfg.train.seed, bucket_window=cfg.data.bucket_window,
      pad_multiple=cfg.data.pad_multiple, process_index=jax.process_index(),
      process_count=jax.process_count())
  rows = pipeline.process_rows(cfg.data.batch_size, jax.process_index(), jax.process_count())
  logging.info("process %d of %d reads rows [%d, %d) of every global batch of %d",
               jax.process_index(), jax.process_count(), rows.start, rows.stop,
               cfg.data.batch_size)
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = cfg.train.num_steps or int(math.ceil(cfg.train.num_epochs * steps_per_epoch))
  eval_every = cfg.train.eval_every or steps_per_epoch
  model = build_model(cfg, len(vocab))
  task = build_task(cfg, model, vocab, total_steps, steps_per_epoch)
  mesh = mesh_lib.make_mesh()
  if cfg.get("pretrain") and cfg.pretrain.steps:
    pre_steps = total_steps if cfg.pretrain.steps < 0 else cfg.pretrain.steps
    pretrained = _pretrain_autoencoder(cfg, workdir, vocab, mesh, train_iter, pre_steps)
    task = dataclasses.replace(task, init_fn=_with_encoder(task.init_fn, pretrained))
  aggressive = aggressive_config(cfg)
  encoder_iter = None
  if aggressive is not None:
    # The inner steps' batches: the same data in an independent order (He et al. draw them at
    # random from the training set).
    encoder_iter = pipeline.TrainIterator(
        train, cfg.data.batch_size, seed=cfg.train.seed + 1,
        bucket_window=cfg.data.bucket_window, pad_multiple=cfg.data.pad_multiple,
        process_index=jax.process_index(), process_count=jax.process_count())
  train_cfg = loop.TrainConfig(
      num_steps=total_steps, log_every=cfg.train.log_every, eval_every=eval_every,
      checkpoint_every=cfg.train.checkpoint_every or eval_every, seed=cfg.train.seed,
      best_metric=cfg.train.best_metric or (
          "nll" if cfg.model.kind in LM_KINDS else "neg_elbo"),
      progress_bar=cfg.train.progress_bar or False,
      optimizer=optimizer_config(cfg), aggressive=aggressive)
  logging.info("training %s for %d steps (%d per epoch) on %d devices", cfg.model.kind,
               total_steps, steps_per_epoch, mesh.size)
  loop.train_and_evaluate(
      task, train_iter,
      {"valid": lambda: eval_iterator(cfg, valid, cfg.data.eval_batch_size)},
      train_cfg, workdir, vocab.fingerprint, mesh=mesh, encoder_iter=encoder_iter)
  return evaluate_workdir(cfg, workdir, splits=_splits(cfg), vocab=vocab, model=model,
                          task=task)


PRETRAIN_DIR = "pretrain"


def _pretrain_autoencoder(cfg, workdir: str, vocab: Vocab, mesh, train_iter, steps: int):
  """Autoencoder pretraining (Li et al. 2019): the same model trained `steps` steps
  with beta = 0 (reconstruction only, no KL term), in `<workdir>/pretrain` (resumable like any
  run). Returns the variables of its best checkpoint (lowest validation reconstruction)."""
  pre = copy.deepcopy(cfg)
  with pre.unlocked():
    pre.pretrain.steps = 0
    pre.kl.kind = "kl"
    pre.kl.schedule, pre.kl.value, pre.kl.start = "constant", 0.0, 0.0
    pre.kl.free_bits = 0.0
    pre.train.num_steps, pre.train.num_epochs = steps, 0.0
    pre.train.aggressive = False
    pre.train.best_metric = "rec"
    pre.eval.splits = ""
  pre_dir = os.path.join(workdir, PRETRAIN_DIR)
  logging.info("autoencoder pretraining for %d steps in %s", steps, pre_dir)
  run(pre, pre_dir)
  pre_model = build_model(pre, len(vocab))
  pre_task = build_task(pre, pre_model, vocab, 1, 1)
  position = train_iter.state()
  example = next(train_iter)
  train_iter.restore(position)
  variables, _ = restore_variables(pre, pre_dir, pre_task, example, vocab, mesh, "best")
  return jax.device_get(variables)


def _with_encoder(init_fn, pretrained):
  """`init_fn` whose inference network (`encoder_param_mask`) and non-parameter collections
  come from `pretrained`; the decoder is freshly initialised (Li et al. 2019 reset it)."""

  def init(rng, batch):
    variables = dict(init_fn(rng, batch))
    mask = encoder_param_mask(variables["params"])
    variables["params"] = jax.tree.map(lambda enc, new, old: old if enc else new, mask,
                                       variables["params"], pretrained["params"])
    for name in variables:
      if name != "params":
        variables[name] = pretrained[name]
    return variables

  return init


def generation_kwargs(cfg) -> dict[str, int]:
  """The hole and generation settings of `evaluation.evaluate_vae` (defaults for runs saved
  before these fields existed)."""
  e = cfg.eval
  return dict(hole_samples=e.get("hole_samples", 10_000),
              num_prior_samples=e.get("num_prior_samples", 1000),
              num_interpolations=e.get("num_interpolations", 100),
              interpolation_steps=e.get("interpolation_steps", 10),
              max_decode_length=e.max_decode_length)


def _splits(cfg) -> list[str]:
  return [s.strip() for s in cfg.eval.splits.split(",") if s.strip()]


def restore_variables(cfg, workdir: str, task: loop.Task, example_batch, vocab: Vocab,
                      mesh, which: str = "best"):
  """Model variables of the best (or latest) checkpoint of a run, and its metadata."""
  target = loop.abstract_train_state(task, optimizer_config(cfg), example_batch, mesh)
  restore = checkpoint_lib.restore_best if which == "best" else checkpoint_lib.restore_latest
  state, meta = restore(workdir, target, vocab_fingerprint=vocab.fingerprint)
  return {"params": state.params, **state.model_state}, meta


def evaluate_workdir(cfg, workdir: str, splits: list[str], *, vocab: Vocab | None = None,
                     model=None, task=None, which: str = "best",
                     seed: int = 0) -> dict[str, Any]:
  """Evaluates a run's best checkpoint on `splits`; writes `<workdir>/eval_<split>.json`."""
  quiet_library_logs()
  if vocab is None:
    vocab = bpe.load_vocabulary(os.path.join(workdir, VOCAB_FILE))
  if model is None:
    model = build_model(cfg, len(vocab))
  if task is None:
    task = build_task(cfg, model, vocab, 1, 1)
  encode = encoder(cfg, vocab)
  results = {}
  variables = None
  mesh = mesh_lib.make_mesh()
  for split in splits:
    data = encode(_cap(load_split_examples(cfg, split), cfg.eval.max_examples))
    batches = eval_iterator(cfg, data, cfg.eval.batch_size)
    if variables is None:
      variables, meta = restore_variables(cfg, workdir, task, next(iter(batches)), vocab,
                                          mesh, which)
      step = int(meta.get("step", -1)) if isinstance(meta, dict) else -1
    global_batches = (mesh_lib.to_global(b, mesh) for b in batches)
    rng = jax.random.PRNGKey(seed)
    if is_dialogue(cfg):
      out, examples = _evaluate_dialogue(cfg, model, variables, vocab, data, global_batches,
                                         rng)
    elif cfg.model.kind in LM_KINDS:
      out = evaluation.evaluate_lm(model, variables, global_batches, rng)
    else:
      out = evaluation.evaluate_vae(model, variables, global_batches, rng,
                                    k_samples=cfg.eval.k_samples,
                                    chunk_size=cfg.eval.chunk_size,
                                    mi_max_examples=cfg.eval.mi_max_examples,
                                    **generation_kwargs(cfg))
    reconstructions = None
    if cfg.model.kind not in LM_KINDS and not is_dialogue(cfg):
      scores, reconstructions = evaluation.reconstruction_metrics(
          model, variables, reconstruction_batches(cfg, data), rng)
      out.update(scores)
    out.update(split=split, checkpoint=which, step=step)
    results[split] = out
    if not is_dialogue(cfg):
      examples = _show_examples(cfg, model, variables, vocab, data, rng, reconstructions)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
        json.dump({**out, "examples": examples}, f, indent=2)
      print(examples_text(split, examples))
  if results and jax.process_index() == 0:
    print(metrics_table(results))
  return results


def _evaluate_dialogue(cfg, model, variables, vocab: Vocab, data, batches, rng):
  """`dialogue_evaluation.evaluate_cvae` on a split, the act/emotion probes, and the first
  `eval.num_print` contexts with their reference, sampled, greedy and beam responses."""
  e = cfg.eval
  eval_rng, probe_rng = jax.random.split(rng)
  out, responses = dialogue_evaluation.evaluate_cvae(
      model, variables, batches, eval_rng, k_samples=e.k_samples, chunk_size=e.chunk_size,
      mi_max_examples=e.mi_max_examples, hole_samples=e.get("hole_samples", 0),
      num_response_samples=e.num_response_samples, max_decode_length=e.max_decode_length,
      beam_size=e.beam_size)
  if e.probe_train_examples:
    out.update(_dialogue_probe(cfg, model, variables, vocab, data, probe_rng))
  text = lambda ids: " ".join(vocab.decode(ids))
  order = eval_iterator(cfg, data, e.batch_size).order
  order = order[order >= 0]  # responses come in the iterator's order
  rows = np.argsort(order)[:e.num_print]  # the first pairs of the split
  examples = []
  for r in rows:
    i = int(order[r])
    context = [text(data.contexts[j]) for j in range(
        data.context_start[i], data.context_start[i] + data.context_count[i])]
    examples.append({
        "context": context, "reference": text(responses["references"][r]),
        "samples": [text(h) for h in responses["samples"][r]],
        "greedy": text(responses["greedy"][r]),
        **({"beam": text(responses["beam"][r])} if responses["beam"] else {})})
  return out, {"dialogue": examples}


def _dialogue_features(cfg, model, variables, data, rng) -> np.ndarray:
  """`dialogue_evaluation.probe_features` of every pair of `data`, row i = pair i."""
  feature_fn = lambda tokens, context, speakers, i: dialogue_evaluation.probe_features(
      model, variables, tokens, context, speakers, jax.random.fold_in(rng, i))
  return probe.feature_matrix(data, feature_fn, cfg.eval.batch_size, cfg.data.pad_multiple,
                              keys=CVAE.input_keys)


def _dialogue_probe(cfg, model, variables, vocab: Vocab, test, rng) -> dict[str, float]:
  """Linear probes of the response's dialogue act and emotion from E_q[z|x,c] (the context
  vector for seq2seq): fitted on the first `eval.probe_train_examples` training pairs, scored
  on `test`; with the majority-class accuracy of the test set for reference."""
  train_pairs = load_pairs(cfg, cfg.data.train_split)[:cfg.eval.probe_train_examples]
  train = encoder(cfg, vocab)(train_pairs)
  train_rng, test_rng = jax.random.split(rng)
  train_x = _dialogue_features(cfg, model, variables, train, train_rng)
  test_x = _dialogue_features(cfg, model, variables, test, test_rng)
  out = {}
  for name, k in (("act", 4), ("emotion", 7)):
    train_y, test_y = getattr(train, name + "s"), getattr(test, name + "s")
    scores = probe.probe_accuracy(train_x, train_y, test_x, test_y, k)
    out[f"{name}_accuracy"] = scores["accuracy"]
    out[f"{name}_majority"] = float(np.bincount(test_y, minlength=k).max() / len(test_y))
  return out


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (its `config.json`); a clear error if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: the workdir must be a directory written by an "
                            "experiments/*.py run.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, which: str = "best"):
  """A finished run, for downstream use: (config, model, variables, vocab).

  The config is the run's saved `config.json`; the variables those of its best (or latest)
  checkpoint, restored on this process's devices.
  """
  cfg = saved_config(workdir)
  vocab = bpe.load_vocabulary(os.path.join(workdir, VOCAB_FILE))
  model = build_model(cfg, len(vocab))
  task = build_task(cfg, model, vocab, 1, 1)
  b = cfg.data.eval_batch_size
  example = {"tokens": np.full((b, cfg.data.pad_multiple), 4, np.int32),
             "weights": np.ones((b,), np.float32)}
  if is_dialogue(cfg):
    example["context"] = np.full((b, cfg.data.context_window, cfg.data.pad_multiple), 4,
                                 np.int32)
    example["context_speakers"] = np.zeros((b, cfg.data.context_window), np.int32)
  variables, _ = restore_variables(cfg, workdir, task, example, vocab, mesh_lib.make_mesh(),
                                   which)
  return cfg, model, variables, vocab


def reconstruction_batches(cfg, data) -> Iterator[np.ndarray]:
  """Token batches of the first `eval.num_reconstructions` sentences of `data` (0: none), in
  order, all padded to one width (one compiled decoding program for every full batch)."""
  n = min(cfg.eval.get("num_reconstructions", 1000), len(data))
  if n == 0:
    return
  width = pipeline.round_up(int(data.lengths[:n].max()), cfg.data.pad_multiple)
  b = cfg.eval.batch_size
  for start in range(0, n, b):
    yield pipeline.make_batch(data, np.arange(start, min(start + b, n)), width)["tokens"]


def _show_examples(cfg, model, variables, vocab: Vocab, data, rng,
                   reconstructions: list[list[int]] | None = None) -> dict[str, list]:
  """A few reconstructions (greedy from the posterior mean; the first of `reconstructions`
  when they are given, as `reconstruction_batches` orders them) and prior samples."""
  n = min(cfg.eval.num_print, len(data))
  if n == 0:
    return {}
  max_len = cfg.eval.max_decode_length
  rows = pipeline.make_batch(data, np.arange(n), pipeline.round_up(
      int(data.lengths[:n].max()), cfg.data.pad_multiple))["tokens"]
  text = lambda ids: [" ".join(vocab.decode(r))
                      for r in (ids if isinstance(ids, list) else np.asarray(ids))]
  if cfg.model.kind in LM_KINDS:
    return {"samples": text(evaluation.generate(model, variables, None, rng,
                                                max_length=max_len, greedy=False,
                                                batch_size=n))}
  if reconstructions is not None and len(reconstructions) >= n:
    recon = reconstructions[:n]
  else:
    recon = evaluation.reconstruct(model, variables, rows, rng, max_len)
  samples = evaluation.sample_prior(model, variables, rng, n, evaluation.code_dim(model),
                                    max_len)
  return {"inputs": text(rows), "reconstructions": text(recon), "samples": text(samples)}


def examples_text(split: str, examples: dict[str, list]) -> str:
  lines = []
  for ex in examples.get("dialogue", []):
    lines.append(f"[{split}] context:")
    lines += [f"    | {turn}" for turn in ex["context"]]
    lines.append(f"  reference: {ex['reference']}")
    lines += [f"  sample:    {h}" for h in ex["samples"][:3]]
    lines.append(f"  greedy:    {ex['greedy']}")
    if "beam" in ex:
      lines.append(f"  beam:      {ex['beam']}")
  if "inputs" in examples:
    lines.append(f"[{split}] reconstructions (greedy from the posterior mean):")
    for x, r in zip(examples["inputs"], examples["reconstructions"]):
      lines += [f"  x: {x}", f"  r: {r}"]
  if examples.get("samples"):
    lines.append(f"[{split}] samples:")
    lines += [f"  - {s}" for s in examples["samples"]]
  return "\n".join(lines)


COLUMNS = ("nll", "ppl", "elbo", "kl", "mi", "au", "dispersion", "hole_kl", "prior_matched_dims",
           "prior_self_bleu", "prior_distinct_2", "recon_bleu", "k_samples", "n_sentences",
           "n_tokens")


DIALOGUE_COLUMNS = ("nll", "ppl", "kl", "mi", "au", "bow", "bleu1_precision", "bleu1_recall",
                    "bleu2_precision", "bleu2_recall", "bleu4_precision", "bleu4_recall",
                    "distinct_1", "distinct_2", "intra_distinct_1", "intra_distinct_2", "length",
                    "act_accuracy", "emotion_accuracy")


def metrics_table(results: dict[str, dict]) -> str:
  """A plain-text table: one row per split."""
  dialogue_run = any("bleu1_precision" in r for r in results.values())
  columns = DIALOGUE_COLUMNS if dialogue_run else COLUMNS
  header = ["split", *columns]
  rows = [[split] + [_fmt(r.get(c)) for c in columns] for split, r in results.items()]
  widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3f}" if abs(v) < 1e5 else f"{v:.4g}"
  return str(v)
