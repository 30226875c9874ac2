"""experiments/reproduce.py: rows as commands, skipping finished rows, resuming interrupted
ones, and the results it writes (run end to end on the `smoke` table, as a user runs it)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")
sys.path.insert(0, EXPERIMENTS)

import reproduce  # noqa: E402
import tables  # noqa: E402


def _main(script: str):
  """experiments/<script> imported without running it."""
  spec = importlib.util.spec_from_file_location(f"reproduce_main_{script[:-3]}",
                                                os.path.join(EXPERIMENTS, script))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rows_are_experiment_commands():
  table = tables.PTB_LSTM
  argv = reproduce.command(table, table.row("ae_fb"), 2, "runs/r/ptb_lstm/ae_fb_s2")
  assert argv[0].endswith(os.path.join("experiments", "vae.py"))
  assert argv[1].endswith(os.path.join("configs", "vae.py") + ":ptb,sgd,ae_free_bits")
  assert argv[2:2 + len(table.overrides)] == list(table.overrides)
  assert argv[-2:] == ["--config.train.seed=2", "--workdir=runs/r/ptb_lstm/ae_fb_s2"]
  # Every row of every table parses against its main's flags (a typo in a variant or an
  # override name would only surface hours into a reproduction otherwise).
  from absl import flags
  from vae_jax import configs
  for t in tables.TABLES.values():
    for row in t.rows:
      argv = reproduce.command(t, row, 0, "runs/x")
      module = _main(row.script)
      fv = flags.FlagValues()
      # config_flags reads the `--config.*` overrides from sys.argv when it defines --config.
      saved, sys.argv = sys.argv, [row.script, *argv[1:]]
      try:
        module.define_flags(fv)
        fv(sys.argv)
      finally:
        sys.argv = saved
      cfg = configs.read(fv.config)   # as the main reads it: every setting checked
      assert cfg.train.seed == 0, (t.name, row.name)
      for override in row.overrides:   # the row's own settings win over the table's
        name, value = override.removeprefix("--config.").split("=", 1)
        got = fv.config
        for part in name.split("."):
          got = got[part]
        same = (float(got) == float(value) if isinstance(got, (int, float))
                and not isinstance(got, bool) else str(got) == value)
        assert same, (t.name, row.name, name, got, value)


def test_config_differences_of_a_record():
  # A variant that changes what a row runs (DG-VAE's checkpoint selection) is a difference,
  # whether the record holds the old value or predates the setting; a path is not.
  table = tables.SYNTHETIC
  current = reproduce.row_config(table, table.row("dg_vae"), 1)
  assert current["train"]["seed"] == 1 and current["kl"]["kind"] == "density_gap"
  defaults = reproduce.default_config()
  assert reproduce.config_differences(current, current, defaults) == []
  old = json.loads(json.dumps(current))
  old["train"]["best_metric"] = ""
  old["data"]["dir"] = "/elsewhere"
  assert reproduce.config_differences(old, current, defaults) == [
      "train.best_metric: '' -> 'objective'"]
  del old["train"]["best_metric"]
  assert reproduce.config_differences(old, current, defaults) == [
      "train.best_metric: (not recorded) -> 'objective'"]
  # A setting added since, at its default, is the old behaviour; a removed one is not compared.
  old = json.loads(json.dumps(current))
  del old["train"]["aggressive"]
  old["train"]["retired"] = 3
  assert reproduce.config_differences(old, current, defaults) == []


def test_committed_results_are_the_tables_protocol():
  # Every run docs/results records is still its row's command and config: a change to a
  # variant or a table that alters a recorded row's protocol must take its records out.
  results = os.path.join(os.path.dirname(EXPERIMENTS), "docs", "results")
  for name, table in tables.TABLES.items():
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      runs = json.load(f)["runs"]
    kept = reproduce.recorded(table, results)
    assert sorted(kept) == sorted((r["row"], r["seed"]) for r in runs), name


def test_paired_differences_from_kept_sentences(tmp_path):
  table = tables.SMOKE
  rng = np.random.default_rng(0)
  a, b = rng.normal(30, 3, 40), rng.normal(30, 3, 40)
  # Run a evaluated sentences 0..39 out of order; run b only the odd ones.
  for row, index, nll in (("vae", rng.permutation(40), a), ("lm", np.arange(1, 40, 2), b)):
    path = tmp_path / row
    path.mkdir()
    (path / "eval_test_sentences.json").write_text(json.dumps(
        {"sentence": index.tolist(), "nll": nll[index].tolist(),
         "n_tokens": [5] * len(index)}))
    reproduce.keep_sentences(table, row, 3, str(path), str(tmp_path / "results"))
  got_a = reproduce.read_sentences(str(tmp_path / "results"), table, "vae", 3)
  got_b = reproduce.read_sentences(str(tmp_path / "results"), table, "lm", 3)
  assert sorted(got_a) == list(range(40)) and sorted(got_b) == list(range(1, 40, 2))
  assert got_b[7] == pytest.approx(b[7], abs=5e-4)
  d = a[1::2] - b[1::2]
  paired = reproduce.paired_difference(got_a, got_b)
  assert paired["n"] == 20
  assert paired["difference"] == pytest.approx(d.mean(), abs=1e-3)
  assert paired["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(20), rel=1e-3)
  assert reproduce.paired_difference(got_a, {}) == {}
  assert reproduce.read_sentences(str(tmp_path / "results"), table, "vae", 0) == {}


def test_selection_order_and_errors():
  table = tables.SYNTHETIC
  chosen = reproduce.selected(table, ["vae", "lm"], ["1", "0"])
  # Every chosen row of the first seed, then of the next, in the table's order.
  assert [(r.name, s) for r, s in chosen] == [("lm", 1), ("vae", 1), ("lm", 0), ("vae", 0)]
  from vae_jax import errors
  with pytest.raises(errors.ConfigError, match="nope"):
    reproduce.selected(table, ["nope"], [])
  with pytest.raises(errors.ConfigError, match="integers"):
    reproduce.selected(table, [], ["a"])


def test_anchor_differences_know_their_spread():
  anchor = tables.Anchor("paper", {"ppl": 100.0, "au": 32})
  one = {"ppl": {"mean": 101.0, "sd": 0.0, "se": 0.0, "n": 1}}
  three = {"ppl": {"mean": 101.0, "sd": 0.6, "se": 0.35, "n": 3},
           "au": {"mean": 30.0, "sd": 0.5, "se": 0.3, "n": 3}}
  assert reproduce.anchor_differences(anchor, one)["ppl"]["within_2sd"] is None
  d = reproduce.anchor_differences(anchor, three)
  assert d["ppl"]["difference"] == pytest.approx(1.0) and d["ppl"]["within_2sd"]
  assert d["au"]["difference"] == pytest.approx(-2.0) and not d["au"]["within_2sd"]


def test_synthetic_truth_matches_the_grammar():
  from vae_jax.data import synthetic
  truth = reproduce.synthetic_truth(reproduce.synthetic_exact("valid"))
  examples = synthetic.generate("valid")
  assert truth["exact_nll"] == pytest.approx(
      -sum(synthetic.log_prob(e.tokens) for e in examples) / len(examples))
  # The corpus's sentences determine their factors: all log 32 nats are in x.
  assert truth["factor_information"] == pytest.approx(synthetic.FACTOR_ENTROPY, abs=1e-6)


def test_gap_to_the_exact_nll_is_paired_when_it_can_be():
  exact = {"nll": np.array([10.0, 20.0, 30.0, 40.0]), "n_tokens": np.array([3, 5, 7, 9])}
  sentences = {"sentence": [1, 3], "n_tokens": [5, 9], "nll": [21.0, 41.5]}
  gap = reproduce.exact_gap(sentences, exact)
  assert gap["nll_gap"] == pytest.approx(1.25)
  assert gap["nll_gap_se"] == pytest.approx(np.std([1.0, 1.5], ddof=1) / np.sqrt(2))
  # Sentences that are not the split's as the grammar gives them: no paired gap.
  assert reproduce.exact_gap(dict(sentences, n_tokens=[5, 8]), exact) == {}
  assert reproduce.exact_gap(dict(sentences, sentence=[1, 4]), exact) == {}
  # A record without one (evaluated before per-sentence values were saved) gets the
  # difference of the means, and no standard error; a paired one is kept.
  truth = {"exact_nll": 25.0}
  old = reproduce.with_gap({"metrics": {"nll": 26.5, "nll_se": 0.1}}, truth)
  assert old["metrics"] == {"nll": 26.5, "nll_se": 0.1, "nll_gap": 1.5}
  paired = {"metrics": {"nll": 26.5, **gap}}
  assert reproduce.with_gap(paired, truth) == paired
  assert reproduce.with_gap({"metrics": {"nll": 1.0}}, {}) == {"metrics": {"nll": 1.0}}


def _reproduce(tmp_path, *args):
  out = subprocess.run(
      [sys.executable, os.path.join(EXPERIMENTS, "reproduce.py"), "--table=smoke",
       "--root=runs", "--results_dir=results", "--figures=False", *args],
      cwd=tmp_path, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads((tmp_path / "results" / "smoke.json").read_text())


def test_runs_skips_resumes_and_reports(tmp_path):
  # Relative --root and --results_dir, from another directory, as a user types them.
  results = _reproduce(tmp_path, "--rows=vae")
  run_dir = tmp_path / "runs" / "smoke" / "vae_s0"
  evaluation = json.loads((run_dir / "eval_test.json").read_text())
  [run] = results["runs"]
  assert run["row"] == "vae" and run["seed"] == 0 and run["workdir"] == "smoke/vae_s0"
  assert run["metrics"]["nll"] == evaluation["nll"]
  assert run["metrics"]["nll_se"] == evaluation["nll_se"]
  assert set(run["metrics"]) >= {"probe/topic", "probe/sentiment", "probe/tense",
                                 "probe/number", "epochs", "best_epoch"}
  # The gap to the exact NLL, paired sentence by sentence (the smoke run evaluates the first
  # 48 test sentences).
  from vae_jax.data import synthetic
  sentences = json.loads((run_dir / "eval_test_sentences.json").read_text())
  exact = np.array([-synthetic.log_prob(e.tokens) for e in synthetic.generate("test")[:48]])
  gap = np.array(sentences["nll"]) - exact
  assert run["metrics"]["nll_gap"] == pytest.approx(evaluation["nll"] - exact.mean(), abs=1e-4)
  assert run["metrics"]["nll_gap_se"] == pytest.approx(gap.std(ddof=1) / np.sqrt(48))
  # The per-sentence values are kept beside the results, in the split's order.
  kept = json.loads((tmp_path / "results" / "smoke_sentences" / "vae_s0.json").read_text())
  order = np.argsort(sentences["sentence"])
  np.testing.assert_allclose(kept["nll"], np.array(sentences["nll"])[order], atol=5e-4)
  assert "sentence" not in kept   # the first 48 sentences: indices 0..47
  assert run["steps"] == 12 and run["epochs"] == pytest.approx(12 / run["steps_per_epoch"])
  assert run["config"]["train"]["seed"] == 0 and run["invocations"] == 2  # train, probe
  assert run["command"].startswith("python ") and "--workdir=runs/smoke/vae_s0" in run["command"]
  assert [p["row"] for p in results["pending"]] == ["lm"]
  markdown = (tmp_path / "results" / "smoke.md").read_text()
  assert "| vae (tiny VAE) | 0 |" in markdown and "## Not yet run" in markdown
  assert f"{evaluation['nll']:.2f}" in markdown

  # A finished row is skipped: nothing runs again.
  again = _reproduce(tmp_path, "--rows=vae")
  assert again["runs"][0]["invocations"] == 2

  # An interrupted row is resumed: with its training done and its evaluation missing, the
  # row's command only evaluates (no new training step is logged) and gives the same numbers.
  logged = (run_dir / "metrics.jsonl").read_text()
  os.remove(run_dir / "eval_test.json")
  os.remove(tmp_path / "results" / "smoke.json")   # interrupted before it was recorded
  resumed = _reproduce(tmp_path, "--rows=vae")
  assert resumed["runs"][0]["invocations"] == 3
  assert (run_dir / "metrics.jsonl").read_text().startswith(logged)
  assert '"split": "train"' not in (run_dir / "metrics.jsonl").read_text()[len(logged):]
  assert json.loads((run_dir / "eval_test.json").read_text())["nll"] == pytest.approx(
      evaluation["nll"], rel=1e-6)

  # Results last without their workdirs (another machine, a new checkout): the recorded row
  # is neither run again nor dropped from the table.
  shutil.rmtree(tmp_path / "runs")
  kept = _reproduce(tmp_path, "--rows=vae")
  assert not run_dir.exists()
  assert kept["runs"] == resumed["runs"]
  # A record of another protocol is dropped: its row is to run again.
  stale = dict(kept, runs=[dict(kept["runs"][0], command=kept["runs"][0]["command"] +
                                " --config.train.num_epochs=3")])
  (tmp_path / "results" / "smoke.json").write_text(json.dumps(stale))
  dropped = _reproduce(tmp_path, "--report_only")
  assert dropped["runs"] == [] and [p["row"] for p in dropped["pending"]] == ["vae", "lm"]
  # So is a record whose command is the row's but whose config is not what it gives now (a
  # variant changed), while a record with another data path is the same protocol.
  config = kept["runs"][0]["config"]
  for changed, kept_it in (({**config, "kl": {**config["kl"], "value": 0.5}}, False),
                           ({**config, "data": {**config["data"], "dir": "elsewhere"}}, True)):
    (tmp_path / "results" / "smoke.json").write_text(
        json.dumps(dict(kept, runs=[dict(kept["runs"][0], config=changed)])))
    assert bool(_reproduce(tmp_path, "--report_only")["runs"]) == kept_it


def test_progress_of_an_unfinished_row(tmp_path):
  assert reproduce.progress(str(tmp_path)) == {}
  (tmp_path / "config.json").write_text(json.dumps({"model": {"kind": "vae"},
                                                    "train": {"best_metric": ""}}))
  lines = [{"step": 10, "split": "train", "metrics": {"neg_elbo": 1.0}},
           {"step": 20, "split": "valid", "metrics": {"neg_elbo": 5.0}},
           {"step": 40, "split": "valid", "metrics": {"neg_elbo": 4.0}},
           {"step": 60, "split": "valid", "metrics": {"neg_elbo": 4.5}}]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 8')  # a line being written
  assert reproduce.progress(str(tmp_path)) == {"step": 60, "best_step": 40,
                                              "best_metric": "neg_elbo", "best_value": 4.0}
