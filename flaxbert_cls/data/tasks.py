"""Task registry: the nine GLUE tasks and user-defined ('custom') tasks.

A `Task` says which columns hold the text and the label, what the classes are
and which metrics to report. Readers (`readers.py`) and metrics (`metrics.py`)
only look at a `Task`, never at task names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any


from flaxbert_cls import workdir as files
from flaxbert_cls.errors import UserError

# Kept in sync with `metrics.METRIC_NAMES`; duplicated here so that building a
# task does not import scikit-learn / scipy.
_KNOWN_METRICS = ("accuracy", "f1", "f1_macro", "matthews_correlation",
                  "pearson", "spearmanr", "f1_micro", "subset_accuracy")
_REGRESSION_METRICS = ("pearson", "spearmanr")
# Multi-label metrics (metrics.multilabel_metrics); macro F1 is the main one.
MULTILABEL_METRICS = ("f1_macro", "f1_micro", "subset_accuracy")
SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"

_DEFAULT_GLUE_FILES = {
    "train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


@dataclasses.dataclass(frozen=True)
class Task:
  """What to read and how to score one text-classification task.

  Attributes:
    name: 'sst2', ..., or 'custom'.
    text_fields: 1 or 2 column names holding the text (2 = sentence pair).
    label_field: column holding the label.
    label_names: class names in id order (as strings, as they appear in the
      files). None for regression, and for custom tasks whose label map is
      built from the training data (see `readers.build_label_names`).
    is_regression: True for real-valued targets (STS-B); `num_labels` is 1.
    metrics: names understood by `metrics.compute_metrics`.
    main_metric: the metric used for best checkpoint / early stopping.
    hf_dataset: (name, config) for `datasets.load_dataset`, e.g.
      ('nyu-mll/glue', 'sst2').
    hf_text_fields: the text columns in the Hugging Face dataset, where they
      differ from the GLUE TSV columns (MRPC: sentence1/sentence2).
    hf_label_field: the label column in the Hugging Face dataset, where it
      differs from `label_field`.
    hf_splits: split -> HF split name where they differ (MNLI: 'validation' ->
      'validation_matched').
    glue_dir: directory name in a GLUE data directory, e.g. 'SST-2'.
    glue_files: split -> file name in `glue_dir`.
    file_columns: column names for header-less files (CoLA train/dev).
    problem_type: 'single_label_classification', 'multi_label_classification' or
      'regression' (kept equal to is_regression).
    label_delimiter: multi-label TSV/CSV: what joins a row's labels ('3,27').
  """
  name: str
  text_fields: tuple[str, ...]
  label_field: str
  label_names: tuple[str, ...] | None
  is_regression: bool = False
  metrics: tuple[str, ...] = ("accuracy",)
  main_metric: str = "accuracy"
  hf_dataset: tuple[str, str] | None = None
  hf_text_fields: tuple[str, ...] | None = None
  hf_label_field: str | None = None
  # Dicts are not hashable: keep them out of the generated __hash__.
  hf_splits: Mapping[str, str] | None = dataclasses.field(
      default=None, hash=False)
  glue_dir: str | None = None
  glue_files: Mapping[str, str] | None = dataclasses.field(
      default=None, hash=False)
  file_columns: tuple[str, ...] | None = None
  problem_type: str = SINGLE_LABEL
  label_delimiter: str = ","

  def __post_init__(self):
    if self.is_regression and self.problem_type != REGRESSION:
      object.__setattr__(self, "problem_type", REGRESSION)

  @property
  def is_multilabel(self) -> bool:
    return self.problem_type == MULTI_LABEL

  @property
  def num_labels(self) -> int:
    """Size of the model's output layer: 1 for regression."""
    if self.is_regression:
      return 1
    if self.label_names is None:
      raise ValueError(
          f"task {self.name!r} has no label names yet: build them with "
          "readers.build_label_names() and tasks.with_label_names()")
    return len(self.label_names)

  @property
  def is_pair(self) -> bool:
    return len(self.text_fields) == 2

  def hf_split_name(self, split: str) -> str:
    """The Hugging Face split name for 'train' / 'validation' / 'test'."""
    return dict(self.hf_splits or {}).get(split, split)


