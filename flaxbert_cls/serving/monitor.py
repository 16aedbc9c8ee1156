"""Drift monitoring: the model's view of a reference data set and a current one, compared.

  flaxbert-cls monitor --model=DIR --reference=REF --current=NEW [--output=DIR]
      [--psi_threshold=0.2] [--p_value=0.01] [--label_column=label]

Both files go through predict's inference path (`predict.Predictor`: the run's tokenizer,
truncation, buckets and logits). Per example it takes the predicted label, the confidence
(max probability), the entropy of the probabilities (a regression model: its score), the
input length in tokens (after truncation: what the model sees) and the unknown-token rate
(unknown tokens / non-special tokens). Each feature gets a population stability index
(PSI) and a two-sample test: chi-square on the predicted-label counts, Kolmogorov-Smirnov
on the others. A feature drifts when its PSI is above `psi_threshold` AND its p-value is
below `p_value`; any drifting feature makes the verdict DRIFT (exit status 3), else
STABLE (0). With `--label_column` both files' gold labels give each set's metrics too
(reported, not part of the verdict).

PSI = sum over bins of (c - r) * ln(c / r), r and c the reference's and current's share of
examples in the bin. Bins: the reference's deciles as edges, right-closed like
pandas.qcut (e_{i-1}, e_i], duplicate edges merged (so a feature that is mostly 0 still
splits 0 from > 0), open-ended outer bins; the predicted label's bins are its classes. A
share of 0 counts as 1e-4, so an empty bin gives a large but finite PSI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
from scipy import stats

from flaxbert_cls.training import evaluate as evaluate_lib
from flaxbert_cls.decisions import metrics as metrics_lib
from flaxbert_cls.report import plots
from flaxbert_cls.serving import predict as predict_lib
from flaxbert_cls.data import readers
from flaxbert_cls.data import tokenization
from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

DRIFT_EXIT_CODE = 3
REPORT_NAME = "monitor.json"
FIGURE_NAME = "monitor.png"
PSI_BINS = 10
PSI_FLOOR = 1e-4  # the share an empty bin counts as


@dataclasses.dataclass
class View:
  """The model's view of one data set: per-example features, and metrics when labelled."""

  source: str
  features: dict[str, np.ndarray]  # name -> [n]; 'predicted_label' holds class ids
  metrics: dict[str, float] | None
  truncated: int


def model_view(predictor: predict_lib.Predictor, path: str,
               label_column: str | None = None) -> View:
  """Reads `path`, predicts it, and measures the features of every example."""
  task = predictor.task
  if label_column:
    task = dataclasses.replace(task, label_field=label_column,
                               label_names=predictor.label_names,
                               is_regression=predictor.is_regression)
  examples = readers.read_file(path, task, require_labels=bool(label_column))
  if not len(examples):
    raise UserError(f"{path}: no rows")
  split = tokenization.tokenize(predictor.tokenizer, examples.texts, None,
                                predictor.max_seq_length)
  logits = predictor.logits(split)
  features = {}
  if predictor.is_regression:
    predictions = logits[:, 0].astype(np.float64)
    features["score"] = predictions
  else:
    probs = evaluate_lib.softmax(logits)
    predictions = probs.argmax(-1)
    features["predicted_label"] = predictions
    features["confidence"] = probs.max(-1)
    features["entropy"] = -np.sum(probs * np.log(np.clip(probs, 1e-300, None)), -1)
  lengths = split.lengths
  features["length"] = lengths.astype(np.float64)
  features["unknown_rate"] = _unknown_rate(predictor.tokenizer, split)
  metrics = None
  if label_column:
    names = ("pearson", "spearmanr") if predictor.is_regression else task.metrics
    metrics = metrics_lib.compute_metrics(names, predictions, examples.labels)
  log.info("monitor: %d rows from %s, mean length %.1f tokens, %d truncated to %d", len(split),
           path, lengths.mean(), split.num_truncated, predictor.max_seq_length)
  return View(path, features, metrics, split.num_truncated)


