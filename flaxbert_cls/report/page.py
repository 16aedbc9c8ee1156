"""The report page: `flaxbert-cls report --workdir=DIR` writes DIR/report/index.html.

One self-contained HTML file (plots are PNGs embedded as base64; it opens from disk,
with no server and no network): the run's config; training loss and learning rate
(train_log.jsonl); every eval metric over steps with the best step marked
(metrics.jsonl); and for the best checkpoint on the validation set, one section per
task from what `flaxbert-cls eval` wrote to DIR/eval/: a confusion matrix (or
predicted-vs-true scatter for regression), per-class precision/recall/F1, a
reliability diagram and the most confidently wrong examples. The eval runs first
(`evaluate.evaluate_workdir`) when its files are missing or are for another step.

The numbers come from small NumPy functions (`confusion_matrix`, `per_class_scores`,
`calibration.calibration_bins`), tested against scikit-learn; plots in `report/plots.py`.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import re
from typing import Any

import ml_collections
import numpy as np

from flaxbert_cls import saved_config
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import evaluate as evaluate_lib
from flaxbert_cls.report import plots as report_plots
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.decisions.calibration import calibration_bins
from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

REPORT_DIR = "report"
PAGE_NAME = "index.html"
NUM_ERRORS_SHOWN = 20
# Config keys worth a glance; the whole config.json is in a fold below them.
SUMMARY_KEYS = ("model_name_or_path", "task_name", "tasks", "train_file", "validation_file",
                "data_dir", "dataset_name", "tfds_name", "num_train_steps", "num_train_epochs",
                "batch_size", "learning_rate", "lr_schedule", "warmup_ratio", "warmup_steps",
                "weight_decay", "max_seq_length", "dtype", "lora_rank", "freeze", "mesh_shape",
                "seed")


# --- Data: the numbers the page shows ---------------------------------------------------


read_jsonl = workdir_lib.read_jsonl  # the records of a JSON Lines file; [] when missing


def read_json(path: str) -> Any:
  try:
    return json.loads(workdir_lib.read_text(path))
  except ValueError as e:
    raise UserError(f"{path}: not JSON ({e})") from None


def last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Records sorted by step, the last written one for a step (a resumed run logs a step
  again after restoring an earlier checkpoint)."""
  return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int
                     ) -> np.ndarray:
  """int64 [true class, predicted class] counts."""
  flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Per class: precision, recall, f1 and support (true count) from a confusion matrix.

  A class never predicted (or never present) scores 0 there, as scikit-learn's
  zero_division=0 does.
  """
  tp = np.diag(confusion).astype(np.float64)
  predicted, support = confusion.sum(0), confusion.sum(1)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  denominator = precision + recall
  f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(tp),
                 where=denominator > 0)
  return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def classification_arrays(rows: list[dict[str, Any]], label_names: list[str]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(true class ids, predicted class ids, probabilities [n, classes]) of prediction rows."""
  index = {name: i for i, name in enumerate(label_names)}
  labels = np.array([index[r["label"]] for r in rows], np.int64)
  predictions = np.array([index[r["prediction"]] for r in rows], np.int64)
  probs = np.array([[r["probabilities"][n] for n in label_names] for r in rows], np.float64)
  return labels, predictions, probs.reshape(len(rows), len(label_names))


# Numbers in metrics.jsonl records that are not metrics: the step, a sweep member's values.
_NOT_METRICS = ("step", "member", "learning_rate", "seed", "weight_decay", "warmup_ratio")