def _glue(name, text_fields, label_field, label_names, glue_dir, *,
          hf_config=None, hf_text_fields=None, hf_label_field="label",
          **kwargs) -> Task:
  return Task(
      name=name,
      text_fields=tuple(text_fields),
      label_field=label_field,
      label_names=None if label_names is None else tuple(label_names),
      hf_dataset=("nyu-mll/glue", hf_config or name),
      hf_text_fields=None if hf_text_fields is None else tuple(hf_text_fields),
      hf_label_field=hf_label_field,
      glue_dir=glue_dir,
      glue_files=kwargs.pop("glue_files", dict(_DEFAULT_GLUE_FILES)),
      **kwargs)


# Column names are those of the files written by the GLUE download script.
# Label names are the strings in those files, listed in the order of the
# ClassLabel ids of the Hugging Face 'nyu-mll/glue' dataset, so that both
# sources give the same label ids ('0' -> 0, 'not_entailment' -> 1 in RTE...).
GLUE_TASKS: dict[str, Task] = {
    t.name: t for t in [
        _glue("cola", ["sentence"], "label", ["0", "1"], "CoLA",
              # CoLA train/dev have no header line (its test.tsv does).
              file_columns=("source", "label", "mark", "sentence"),
              metrics=("matthews_correlation", "accuracy"),
              main_metric="matthews_correlation"),
        _glue("sst2", ["sentence"], "label", ["0", "1"], "SST-2"),
        _glue("mrpc", ["#1 String", "#2 String"], "Quality", ["0", "1"],
              "MRPC", hf_text_fields=["sentence1", "sentence2"],
              metrics=("f1", "accuracy"), main_metric="f1"),
        # GLUE reports accuracy and F1 for QQP; accuracy is the main metric,
        # as in BERT's paper (Table 1) and most fine-tuning recipes.
        _glue("qqp", ["question1", "question2"], "is_duplicate", ["0", "1"],
              "QQP", metrics=("accuracy", "f1"), main_metric="accuracy"),
        _glue("stsb", ["sentence1", "sentence2"], "score", None, "STS-B",
              is_regression=True, metrics=("pearson", "spearmanr"),
              main_metric="pearson"),
        _glue("mnli", ["sentence1", "sentence2"], "gold_label",
              ["entailment", "neutral", "contradiction"], "MNLI",
              hf_text_fields=["premise", "hypothesis"],
              hf_splits={"validation": "validation_matched",
                         "validation_mismatched": "validation_mismatched",
                         "test": "test_matched"},
              glue_files={"train": "train.tsv",
                          "validation": "dev_matched.tsv",
                          "validation_mismatched": "dev_mismatched.tsv",
                          "test": "test_matched.tsv",
                          "test_mismatched": "test_mismatched.tsv"}),
        _glue("qnli", ["question", "sentence"], "label",
              ["entailment", "not_entailment"], "QNLI"),
        _glue("rte", ["sentence1", "sentence2"], "label",
              ["entailment", "not_entailment"], "RTE"),
        # The files say '0'/'1' (1 = entailment); HF has 0 = not_entailment.
        _glue("wnli", ["sentence1", "sentence2"], "label", ["0", "1"],
              "WNLI"),
    ]
}

# Spellings people use for the same task: 'SST-2', 'sts-b', 'mnli-m'...
_ALIASES = {"mnli-m": "mnli", "mnli_matched": "mnli"}


def _normalize(name: str) -> str:
  key = name.strip().lower()
  if key in _ALIASES:
    return _ALIASES[key]
  return key.replace("-", "").replace("_", "")


def _get(keys: Mapping[str, Any], key: str, default: Any) -> Any:
  value = keys[key] if key in keys else default
  return default if value is None else value


def _str_tuple(value: Any, key: str) -> tuple[str, ...]:
  if isinstance(value, str):
    return (value,)
  if not isinstance(value, Sequence):
    raise UserError(f"config.{key}: expected a list of names, got {value!r}")
  out = []
  for v in value:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
      raise UserError(
          f"config.{key}: {v!r} is not a string (or an integer label)")
    out.append(str(v).strip())
  return tuple(out)


