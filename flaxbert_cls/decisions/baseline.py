"""The bag-of-words baseline beside a run: TF-IDF + a linear model on the same rows.

`config.baseline='tfidf'` (the default) fits scikit-learn's TF-IDF (word 1-2-grams,
min_df 2, sublinear tf) and logistic regression (multi-label: one per label, thresholds
tuned on validation as the run tunes its own; regression: ridge) on the run's training
rows (at most `config.baseline_max_rows`, sampled with the run's seed), scores it on the
same validation rows with the task's metrics and saves the scores in workdir/baseline.json.
The loop fits it in a thread on process 0 (`start`), so it never holds up a train step;
every eval's log line and metrics.jsonl record carry its scores as 'baseline/<metric>'.
It fails soft: a baseline that cannot be fitted is one warning, never a failed run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import time
from typing import Any

import joblib
import ml_collections
import numpy as np
from sklearn import feature_extraction
from sklearn import linear_model
from sklearn import pipeline

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.decisions import metrics as metrics_lib
from flaxbert_cls.decisions import thresholds as thresholds_lib
from flaxbert_cls.decisions import tuning

log = logging.getLogger(__name__)

BASELINE_FILE = "baseline.json"  # in the workdir: {"key": ..., "metrics": ..., ...}
# Its class probabilities on the validation rows, in file order (single-label tasks): what a
# blend with the run's own (decisions/blend.py) is chosen on.
PROBABILITIES_FILE = "baseline_probabilities.npy"
MODEL_FILE = "baseline_model.joblib"  # single-label: the fitted TF-IDF + logistic regression
METHODS = ("tfidf", "none")
PREFIX = "baseline/"  # the scores' names in eval lines, metrics.jsonl and eval's output
PAIR_SEPARATOR = " [SEP] "  # two-text tasks: one bag of words over both texts
C = 4.0  # inverse L2 strength (C=1 lost 11 points on 800 20 Newsgroups posts, C=16 lost 0.8 on SST-2)
MAX_FEATURES = 200_000  # the most frequent n-grams kept: bounds the model's memory


def _texts(examples: readers.Examples) -> list[str]:
  return [PAIR_SEPARATOR.join(t) for t in examples.texts]


def sample_rows(num_rows: int, max_rows: int, seed: int) -> np.ndarray:
  """Row indices, in file order: all of them, or `max_rows` drawn without replacement."""
  if num_rows <= max_rows:
    return np.arange(num_rows)
  return np.sort(np.random.default_rng(seed).choice(num_rows, max_rows, replace=False))


def _logistic(x: Any, y: np.ndarray, class_weight: Any, seed: int, c: float
              ) -> linear_model.LogisticRegression:
  return linear_model.LogisticRegression(C=c, max_iter=1000, class_weight=class_weight,
                                         random_state=seed).fit(x, y)


def _label_probabilities(x_train: Any, y_train: np.ndarray, x_eval: Any,
                         class_weights: tuple[float, ...], seed: int, c: float) -> np.ndarray:
  """Multi-label: one logistic regression per label -> P(label) [N, L]; a label without
  both outcomes in training is constant (its training rate)."""
  out = np.zeros((x_eval.shape[0], y_train.shape[1]))
  for j in range(y_train.shape[1]):
    y = y_train[:, j] > 0.5
    if y.all() or not y.any():
      out[:, j] = float(y.mean())
      continue
    weight = {0: 1.0, 1: class_weights[j]} if class_weights else None
    out[:, j] = _logistic(x_train, y, weight, seed, c).predict_proba(x_eval)[:, 1]
  return out


@dataclasses.dataclass(frozen=True)
class Fit:
  metrics: dict[str, float]
  probabilities: np.ndarray | None = None  # single-label: [validation rows, classes]
  model: Any = None  # single-label: the fitted scikit-learn pipeline (texts -> probabilities)


def fit_and_score(train: readers.Examples, validation: readers.Examples, task: tasks_lib.Task,
                  config: ml_collections.ConfigDict, num_labels: int,
                  class_weights: tuple[float, ...] = (), c: float = C) -> dict[str, float]:
  """The baseline's validation metrics, named as the run's ('<metric>_tuned' at thresholds
  tuned on validation, as the run's decisions are; with them '<main>_cross_fitted')."""
  return fit(train, validation, task, config, num_labels, class_weights, c).metrics


def fit(train: readers.Examples, validation: readers.Examples, task: tasks_lib.Task,
        config: ml_collections.ConfigDict, num_labels: int,
        class_weights: tuple[float, ...] = (), c: float = C) -> Fit:
  """`fit_and_score`'s metrics and, for a single-label task, the validation probabilities."""
  seed = int(config.seed)
  rows = sample_rows(len(train), int(config.baseline_max_rows), seed)
  vectorizer = feature_extraction.text.TfidfVectorizer(
      ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=MAX_FEATURES,
      dtype=np.float32)
  texts = _texts(train)
  x_train = vectorizer.fit_transform([texts[i] for i in rows])
  x_eval = vectorizer.transform(_texts(validation))
  y_train, y_eval = np.asarray(train.labels)[rows], np.asarray(validation.labels)
  metric_names = tuple(task.metrics)
  if task.is_regression:
    predictions = linear_model.Ridge(alpha=1.0 / c).fit(x_train, y_train).predict(x_eval)
    return Fit(metrics_lib.compute_metrics(metric_names, predictions, y_eval))
  tune = tuning.tunes_thresholds(config, task.is_multilabel)
  if task.is_multilabel:
    probabilities = _label_probabilities(x_train, y_train, x_eval, class_weights, seed, c)
    out = metrics_lib.multilabel_metrics(metric_names, probabilities > 0.5, y_eval)
    if tune:
      cut = thresholds_lib.per_label_thresholds(probabilities, y_eval)
      out.update({f"{k}_tuned": v for k, v in metrics_lib.multilabel_metrics(
          metric_names, probabilities >= cut, y_eval).items()})
      # Tuned and scored on the same rows overstates unseen-row F1; cross-fitting does not.
      out[f"{task.main_metric}_cross_fitted"] = tuning.cross_fitted(
          probabilities, y_eval, task.main_metric, multi_label=True)
    return Fit(out)
  weight = dict(enumerate(class_weights)) if class_weights else None
  model = _logistic(x_train, y_train, weight, seed, c)
  probabilities = _class_probabilities(model, x_eval, num_labels)
  predictions = probabilities.argmax(-1)
  out = metrics_lib.compute_metrics(metric_names, predictions, y_eval)
  out.setdefault("f1_macro", metrics_lib.compute_metrics(("f1_macro",), predictions,
                                                         y_eval)["f1_macro"])
  if tune and num_labels == 2:
    threshold = thresholds_lib.binary_threshold(probabilities, y_eval, tuning.POSITIVE)
    tuned = thresholds_lib.apply_binary(probabilities, threshold, tuning.POSITIVE)
    names = tuple(dict.fromkeys((*metric_names, "f1")))
    out.update({f"{k}_tuned": v for k, v in
                metrics_lib.compute_metrics(names, tuned, y_eval).items()})
    # As multi-label: each half cut at the threshold tuned on the other, for unseen rows.
    out["f1_cross_fitted"] = tuning.cross_fitted(probabilities, y_eval, "f1", multi_label=False)
  return Fit(out, probabilities.astype(np.float32),
             pipeline.Pipeline([("tfidf", vectorizer), ("logistic_regression", model)]))


def _class_probabilities(model: Any, x: Any, num_labels: int) -> np.ndarray:
  """[N, num_labels]: a class absent from the training rows has probability 0."""
  seen = model.predict_proba(x)  # columns: the classes seen in training
  probabilities = np.zeros((len(seen), num_labels))
  probabilities[:, model.classes_] = seen
  return probabilities


def load_model(workdir: str) -> Any | None:
  """The run's fitted single-label baseline (a scikit-learn pipeline: texts -> probabilities),
  or None when it has none."""
  path = workdir_lib.join(workdir, MODEL_FILE)
  if not workdir_lib.is_file(path):
    return None
  return joblib.load(io.BytesIO(workdir_lib.read_bytes(path)))


def model_probabilities(model: Any, texts: list[tuple[str, ...]], num_labels: int) -> np.ndarray:
  """A saved baseline's class probabilities [N, num_labels] for texts (one or two per row)."""
  return _class_probabilities(model, [PAIR_SEPARATOR.join(t) for t in texts], num_labels)


def check_config(config: ml_collections.ConfigDict) -> str | None:
  """The one-line reason config's baseline keys are wrong, or None."""
  method = config.baseline
  if method not in METHODS:
    return f"config.baseline={method!r}: use one of {METHODS}"
  max_rows = config.baseline_max_rows
  if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2:
    return f"config.baseline_max_rows={max_rows!r}: must be an integer >= 2"
  return None


def _key(config: ml_collections.ConfigDict, train: readers.Examples,
         validation: readers.Examples, class_weights: tuple[float, ...]) -> dict[str, Any]:
  """What the saved scores depend on: a resumed run with the same key reuses them."""
  return {"method": config.baseline, "seed": int(config.seed),
          "max_rows": int(config.baseline_max_rows),
          "train_source": train.source, "train_rows": len(train),
          "validation_source": validation.source, "validation_rows": len(validation),
          "class_weights": list(class_weights),
          "tune_thresholds": config.tune_thresholds}


class Pending:
  """The baseline fitting in a thread; `metrics()` waits for it: {'baseline/<metric>': v}."""

  def __init__(self, target: Any = None):
    self._metrics: dict[str, float] = {}
    self._thread = None
    if target is not None:
      self._thread = threading.Thread(target=self._run, args=(target,), name="baseline",
                                      daemon=True)
      self._thread.start()

  def _run(self, target: Any) -> None:
    try:
      self._metrics = target()
    except Exception as e:  # pylint: disable=broad-except  # fails soft, by design
      log.warning("baseline: not fitted (%s: %s); the run goes on without it",
                  type(e).__name__, str(e).splitlines()[0] if str(e) else "")

  def metrics(self) -> dict[str, float]:
    if self._thread is not None:
      if self._thread.is_alive():
        start = time.time()
        self._thread.join()
        log.info("baseline: waited %.1fs for its fit", time.time() - start)
      self._thread = None
    return {f"{PREFIX}{k}": v for k, v in self._metrics.items()}


def start(exp: Any, workdir: str, train: readers.Examples, validation: readers.Examples,
          process_index: int = 0) -> Pending:
  """Starts the run's baseline (process 0; a single task) unless config.baseline='none'.

  Reuses workdir/baseline.json when it was fitted on the same rows (a resumed run)."""
  config = exp.config
  if config.baseline == "none" or process_index != 0:
    return Pending()
  if exp.multitask:
    log.info("baseline: none for a multi-task run (config.baseline is for one task)")
    return Pending()
  run_task = exp.tasks[0]
  class_weights = tuple(run_task.class_weights)
  key = _key(config, train, validation, class_weights)
  saved = read(workdir)
  if saved and saved.get("key") == key:
    log.info("baseline: TF-IDF + %s scores from %s: %s", _model_name(run_task.task),
             BASELINE_FILE, _format(saved["metrics"]))
    return Pending(lambda: saved["metrics"])

  def fit_and_save() -> dict[str, float]:
    begin = time.time()
    fitted = fit(train, validation, run_task.task, config, run_task.num_labels, class_weights)
    metrics = fitted.metrics
    seconds = time.time() - begin
    if fitted.probabilities is not None:  # before baseline.json: a run never reads a stale one
      buffer = io.BytesIO()
      np.save(buffer, fitted.probabilities)
      workdir_lib.write_bytes(workdir_lib.join(workdir, PROBABILITIES_FILE), buffer.getvalue())
      buffer = io.BytesIO()
      joblib.dump(fitted.model, buffer)
      workdir_lib.write_bytes(workdir_lib.join(workdir, MODEL_FILE), buffer.getvalue())
    workdir_lib.write_text(workdir_lib.join(workdir, BASELINE_FILE), json.dumps(
        {"key": key, "metrics": metrics, "main_metric": run_task.task.main_metric,
         "seconds": seconds}, indent=2))
    log.info("baseline: TF-IDF + %s on %d training rows%s in %.1fs, on %d validation rows: %s",
             _model_name(run_task.task), min(len(train), key["max_rows"]),
             f" (sampled from {len(train)} with seed {key['seed']}: config.baseline_max_rows)"
             if len(train) > key["max_rows"] else "", seconds, len(validation), _format(metrics))
    return metrics

  return Pending(fit_and_save)


def _model_name(task: tasks_lib.Task) -> str:
  return ("ridge regression" if task.is_regression else "logistic regression per label"
          if task.is_multilabel else "logistic regression")


def _format(metrics: dict[str, float]) -> str:
  return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def read(workdir: str) -> dict[str, Any] | None:
  """workdir/baseline.json, or None when the run has none."""
  return workdir_lib.read_json(workdir_lib.join(workdir, BASELINE_FILE))


def for_eval(workdir: str, validation: readers.Examples) -> dict[str, float]:
  """`flaxbert-cls eval`: the saved scores as 'baseline/<metric>' when they were scored on
  these validation rows; {} otherwise (said once: a new file would need a refit)."""
  saved = read(workdir)
  if not saved:
    return {}
  key = saved.get("key", {})
  if (key.get("validation_source"), key.get("validation_rows")) != (validation.source,
                                                                    len(validation)):
    log.info("baseline: %s was scored on %s (%s rows), not on %s: no baseline shown",
             BASELINE_FILE, key.get("validation_source"), key.get("validation_rows"),
             validation.source)
    return {}
  return {f"{PREFIX}{k}": v for k, v in saved["metrics"].items()}


def validation_probabilities(workdir: str, num_rows: int) -> np.ndarray | None:
  """The saved baseline's probabilities on the run's validation rows, or None when the run has
  none for `num_rows` rows (multi-label, regression, no baseline, other rows)."""
  path = workdir_lib.join(workdir, PROBABILITIES_FILE)
  if not workdir_lib.is_file(path):
    return None
  probabilities = np.load(io.BytesIO(workdir_lib.read_bytes(path)))
  return probabilities if len(probabilities) == num_rows else None
