"""A run's fitted decisions: temperature and thresholds, fitted, saved, applied and scored.

After each evaluation in training, a run with `calibrate`, `tune_thresholds` or
`thresholds_file` fits them on the validation logits (calibration.py, thresholds.py) and
process 0 writes them to workdir/decisions.json under the evaluated step; the last
evaluation's are the final ones. `eval`, `predict` and `export` read the entry of the
checkpoint they load. The export's config.json carries them as `calibration_temperature`
(transformers refuses a model config with `temperature`, a generation parameter),
`threshold` (binary: P(label id 1) >= threshold) or `thresholds` (multi-label, label
order), which transformers keeps as extra config attributes.

Thresholds read probabilities after the temperature: probabilities = f(logits / T).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from flaxbert_cls.decisions import blend as blend_lib
from flaxbert_cls.decisions import calibration
from flaxbert_cls.decisions import metrics as metrics_lib
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.decisions import thresholds as thresholds_lib
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

DECISIONS_FILE = "decisions.json"  # in the workdir: {"steps": {"<step>": Decisions}}
POSITIVE = 1  # binary single-label: the positive class is label id 1, as metric 'f1'
HF_TEMPERATURE = "calibration_temperature"  # the temperature's key in an export's config.json


@dataclasses.dataclass
class Decisions:
  """How logits become probabilities and labels. None: not tuned (argmax, or 0.5 per label)."""

  temperature: float = 1.0
  threshold: float | None = None  # binary single-label, on P(label id 1)
  thresholds: list[float] | None = None  # multi-label, one per label in label order
  global_threshold: float | None = None  # multi-label, maximising micro F1 (reported only)
  blend_weight: float | None = None  # single-label: the run's share of a blend (blend.py)
  step: int | None = None  # the checkpoint whose validation logits they were fitted on

  def probabilities(self, logits: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """softmax(logits / T) [N, C], or per-label sigmoid(logits / T) [N, L]."""
    if multi_label:
      return calibration.sigmoid(logits, self.temperature)
    return calibration.softmax(logits, self.temperature)

  def predictions(self, probabilities: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """int class ids [N], or bool [N, L] (labels at or over their thresholds)."""
    if multi_label:
      if self.thresholds is None:  # untuned: over 0.5, as evaluate's metrics at 0.5
        return probabilities > thresholds_lib.DEFAULT_THRESHOLD
      return probabilities >= np.asarray(self.thresholds)
    if self.threshold is None:
      return probabilities.argmax(-1)
    return thresholds_lib.apply_binary(probabilities, self.threshold, POSITIVE)

  def blended(self, probabilities: np.ndarray, baseline: np.ndarray | None) -> np.ndarray:
    """The probabilities blended with the baseline's when a weight was chosen."""
    if self.blend_weight is None:
      return probabilities
    if baseline is None:
      raise UserError("decisions: a blend_weight without the baseline's probabilities")
    return blend_lib.blend(probabilities, baseline, self.blend_weight)

  def hf_fields(self) -> dict[str, Any]:
    """The keys an export's config.json carries (always a temperature; tuned thresholds)."""
    fields = {HF_TEMPERATURE: self.temperature}
    if self.threshold is not None:
      fields["threshold"] = self.threshold
    if self.thresholds is not None:
      fields["thresholds"] = list(self.thresholds)
    if self.blend_weight is not None:
      fields["blend_weight"] = self.blend_weight
    return fields

  @classmethod
  def from_hf_config(cls, hf_config: Any, where: str) -> "Decisions":
    """From an export's config.json (its extra keys; defaults when absent)."""
    values = {"temperature": getattr(hf_config, HF_TEMPERATURE, 1.0),
              "threshold": getattr(hf_config, "threshold", None),
              "thresholds": getattr(hf_config, "thresholds", None),
              "blend_weight": getattr(hf_config, "blend_weight", None)}
    multi_label = hf_config.problem_type == tasks_lib.MULTI_LABEL
    return cls.from_dict(values, hf_config.num_labels, multi_label, where, HF_TEMPERATURE)

  @classmethod
  def from_dict(cls, values: dict[str, Any], num_labels: int, multi_label: bool,
                where: str, temperature_key: str = "temperature") -> "Decisions":
    """Checked: temperature > 0, thresholds in (0, 1), one per label (UserError naming `where`)."""
    temperature = values.get("temperature", 1.0)
    if temperature is None:
      temperature = 1.0
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature) or temperature <= 0):
      raise UserError(f"{where}: {temperature_key}={temperature!r}; it must be a number > 0 "
                      "(1.0 = uncalibrated)")
    out = cls(temperature=float(temperature), step=values.get("step"),
              global_threshold=values.get("global_threshold"))
    if values.get("thresholds") is not None:
      if not multi_label:
        raise UserError(f"{where}: 'thresholds' (one per label) is for multi-label models; "
                        "a single-label model takes one binary 'threshold'")
      out.thresholds = thresholds_lib.check_thresholds(values["thresholds"], num_labels,
                                                       where).tolist()
    if values.get("threshold") is not None:
      if multi_label or num_labels != 2:
        raise UserError(f"{where}: 'threshold' is for binary single-label models; this one "
                        f"has {num_labels} {'labels (multi-label)' if multi_label else 'classes'}")
      out.threshold = float(thresholds_lib.check_thresholds([values["threshold"]], 1, where)[0])
    weight = values.get("blend_weight")
    if weight is not None:
      if (multi_label or isinstance(weight, bool) or not isinstance(weight, (int, float))
          or not 0 <= weight <= 1):
        raise UserError(f"{where}: blend_weight={weight!r}; a single-label model's blend "
                        "weight is a number in [0, 1]")
      out.blend_weight = float(weight)
    return out