def _unknown_rate(tokenizer: Any, split: tokenization.TokenizedSplit) -> np.ndarray:
  """Per example: unknown tokens / tokens that are not special ([CLS], [SEP])."""
  if tokenizer.unk_token_id is None:  # byte-level BPE: every input has tokens
    return np.zeros(len(split))
  unknown = np.add.reduceat((split.input_ids == tokenizer.unk_token_id).astype(np.int64),
                            split.offsets[:-1])
  special = np.add.reduceat(np.isin(split.input_ids, tokenizer.all_special_ids).astype(np.int64),
                            split.offsets[:-1])
  return (unknown / np.maximum(split.lengths - special + unknown, 1)).astype(np.float64)


def quantile_edges(reference: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
  """The interior bin edges: the reference's quantiles, duplicates merged."""
  return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Counts in (-inf, e_0], (e_0, e_1], ..., (e_last, inf)."""
  return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


def psi(reference_counts: np.ndarray, current_counts: np.ndarray) -> float:
  """Population stability index of two histograms over the same bins."""
  r = np.maximum(reference_counts / reference_counts.sum(), PSI_FLOOR)
  c = np.maximum(current_counts / current_counts.sum(), PSI_FLOOR)
  return float(np.sum((c - r) * np.log(c / r)))


def compare_feature(reference: np.ndarray, current: np.ndarray,
                    num_classes: int | None = None) -> dict[str, Any]:
  """PSI and the two-sample test of one feature; `num_classes`: a categorical feature."""
  if num_classes is not None:
    ref_counts = np.bincount(reference, minlength=num_classes)
    cur_counts = np.bincount(current, minlength=num_classes)
    table = np.stack([ref_counts, cur_counts])
    table = table[:, table.sum(0) > 0]
    # One class in both sets: nothing to test (the counts cannot differ in shape).
    statistic, p = ((0.0, 1.0) if table.shape[1] < 2
                    else stats.chi2_contingency(table, correction=False)[:2])
    summary = {"test": "chi2"}  # the counts are the summary: class ids have no mean
  else:
    edges = quantile_edges(reference)
    ref_counts, cur_counts = bin_counts(reference, edges), bin_counts(current, edges)
    result = stats.ks_2samp(reference, current)
    statistic, p = result.statistic, result.pvalue
    summary = {"test": "ks", "reference_mean": float(np.mean(reference)),
               "current_mean": float(np.mean(current)), "bin_edges": edges.tolist()}
  return {"psi": psi(ref_counts, cur_counts), "statistic": float(statistic), "p_value": float(p),
          **summary, "reference_counts": ref_counts.tolist(),
          "current_counts": cur_counts.tolist()}


def compare(reference: View, current: View, label_names: Sequence[str] | None,
            psi_threshold: float, p_value: float) -> dict[str, Any]:
  """The report: every feature's comparison, the drifting ones, and the verdict."""
  features = {}
  for name in reference.features:
    classes = len(label_names) if name == "predicted_label" else None
    result = compare_feature(reference.features[name], current.features[name], classes)
    result["drift"] = result["psi"] > psi_threshold and result["p_value"] < p_value
    features[name] = result
  drifted = [name for name, f in features.items() if f["drift"]]
  return {
      "verdict": "drift" if drifted else "stable", "drifted": drifted,
      "rule": f"a feature drifts when PSI > {psi_threshold:g} and p < {p_value:g}",
      "psi_threshold": psi_threshold, "p_value": p_value,
      "psi_binning": f"reference deciles (right-closed, duplicates merged); empty share "
                     f"counts as {PSI_FLOOR:g}",
      "label_names": list(label_names) if label_names else None,
      "sets": {which: {"source": view.source, "rows": len(view.features["length"]),
                       "truncated": view.truncated, "metrics": view.metrics}
               for which, view in (("reference", reference), ("current", current))},
      "features": features,
  }


def verdict_line(report: dict[str, Any]) -> str:
  """One line a person (or a scheduler's log) reads: the verdict and why."""
  features = report["features"]
  if report["drifted"]:
    why = ", ".join(f"{n} PSI {features[n]['psi']:.3f} p={features[n]['p_value']:.2g}"
                    for n in report["drifted"])
    return f"monitor: DRIFT in {len(report['drifted'])} of {len(features)} features ({why}); " \
           f"{report['rule']}"
  top = max(features, key=lambda n: features[n]["psi"])
  return (f"monitor: STABLE (largest PSI {features[top]['psi']:.3f} for {top}, p="
          f"{features[top]['p_value']:.2g}); {report['rule']}")


def write_figure(reference: View, current: View, report: dict[str, Any], path: str) -> None:
  """One panel per feature, reference and current side by side (shares of examples)."""
  names = list(report["features"])
  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plots.figure(4.2 * cols, 3.2 * rows, rows, cols)
  for ax in axes.flat[len(names):]:
    ax.set_visible(False)
  for ax, name in zip(axes.flat, names):
    ref, cur = reference.features[name], current.features[name]
    if name == "predicted_label":
      labels = report["label_names"]
      x = np.arange(len(labels))
      for offset, counts, which in ((-0.2, report["features"][name]["reference_counts"],
                                     "reference"),
                                    (0.2, report["features"][name]["current_counts"], "current")):
        ax.bar(x + offset, np.asarray(counts) / max(sum(counts), 1), 0.4, label=which)
      ax.set_xticks(x, labels, fontsize=8)
    else:
      edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=30)
      for values, which in ((ref, "reference"), (cur, "current")):
        ax.hist(values, edges, weights=np.full(len(values), 1 / len(values)), alpha=0.55,
                label=which)
    f = report["features"][name]
    ax.set_title(f"{name}: PSI {f['psi']:.3f}, p={f['p_value']:.2g}"
                 + (" DRIFT" if f["drift"] else ""), fontsize=9,
                 color="crimson" if f["drift"] else "black")
    ax.set_ylabel("share of examples", fontsize=8)
    ax.legend(fontsize=7)
  fig.savefig(path, format="png")


