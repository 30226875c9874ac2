"""Figures of a run: training curves, the KL and activity of every latent dimension, and a
PCA map of the posterior means (drawn by experiments/report.py).

Every function is pure: numbers in, a `matplotlib.figure.Figure` out, drawn on the
non-interactive Agg canvas without pyplot, so no figure is registered anywhere, nothing needs
closing and nothing depends on a display. `png_bytes` renders a figure; the caller writes the
bytes (atomically, `vae_jax.fileio.write_bytes_atomic`).

The figures:

- `curves_figure`: one panel per logged quantity of `<workdir>/metrics.jsonl` (`CURVES`: the
  loss, −ELBO or NLL, reconstruction, KL, β, MI, active units, learning rate), training and
  validation on the same axes against the step; panels only for the quantities the run logged
  (a language model has no KL).
- `latent_dimensions_figure`: the split-average KL of every latent dimension, sorted
  descending, and beside it, in the same order, the active-unit statistic Var_x E_q[z_d|x]
  on a log scale with the AU threshold (0.01) drawn.
- `pca_figure`: the posterior means of a split projected on their first two principal
  components (`pca_projection`), one panel per labelling (the embedded corpus's four factors,
  a sentiment label, a dialogue act), the explained variance in the axis labels.
- `comparison_figure`: several runs on shared axes: one panel per logged quantity (validation
  solid, training dashed, one colour per run) and, where given, their sorted per-dimension KLs
  and active-unit statistics.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# (metrics.jsonl key, panel title), in panel order. `loss` is the objective the optimiser
# minimised (β-weighted KL, regularisers), logged for training only; `neg_elbo` (VAEs) and
# `nll` (language models) are its β = 1 counterparts logged for both splits.
CURVES: tuple[tuple[str, str], ...] = (
    ("loss", "loss (training objective)"),
    ("neg_elbo", "−ELBO per sentence (nats)"),
    ("nll", "NLL per sentence (nats)"),
    ("rec", "reconstruction −log p(x|z) (nats)"),
    ("kl", "KL(q(z|x) ‖ p(z)) (nats)"),
    ("beta", "β (KL weight)"),
    ("mi", "MI I_q(x; z) (nats)"),
    ("au", "active units"),
    ("learning_rate", "learning rate"),
)
SPLITS: tuple[str, ...] = ("train", "valid")
AU_THRESHOLD = 0.01
# Variances at or below this are drawn at it on the log axis (the unbiased covariance estimate
# of a sampled E_q[z|x] can be slightly negative for an inactive dimension).
VARIANCE_FLOOR = 1e-6
_PANEL_SIZE = (3.6, 2.8)  # inches per panel


@dataclasses.dataclass(frozen=True)
class Colouring:
  """Labels to colour the points of a PCA panel by.

  Attributes:
    name: what the labels are (the panel title), e.g. 'topic' or 'dialogue act'.
    labels: int [N] class of every point.
    class_names: name of every class (index = label).
  """
  name: str
  labels: np.ndarray
  class_names: Sequence[str]


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def scalar_series(records: Sequence[Mapping]) -> dict[tuple[str, str], tuple[np.ndarray,
                                                                             np.ndarray]]:
  """(split, key) -> (steps, values) of the scalar records of a metrics.jsonl, by step.

  Records without 'metrics' (text samples) are skipped; a null value (non-finite when logged)
  becomes NaN, which leaves a gap in the curve. A step logged twice keeps its last value.
  """
  points: dict[tuple[str, str], dict[int, float]] = {}
  for record in records:
    if "metrics" not in record:
      continue
    for key, value in record["metrics"].items():
      points.setdefault((record["split"], key), {})[int(record["step"])] = (
          math.nan if value is None else float(value))
  return {k: (np.array(sorted(v), np.int64), np.array([v[s] for s in sorted(v)], np.float64))
          for k, v in points.items()}


def curve_keys(series: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]
               ) -> list[tuple[str, str]]:
  """The `CURVES` entries with at least one finite value in `series`, in `CURVES` order."""
  present = {key for (_, key), (_, values) in series.items() if np.isfinite(values).any()}
  return [(key, title) for key, title in CURVES if key in present]


def pca_projection(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The rows of `x` [N, d] on their first two principal components.

  With X the centred rows and X = U S Vᵀ its thin SVD, the coordinates are X V[:, :2] and the
  explained variance ratios s_k² / Σ_j s_j². Each component's sign is fixed so that its largest
  loading is positive (the same data always give the same picture). Components beyond the
  rank of X (d = 1, or N ≤ 2) are zero with ratio 0.

  Returns:
    (coords float64 [N, 2], explained float64 [2]).
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"pca_projection needs a non-empty [N, d] array, got shape {x.shape}.")
  centred = x - x.mean(axis=0)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)
  total = float(np.sum(s ** 2))
  coords = np.zeros((x.shape[0], 2))
  explained = np.zeros(2)
  for k in range(min(2, len(s))):
    v = vt[k] * (1.0 if vt[k][np.argmax(np.abs(vt[k]))] >= 0 else -1.0)
    coords[:, k] = centred @ v
    explained[k] = s[k] ** 2 / total if total > 0 else 0.0
  return coords, explained


# ---------------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------------


def new_figure(num_panels: int, max_columns: int = 4, panel_size=_PANEL_SIZE
               ) -> tuple[Figure, list]:
  """A figure on the Agg canvas with `num_panels` axes in rows of at most `max_columns`."""
  columns = max(1, min(max_columns, num_panels))
  rows = max(1, math.ceil(num_panels / columns))
  fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows + 0.5),
               layout="constrained")
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(rows, columns, i + 1) for i in range(num_panels)]
  return fig, axes


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
  """The figure rendered as PNG."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  return buffer.getvalue()