def eval_series(records: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
  """metrics.jsonl as {group: {metric: [(step, value)]}}; group '' for a single task,
  else the task's name (and 'average'); a sweep's groups are 'member<i>[/task]'."""
  def group_of(r: dict[str, Any]) -> str:
    return "/".join(x for x in (f"member{r['member']}" if "member" in r else "",
                                r.get("task", "")) if x)

  out: dict[str, dict[str, list[tuple[int, float]]]] = {}
  for group in dict.fromkeys(group_of(r) for r in records):
    rows = last_per_step([r for r in records if group_of(r) == group])
    names = dict.fromkeys(k for r in rows for k, v in r.items()
                          if k not in _NOT_METRICS and isinstance(v, (int, float)))
    out[group] = {n: [(r["step"], float(r[n])) for r in rows if n in r] for n in names}
  return out


def ensure_eval(workdir: str) -> dict[str, Any]:
  """workdir/eval's eval.json for the best checkpoint (the latest if none was evaluated),
  running `evaluate.evaluate_workdir` first when it is missing or for another step."""
  summary_path = workdir_lib.join(workdir, workdir_lib.EVAL_DIR, workdir_lib.SUMMARY_FILE)
  predictions_path = workdir_lib.join(workdir, workdir_lib.EVAL_DIR,
                                      workdir_lib.PREDICTIONS_FILE)
  summary = None
  if workdir_lib.exists(summary_path) and workdir_lib.exists(predictions_path):
    summary = read_json(summary_path)
  wanted = _best_checkpoint_step(workdir)
  if summary is not None and (wanted is None or summary.get("step") == wanted):
    return summary
  if wanted is None:
    raise UserError(f"{workdir}: no checkpoints and no {workdir_lib.EVAL_DIR}/"
                    f"{workdir_lib.SUMMARY_FILE}: nothing to report on")
  log.info("report: evaluating checkpoint %d (%s)", wanted,
           "no eval files yet" if summary is None else f"eval files are for step "
           f"{summary.get('step')}")
  evaluate_lib.evaluate_workdir(workdir, step=wanted)
  return read_json(summary_path)


def _best_checkpoint_step(workdir: str) -> int | None:
  """The best saved checkpoint by the main metric, else the latest; None without any."""
  try:
    ckpt = checkpoint_lib.Checkpoints(workdir, read_only=True)
  except UserError:
    return None
  try:
    best = ckpt.best_step()
    return best if best is not None else ckpt.latest_step()
  finally:
    ckpt.close()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 16px 40px;
       color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-top: 8px; }
