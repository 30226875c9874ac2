"""End-to-end: the experiment mains train, checkpoint, evaluate and report on the smoke config."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiment_configs import load_config, run_experiment, smoke_config
from vae_jax import (build, configs, errors, evaluation, kl_terms, pretraining, run_config,
                     run_data, run_evaluation)
from vae_jax.data import pipeline
from vae_jax.data.vocab import PAD, Vocab, VocabMismatchError

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = {"nll", "ppl", "kl", "mi", "au", "k_samples", "n_sentences", "n_tokens"}


def run_main(script, *args):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_vae_cli_trains_evaluates_and_reevaluates(tmp_path):
  workdir = tmp_path / "vae"
  out = run_main("vae.py", "--config=experiments/configs/vae.py:smoke",
                 "--config.data.pad_multiple=32", f"--workdir={workdir}")
  assert "nll" in out and "samples" in out
  result = json.loads((workdir / "eval_test.json").read_text())
  assert EVAL_KEYS <= set(result)
  assert result["k_samples"] == 8 and result["n_sentences"] == 48
  assert result["nll"] > 0 and result["ppl"] > 1
  # The IW bound is at least as tight as the ELBO.
  assert -result["nll"] >= result["elbo"] - 1e-3
  assert 0 <= result["recon_bleu"] <= 1 and result["recon_length"] > 0
  assert (workdir / "metrics.jsonl").exists() and (workdir / "vocab.json").exists()

  out = run_main("evaluate.py", f"--workdir={workdir}", "--config.eval.splits=valid",
                 "--config.eval.k_samples=4", "--config.eval.max_examples=20")
  result = json.loads((workdir / "eval_valid.json").read_text())
  assert EVAL_KEYS <= set(result) and result["split"] == "valid"
  assert result["k_samples"] == 4 and result["n_sentences"] == 20
  assert result["examples"]["reconstructions"]
  # The saved config is the run's: evaluation overrides do not change it.
  assert json.loads((workdir / "config.json").read_text())["eval"]["k_samples"] == 8


def test_lm_run_and_resume_is_a_no_op_when_finished(tmp_path):
  cfg = smoke_config("lm")
  first = run_experiment(cfg, tmp_path)
  assert first["test"]["kl"] == 0.0 and first["test"]["ppl"] > 1
  # Every test sentence's NLL, in the split's order (the evaluation ran on length-sorted
  # batches): against the same model scored on one batch holding the split in its own order.
  sentences = json.loads((tmp_path / "eval_test_sentences.json").read_text())
  saved_cfg, model, variables, vocab = run_evaluation.load_run(str(tmp_path))
  data = run_data.encoder(saved_cfg.data, vocab)(
      run_data.load_eval_split(saved_cfg.data, "test", saved_cfg.eval.max_examples))
  assert sentences["sentence"] == list(range(len(data))) == list(range(48))
  assert sentences["n_tokens"] == [int(n) for n in data.lengths]
  batch = pipeline.make_batch(data, np.arange(len(data)), int(data.lengths.max()))
  _, direct = evaluation.evaluate(model, variables, [batch], jax.random.PRNGKey(0),
                                  hole_samples=0, per_sentence=True)
  np.testing.assert_allclose(sentences["nll"], direct["nll"], atol=2e-4)
  assert np.mean(sentences["nll"]) == pytest.approx(first["test"]["nll"], abs=1e-4)
  # Running the finished run again restores it and reproduces the evaluation exactly.
  second = run_experiment(cfg, tmp_path)
  assert second["test"]["nll"] == first["test"]["nll"]


def two_step_run(workdir):
  """A 2-step smoke run without final evaluation; returns its (unlocked) config."""
  cfg = smoke_config("vae")
  cfg.unlock()
  cfg.train.num_steps = 2
  cfg.eval.splits = ""
  run_experiment(cfg, workdir)
  return cfg


def test_vocabulary_mismatch_is_a_clear_error(tmp_path):
  cfg = two_step_run(tmp_path)
  vocab = Vocab.load(tmp_path / "vocab.json")
  Vocab.from_words(list(vocab.tokens[4:])[::-1]).save(tmp_path / "vocab.json")
  with pytest.raises(VocabMismatchError, match="fresh --workdir"):
    run_experiment(cfg, tmp_path)


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match="available: .*anneal"):
    load_config("vae", "smoke,nonsense")


def test_load_run_restores_the_trained_model(tmp_path):
  cfg = smoke_config("flow_vrae", "smoke,coupling")
  first = run_experiment(cfg, tmp_path)
  saved_cfg, model, variables, vocab = run_evaluation.load_run(str(tmp_path))
  assert saved_cfg.model.config.flow.kind == "coupling"
  assert len(vocab) == model.config.vocab_size
  again = run_evaluation.evaluate_workdir(saved_cfg, str(tmp_path), ["test"])
  assert again["test"]["nll"] == pytest.approx(first["test"]["nll"], abs=1e-5)


def test_training_sentences_of_a_held_out_split_are_removed():
  cfg = load_config("vae", "smoke")
  cfg.unlock()
  cfg.data.max_train_examples = 0
  cfg.data.train_split = "valid+test"   # '+' concatenates splits
  cfg.data.exclude = "synthetic:test"
  data = configs.read(cfg).data
  kept, removed = run_data.load_train_examples(data)
  train = run_data.load_examples(data, "valid") + run_data.load_examples(data, "test")
  held_out = {ex.tokens for ex in run_data.load_examples(data, "test")}
  assert removed == sum(ex.tokens in held_out for ex in train) > 0
  assert len(kept) == len(train) - removed
  assert not any(ex.tokens in held_out for ex in kept)


def test_regulariser_weight_without_token_dropout_is_refused():
  cfg = load_config("flow_vrae", "smoke")
  cfg.unlock()
  cfg.model.smoothness_dropout = 0.0
  with pytest.raises(ValueError, match="smoothness_dropout"):
    configs.kl_term_config(cfg)


def test_dg_vae_with_pooling_reports_dispersion_holes_and_generation(tmp_path):
  cfg = smoke_config("dg_vae", "smoke,mean_pool")
  assert cfg.kl.kind == "density_gap" and cfg.model.pooling == "mean"
  result = run_experiment(cfg, tmp_path)["test"]
  assert {"dispersion", "hole_kl", "hole_kl_stderr", "hole_kl_null", "hole_kl_null_stderr",
          "hole_kl_excess", "hole_kl_excess_stderr", "marginal_kl", "prior_matched_dims",
          "prior_self_bleu", "prior_distinct_1", "prior_distinct_2", "prior_nll_per_token",
          "interp_self_bleu", "interp_distinct_2"} <= set(result)
  assert len(result["marginal_kl"]) == cfg.model.latent_dim
  assert 0 <= result["prior_matched_dims"] <= cfg.model.latent_dim
  assert 0.0 <= result["prior_self_bleu"] <= 1.0 and 0.0 < result["prior_distinct_1"] <= 1.0
  assert result["prior_nll_per_token"] > 0 and result["dispersion"] > 0
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r["metrics"] for r in records if r["split"] == "train"]
  assert all("density_gap" in m and "dispersion" in m for m in train)
  # Pooling configs keep the plain objective of the paper.
  pooled = load_config("pooling_vae", "ptb,max")
  assert pooled.model.pooling == "max" and pooled.kl.kind == "kl"
  assert pooled.kl.schedule == "constant" and pooled.data.corpus == "ptb"


def test_aggressive_training_and_ae_pretraining_runs(tmp_path):
  cfg = smoke_config("vae", "smoke,aggressive")
  cfg.eval.splits = ""
  cfg.train.num_steps, cfg.train.eval_every, cfg.train.log_every = 4, 2, 2
  cfg.train.aggressive_max_inner_steps, cfg.train.aggressive_check_every = 4, 2
  run_experiment(cfg, tmp_path / "aggressive")
  records = [json.loads(line) for line in
             (tmp_path / "aggressive" / "metrics.jsonl").read_text().splitlines()]
  train = [r["metrics"] for r in records if r["split"] == "train"]
  assert train[0]["aggressive"] == 1.0 and train[0]["inner_steps"] >= 1
  cfg = smoke_config("vae", "smoke,ae_free_bits")
  cfg.eval.splits = ""
  cfg.train.num_steps, cfg.train.eval_every, cfg.train.log_every = 4, 4, 2
  run_experiment(cfg, tmp_path / "ae_fb")
  pre = json.loads((tmp_path / "ae_fb" / "pretrain" / "config.json").read_text())
  assert pre["kl"]["value"] == 0.0 and pre["train"]["num_steps"] == cfg.train.num_steps


def test_decoder_reset_keeps_the_pretrained_encoder():
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from vae_jax.models.vae import SeqVAE, VAEConfig  # noqa: PLC0415
  model = SeqVAE(VAEConfig(vocab_size=11, embed_dim=4, hidden_dim=5, latent_dim=2))
  tokens = np.array([[5, 6, 2, 0]], np.int32)
  init_fn = lambda rng, batch: model.init({"params": rng, "latent": rng}, batch["tokens"])
  pretrained = init_fn(jax.random.PRNGKey(1), {"tokens": tokens})
  fresh = init_fn(jax.random.PRNGKey(2), {"tokens": tokens})
  got = pretraining.with_encoder(init_fn, pretrained)(jax.random.PRNGKey(2), {"tokens": tokens})
  for name, source in (("encoder", pretrained), ("head", pretrained),
                       ("encoder_embed", pretrained), ("decoder", fresh),
                       ("decoder_embed", fresh)):
    for a, b in zip(jax.tree.leaves(got["params"][name]), jax.tree.leaves(source["params"][name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_pretraining_phase_reads_back_from_its_record():
  """The phase's typed configs are what its saved config.json reads as, and what Li et al.
  train: beta = 0, the plain KL term, the best checkpoint by reconstruction, no final
  evaluation, the main run's data, model and optimiser otherwise."""
  cfg = configs.read(smoke_config("vae", "smoke,ae_free_bits,aggressive"))
  pre = pretraining.pretraining_config(cfg, pretraining.phase_steps(cfg.pretrain, 12))
  assert pre.train.num_steps == 12 and pre.train.aggressive is None
  assert (pre.kl.kind, pre.kl.options, pre.kl.schedule.name,
          pre.kl.schedule.value) == ("kl", kl_terms.PlainKL(), "constant", 0.0)
  assert cfg.kl.kind == "free_bits_sentence"   # the main run's term, off in the phase
  assert run_config.kl_schedule(pre.kl.schedule, 12, 4)(5) == 0.0
  assert (pre.train.best_metric, pre.eval.splits, pre.pretrain.steps) == ("rec", (), 0)
  assert (pre.data, pre.model) == (cfg.data, cfg.model)
  assert pre.optimizer.param_labels is None and cfg.optimizer.param_labels is not None
  again = configs.read(configs.from_json(pre.record))
  assert dataclasses.replace(again, record="") == dataclasses.replace(pre, record="")