def tunes_thresholds(config: ml_collections.ConfigDict, multi_label: bool) -> bool:
  """tune_thresholds None (the default): multi-label yes, binary single-label no."""
  tune = config.tune_thresholds
  return multi_label if tune is None else bool(tune)


def enabled(config: ml_collections.ConfigDict, multi_label: bool) -> bool:
  return bool(config.calibrate or config.thresholds_file or config.blend_baseline
              or tunes_thresholds(config, multi_label))


def check_run(exp: Any) -> None:
  """Before training: decisions need one classification task; binary thresholds two classes."""
  config = exp.config
  first = exp.tasks[0].task
  if config.blend_baseline and (exp.multitask or first.is_regression or first.is_multilabel):
    raise UserError("config.blend_baseline: for a single-task, single-label classification "
                    "run")
  if not any(config[k] for k in ("calibrate", "tune_thresholds", "thresholds_file")):
    return
  if exp.multitask:
    raise UserError("config.calibrate / tune_thresholds / thresholds_file: single-task runs "
                    "only; this run has tasks " + ", ".join(t.name for t in exp.tasks))
  task = exp.tasks[0]
  if task.task.is_regression:
    raise UserError("config.calibrate / tune_thresholds / thresholds_file: for classification; "
                    f"task {task.name} is a regression")
  if (config.tune_thresholds or config.thresholds_file) and not (
      task.task.is_multilabel or task.num_labels == 2):
    raise UserError(f"config.tune_thresholds / thresholds_file: a single-label task needs two "
                    f"classes (the threshold is on P(label id 1)); {task.name} has "
                    f"{task.num_labels}")
  if config.thresholds_file:
    user_thresholds(config, task.num_labels, task.task.is_multilabel)


def user_thresholds(config: ml_collections.ConfigDict, num_labels: int,
                    multi_label: bool) -> np.ndarray | None:
  """config.thresholds_file's thresholds (one per label, or one for a binary task)."""
  if not config.thresholds_file:
    return None
  return thresholds_lib.read_thresholds_file(config.thresholds_file,
                                             num_labels if multi_label else 1)


def fit(config: ml_collections.ConfigDict, logits: np.ndarray, labels: np.ndarray,
        multi_label: bool, step: int | None = None, baseline: np.ndarray | None = None,
        metric: str = "accuracy") -> Decisions:
  """Temperature (config.calibrate), then thresholds on the calibrated probabilities
  (tuned, or config.thresholds_file's) on validation logits and labels; with
  config.blend_baseline and the baseline's validation probabilities, the blend weight that
  maximises `metric`."""
  decisions = Decisions(step=step)
  if config.calibrate:
    decisions.temperature = calibration.fit_temperature(logits, labels, multi_label)
  probabilities = decisions.probabilities(logits, multi_label)
  given = user_thresholds(config, logits.shape[-1], multi_label)
  if multi_label:
    if given is not None:
      decisions.thresholds = given.tolist()
    elif tunes_thresholds(config, multi_label):
      decisions.thresholds = thresholds_lib.per_label_thresholds(probabilities, labels).tolist()
    decisions.global_threshold = thresholds_lib.global_threshold(probabilities, labels)
  elif given is not None:
    decisions.threshold = float(given[0])
  elif tunes_thresholds(config, multi_label):
    decisions.threshold = thresholds_lib.binary_threshold(probabilities, labels, POSITIVE)
  if config.blend_baseline and baseline is not None and not multi_label:
    decisions.blend_weight = blend_lib.best_weight(probabilities, baseline, labels, metric)
  return decisions


