"""Evaluation: the eval step, logits gathering (shared with predict), metrics per task.

Eval is exact: batches sorted by length (less padding), the last one padded with
weight-0 rows, logits gathered from every process and metrics computed on the host
with scikit-learn / scipy (`metrics.py`). `evaluate_workdir` (`flaxbert-cls eval`) also
writes every prediction and the errors to workdir/eval/ for the report page.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.decisions import baseline as baseline_lib
from flaxbert_cls.decisions import blend as blend_lib
from flaxbert_cls.decisions import ensemble as ensemble_lib
from flaxbert_cls.decisions import tuning as decisions_lib
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import runs
from flaxbert_cls.model import long_documents
from flaxbert_cls.decisions import metrics as metrics_lib
from flaxbert_cls.training import progress as progress_lib
from flaxbert_cls.data import readers
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.decisions.calibration import sigmoid, softmax  # also evaluate.softmax / .sigmoid

log = logging.getLogger(__name__)



def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              window_pooling: str = "mean") -> jax.Array:
  """Logits [batch, classes]; for a multi-task model [batch, task, max classes] (zero-padded).

  A window batch gives one row per document: its windows' pooled logits.
  """
  logits = long_documents.document_logits(model, params, batch, window_pooling,
                                          deterministic=True)
  if isinstance(logits, tuple):  # every head in one program: one compile per length bucket
    width = max(x.shape[-1] for x in logits)
    logits = jnp.stack([jnp.pad(x, ((0, 0), (0, width - x.shape[-1]))) for x in logits], 1)
  return logits.astype(jnp.float32)


def jit_eval_step(model: nn.Module, param_shardings: Any = None,
                  batch_sharding: jax.sharding.Sharding | None = None,
                  window_pooling: str = "mean") -> Callable:
  """eval_step jitted for `model`; with shardings, as training places params and batches."""
  step = functools.partial(eval_step, model=model, window_pooling=window_pooling)
  if batch_sharding is None:
    return jax.jit(step)
  return jax.jit(step, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=batch_sharding)


def gather_logits(jit_eval: Callable, params: Any, split: data_lib.TokenizedSplit,
                  batch_size: int, buckets: tuple[int, ...], max_seq_length: int,
                  batch_sharding: jax.sharding.Sharding | None = None,
                  on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
  """float32 logits of every example (document, with windows) of `split` in its order,

  from every process: [n, classes], or [n, task, max classes] for a multi-task model. `on_batch(done, total)`
  is called after each batch (progress).
  """
  out = None
  num_batches = -(-len(split) // batch_size)
  for i, (rows, batch) in enumerate(data_lib.eval_batches(split, batch_size, buckets,
                                                          max_seq_length, batch_sharding)):
    if batch_sharding is not None:
      batch = data_lib.to_global(batch, batch_sharding)
    logits = jit_eval(params, batch)
    # A batch on this process's devices only (a pod's predict: each process its own input)
    # is all here; a batch over every process's devices is gathered.
    if not (isinstance(logits, jax.Array) and logits.is_fully_addressable):
      logits = multihost_utils.process_allgather(logits, tiled=True)
    logits = np.asarray(logits)
    if out is None:
      out = np.zeros((len(split), *logits.shape[1:]), np.float32)
    real = rows >= 0
    out[rows[real]] = logits[real]
    if on_batch is not None:
      on_batch(i + 1, num_batches)
  return out


def evaluate(exp: experiment_lib.Experiment, params: Any, split: data_lib.TokenizedSplit,
             jit_eval: Callable, task_index: int = 0) -> tuple[dict[str, float], np.ndarray]:
  """Exact metrics of one task over every example once; returns (metrics, logits).

  `task_index`: which task of a multi-task run `split` belongs to. `params` may be a sweep's
  `runs.Members`: each member's logits, then the ensemble's (the mean probability's logits).
  """
  cfg = exp.config
  run_task = exp.tasks[task_index]
  task = run_task.task
  member_logits = []
  for i, member in enumerate(params.params if isinstance(params, runs.Members) else [params]):
    where = f"eval {run_task.name}" + (f" member {i}" if isinstance(params, runs.Members) else "")
    logits = gather_logits(jit_eval, member, split, cfg.eval_batch_size, cfg.seq_buckets,
                           cfg.max_seq_length, exp.batch_sharding,
                           progress_lib.BatchProgress(where))
    if logits.ndim == 3:  # multi-task: [n, task, max classes]
      logits = logits[:, task_index, :run_task.num_labels]
    member_logits.append(logits)
  logits = member_logits[0] if len(member_logits) == 1 else ensemble_lib.ensemble_logits(
      member_logits, task.is_multilabel, task.is_regression)
  labels = split.labels
  if task.is_regression:
    predictions = logits[:, 0]
    loss = float(np.mean(np.square(predictions - labels)))
    results = {"loss": loss, **metrics_lib.compute_metrics(task.metrics, predictions, labels)}
  elif task.is_multilabel:
    # BCE as the train step's (unweighted); decisions at probability 0.5 (logit 0).
    loss = float(np.mean(np.logaddexp(0.0, logits) - labels * logits))
    results = {"loss": loss, **metrics_lib.multilabel_metrics(task.metrics, logits > 0, labels)}
  else:
    predictions = logits.argmax(-1)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = float(-np.mean(log_probs[np.arange(len(labels)), labels]))
    results = {"loss": loss, **metrics_lib.compute_metrics(task.metrics, predictions, labels)}
    # Every classification run reports macro F1 (imbalanced classes), whatever its main metric.
    results.setdefault("f1_macro", metrics_lib.compute_metrics(
        ("f1_macro",), predictions, labels)["f1_macro"])
  return results, logits


def per_class(run_task: experiment_lib.RunTask, logits: np.ndarray, labels: np.ndarray
              ) -> dict[str, dict[str, float]] | None:
  """Precision / recall / F1 / support per class (multi-label: per label at 0.5); None for
  regression."""
  if run_task.task.is_regression:
    return None
  decisions = logits > 0 if run_task.task.is_multilabel else logits.argmax(-1)
  return metrics_lib.per_class_metrics(decisions, labels, run_task.label_names)


def evaluate_tasks(exp: experiment_lib.Experiment, params: Any,
                   splits: list[data_lib.TokenizedSplit], jit_eval: Callable
                   ) -> tuple[dict[str, float], list[dict[str, Any]], list[np.ndarray]]:
  """Every task on its own dev set: (flat metrics, metrics.jsonl records without 'step',
  each task's logits).

  Single task: the task's metrics, one record. Multi-task: '<task>/<metric>' keys plus
  'average' (the mean of the tasks' main metrics); a record per task and an 'average' one.
  """
  if not exp.multitask:
    metrics, logits = evaluate(exp, params, splits[0], jit_eval)
    return metrics, [{"split": "validation", **metrics,
                      **_per_class_record(exp.tasks[0], logits, splits[0].labels)}], [logits]
  flat, records, main, all_logits = {}, [], [], []
  for i, (run_task, split) in enumerate(zip(exp.tasks, splits)):
    metrics, logits = evaluate(exp, params, split, jit_eval, task_index=i)
    flat.update({f"{run_task.name}/{k}": v for k, v in metrics.items()})
    main.append(metrics[run_task.task.main_metric])
    records.append({"split": "validation", "task": run_task.name, **metrics,
                    **_per_class_record(run_task, logits, split.labels)})
    all_logits.append(logits)
  flat["average"] = float(np.mean(main))
  records.append({"split": "validation", "task": "average", "score": flat["average"],
                  "tasks": {t.name: m for t, m in zip(exp.tasks, main)}})
  return flat, records, all_logits


def _per_class_record(run_task: experiment_lib.RunTask, logits: np.ndarray,
                      labels: np.ndarray) -> dict[str, Any]:
  table = per_class(run_task, logits, labels)
  return {} if table is None else {"per_class": table}


def format_metrics(metrics: dict[str, float]) -> str:
  return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def evaluate_workdir(workdir: str, overrides: ml_collections.ConfigDict | None = None,
                     step: int | str | None = None, member: int | str | None = None
                     ) -> dict[str, float]:
  """Re-evaluates a run's checkpoint on its validation data (or an overridden file).

  Also writes workdir/eval/: predictions.jsonl (every example), errors.jsonl (the
  misclassified ones, most confident first) and eval.json (step, metrics, tasks).
  """
  exp, params = runs.load_run(workdir, overrides, step, member=member)
  read = experiment_lib.read_examples_tokenized(exp, "validation")
  results, _, logits = evaluate_tasks(
      exp, params, [t for _, t in read],
      jit_eval_step(exp.model, window_pooling=exp.config.window_pooling))
  if isinstance(params, runs.Members):  # no training saved an ensemble's decisions: fit them
    scores, decisions = decisions_lib.fitted_here(exp, logits[0], read[0][1].labels)
    results.update(scores)
    if decisions is not None and overrides is None and jax.process_index() == 0:
      # for export and predict of the mean (on the run's own validation rows only)
      decisions_lib.save(workdir, decisions, decisions_lib.ensemble_key(exp.checkpoint_step))
  else:  # metrics at the saved temperature / thresholds too (decisions/tuning.py)
    results.update(decisions_lib.for_eval(exp, workdir, logits[0], read[0][1].labels))
  results.update(baseline_lib.for_eval(workdir, read[0][0]))  # scored when the run trained
  results.update(_blend_scores(exp, workdir, logits[0], read[0][1].labels))
  log.info("eval of %s (step %d): %s", workdir, exp.checkpoint_step, format_metrics(results))
  if jax.process_index() == 0:
    write_eval_files(workdir, exp, [e for e, _ in read], logits, results, exp.checkpoint_step,
                     _best_step(exp))
  return results


def _best_step(exp: experiment_lib.Experiment) -> int | None:
  """The loaded run's best step so far (a sweep member's own; none for the members' mean)."""
  best = (exp.checkpoint_meta or {}).get("best")
  if isinstance(best, list):  # a sweep: one per member
    best = best[exp.member] if isinstance(exp.member, int) else None
  return (best or {}).get("step")


def _blend_scores(exp: experiment_lib.Experiment, workdir: str, logits: np.ndarray,
                  labels: np.ndarray) -> dict[str, float]:
  """A single-label run blended with its baseline (decisions/blend.py) on the validation
  rows the baseline was scored on; {} otherwise."""
  task = exp.tasks[0].task
  if exp.multitask or task.is_regression or task.is_multilabel:
    return {}
  baseline = baseline_lib.validation_probabilities(workdir, len(labels))
  if baseline is None or baseline.shape != logits.shape:
    return {}
  return blend_lib.scores(softmax(logits), baseline, labels, task.main_metric)


def prediction_rows(run_task: experiment_lib.RunTask, examples: readers.Examples,
                    logits: np.ndarray) -> list[dict[str, Any]]:
  """One JSON-ready row per example, in file order.

  Classification: text (text_pair), line, label, prediction, confidence (the predicted
  class's probability), probabilities. Regression: label, prediction, error. Multi-label:
  label and prediction are lists of names (probability > 0.5), confidence the least
  sure label's max(p, 1 - p), probabilities every label's.
  """
  rows = []
  multilabel = run_task.task.is_multilabel
  probs = (None if run_task.task.is_regression else sigmoid(logits) if multilabel
           else softmax(logits))
  for i, texts in enumerate(examples.texts):
    row = {"line": examples.line_numbers[i], "text": texts[0]}
    if len(texts) > 1:
      row["text_pair"] = texts[1]
    if probs is None:
      label, prediction = float(examples.labels[i]), float(logits[i, 0])
      row.update(label=label, prediction=prediction, error=prediction - label)
    elif multilabel:
      names, p = run_task.label_names, probs[i]
      row.update(label=[n for n, y in zip(names, examples.labels[i]) if y > 0.5],
                 prediction=[n for n, q in zip(names, p) if q > 0.5],
                 confidence=float(np.maximum(p, 1 - p).min()),
                 probabilities={n: float(q) for n, q in zip(names, p)})
    else:
      names, p = run_task.label_names, probs[i]
      row.update(label=names[int(examples.labels[i])], prediction=names[int(p.argmax())],
                 confidence=float(p.max()),
                 probabilities={n: float(q) for n, q in zip(names, p)})
    rows.append(row)
  return rows


def error_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The misclassified rows, most confident first; regression: every row, largest
  absolute error first (there is no 'wrong', only how far)."""
  if rows and "error" in rows[0]:
    return sorted(rows, key=lambda r: -abs(r["error"]))
  return sorted((r for r in rows if r["prediction"] != r["label"]),
                key=lambda r: -r["confidence"])


def write_eval_files(workdir: str, exp: experiment_lib.Experiment,
                     examples: list[readers.Examples], logits: list[np.ndarray],
                     results: dict[str, float], step: int | None, best_step: int | None) -> str:
  """workdir/eval/{predictions,errors}.jsonl and eval.json (of checkpoint `step`).

  A multi-task run's rows carry 'task' (grouped in task order). Returns the directory.
  """
  directory = workdir_lib.prepare(workdir_lib.join(workdir, workdir_lib.EVAL_DIR))
  predictions, errors = [], []
  for run_task, task_examples, task_logits in zip(exp.tasks, examples, logits):
    rows = prediction_rows(run_task, task_examples, task_logits)
    if exp.multitask:
      rows = [{"task": run_task.name, **r} for r in rows]
    predictions += rows
    errors += error_rows(rows)
  for name, rows in ((workdir_lib.PREDICTIONS_FILE, predictions),
                     (workdir_lib.ERRORS_FILE, errors)):
    workdir_lib.write_text(workdir_lib.join(directory, name), "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  summary = {
      "step": step,
      "best_step": best_step,
      "metrics": results,
      "tasks": [{"name": t.name, "is_regression": t.task.is_regression,
                 "problem_type": t.task.problem_type,
                 "label_names": list(t.label_names) if t.label_names else None,
                 "main_metric": t.task.main_metric, "source": e.source,
                 "per_class": per_class(t, l, e.labels)}
                for t, e, l in zip(exp.tasks, examples, logits)]}
  workdir_lib.write_text(workdir_lib.join(directory, workdir_lib.SUMMARY_FILE), json.dumps(summary, indent=2))
  log.info("eval: wrote %s (%d predictions, %d errors)", directory, len(predictions), len(errors))
  return directory