def test_the_reference_schedule_reaches_the_loop():
  """`sgd` with `train.reload_best_on_decay` and `optimizer.plateau_min_epochs`: He et al.'s
  optimiser, no decay before their epoch 15 (16 epochs), and at each decay the best
  checkpoint's parameters (the loop's behaviour: tests/training/test_loop.py)."""
  cfg = smoke_config("vae", "smoke,sgd")
  assert not configs.read(cfg).train.reload_best_on_decay
  with cfg.unlocked():
    cfg.train.reload_best_on_decay = True
    cfg.optimizer.plateau_min_epochs = 16
  typed = configs.read(cfg)
  loop_cfg = run_config.loop_config(typed.train, typed.optimizer, 1000, 10)
  assert loop_cfg.reload_best_on_decay and loop_cfg.plateau_start_step == 160
  assert (loop_cfg.optimizer.name, loop_cfg.optimizer.learning_rate,
          loop_cfg.optimizer.grad_clip_norm) == ("sgd", 1.0, 5.0)
  assert (loop_cfg.optimizer.plateau.patience, loop_cfg.optimizer.plateau.factor,
          loop_cfg.optimizer.plateau.max_decays) == (2, 0.5, 5)


def test_evaluation_overrides_change_only_eval_fields():
  saved = smoke_config("vae")
  got = configs.with_eval_overrides(saved, {"eval.k_samples": 3, "eval.splits": "valid"})
  assert (got.eval.k_samples, got.eval.splits, saved.eval.k_samples) == (3, "valid", 8)
  for overrides, match in (({"data.dir": "x"}, r"^--config.data.dir: evaluation may change "
                                                r"only the eval settings"),
                           ({"eval.k_sample": 3}, r"^--config.eval.k_sample=3: the run's "
                                                  r"config has no such field"),
                           ({"eval.k_samples": "many"}, r"^--config.eval.k_samples=many: ")):
    with pytest.raises(errors.ConfigError, match=match):
      configs.with_eval_overrides(saved, overrides)


