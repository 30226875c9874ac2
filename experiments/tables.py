"""The project's reference tables: every row an ordinary experiment command, listed here once.

`experiments/reproduce.py --table=NAME` runs a table's rows (`TABLES[NAME]`); a row is the
command

  python experiments/<script> --config=experiments/configs/<config>:<variants> \
      <the table's common overrides> <the row's overrides> \
      --config.train.seed=<seed> --workdir=<root>/<table>/<row>_s<seed>

so every number of a table can be re-run by hand, one row at a time. A table also states its
protocol (what the common overrides mean, and every choice a paper left open), the split its
metrics come from, its columns, and for rows set beside a published number the anchor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Anchor:
  """A published result a row is set beside: metric name -> value (names as in
  `eval_<split>.json`: ppl, nll, kl, mi_per_batch, au), and where it was published."""
  source: str
  metrics: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Row:
  """One method of a table.

  Attributes:
    name: the row's key (`--rows=`) and the prefix of its workdirs.
    script: the experiment main under experiments/, e.g. 'vae.py'.
    variants: the config variants, comma-separated, after the table's own
      (`Table.variants`).
    overrides: further `--config.*` settings of this row, after the table's.
    about: what the row is, in a few words (the Markdown table shows it).
    anchor: the published numbers this row reproduces, if any.
    config: the config file under experiments/configs/ (default: the script's).
  """
  name: str
  script: str
  variants: str = ""
  overrides: tuple[str, ...] = ()
  about: str = ""
  anchor: Anchor | None = None
  config: str = ""


@dataclasses.dataclass(frozen=True)
class Column:
  """A column of a table's Markdown: `metric` of `eval_<split>.json` (or of the row's extra
  results, e.g. 'probe/topic'), shown with `digits` decimals, optionally minus `offset`
  (e.g. the corpus's exact NLL) under `title`."""
  metric: str
  title: str
  digits: int = 2
  offset: float | str | None = None


@dataclasses.dataclass(frozen=True)
class Table:
  """A reference table: its rows, their shared settings and its protocol.

  Attributes:
    name: `--table=` and the name of docs/results/<name>.json / .md.
    title: one line.
    protocol: the paragraph that says how every row was trained and evaluated.
    variants: config variants every row starts with (before the row's).
    overrides: `--config.*` settings every row shares (before the row's).
    rows: the rows, in the table's order.
    seeds: the seeds a full table has.
    split: the evaluated split (`eval_<split>.json`).
    columns: the Markdown table's metrics.
    probe: run experiments/classify.py on the embedded corpus's factors after training.
  """
  name: str
  title: str
  protocol: str
  rows: tuple[Row, ...]
  variants: str = ""
  overrides: tuple[str, ...] = ()
  seeds: tuple[int, ...] = (0,)
  split: str = "test"
  columns: tuple[Column, ...] = ()
  probe: bool = False

  def row(self, name: str) -> Row:
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(name)


# ------------------------------------------------------------------------------------------
# synthetic: every method on the embedded corpus, to convergence.

_SYNTHETIC_PROTOCOL = """\
The embedded corpus (`vae_jax/data/synthetic.py`: 20,000 / 2,000 / 2,000 sentences, 369 words,
four hidden factors carrying log 32 = 3.47 nats). Every row is the plain LSTM VAE of
`vae.py:vanilla` (embedding 128, LSTM 256, last-state encoder, d = 32, batch 32) with one
method added; the LM is its decoder alone. Adam 1e-3, gradient norm clipped at 5, validation
-ELBO (NLL for the LM; for DG-VAE its own objective, rec + density gap, as its authors' code
selects) after every epoch. Aggressive training ends its aggressive phase when the
validation MI fails to rise (see docs/methods.md: at the per-batch estimator's cap a strict
fall never comes). **Stopping:** the learning rate is halved after 2
evaluations without improvement, never before epoch 10 (the end of the annealing schedules),
and training stops at the second halving or after 50 epochs; the best-validation checkpoint is
evaluated. The cyclical row trains exactly 20 epochs (4 cycles of 5 epochs, half rising), since
its ELBO is not comparable across a cycle. Autoencoder pretraining is a phase of its own with
the same stopping rule on validation reconstruction. Evaluation: all 2,000 test sentences,
IW-NLL with K = 500, MI by He et al.'s per-batch estimator and over the whole split, AU, and a
linear probe of each factor on the posterior means (logistic regression on the first 1,000
training sentences, L2 by 5-fold cross-validation; the LM's feature is its final state). The
truth is known: the test split's exact NLL (dynamic programming over the grammar) and the exact
information I(x; factors) of its sentences are given beside the models'. NLL − exact is the
paired per-sentence difference, with the standard error of those differences (rows evaluated
before per-sentence values were saved give the difference of the means alone). The last
three rows are not `vanilla`: they are the library's cured defaults (the quick start's
mean-pooling encoder with the embedding shared with the decoder, and free bits of 4 nats on the
batch-mean KL at β = 1), as the VAE and as the flow VRAE with a Gaussian and with an IAF
posterior, so that the flow, the skip connection and the regulariser are compared where the
code is in use (under the plain objective the VAE and the flow rows collapse)."""

_SYNTHETIC_ROWS = (
    Row("lm", "lm.py", about="LSTM LM (the decoder alone)"),
    Row("vae", "vae.py", "vanilla", about="VAE, β = 1"),
    Row("anneal", "vae.py", "vanilla,anneal", about="linear KL annealing 0.1 → 1, 10 epochs"),
    Row("cyclical", "vae.py", "vanilla,cyclical",
        ("--config.train.num_epochs=20", "--config.optimizer.plateau_min_epochs=20"),
        about="cyclical β, 4 cycles of 5 epochs"),
    Row("beta_0.5", "vae.py", "vanilla,beta", about="β = 0.5"),
    Row("fb_sentence", "vae.py", "vanilla",
        ("--config.kl.kind=free_bits_sentence", "--config.kl.options.target=0.25",
         "--config.kl.options.per_dimension=True"),
        about="free bits, Li et al.'s form: 0.25 nats per sentence and dimension"),
    Row("fb_batch", "vae.py", "vanilla,free_bits",
        about="free bits, batch form: 0.5 nats per dimension of the batch mean"),
    Row("bn_vae", "vae.py", "vanilla,bn_vae", about="BN-VAE, γ = 0.5"),
    Row("ae_fb", "vae.py", "vanilla,ae_free_bits",
        about="AE pretraining + free bits (Li et al. 2019)"),
    Row("aggressive", "vae.py", "vanilla,aggressive",
        about="aggressive training + annealing (He et al. 2019)"),
    Row("mean_pool", "pooling_vae.py", "mean", about="mean-pooling encoder"),
    Row("max_pool", "pooling_vae.py", "max", about="max-pooling encoder"),
    Row("dg_vae", "dg_vae.py", about="DG-VAE, M = 32, weight annealed 0 → 1"),
    Row("dg_vae_mean_pool", "dg_vae.py", "mean_pool", about="DG-VAE + mean pooling"),
    Row("flow_gaussian", "flow_vrae.py", "vanilla,gaussian",
        about="Gaussian posterior + skip + regulariser"),
    Row("flow_planar", "flow_vrae.py", "vanilla,planar",
        about="flow VRAE: planar flow + skip + regulariser"),
    Row("flow_iaf", "flow_vrae.py", "vanilla,iaf",
        about="flow VRAE: IAF + skip + regulariser"),
    Row("flow_coupling", "flow_vrae.py", "vanilla,coupling",
        about="flow VRAE: coupling flow + skip + regulariser"),
    Row("flow_kl_preserving", "flow_vrae.py", "vanilla,kl_preserving",
        about="flow VRAE: KL-preserving IAF + skip + regulariser"),
    Row("flow_iaf_no_skip", "flow_vrae.py", "vanilla,iaf,no_skip",
        about="IAF + regulariser, no skip"),
    Row("flow_iaf_no_reg", "flow_vrae.py", "vanilla,iaf,no_reg", about="IAF + skip, no regulariser"),
    Row("flow_iaf_plain", "flow_vrae.py", "vanilla,iaf,no_skip,no_reg",
        about="IAF alone (no skip, no regulariser)"),
    # The library's cured configurations (no variant): the flows compared where a code is in use.
    Row("cured_vae", "vae.py",
        about="the quick start's cured VAE: mean pooling, shared embedding, batch free bits"),
    Row("cured_flow_gaussian", "flow_vrae.py", "gaussian",
        about="the cured VAE + skip + regulariser (Gaussian posterior)"),
    Row("cured_flow_iaf", "flow_vrae.py",
        about="the flow VRAE's default: the cured VAE + IAF + skip + regulariser"),
)

SYNTHETIC = Table(
    name="synthetic",
    title="Every method on the embedded corpus, trained until validation stops improving",
    protocol=_SYNTHETIC_PROTOCOL,
    rows=_SYNTHETIC_ROWS,
    overrides=("--config.train.num_epochs=50", "--config.optimizer.plateau_patience=2",
               "--config.optimizer.max_decays=2", "--config.optimizer.plateau_min_epochs=10",
               "--config.eval.k_samples=500", "--config.eval.splits=test",
               "--config.train.progress_bar=False"),
    seeds=(0, 1, 2),
    columns=(Column("nll", "NLL"), Column("nll_gap", "NLL − exact"),
             Column("kl", "KL"), Column("mi_per_batch", "MI per batch"),
             Column("mi_set", "MI set"),
             Column("mi_set", "MI set − I(x; f)", offset="factor_information"),
             Column("au", "AU", digits=1), Column("hole_kl_excess", "hole KL excess", 3),
             Column("probe/topic", "topic acc", 3), Column("probe/sentiment", "sentiment acc", 3),
             Column("probe/tense", "tense acc", 3), Column("probe/number", "number acc", 3),
             Column("epochs", "epochs", 1), Column("best_epoch", "best epoch", 1)),
    probe=True,
)

# ------------------------------------------------------------------------------------------
# ptb_lstm: the field's PTB table under He et al. 2019's protocol.

_PTB_PROTOCOL = """\
PTB (Mikolov et al.'s 42,068 / 3,370 / 3,761 sentences, 10,000 words), He et al. 2019's
`text.py` protocol (Li et al. 2019's code is built on it; its differences are below): LSTM 256 /
256, embedding 256, d = 32, batch 32, weights U(±0.01) and embeddings U(±0.1), dropout 0.5 on
the decoder's input embeddings and output states; SGD with learning rate 1.0, no momentum,
gradient norm clipped at 5; the validation loss after every epoch; from epoch 16 on (their
`epoch >= 15`, counted from 0) the learning rate is halved when it did not improve for 2 epochs
(their `decay_epoch`), training continues from the best parameters at each halving, and stops
at the 5th halving or after 100 epochs. Batches are formed from length-sorted sentences (the
whole corpus sorted, as their `create_data_batch`) without padding to a multiple. Evaluation:
the best-validation checkpoint, the full test set, IW-NLL with K = 500 (their `iw_nll`), MI by
their per-batch estimator, AU with threshold 0.01. **Choices where the papers are silent or
differ:** the annealed rows anneal β linearly from 0.1 over 10 epochs (He et al.'s
`--kl_start 0.1 --warm_up 10`); the cyclical row has 4 cycles over the 100-epoch budget (25
epochs each, rising for the first half; Fu et al. 2019's M = 4, R = 0.5), and the plateau rule
ends it as it ends every row, so it may stop inside a cycle. AE + FB follows Li et al. 2019's own scripts (their README's
commands, `text_beta.py --beta 0 --lr 0.5` then `text_anneal_fb.py --reset_dec --kl_start 0
--warm_up 10 --target_kl 8 --fb 2 --lr 0.5`): learning rate 0.5 and a patience of 5 epochs
(their `decay_epoch = 5`) in both phases, free bits per sentence and dimension at 8 / 32 nats;
the pretrained encoder is the one with the best validation reconstruction. DG-VAE, pooling and the flow VRAE have no published
PTB number under this protocol and are run under it unchanged, except that DG-VAE selects and
decays on its own validation objective (rec + density gap), as its authors' code does."""

# METHODS.md §7: the PTB numbers Optimus quotes for the LSTM models (PPL / MI / AU).
_OPTIMUS = "quoted in Optimus (Li et al. 2020); METHODS.md §7"

_PTB_ROWS = (
    Row("lm", "lm.py", about="LSTM LM",
        anchor=Anchor(_OPTIMUS, {"ppl": 100.47})),
    Row("anneal", "vae.py", "anneal", about="VAE + KL annealing",
        anchor=Anchor(_OPTIMUS,
                      {"ppl": 101.40, "mi_per_batch": 0.00, "au": 0})),
    Row("ae_fb", "vae.py", "ae_free_bits",
        ("--config.optimizer.learning_rate=0.5", "--config.optimizer.plateau_patience=5"),
        about="AE pretraining + free bits (Li et al. 2019)",
        anchor=Anchor(_OPTIMUS,
                      {"ppl": 96.86, "mi_per_batch": 5.31, "au": 32})),
    Row("dg_vae", "dg_vae.py", about="DG-VAE"),
    Row("mean_pool", "pooling_vae.py", "mean", about="mean-pooling encoder"),
    Row("flow_iaf", "flow_vrae.py", "iaf", about="flow VRAE: IAF + skip + regulariser"),
    Row("cyclical", "vae.py", "cyclical", about="cyclical β (4 cycles)",
        anchor=Anchor(_OPTIMUS,
                      {"ppl": 108.81, "mi_per_batch": 1.27, "au": 5})),
    Row("aggressive", "vae.py", "aggressive", about="aggressive training + annealing",
        anchor=Anchor(_OPTIMUS,
                      {"ppl": 99.83, "mi_per_batch": 0.83, "au": 4})),
)

PTB_LSTM = Table(
    name="ptb_lstm",
    title="PTB, LSTM models, He et al. 2019's protocol",
    protocol=_PTB_PROTOCOL,
    rows=_PTB_ROWS,
    variants="ptb,sgd",
    overrides=("--config.model.dropout_in=0.5", "--config.model.dropout_out=0.5",
               "--config.optimizer.plateau_min_epochs=16",
               "--config.train.reload_best_on_decay=True", "--config.train.num_epochs=100",
               "--config.data.bucket_window=100000", "--config.data.pad_multiple=1",
               "--config.eval.splits=test", "--config.train.progress_bar=False"),
    columns=(Column("nll", "NLL"), Column("ppl", "PPL"), Column("kl", "KL"),
             Column("mi_per_batch", "MI per batch"), Column("mi_set", "MI set"),
             Column("au", "AU", digits=1), Column("hole_kl_excess", "hole KL excess", 3),
             Column("epochs", "epochs", 1), Column("best_epoch", "best epoch", 1)),
)

# ------------------------------------------------------------------------------------------
# ptb_transformer: DELLA from scratch against the same-size Transformers.

_DELLA_PROTOCOL = """\
PTB at `della.py:ptb` size (a GPT-2-style Transformer of 4 layers, 4 heads, width 256, MLP
1,024, dropout 0.1, trained from scratch), d = 32 per layer, batch 32, Adam 5e-4 with clipping
at 1, cyclical β for the VAEs (4 cycles of 5 epochs, half of each rising; Fu et al. 2019, as
DELLA trains); 20 epochs and the best-validation checkpoint (the ELBO is not comparable across
a cycle, so there is no early stop inside the budget). Evaluation: the full test set, IW-NLL
with K = 500, our MI and AU, and beside them the official code's estimators
(`della_metrics.paper_metrics`: its L_K bound `nll_paper` / `ppl_paper` and its AU count
`au_paper_count`), which `eval_test.json` carries for DELLA. A train step costs about 1.1 s on
2 CPU cores at this size (docs/results.md), about 14 hours per row on one core: this table is
meant for an accelerator."""

_DELLA_ROWS = (
    Row("lm", "della.py", "lm", about="Transformer LM"),
    Row("della", "della.py", about="DELLA: a latent per layer, low-rank fusion"),
    Row("embedding", "della.py", "embedding", about="one latent in the input embeddings"),
    Row("memory", "della.py", "memory", about="one latent as a memory vector (Optimus)"),
    Row("softmax", "della.py", "softmax", about="one latent at the softmax"),
)

PTB_TRANSFORMER = Table(
    name="ptb_transformer",
    title="PTB, Transformer models trained from scratch: DELLA and the single-latent injections",
    protocol=_DELLA_PROTOCOL,
    rows=_DELLA_ROWS,
    variants="ptb",
    overrides=("--config.train.num_epochs=20", "--config.eval.splits=test",
               "--config.train.progress_bar=False"),
    columns=(*PTB_LSTM.columns[:7], Column("nll_paper", "NLL (official L_K)"),
             Column("ppl_paper", "PPL (official)"), Column("au_paper_count", "AU (official)", 1),
             Column("epochs", "epochs", 1), Column("best_epoch", "best epoch", 1)),
)

TABLES = {t.name: t for t in (SYNTHETIC, PTB_LSTM, PTB_TRANSFORMER)}

# ------------------------------------------------------------------------------------------
# smoke: seconds, for tests of experiments/reproduce.py.

SMOKE = Table(
    name="smoke",
    title="Smoke test of the reproduction driver (tiny models, seconds)",
    protocol="The `smoke` variants of vae.py and lm.py: 12 steps on 256 sentences.",
    rows=(Row("vae", "vae.py", about="tiny VAE"), Row("lm", "lm.py", about="tiny LM")),
    variants="smoke",
    overrides=("--config.eval.splits=test",),
    seeds=(0,),
    columns=SYNTHETIC.columns,
    probe=True,
)

TABLES["smoke"] = SMOKE