def scores(decisions: Decisions, logits: np.ndarray, labels: np.ndarray,
           metric_names: tuple[str, ...], multi_label: bool) -> dict[str, float]:
  """Eval metrics of the decisions: ECE before/after the temperature and, with tuned
  thresholds, the task's metrics at them ('<metric>_tuned'; metrics at 0.5 / argmax are
  the eval's own)."""
  uncalibrated = Decisions().probabilities(logits, multi_label)
  out = {"ece": calibration.expected_calibration_error(uncalibrated, labels, multi_label)}
  probabilities = decisions.probabilities(logits, multi_label)
  if decisions.temperature != 1.0:
    out["ece_calibrated"] = calibration.expected_calibration_error(probabilities, labels,
                                                                   multi_label)
    out["temperature"] = decisions.temperature
  if multi_label:
    labels = np.asarray(labels)
    if decisions.thresholds is not None:
      out.update({f"{k}_tuned": v for k, v in metrics_lib.multilabel_metrics(
          metric_names, decisions.predictions(probabilities, True), labels).items()})
    if decisions.global_threshold is not None:  # one threshold for every label (micro F1)
      out.update({f"{k}_global": v for k, v in metrics_lib.multilabel_metrics(
          metric_names, probabilities >= decisions.global_threshold, labels).items()})
      out["global_threshold"] = decisions.global_threshold
  elif decisions.threshold is not None:
    names = tuple(dict.fromkeys((*metric_names, "f1")))
    if "f1" not in metric_names:  # the metric the threshold maximises, at argmax too
      out["f1"] = metrics_lib.compute_metrics(("f1",), probabilities.argmax(-1), labels)["f1"]
    tuned = decisions.predictions(probabilities)
    out.update({f"{k}_tuned": v for k, v in
                metrics_lib.compute_metrics(names, tuned, labels).items()})
    out["threshold"] = decisions.threshold
  return out


def after_eval(exp: Any, workdir: str, step: int, logits: np.ndarray, labels: np.ndarray,
               baseline: np.ndarray | None = None) -> dict[str, float]:
  """In training, after an evaluation: fit on the validation logits (and the baseline's
  validation probabilities, for a blend), save (process 0), return their scores. {} when
  the run asks for no decisions."""
  task = exp.tasks[0]
  multi_label = task.task.is_multilabel
  if exp.multitask or task.task.is_regression or not enabled(exp.config, multi_label):
    return {}
  decisions = fit(exp.config, logits, labels, multi_label, step, baseline,
                  task.task.main_metric)
  if jax.process_index() == 0:
    save(workdir, decisions)
  out = scores(decisions, logits, labels, tuple(task.task.metrics), multi_label)
  if decisions.blend_weight is not None:
    out.update(blend_lib.scores(decisions.probabilities(logits), baseline, labels,
                                task.task.main_metric))
  elif exp.config.blend_baseline:
    log.warning("blend_baseline: no baseline probabilities for these validation rows yet; "
                "step %d decides by the run alone", step)
  return out


def for_eval(exp: Any, workdir: str, logits: np.ndarray, labels: np.ndarray
             ) -> dict[str, float]:
  """`flaxbert-cls eval`: the scores of the decisions saved for the loaded checkpoint
  (thresholds from config.thresholds_file when given); {} when there are none."""
  task = exp.tasks[0]
  multi_label = task.task.is_multilabel
  if exp.multitask or task.task.is_regression:
    return {}
  decisions = load(workdir, exp.checkpoint_step, task.num_labels, multi_label)
  given = user_thresholds(exp.config, task.num_labels, multi_label)
  if decisions is None and given is None:
    return {}
  decisions = decisions or Decisions(step=exp.checkpoint_step)
  if given is not None and multi_label:
    decisions.thresholds = given.tolist()
  elif given is not None:
    decisions.threshold = float(given[0])
  return scores(decisions, logits, labels, tuple(task.task.metrics), multi_label)