def curves_figure(records: Sequence[Mapping], title: str = "") -> Figure:
  """Training and validation curves of a run, one panel per quantity it logged.

  Each panel (titled as in `CURVES`) plots the quantity against the training step, a line per
  split that logged it ('train', 'valid'; training values are averages over the `log_every`
  steps before each point, validation values the one-sample estimates of the loop's periodic
  evaluation). β and the learning rate are schedules; the active units of the curves are
  counted from the base Gaussian's means (`losses.summarize`).

  Raises:
    ValueError: if the records hold none of the `CURVES` quantities.
  """
  series = scalar_series(records)
  panels = curve_keys(series)
  if not panels:
    raise ValueError("no scalar metrics to plot (none of "
                     f"{', '.join(k for k, _ in CURVES)} was logged).")
  fig, axes = new_figure(len(panels))
  for ax, (key, panel_title) in zip(axes, panels):
    for split in SPLITS:
      if (split, key) in series:
        steps, values = series[(split, key)]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                label=split)
    ax.set_title(panel_title, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  return fig


def latent_dimensions_figure(kl_dims: np.ndarray, au_variance: np.ndarray, *, kl_label: str,
                             au_threshold: float = AU_THRESHOLD, title: str = "") -> Figure:
  """Per-dimension KL (sorted descending) and, beside it, the active-unit statistic.

  Left: bar d' is the d'-th largest of `kl_dims` (nats, averaged over the split's sentences),
  titled `kl_label` (which says whether it is the posterior's exact KL or a base Gaussian's),
  with the sum in the title. Right: Var_x E_q[z_d|x] of the same dimensions in the same order
  on a log scale (values at or below `VARIANCE_FLOOR` drawn at it), the AU threshold as a
  dashed line and the count of dimensions above it in the title. Tick labels name the original
  dimension index when there are at most 40 dimensions.
  """
  kl_dims = np.asarray(kl_dims, np.float64)
  au_variance = np.asarray(au_variance, np.float64)
  if kl_dims.shape != au_variance.shape or kl_dims.ndim != 1:
    raise ValueError(f"kl_dims {kl_dims.shape} and au_variance {au_variance.shape} must be "
                     "[d] vectors of one size.")
  order = np.argsort(-kl_dims, kind="stable")
  rank = np.arange(len(order))
  fig, (kl_ax, au_ax) = new_figure(2, panel_size=(max(4.0, 0.12 * len(order) + 2.5), 3.2))
  kl_ax.bar(rank, kl_dims[order], color="tab:blue")
  kl_ax.set_title(f"{kl_label}\nsum = {kl_dims.sum():.3g} nats", fontsize=9)
  kl_ax.set_ylabel("KL per dimension (nats)")
  active = au_variance > au_threshold
  shown = np.maximum(au_variance[order], VARIANCE_FLOOR)
  au_ax.bar(rank, shown, color=np.where(active[order], "tab:green", "tab:gray"))
  au_ax.set_yscale("log")
  au_ax.axhline(au_threshold, color="tab:red", linestyle="--",
                label=f"AU threshold {au_threshold:g}")
  au_ax.set_title(f"Var_x E_q[z_d|x]: AU = {int(active.sum())} of {len(active)}", fontsize=9)
  au_ax.set_ylabel("variance of the posterior mean")
  au_ax.legend(fontsize=7)
  for ax in (kl_ax, au_ax):
    ax.set_xlabel("dimension (sorted by KL)")
    if len(order) <= 40:
      ax.set_xticks(rank, [str(d) for d in order], fontsize=6)
    ax.grid(axis="y", alpha=0.3)
  if title:
    fig.suptitle(title)
  return fig


def pca_figure(codes: np.ndarray, colourings: Sequence[Colouring] = (), *,
               code_label: str = "posterior means", title: str = "") -> Figure:
  """The rows of `codes` [N, d] on their first two principal components (`pca_projection`),
  one scatter panel per colouring (a single uncoloured panel without any); the axis labels
  give each component's share of the total variance. A legend names the classes (up to 20
  colours are distinct)."""
  coords, explained = pca_projection(codes)
  panels = list(colourings) or [None]
  fig, axes = new_figure(len(panels), max_columns=2, panel_size=(4.6, 4.0))
  for ax, colouring in zip(axes, panels):
    if colouring is None:
      ax.scatter(coords[:, 0], coords[:, 1], s=6, alpha=0.6, linewidths=0)
      ax.set_title(f"{code_label} ({len(coords)} points)", fontsize=9)
    else:
      labels = np.asarray(colouring.labels)
      if labels.shape != (len(coords),):
        raise ValueError(f"colouring {colouring.name!r} has {labels.shape} labels for "
                         f"{len(coords)} points.")
      palette = "tab10" if len(colouring.class_names) <= 10 else "tab20"
      for k, name in enumerate(colouring.class_names):
        rows = labels == k
        if rows.any():
          ax.scatter(coords[rows, 0], coords[rows, 1], s=6, alpha=0.6, linewidths=0,
                     color=_palette_colour(palette, k), label=f"{name} ({int(rows.sum())})")
      ax.set_title(f"{code_label} by {colouring.name}", fontsize=9)
      ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  return fig


def comparison_figure(runs: Mapping[str, Sequence[Mapping]],
                      dimensions: Mapping[str, Mapping] | None = None,
                      title: str = "") -> Figure:
  """Several runs side by side on shared axes.

  One panel per `CURVES` quantity that any run logged: a colour per run, validation solid,
  training dashed. With `dimensions` (run -> `evaluation.dimension_statistics` plus
  'kl_exact', whether the KL is the posterior's own), two more panels: each run's
  per-dimension KL sorted descending (dotted where it is a base Gaussian's, not the exact KL)
  and its Var_x E_q[z_d|x] sorted descending on a log scale with the AU threshold; each
  panel's x axis is the rank of the dimension.
  """
  series = {name: scalar_series(records) for name, records in runs.items()}
  keys = {key for s in series.values() for key, _ in curve_keys(s)}
  panels = [(key, panel_title) for key, panel_title in CURVES if key in keys]
  dimensions = dict(dimensions or {})
  if not panels and not dimensions:
    raise ValueError("none of the runs logged a quantity to compare.")
  columns = min(4, max(len(panels), 2 if dimensions else 1))
  curve_slots = math.ceil(len(panels) / columns) * columns  # the KL panels start a new row
  fig, axes = new_figure(curve_slots + (2 if dimensions else 0), max_columns=columns)
  for ax in axes[len(panels):curve_slots]:
    fig.delaxes(ax)
  colour = {name: _palette_colour("tab10", i) for i, name in enumerate(runs)}
  for ax, (key, panel_title) in zip(axes, panels):
    for name, s in series.items():
      for split, style in (("valid", "-"), ("train", "--")):
        if (split, key) in s:
          steps, values = s[(split, key)]
          ax.plot(steps, values, linestyle=style, color=colour[name],
                  marker="o" if len(steps) < 30 else None, markersize=2,
                  alpha=1.0 if split == "valid" else 0.6)
    ax.set_title(panel_title, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if dimensions:
    kl_ax, au_ax = axes[curve_slots:]
    threshold = AU_THRESHOLD
    for name, stats in dimensions.items():
      kl_dims = np.sort(np.asarray(stats["kl_dims"], np.float64))[::-1]
      variance = np.sort(np.asarray(stats["au_variance"], np.float64))[::-1]
      threshold = stats.get("au_threshold", threshold)
      rank = np.arange(1, len(kl_dims) + 1)
      kl_ax.plot(rank, kl_dims, marker=".", color=colour.get(name),
                 linestyle="-" if stats.get("kl_exact", True) else ":")
      au_ax.plot(rank, np.maximum(variance, VARIANCE_FLOOR), marker=".", color=colour.get(name))
    kl_ax.set_title("KL per dimension, sorted\n(dotted: a base Gaussian's)", fontsize=9)
    kl_ax.set_ylabel("nats")
    au_ax.set_yscale("log")
    au_ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
    au_ax.set_title(f"Var_x E_q[z_d|x], sorted\n(AU threshold {threshold:g})", fontsize=9)
    for ax in (kl_ax, au_ax):
      ax.set_xlabel("dimension rank")
      ax.grid(alpha=0.3)
  handles = [Line2D([], [], color=colour[name], label=name) for name in runs]
  handles += [Line2D([], [], color="black", linestyle="-", label="valid"),
              Line2D([], [], color="black", linestyle="--", label="train")]
  fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
             fontsize=8)
  if title:
    fig.suptitle(title)
  return fig


def _palette_colour(name: str, index: int):
  """Colour `index` of a qualitative matplotlib palette (cycling), without pyplot."""
  cmap = colormaps[name]
  return cmap(index % cmap.N)