def monitor(model: str, reference: str, current: str, output: str | None = None,
            psi_threshold: float = 0.2, p_value: float = 0.01, step: int | str | None = None,
            text_fields: Sequence[str] | None = None,
            label_column: str | None = None) -> dict[str, Any]:
  """`flaxbert-cls monitor`: the report (also written to output/monitor.json + .png)."""
  if not psi_threshold > 0:
    raise UserError(f"--psi_threshold={psi_threshold}: must be > 0")
  if not 0 < p_value < 1:
    raise UserError(f"--p_value={p_value}: must be in (0, 1)")
  if output and os.path.exists(output) and not os.path.isdir(output):
    raise UserError(f"--output={output}: not a directory")
  predictor = predict_lib.Predictor.from_path(model, step=step, text_fields=text_fields)
  views = [model_view(predictor, path, label_column) for path in (reference, current)]
  report = compare(*views, predictor.label_names, psi_threshold, p_value)
  report["model"] = predictor.source
  if output:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, REPORT_NAME), "w") as f:
      json.dump(report, f, indent=2)
    write_figure(*views, report, os.path.join(output, FIGURE_NAME))
  return report


def table(report: dict[str, Any]) -> str:
  """The per-feature lines printed before the verdict."""
  lines = [f"{'feature':<16}{'PSI':>9}{'test':>6}{'p':>11}{'ref mean':>11}{'cur mean':>11}"]
  for name, f in report["features"].items():
    means = (f"{f['reference_mean']:>11.4g}{f['current_mean']:>11.4g}" if "reference_mean" in f
             else f"{'-':>11}{'-':>11}")
    lines.append(f"{name:<16}{f['psi']:>9.4f}{f['test']:>6}{f['p_value']:>11.3g}{means}"
                 + ("  drift" if f["drift"] else ""))
  for which, s in report["sets"].items():
    if s["metrics"]:
      lines.append(f"{which} metrics: " + "  ".join(f"{k}={v:.4f}"
                                                    for k, v in s["metrics"].items()))
  return "\n".join(lines)