def test_cvrae_dialogue_flow_run_reports_dialogue_metrics(tmp_path):
  cfg = smoke_config("cvrae_dialogue", "smoke,iaf")
  with cfg.unlocked():
    cfg.data.dir = str(ROOT.parent / "shared" / "data" / "dailydialog")
  result = run_experiment(cfg, tmp_path)["test"]
  for key in ("nll", "ppl", "kl", "mi", "au", "bow", "bleu1_precision", "bleu4_recall",
              "distinct_1", "distinct_2", "length", "beam_bleu1", "act_accuracy",
              "emotion_majority"):
    assert key in result, key
  assert result["n_sentences"] == 24 and result["num_response_samples"] == 3
  assert -result["nll"] >= result["elbo"] - 1e-3
  saved = json.loads((tmp_path / "eval_test.json").read_text())
  shown = saved["examples"]["dialogue"]
  assert len(shown) == 2 and len(shown[0]["samples"]) == 3 and shown[0]["context"]
  _, model, variables, _ = run_evaluation.load_run(str(tmp_path))
  assert model.config.posterior == "flow" and "flow" in variables["params"]


def _tiny_gpt2_checkpoint(directory, cfg):
  """A random GPT-2 of the smoke size in the Hugging Face layout, with a byte-level BPE
  vocabulary of the 256 byte symbols and a few merges."""
  from vae_jax.data import bpe
  from vae_jax.nn import gpt2
  from vae_jax.nn.transformer import Transformer

  symbols = list(bpe.bytes_to_unicode().values())
  merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "r")]
  vocab = {s: i for i, s in enumerate(symbols + ["".join(m) for m in merges])}
  directory.mkdir()
  (directory / "vocab.json").write_text(json.dumps(vocab))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n"
                                                                   for a, b in merges))
  config = configs.transformer_config(cfg, len(vocab) + gpt2.ID_OFFSET)
  params = jax.jit(Transformer(config).init)(jax.random.PRNGKey(7),
                                             np.ones((1, 4), np.int32))["params"]
  gpt2.save_gpt2_checkpoint(params, config, directory)
  return params