h3 { margin-bottom: 0.3em; } .muted { color: #666; font-size: 0.9em; }
nav a { margin-right: 14px; } img { max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9em; margin: 6px 0 12px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 0.85em; }
"""

# Sets data-images on <body> once every image has decoded: "ok N" or "broken K of N"
# (the headless-browser test reads it back).
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images", broken.length ?
      "broken " + broken.length + " of " + images.length : "ok " + images.length);
});
"""


def _e(value: Any) -> str:
  return html.escape(str(value))


def _img(uri: str, alt: str) -> str:
  return f'<img src="{uri}" alt="{_e(alt)}">'


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
  head = "".join(f"<th>{_e(h)}</th>" for h in header)
  body = "".join(
      "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i >= numeric_from
                       else f"<td>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
      for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _slug(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "task"


def config_summary(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """The SUMMARY_KEYS a run set: not empty, not -1 ('unset'), not overridden by another."""
  shadowed = set()
  if config.tasks:
    shadowed.add("task_name")  # each task names its own
  if config.num_train_steps > 0:
    shadowed.add("num_train_epochs")
  if config.warmup_steps >= 0:
    shadowed.add("warmup_ratio")
  if not config.lora_rank:
    shadowed.add("lora_rank")
  values = config.to_dict()
  return [(k, json.dumps(values[k]) if isinstance(values[k], (list, tuple, dict)) else values[k])
          for k in SUMMARY_KEYS
          if k not in shadowed and values[k] not in (None, "", (), [], -1)]


def _config_section(config: ml_collections.ConfigDict) -> str:
  rows = [list(row) for row in config_summary(config)]
  return (f'<section id="config"><h2>Config</h2>{_table(["key", "value"], rows, 9)}'
          f"<details><summary>config.json</summary><pre>{_e(config.to_json(indent=2))}"
          "</pre></details></section>")


def _training_section(records: list[dict[str, Any]]) -> str:
  if not records:
    body = (f'<p class="muted">No {workdir_lib.TRAIN_LOG_FILE} in the workdir (runs before it '
            "existed log training only to TensorBoard).</p>")
  else:
    last = records[-1]
    body = (f'<p class="muted">{len(records)} log lines up to step {last["step"]}; last: loss '
            f'{last["loss"]:.4f}, {last.get("examples_per_sec", 0):.1f} examples/s.</p>'
            + _img(report_plots.train_plot(records), "training loss and learning rate"))
  return f'<section id="training"><h2>Training</h2>{body}</section>'


def _evaluation_section(records: list[dict[str, Any]], best_step: int | None) -> str:
  if not records:
    return (f'<section id="evaluation"><h2>Evaluation over steps</h2><p class="muted">No '
            f"{workdir_lib.METRICS_FILE} in the workdir.</p></section>")
  parts = []
  for group, series in eval_series(records).items():
    title = f"<h3>{_e(group)}</h3>" if group else ""
    parts.append(title + _img(report_plots.eval_plot(series, best_step), f"eval metrics {group}".strip()))
  best = f"best step {best_step} (red star)" if best_step is not None else "no best step"
  return (f'<section id="evaluation"><h2>Evaluation over steps</h2><p class="muted">Every '
          f"evaluation during training; {best}.</p>{''.join(parts)}</section>")


def _classification_parts(task: dict[str, Any], rows: list[dict[str, Any]],
                          errors: list[dict[str, Any]], slug: str) -> str:
  names = task["label_names"]
  labels, predictions, probs = classification_arrays(rows, names)
  confusion = confusion_matrix(labels, predictions, len(names))
  scores = per_class_scores(confusion)
  table_rows = [[n, f"{scores['precision'][i]:.3f}", f"{scores['recall'][i]:.3f}",
                 f"{scores['f1'][i]:.3f}", int(scores["support"][i])]
                for i, n in enumerate(names)]
  table_rows.append(["macro average", *(f"{scores[k].mean():.3f}"
                                        for k in ("precision", "recall", "f1")),
                     int(scores["support"].sum())])
  bins = calibration_bins(probs.max(-1), predictions == labels)
  error_table = _table(
      ["#", "text", "true", "predicted", "p(predicted)", "p(true)"],
      [[i + 1, _texts(r), r["label"], r["prediction"], f"{r['confidence']:.3f}",
        f"{r['probabilities'][r['label']]:.3f}"] for i, r in enumerate(errors)], 4)
  return (
      f'<div class="row"><div id="{slug}-confusion"><h3>Confusion matrix</h3>'
      f'{_img(report_plots.confusion_plot(confusion, names), "confusion matrix")}</div>'
      f'<div id="{slug}-calibration"><h3>Reliability diagram</h3>'
      f'{_img(report_plots.reliability_plot(bins), "reliability diagram")}<p class="muted">Examples binned '
      "by the probability of the class predicted;<br>a calibrated model's bars touch the "
      "diagonal.</p></div></div>"
      f'<div id="{slug}-per-class"><h3>Per class</h3>'
      f'{_table(["class", "precision", "recall", "F1", "support"], table_rows)}</div>'
      f'<div id="{slug}-errors"><h3>The {len(errors)} most confidently wrong examples</h3>'
      f"{error_table}</div>")


def _multilabel_parts(task: dict[str, Any], errors: list[dict[str, Any]], slug: str) -> str:
  """Per label at 0.5 (eval.json's per_class) and the most confidently wrong rows."""
  table = task.get("per_class") or {}
  table_rows = [[n, *(f"{s[k]:.3f}" for k in ("precision", "recall", "f1")), s["support"]]
                for n, s in table.items()]
  error_table = _table(["#", "text", "true", "predicted", "least sure label's confidence"],
                       [[i + 1, _texts(r), ", ".join(r["label"]), ", ".join(r["prediction"]),
                         f"{r['confidence']:.3f}"] for i, r in enumerate(errors)], 4)
  return (f'<div id="{slug}-per-class"><h3>Per label (threshold 0.5)</h3>'
          f'{_table(["label", "precision", "recall", "F1", "support"], table_rows)}</div>'
          f'<div id="{slug}-errors"><h3>The {len(errors)} most confidently wrong examples</h3>'
          f"{error_table}</div>")


def _regression_parts(rows: list[dict[str, Any]], errors: list[dict[str, Any]],
                      slug: str) -> str:
  labels = np.array([r["label"] for r in rows])
  predictions = np.array([r["prediction"] for r in rows])
  error_table = _table(["#", "text", "true", "predicted", "error"],
                       [[i + 1, _texts(r), f"{r['label']:.3f}", f"{r['prediction']:.3f}",
                         f"{r['error']:+.3f}"] for i, r in enumerate(errors)], 2)
  return (f'<div id="{slug}-scatter"><h3>Predicted vs true</h3>'
          f'{_img(report_plots.scatter_plot(labels, predictions), "predicted vs true")}</div>'
          f'<div id="{slug}-errors"><h3>The {len(errors)} largest errors</h3>{error_table}</div>')


def _texts(row: dict[str, Any]) -> str:
  return row["text"] + (f"  ‖  {row['text_pair']}" if "text_pair" in row else "")


def _task_section(task: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]],
                  errors: list[dict[str, Any]], multitask: bool) -> str:
  slug = f"task-{_slug(task['name'])}"
  prefix = f"{task['name']}/" if multitask else ""
  metrics = {k[len(prefix):]: v for k, v in summary["metrics"].items()
             if k.startswith(prefix) and "/" not in k[len(prefix):]}
  metric_line = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
  baseline = {k[len("baseline/"):]: v for k, v in summary["metrics"].items()
              if k.startswith("baseline/") and not multitask}
  blend = {k[len("blend/"):]: v for k, v in summary["metrics"].items()
           if k.startswith("blend/") and not multitask}
  blend_row = [[f"this run and the baseline, blended (w={blend['weight']:.2f}; cross-fitted)",
                *(f"{blend[k]:.4f}" if k in blend else "-" for k in baseline)]] if blend else []
  compare = f'<div id="{slug}-baseline">' + _table(["", *baseline], [  # baseline row first
      ["TF-IDF + linear model (baseline), same rows", *(f"{v:.4f}" for v in baseline.values())],
      [f"this run, step {summary['step']}", *(f"{metrics[k]:.4f}" if k in metrics else "-"
                                              for k in baseline)],
      *blend_row]) + "</div>" if baseline else ""
  errors = errors[:NUM_ERRORS_SHOWN]
  body = (_regression_parts(rows, errors, slug) if task["is_regression"]
          else _multilabel_parts(task, errors, slug)
          if task.get("problem_type") == "multi_label_classification"
          else _classification_parts(task, rows, errors, slug))
  return (f'<section id="{slug}" class="task"><h2>Task {_e(task["name"])}: checkpoint '
          f'step {_e(summary["step"])}</h2><p class="muted">{len(rows)} examples from '
          f'{_e(task.get("source", ""))}; {_e(metric_line)}</p>{compare}{body}</section>')


def render_page(workdir: str, config: ml_collections.ConfigDict,
                train_records: list[dict[str, Any]],
                eval_records: list[dict[str, Any]], summary: dict[str, Any],
                predictions: list[dict[str, Any]], errors: list[dict[str, Any]]) -> str:
  """The whole page as one HTML string."""
  tasks = summary["tasks"]
  multitask = len(tasks) > 1 or any("task" in r for r in predictions[:1])
  best_step = summary.get("best_step") or summary.get("step")
  sections = [_config_section(config), _training_section(last_per_step(train_records)),
              _evaluation_section(eval_records, best_step)]
  for task in tasks:
    mine = (lambda r, name=task["name"]: r.get("task") == name) if multitask else (lambda r: True)
    sections.append(_task_section(task, summary, [r for r in predictions if mine(r)],
                                  [r for r in errors if mine(r)], multitask))
  nav = "".join(f'<a href="#{i}">{_e(t)}</a>' for i, t in (
      ("config", "Config"), ("training", "Training"), ("evaluation", "Evaluation"),
      *((f"task-{_slug(t['name'])}", f"Task {t['name']}") for t in tasks)))
  title = f"flaxbert-cls report: {workdir}"
  generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}'
          f"</title><style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>"
          f'<p class="muted">{_e(config.model_name_or_path)}; generated {generated}; '
          f"analysis of checkpoint step {_e(summary['step'])} on the validation set.</p>"
          f"<nav>{nav}</nav>{''.join(sections)}<script>{_IMAGE_CHECK}</script></body></html>\n")


def page_path(workdir: str) -> str:
  return workdir_lib.join(workdir_lib.resolve(workdir), REPORT_DIR, PAGE_NAME)


def write_report(workdir: str) -> str:
  """Builds workdir/report/index.html (evaluating the best checkpoint first if needed).

  Returns the page's path.
  """
  workdir = workdir_lib.resolve(workdir)
  config = saved_config.load_saved(workdir)
  summary = ensure_eval(workdir)
  eval_dir = workdir_lib.join(workdir, workdir_lib.EVAL_DIR)
  page = render_page(
      workdir, config,
      read_jsonl(workdir_lib.join(workdir, workdir_lib.TRAIN_LOG_FILE)),
      read_jsonl(workdir_lib.join(workdir, workdir_lib.METRICS_FILE)), summary,
      read_jsonl(workdir_lib.join(eval_dir, workdir_lib.PREDICTIONS_FILE)),
      read_jsonl(workdir_lib.join(eval_dir, workdir_lib.ERRORS_FILE)))
  workdir_lib.prepare(workdir_lib.join(workdir, REPORT_DIR))
  path = page_path(workdir)
  workdir_lib.write_text(path, page)
  log.info("report: wrote %s", path)
  return path
