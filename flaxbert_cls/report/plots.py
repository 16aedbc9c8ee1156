"""The report page's plots: matplotlib figures on the Agg canvas, as PNG data: URIs.

No pyplot (no global state, no display); each function returns one embeddable image.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

def figure(width: float, height: float, rows: int = 1, cols: int = 1, **kwargs: Any):
  """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def _png(fig: Any) -> str:
  """The figure as a data: URI, so the page is one file."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def train_plot(records: list[dict[str, Any]]) -> str:
  fig, axes = figure(10, 3, 1, 2)
  steps = [r["step"] for r in records]
  for ax, key, title in ((axes[0, 0], "loss", "training loss (mean since the last log line)"),
                         (axes[0, 1], "learning_rate", "learning rate")):
    ax.plot(steps, [r.get(key, np.nan) for r in records], marker="." if len(steps) < 60 else "")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0, 1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
  return _png(fig)


def eval_plot(series: dict[str, list[tuple[int, float]]], best_step: int | None) -> str:
  """A panel per metric; a 'baseline/<metric>' series is a dotted line in its metric's."""
  baselines = {n[len("baseline/"):]: s[-1][1] for n, s in series.items()
               if n.startswith("baseline/")}
  names = [n for n in series if not n.startswith("baseline/")]
  cols = min(4, len(names))
  rows = -(-len(names) // cols)
  fig, axes = figure(2.6 * cols + 0.4, 2.3 * rows, rows, cols)
  for ax in axes.flat[len(names):]:
    ax.set_visible(False)
  for ax, name in zip(axes.flat, names):
    steps, values = zip(*series[name])
    ax.plot(steps, values, marker="o", markersize=3)
    if name in baselines:
      ax.axhline(baselines[name], color="gray", linestyle=":", label="TF-IDF baseline")
    if best_step is not None and best_step in steps:
      ax.axvline(best_step, color="tab:red", linestyle="--", linewidth=1)
      ax.plot([best_step], [values[steps.index(best_step)]], marker="*", markersize=12,
              color="tab:red", label=f"best (step {best_step})")
    if name in baselines:
      ax.legend(fontsize=7, loc="best")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  if best_step is not None:
    axes.flat[0].legend(fontsize=8, loc="best")
  return _png(fig)


def confusion_plot(confusion: np.ndarray, label_names: list[str]) -> str:
  k = len(label_names)
  size = min(2.5 + 0.5 * k, 9)
  fig, axes = figure(size + 1, size)
  ax = axes[0, 0]
  # Colours by row share (recall), so small classes show their errors too; cells hold counts.
  shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, label="share of the true class")
  if k <= 30:
    for (i, j), count in np.ndenumerate(confusion):
      ax.text(j, i, str(count), ha="center", va="center", fontsize=9,
              color="white" if shares[i, j] > 0.6 else "black")
  ax.set_xticks(range(k), label_names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else
                "center")
  ax.set_yticks(range(k), label_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  return _png(fig)


def scatter_plot(labels: np.ndarray, predictions: np.ndarray) -> str:
  fig, axes = figure(4.5, 4.2)
  ax = axes[0, 0]
  ax.scatter(labels, predictions, s=8, alpha=0.5)
  low = float(min(labels.min(), predictions.min()))
  high = float(max(labels.max(), predictions.max()))
  ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1, label="y = x")
  ax.set_xlabel("true")
  ax.set_ylabel("predicted")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return _png(fig)


def reliability_plot(bins: dict[str, Any]) -> str:
  fig, axes = figure(4.8, 4.6, 2, 1, sharex=True, height_ratios=(3, 1))
  top, bottom = axes[0, 0], axes[1, 0]
  edges, width = bins["edges"], np.diff(bins["edges"])
  filled = bins["count"] > 0
  top.bar(edges[:-1][filled], bins["accuracy"][filled], width=width[filled], align="edge",
          edgecolor="black", linewidth=0.5, label="accuracy")
  top.bar(edges[:-1][filled], (bins["confidence"] - bins["accuracy"])[filled],
          bottom=bins["accuracy"][filled], width=width[filled], align="edge", color="tab:red",
          alpha=0.3, label="gap to confidence")
  top.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
  top.set_ylim(0, 1)
  top.set_ylabel("accuracy")
  top.set_title(f"expected calibration error {bins['ece']:.3f}", fontsize=10)
  top.legend(fontsize=8, loc="upper left")
  bottom.bar(edges[:-1], bins["count"], width=width, align="edge", color="gray")
  bottom.set_xlim(0, 1)
  bottom.set_xlabel("confidence (probability of the predicted class)")
  bottom.set_ylabel("examples")
  return _png(fig)


# --- HTML ----------------------------------------------------------------------------