def test_della_from_gpt2_weights_with_its_bpe_tokenizer_trains_evaluates_reloads(tmp_path):
  cfg = smoke_config("della")
  with cfg.unlocked():
    cfg.data.tokenizer = "gpt2"
    cfg.model.pretrained_dir = str(tmp_path / "gpt2")
  pretrained = _tiny_gpt2_checkpoint(tmp_path / "gpt2", cfg)
  workdir = tmp_path / "run"
  typed = configs.read(cfg)
  vocab = run_data.build_vocab(typed.data, [])
  model = build.build_model(typed.model, len(vocab))
  task = build.build_task(typed, model, vocab, 1, 1)
  tokens = run_data.encoder(typed.data, vocab)(run_data.load_split_examples(typed.data, "test")[:2])
  batch = pipeline.make_batch(tokens, np.arange(2), 24)
  params = task.warm_start(jax.jit(task.init_fn)(jax.random.PRNGKey(0), batch)["params"])
  params = params["transformer"]
  for name in ("wpe", "ln_f"):
    np.testing.assert_array_equal(jax.tree.leaves(params[name]),
                                  jax.tree.leaves(pretrained[name]))
  np.testing.assert_array_equal(params["wte"]["embedding"][4:],
                                pretrained["wte"]["embedding"][4:])
  # Sentences are BPE ids (cut at max_length) that decode back to the words.
  words = run_data.load_split_examples(typed.data, "test")[0].tokens
  assert vocab.decode(vocab.encode(words))[0] == " ".join(words)
  assert " ".join(words).startswith(vocab.decode(batch["tokens"][0])[0])
  # The whole run: train, evaluate with the generic suite, reload.
  result = run_experiment(cfg, workdir)["test"]
  assert json.loads((workdir / "vocab.json").read_text())["kind"] == "gpt2_bpe"
  d = cfg.model.latent_dim
  assert "hole_kl" in result and "prior_self_bleu" in result
  assert 0 <= result["recon_bleu"] <= 1 and 0 <= result["recon_exact"] <= 1
  _, model, variables, _ = run_evaluation.load_run(str(workdir))
  fusion = variables["params"]["transformer"]["h_0"]["attn"]["fusion"]
  assert fusion["latent_factors"].shape == (4, d + 1, cfg.model.transformer.model_dim)
  # The evaluated sentences (the first 16 of the test split, BPE ids and EOS), counted here:
  # the PPL's denominator; and the per-layer active units from the population variance of the
  # z-space chain of posterior means of the restored model on them.
  data = run_data.encoder(typed.data, vocab)(
      run_data.load_eval_split(typed.data, "test", typed.eval.max_examples))
  tokens = pipeline.make_batch(data, np.arange(len(data)), cfg.data.max_length)["tokens"]
  n_tokens = int(np.sum(tokens != PAD))
  assert result["n_sentences"] == len(tokens) == 16 and result["n_tokens"] == n_tokens
  assert np.isfinite(result["nll"])
  np.testing.assert_allclose(result["ppl"], np.exp(result["nll"] * 16 / n_tokens), rtol=1e-6)
  # The official estimators beside them: its PPL counts BOS too (|x| + 2 per sentence).
  np.testing.assert_allclose(result["ppl_paper"],
                             np.exp(result["nll_paper"] * 16 / (n_tokens + 16)), rtol=1e-6)
  assert result["au_paper_count"] == result["au_paper"] * model.config.num_latents * d
  layer_means = jax.jit(lambda v, t: model.apply(v, t, method="layer_means"))(variables, tokens)
  variances = np.asarray(layer_means, np.float64).var(0)
  for t in (0.01, 0.2):
    per_layer = np.sum(variances > t, axis=-1)
    assert result[f"au_layers_{t:g}"] == per_layer.tolist()
    assert result[f"au_z_{t:g}"] == per_layer.sum()
    np.testing.assert_allclose(result[f"au_layer_mean_{t:g}"], per_layer.mean())