def get_task(keys: Mapping[str, Any]) -> Task:
  """Returns the `Task` named by `keys['task_name']` (a task's config keys, TASK_KEYS).

  For `task_name='custom'` the keys also give `text_columns` (1 or 2
  names), `label_column`, `label_names` (empty = build the label map from the
  training data), `is_regression`, and optionally `metrics` and
  `main_metric`.
  """
  raw_name = _get(keys, "task_name", "")
  if not isinstance(raw_name, str) or not raw_name.strip():
    raise UserError(
        "config.task_name is not set: use one of "
        f"{sorted(GLUE_TASKS)} or 'custom'")
  name = _normalize(raw_name)
  if name in GLUE_TASKS:
    return GLUE_TASKS[name]
  if name != "custom":
    raise UserError(
        f"config.task_name: unknown task {raw_name!r}; known tasks: "
        f"{sorted(GLUE_TASKS) + ['custom']}")
  return _custom_task(keys)


def _custom_task(config: Mapping[str, Any]) -> Task:
  """Builds a custom task from its keys, checking every one."""
  text_columns = _str_tuple(_get(config, "text_columns", ()), "text_columns")
  if len(text_columns) not in (1, 2) or not all(text_columns):
    raise UserError(
        "config.text_columns: give 1 or 2 column names, got "
        f"{list(text_columns)}")
  if len(set(text_columns)) != len(text_columns):
    raise UserError(
        f"config.text_columns: the same column twice: {list(text_columns)}")

  label_column = _get(config, "label_column", "")
  if not isinstance(label_column, str) or not label_column.strip():
    raise UserError("config.label_column: give the name of the label column")
  label_column = label_column.strip()
  if label_column in text_columns:
    raise UserError(
        f"config.label_column: {label_column!r} is also a text column")

  problem_type = _get(config, "problem_type", "") or (
      REGRESSION if _get(config, "is_regression", False) else SINGLE_LABEL)
  if problem_type not in (SINGLE_LABEL, MULTI_LABEL, REGRESSION):
    raise UserError(f"config.problem_type={problem_type!r}: use one of "
                    f"{[SINGLE_LABEL, MULTI_LABEL, REGRESSION]}")
  if _get(config, "is_regression", False) and problem_type != REGRESSION:
    raise UserError(f"config.is_regression=True contradicts config.problem_type="
                    f"{problem_type!r}; set one of them")
  is_regression = problem_type == REGRESSION
  is_multilabel = problem_type == MULTI_LABEL
  label_names = _str_tuple(_get(config, "label_names", ()), "label_names")
  label_names_file = _get(config, "label_names_file", "")
  if label_names_file:
    if label_names:
      raise UserError("config.label_names_file: also gave config.label_names; set one of them")
    label_names = _read_label_names_file(label_names_file)
  delimiter = _get(config, "label_delimiter", ",")
  if is_multilabel and (not isinstance(delimiter, str) or not delimiter):
    raise UserError(f"config.label_delimiter={delimiter!r}: a multi-label task needs a "
                    "non-empty delimiter (e.g. ',' or '|')")
  file_columns = _str_tuple(_get(config, "file_columns", ()), "file_columns")
  if is_regression and label_names:
    raise UserError(
        "config.label_names: a regression task (is_regression=True) has no "
        f"label names, got {list(label_names)}")
  if not is_regression:
    if any(not n for n in label_names):
      raise UserError(
          f"config.label_names: empty label name in {list(label_names)}")
    duplicates = sorted({n for n in label_names if label_names.count(n) > 1})
    if duplicates:
      raise UserError(
          f"config.label_names: repeated label(s) {duplicates}")
    if len(label_names) == 1 and not is_multilabel:
      raise UserError(
          "config.label_names: a classification task needs at least 2 "
          f"labels, got {list(label_names)}")

  default_metrics = (_REGRESSION_METRICS if is_regression else
                     MULTILABEL_METRICS if is_multilabel else ("accuracy",))
  metrics = _str_tuple(_get(config, "metrics", ()), "metrics") or (
      default_metrics)
  for m in metrics:
    if m not in _KNOWN_METRICS:
      raise UserError(
          f"config.metrics: unknown metric {m!r}; known: "
          f"{list(_KNOWN_METRICS)}")
    if is_regression != (m in _REGRESSION_METRICS) or is_multilabel != (
        m in MULTILABEL_METRICS) and m != "f1_macro":
      raise UserError(
          f"config.metrics: {m!r} does not apply to a {problem_type} task")
  if "f1" in metrics and label_names and len(label_names) != 2:
    raise UserError(
        "config.metrics: 'f1' is binary F1 (positive class = label id 1); "
        f'with {len(label_names)} labels use \'f1_macro\'')
  main_metric = _get(config, "main_metric", "") or metrics[0]
  if main_metric not in metrics:
    raise UserError(
        f"config.main_metric: {main_metric!r} is not in config.metrics "
        f"{list(metrics)}")

  return Task(
      name="custom",
      text_fields=text_columns,
      label_field=label_column,
      label_names=None if is_regression or not label_names else label_names,
      is_regression=is_regression,
      metrics=metrics,
      main_metric=main_metric,
      file_columns=file_columns or None,
      problem_type=problem_type,
      label_delimiter=delimiter if isinstance(delimiter, str) and delimiter else ",")


