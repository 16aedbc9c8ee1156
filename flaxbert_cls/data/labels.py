"""Labels: raw values from a file or dataset to label ids, multi-hot rows or regression targets,
and the label map (names in id order) built from training data.

Every bad label raises `UserError` with one line naming the source, the line (or row) and
the value; `readers.py` and `sources.py` read the rows, this module gives their labels
meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import math
import re
from typing import Any

import numpy as np

from flaxbert_cls.data.tasks import Task
from flaxbert_cls.errors import UserError

# (line or row number, text fields, raw label) as the readers yield them.
Row = tuple[int, tuple[str, ...], Any]


def label_string(source: str, where: str, raw: Any) -> str:
  """A classification label as a string; JSON / pandas ints become '1'."""
  if isinstance(raw, (bool, np.bool_)):
    raise UserError(
        f"{source} {where}: label {raw!r} is a boolean; use a string or an "
        "integer")
  if isinstance(raw, (int, np.integer)):
    return str(int(raw))
  if isinstance(raw, str):
    label = raw.strip()
    if not label:
      raise UserError(f"{source} {where}: label is empty")
    return label
  if raw is None or isinstance(raw, float) and math.isnan(raw):
    raise UserError(f"{source} {where}: label is missing")
  raise UserError(
      f"{source} {where}: label {raw!r} ({type(raw).__name__}) must be a "
      "string or an integer")


def regression_target(source: str, where: str, raw: Any) -> float:
  if isinstance(raw, (bool, np.bool_)) or raw is None:
    value = math.nan
  else:
    try:
      value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
      raise UserError(
          f"{source} {where}: label {raw!r} is not a number (regression "
          "task)") from None
  if not math.isfinite(value):
    raise UserError(
        f"{source} {where}: label {raw!r} is not a finite number (regression "
        "task)")
  return value


def normalize_label_names(label_names: Iterable[Any]) -> tuple[str, ...]:
  names = tuple(str(n).strip() for n in label_names)
  if len(set(names)) != len(names):
    raise ValueError(f"repeated label names in {list(names)}")
  return names


def label_array(source: str, rows: Sequence[Row], task: Task,
                label_names: Sequence[Any] | None, unit: str) -> np.ndarray:
  """Converts raw labels to int32 ids or float32 targets."""
  if task.is_regression:
    return np.array(
        [regression_target(source, f"{unit} {n}", raw) for n, _, raw in rows],
        dtype=np.float32)
  names = resolve_label_names(task, label_names)
  if task.is_multilabel:
    return _multi_hot(source, rows, task, names, unit)
  index = {name: i for i, name in enumerate(names)}
  ids = np.empty(len(rows), dtype=np.int32)
  for k, (n, _, raw) in enumerate(rows):
    if isinstance(raw, (list, tuple)):
      raise UserError(
          f"{source} {unit} {n}: label is a list {list(raw)!r}; a single-label task needs one "
          "label (for several set config.problem_type='multi_label_classification')")
    label = label_string(source, f"{unit} {n}", raw)
    if label not in index:
      raise UserError(
          f"{source} {unit} {n}: label {label!r} is not one of {list(names)}")
    ids[k] = index[label]
  return ids


def multilabel_strings(source: str, where: str, raw: Any, delimiter: str) -> list[str]:
  """A multi-label row's labels as strings: a JSON list, or a string split by `delimiter`.

  An empty list or an empty string is a row with no label (valid: all zeros).
  """
  if isinstance(raw, str):
    parts = [p.strip() for p in raw.split(delimiter)] if raw.strip() else []
    if any(not p for p in parts):
      raise UserError(f"{source} {where}: empty label in {raw!r} (split by {delimiter!r})")
    return parts
  if isinstance(raw, (list, tuple, np.ndarray)):
    return [label_string(source, where, r) for r in raw]
  if isinstance(raw, (int, np.integer)) and not isinstance(raw, (bool, np.bool_)):
    return [str(int(raw))]
  raise UserError(f"{source} {where}: label {raw!r} ({type(raw).__name__}) must be a list of "
                  f"labels or a string of labels joined by {delimiter!r}")


def _multi_hot(source: str, rows: Sequence[Row], task: Task, names: tuple[str, ...],
               unit: str) -> np.ndarray:
  """float32 [n, len(names)]: 1 where a row has the label. A label is a name, or (when it
  is no name and the names are not numbers themselves) an id in `names` order, as
  GoEmotions' '3,27' index emotions.txt."""
  index = {name: i for i, name in enumerate(names)}
  if not any(re.fullmatch(r"-?\d+", n) for n in names):
    index.update({str(i): i for i in range(len(names))})
  out = np.zeros((len(rows), len(names)), np.float32)
  for k, (n, _, raw) in enumerate(rows):
    for label in multilabel_strings(source, f"{unit} {n}", raw, task.label_delimiter):
      if label not in index:
        raise UserError(f"{source} {unit} {n}: label {label!r} is not one of {list(names)}"
                        + (f" nor an id 0..{len(names) - 1}" if len(index) > len(names) else ""))
      out[k, index[label]] = 1.0
  return out


def resolve_label_names(task: Task, label_names: Sequence[Any] | None
                        ) -> tuple[str, ...]:
  """`label_names`, else the task's, as stripped strings."""
  names = label_names if label_names is not None else task.label_names
  if names is None:
    raise ValueError(
        f"task {task.name!r} has no label names: build them with "
        "build_label_names() from the training data first")
  return normalize_label_names(names)


def _natural_key(name: str) -> tuple[Any, ...]:
  # Odd chunks of re.split with a group are the digit runs: 'c10' > 'c2'.
  parts = re.split(r"([0-9]+)", name)
  return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def sort_label_names(labels: Iterable[Any]) -> tuple[str, ...]:
  """Unique label strings, sorted numerically if all are numbers ('2' < '10'),
  else in natural order ('class2' < 'class10'), else alphabetically."""
  names = {label_string("labels", "value", l) for l in labels}
  numbers = {}
  for name in names:
    try:
      value = float(name)
    except ValueError:
      break
    if not math.isfinite(value):
      break
    numbers[name] = value
  else:
    return tuple(sorted(names, key=lambda n: (numbers[n], n)))
  return tuple(sorted(names, key=_natural_key))


def check_label_count(source: str, names: tuple[str, ...]) -> tuple[str, ...]:
  """Returns `names`; fewer than 2 classes is an error naming `source`."""
  if len(names) < 2:
    raise UserError(
        f"{source}: found only the label(s) {list(names)}; a classifier "
        "needs at least 2 classes")
  return names


def check_one_label_type(path: str, rows: Sequence[Row]) -> None:
  """JSON labels mixing numbers and words (1 and "pos") are almost surely a data bug."""
  def kind(raw: Any) -> str:
    if isinstance(raw, (int, float, np.number)) and not isinstance(raw, bool):
      return "number"
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
      return "number"  # "1" and 1 are the same label
    return type(raw).__name__

  first = {}
  for n, _, raw in rows:
    first.setdefault(kind(raw), (n, raw))
  if len(first) > 1:
    (k1, (n1, v1)), (k2, (n2, v2)) = list(first.items())[:2]
    raise UserError(
        f"{path}: label column mixes types: line {n1} has {k1} {v1!r}, line "
        f"{n2} has {k2} {v2!r}; use one type for every label")