def fitted_here(exp: Any, logits: np.ndarray, labels: np.ndarray
                ) -> tuple[dict[str, float], Decisions | None]:
  """Decisions fitted on these rows, their scores on them ('<metric>_tuned': optimistic) and
  cross-fitted ('<main>_cross_fitted': each half at the other half's thresholds, an estimate
  for unseen rows); for what no training fitted decisions for (a sweep's ensemble)."""
  task = exp.tasks[0]
  multi_label, main = task.task.is_multilabel, task.task.main_metric
  if exp.multitask or task.task.is_regression or not enabled(exp.config, multi_label):
    return {}, None
  decisions = fit(exp.config, logits, labels, multi_label, step=exp.checkpoint_step, metric=main)
  out = scores(decisions, logits, labels, tuple(task.task.metrics), multi_label)
  if (decisions.thresholds if multi_label else decisions.threshold) is not None:
    out[f"{main}_cross_fitted"] = cross_fitted(decisions.probabilities(logits, multi_label),
                                               labels, main, multi_label)
  return out, decisions


def ensemble_key(step: int | None) -> str:
  """decisions.json's key of a sweep's members averaged at `step` (eval --member=mean)."""
  return f"mean@{step}"


def cross_fitted(probabilities: np.ndarray, labels: np.ndarray, metric: str,
                 multi_label: bool) -> float:
  """`metric` with thresholds cross-fitted on these rows (each half cut at the thresholds
  tuned on the other half): per label, or on P(class POSITIVE) for a binary task."""
  if multi_label:
    return metrics_lib.multilabel_metrics(
        (metric,), thresholds_lib.cross_fitted_decisions(probabilities, labels), labels)[metric]
  return metrics_lib.compute_metrics(
      (metric,), thresholds_lib.cross_fitted_binary(probabilities, labels, POSITIVE),
      labels)[metric]


def save(workdir: str, decisions: Decisions, key: str | None = None) -> str:
  """Adds `decisions` under `key` (default: its step) to workdir/decisions.json (process 0
  only)."""
  path = workdir_lib.join(workdir, DECISIONS_FILE)
  saved = workdir_lib.read_json(path) or {"steps": {}}
  saved["steps"][key or str(decisions.step)] = dataclasses.asdict(decisions)
  workdir_lib.write_text(path, json.dumps(saved, indent=2))
  return path


def load(workdir: str, step: int | None, num_labels: int, multi_label: bool
         ) -> Decisions | None:
  """The decisions fitted at checkpoint `step` (else the last fitted, with a warning);
  None when the run saved none."""
  path = workdir_lib.join(workdir, DECISIONS_FILE)
  saved = workdir_lib.read_json(path)
  if not saved or not saved.get("steps"):
    return None
  steps = saved["steps"]
  key = str(step)
  if key not in steps:
    key = max(steps, key=lambda s: int(s) if s.isdigit() else -1)
    log.warning("%s: no decisions fitted at step %s; using those of step %s", path, step, key)
  return Decisions.from_dict(steps[key], num_labels, multi_label, f"{path} step {key}")


def load_for(exp: Any, workdir: str) -> Decisions | None:
  """The loaded run's decisions (`load`); for a sweep's members averaged, those `eval
  --member=mean` fitted at this step, refused in one line when it has not."""
  task = exp.tasks[0]
  multi_label = task.task.is_multilabel
  if exp.member != "mean":
    return load(workdir, exp.checkpoint_step, task.num_labels, multi_label)
  if not enabled(exp.config, multi_label):
    return None
  path = workdir_lib.join(workdir, DECISIONS_FILE)
  key = ensemble_key(exp.checkpoint_step)
  entry = ((workdir_lib.read_json(path) or {}).get("steps") or {}).get(key)
  if entry is None:
    raise UserError(f"{path}: no decisions for the members' mean at step "
                    f"{exp.checkpoint_step}; run `flaxbert-cls eval --workdir={workdir} "
                    f"--member=mean --step={exp.checkpoint_step}` first (it fits them)")
  return Decisions.from_dict(entry, task.num_labels, multi_label, f"{path} {key}")