def _read_label_names_file(path: Any) -> tuple[str, ...]:
  """Label names one a line (blank lines at the end ignored), e.g. GoEmotions' emotions.txt."""
  if not isinstance(path, str) or not files.is_file(path):
    raise UserError(f"config.label_names_file={path!r}: file not found")
  lines = files.read_text(path).rstrip("\n").split("\n")
  names = tuple(line.strip() for line in lines)
  for i, name in enumerate(names, start=1):
    if not name:
      raise UserError(f"{path} line {i}: empty label name")
  return names


def with_label_names(task: Task, label_names: Sequence[str]) -> Task:
  """Returns `task` with its label map set (custom tasks built from data)."""
  if task.is_regression:
    raise ValueError(f"task {task.name!r} is a regression task")
  return dataclasses.replace(task, label_names=tuple(label_names))


# Keys a `config.tasks` entry may set (besides task_name, name and weight).
TASK_KEYS = ("train_file", "validation_file", "data_dir", "dataset_name", "dataset_config_name",
             "tfds_name", "tfds_data_dir", "text_columns", "label_column", "label_names",
             "is_regression", "metrics", "main_metric", "problem_type", "label_delimiter",
             "label_names_file", "file_columns", "class_weights", "logit_adjustment")


def task_entries(entries: Sequence[Any]) -> list[tuple[str, float, dict[str, Any]]]:
  """config.tasks checked: (head name, weight, the keys the entry sets) per entry, lists as
  tuples. A task's config is the run's with these keys on top (`config.task_configs`), so
  `task_name`, `data_dir`, ... mean the same as in a single-task run."""
  out, names = [], set()
  for i, entry in enumerate(entries):
    where = f"config.tasks[{i}]"
    if not hasattr(entry, "items"):
      raise UserError(f"{where}={entry!r}: give a dict with task_name (and data keys)")
    entry = dict(entry.items())
    unknown = sorted(set(entry) - {"task_name", "name", "weight", *TASK_KEYS})
    if unknown:
      raise UserError(f"{where}: unknown key {unknown[0]!r}; known: "
                      f"{['task_name', 'name', 'weight', *TASK_KEYS]}")
    if not isinstance(entry.get("task_name"), str) or not entry["task_name"].strip():
      raise UserError(f"{where}: task_name is not set (a GLUE task or 'custom')")
    weight = entry.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
      raise UserError(f"{where}.weight={weight!r}: must be a number > 0")
    given_name = "name" in entry
    name = str(entry.pop("name", "") or entry["task_name"]).strip().lower().replace("-", "")
    if entry["task_name"].strip().lower() == "custom" and not given_name:
      raise UserError(f"{where}: a custom task needs a name (its head's name)")
    if not name.replace("_", "").isalnum():
      raise UserError(f"{where}.name={name!r}: use letters, digits and '_'")
    if name in names:
      raise UserError(f"{where}.name={name!r}: two tasks with this name; set distinct names")
    names.add(name)
    keys = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    out.append((name, float(weight), keys))
  return out
