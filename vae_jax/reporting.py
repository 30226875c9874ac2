"""What a run shows of its evaluation: the examples (as text) and the metrics table.

`run_evaluation` decodes the examples of a split (reconstructions, prior or language-model
samples, dialogue responses); this module turns them into the text written to
`eval_<split>.json` and printed (`examples_text`), and prints the metrics of every split as one
table (`metrics_table`).
"""

from __future__ import annotations

import numpy as np

from vae_jax.data import pipeline
from vae_jax.data.vocab import Vocab


def texts(vocab: Vocab, ids) -> list[str]:
  """Sentences of token ids (rows of an array, or lists) as text."""
  return [" ".join(vocab.decode(r)) for r in (ids if isinstance(ids, list) else np.asarray(ids))]


def first_rows(data, n: int, pad_multiple: int) -> np.ndarray:
  """The tokens `[n, L]` of the first `n` sentences of `data` (the ones shown)."""
  width = pipeline.round_up(int(data.lengths[:n].max()), pad_multiple)
  return pipeline.make_batch(data, np.arange(n), width)["tokens"]


def shown_examples(vocab: Vocab, samples, inputs=None, reconstructions=None) -> dict[str, list]:
  """The examples of a split: prior (or language-model) samples and, for a VAE, the first
  sentences with their greedy reconstructions."""
  if inputs is None:
    return {"samples": texts(vocab, samples)}
  return {"inputs": texts(vocab, inputs), "reconstructions": texts(vocab, reconstructions),
          "samples": texts(vocab, samples)}


def dialogue_examples(vocab: Vocab, data, responses: dict, order: np.ndarray,
                      num_print: int) -> dict[str, list]:
  """The first `num_print` contexts of a split with their reference, sampled, greedy and beam
  responses; `responses` come in the evaluation iterator's `order` (-1: padding rows)."""
  text = lambda ids: " ".join(vocab.decode(ids))
  order = order[order >= 0]  # responses come in the iterator's order
  rows = np.argsort(order)[:num_print]  # the first pairs of the split
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
  return {"dialogue": examples}


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


COLUMNS = ("nll", "ppl", "elbo", "kl", "mi_per_batch", "mi_set", "au", "dispersion", "hole_kl",
           "hole_kl_null", "hole_kl_excess", "prior_matched_dims", "prior_self_bleu",
           "prior_distinct_2", "recon_bleu", "k_samples", "n_sentences", "n_tokens")


DIALOGUE_COLUMNS = ("nll", "ppl", "kl", "mi_per_batch", "mi_set", "au", "bow", "bleu1_precision", "bleu1_recall",
                    "bleu2_precision", "bleu2_recall", "bleu4_precision", "bleu4_recall",
                    "distinct_1", "distinct_2", "intra_distinct_1", "intra_distinct_2", "length",
                    "act_accuracy", "emotion_accuracy")


def metrics_table(results: dict[str, dict]) -> str:
  """A plain-text table: one row per split. A value with a standard error (`<key>_se`) is
  shown as `value±se`, and as `≈0` when it lies within two standard errors of zero."""
  dialogue_run = any("bleu1_precision" in r for r in results.values())
  columns = DIALOGUE_COLUMNS if dialogue_run else COLUMNS
  header = ["split", *columns]
  rows = [[split] + [_fmt(r.get(c), r.get(f"{c}_se", r.get(f"{c}_stderr"))) for c in columns]
          for split, r in results.items()]
  widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(v, se=None) -> str:
  if v is None:
    return "-"
  if se is not None and isinstance(v, float) and se > 0:
    return "≈0" if abs(v) < 2 * se else f"{_fmt(v)}±{_fmt(float(se))}"
  if isinstance(v, float):
    return f"{v:.3f}" if abs(v) < 1e5 else f"{v:.4g}"
  return str(v)
