"""Reads one split into memory: from a file, a GLUE directory, TFDS or Hugging Face `datasets`.

The rows become `readers.Examples`, checked as file rows are: every problem raises
`UserError` with one line naming the dataset, the row and the column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import os
from typing import Any

import numpy as np

from flaxbert_cls.data import labels as labels_lib
from flaxbert_cls.data import readers
from flaxbert_cls.errors import UserError, one_line
from flaxbert_cls.data.tasks import Task

# `datasets` builders that read local files (`data_files=`), not the Hub.
_LOCAL_BUILDERS = ("csv", "json", "text", "parquet", "arrow", "pandas")


def _hf_offline() -> bool:
  truthy = ("1", "true", "yes", "on")
  return any(os.environ.get(v, "").strip().lower() in truthy
             for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hf_source(name, config_name, split, data_files) -> str:
  source = f"hf:{name}" + (f"/{config_name}" if config_name else "")
  if data_files is not None:
    source += f"[{data_files}]"
  return f"{source}:{split}"


def _tfds_source(name: str, split: str) -> str:
  return f"tfds:{name}:{split}"


def read_hf_dataset(name: str, config_name: str | None, split: str,
                    task: Task, label_names: Sequence[str] | None = None,
                    data_files: Any = None, *, require_labels: bool = True,
                    cache_dir: str | None = None) -> readers.Examples:
  """Reads one split of a Hugging Face dataset with `datasets.load_dataset`.

  Args:
    name: hub name ('nyu-mll/glue') or a local builder ('csv', 'json') with
      `data_files`.
    config_name: dataset config ('sst2'), or None.
    split: split name as the dataset spells it (see `Task.hf_split_name`).
    task: which columns hold text and label. For the task's own hub dataset
      (`task.hf_dataset`) the `hf_text_fields` / `hf_label_field` columns are
      read, otherwise `text_fields` / `label_field`.
    label_names: the label map; None = `task.label_names`.
    data_files: passed to `load_dataset` (local csv / json files).
    require_labels: if False, a dataset without labels (a GLUE test split,
      labels -1) gives `labels=None`.
    cache_dir: the `datasets` cache, default the user's.

  Returns:
    The rows; `line_numbers` holds row indices.
  """
  source = _hf_source(name, config_name, split, data_files)
  ds = _load_hf(name, config_name, split, data_files, cache_dir, source)
  own_dataset = task.hf_dataset is not None and name in (
      task.hf_dataset[0], task.hf_dataset[0].split("/")[-1])
  return _examples_from_table(ds, source, own_dataset, task, label_names,
                              require_labels)


def _examples_from_table(ds: Any, source: str, own_dataset: bool, task: Task,
                         label_names: Sequence[str] | None,
                         require_labels: bool) -> readers.Examples:
  """Rows of a column table (`datasets.Dataset` or `_TfdsTable`) as Examples.

  `own_dataset`: the table is the task's own GLUE dataset, whose columns are
  `hf_text_fields` / `hf_label_field`.
  """
  text_fields = (task.hf_text_fields or task.text_fields
                 ) if own_dataset else task.text_fields
  label_field = (task.hf_label_field or task.label_field
                 ) if own_dataset else task.label_field
  hf_task = dataclasses.replace(task, text_fields=tuple(text_fields),
                                label_field=label_field)
  text_idx, label_idx = readers.column_indices(
      source, ds.column_names, hf_task, require_labels, where="columns")
  del text_idx
  columns = [list(ds[c]) for c in text_fields]
  rows: list[readers.Row] = []
  for i, values in enumerate(zip(*columns)):
    rows.append((i, readers.row_texts(source, f"row {i}", values, text_fields),
                 None))

  labels = None
  if label_idx is not None:
    raw = list(ds[label_field])
    class_names = _class_names(ds, label_field)
    if class_names is not None:
      # GLUE test splits carry -1 for "no label".
      if all(v == -1 for v in raw) and not require_labels:
        raw = None
      else:
        raw, label_names = _map_class_label(source, raw, class_names, task,
                                            label_names)
    if raw is not None:
      rows = [(i, t, r) for (i, t, _), r in zip(rows, raw)]
      labels = labels_lib.label_array(source, rows, task, label_names, "row")
  return readers.Examples(texts=[r[1] for r in rows], labels=labels,
                          source=source, line_numbers=[r[0] for r in rows])


def _load_hf(name, config_name, split, data_files, cache_dir, source):
  """`datasets.load_dataset` with its failures turned into one-line errors."""
  import datasets  # pylint: disable=g-import-not-at-top  # Slow import.
  try:
    ds = datasets.load_dataset(name, config_name, split=split,
                               data_files=data_files, cache_dir=cache_dir)
  except Exception as e:  # pylint: disable=broad-except
    # `datasets` raises many types (ConnectionError, FileNotFoundError,
    # DatasetNotFoundError, ValueError for a bad split...): name the dataset.
    if _hf_offline() and name not in _LOCAL_BUILDERS:
      raise UserError(
          f"{source}: Hugging Face dataset {name!r} could not be loaded "
          "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and is not "
          f"in the local cache; download it once online, or use local files "
          f"({one_line(e, limit=10_000)})") from None
    raise UserError(
        f"{source}: could not load Hugging Face dataset {name!r}: "
        f"{one_line(e, limit=10_000)}") from None
  if not isinstance(ds, datasets.Dataset):
    raise UserError(f"{source}: expected one split, got {type(ds).__name__}")
  if len(ds) == 0:
    raise UserError(f"{source}: the split has no rows")
  return ds


def _map_class_label(source: str, ids: Sequence[int],
                     class_names: Sequence[str], task: Task,
                     label_names: Sequence[Any] | None
                     ) -> tuple[list[str], tuple[str, ...]]:
  """Maps ClassLabel ids to label strings of `label_names`.

  By name where the ClassLabel names are the task's label names; by id where
  the order is known to agree (GLUE tasks, whose label_names follow the HF
  ClassLabel order, or label names '0', '1', ...).
  """
  if task.is_regression:
    raise UserError(f"{source}: the label column holds classes "
                    f"{list(class_names)} but the task is a regression task")
  if label_names is None and task.label_names is None:
    # Custom task without a label map: the ClassLabel names are the map.
    label_names = tuple(class_names)
  names = labels_lib.resolve_label_names(task, label_names)
  class_names = [str(c) for c in class_names]
  if set(class_names) <= set(names):
    table = class_names
  elif len(class_names) == len(names) and (
      task.name != "custom" or names == tuple(map(str, range(len(names))))):
    table = list(names)
  else:
    raise UserError(
        f"{source}: the dataset's classes {class_names} do not match the "
        f"label names {list(names)}")
  out = []
  for i, v in enumerate(ids):
    if v is None or not 0 <= v < len(table):
      raise UserError(f"{source} row {i}: no label (class id {v!r})")
    out.append(table[v])
  return out, names


def _class_names(table: Any, column: str) -> Sequence[str] | None:
  """The names of a ClassLabel column, in id order; None for any other column."""
  return getattr(table.features[column], "names", None)


def _label_names_from_table(source: str, task: Task,
                            load: Callable[[], Any]) -> tuple[str, ...]:
  """`hf_label_names` and `tfds_label_names` for the table `load()` returns.

  A ClassLabel column gives its own names in id order; other columns give
  their distinct values sorted by `readers.sort_label_names`. A regression
  task fails before the (slow) load.
  """
  if task.is_regression:
    raise ValueError(f"task {task.name!r} is a regression task")
  table = load()
  if task.label_field not in table.column_names:
    raise UserError(
        f"{source} columns: no column {task.label_field!r}; found columns "
        f"{table.column_names}")
  class_names = _class_names(table, task.label_field)
  if class_names is not None:
    return labels_lib.check_label_count(source, tuple(str(c) for c in class_names))
  labels = [labels_lib.label_string(source, f"row {i}", v)
            for i, v in enumerate(table[task.label_field])]
  return labels_lib.check_label_count(source, labels_lib.sort_label_names(labels))


def hf_label_names(name: str, config_name: str | None, split: str,
                   task: Task, data_files: Any = None,
                   cache_dir: str | None = None) -> tuple[str, ...]:
  """The label map of a custom task from a Hugging Face dataset split.

  A ClassLabel column gives its own names in id order; other columns give
  their distinct values sorted by `readers.sort_label_names`.
  """
  source = _hf_source(name, config_name, split, data_files)
  return _label_names_from_table(
      source, task,
      lambda: _load_hf(name, config_name, split, data_files, cache_dir, source))


class _TfdsTable:
  """A TFDS split held as columns: what `_examples_from_table` reads of a Dataset."""

  def __init__(self, rows: Sequence[dict[str, Any]], features: Any):
    self.features = features
    self.column_names = list(features.keys())
    self._rows = rows

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, column: str) -> list[Any]:
    values = [row[column] for row in self._rows]
    # TFDS gives text as bytes (numpy object arrays) and scalars as 0-d arrays.
    return [v.decode("utf-8") if isinstance(v, bytes)
            else v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v
            for v in values]


def _load_tfds(name: str, split: str, data_dir: str | None,
               source: str) -> _TfdsTable:
  """`tfds.data_source` (array_record, no TensorFlow) read into memory."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Slow import.
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir)
    features = tfds.builder(name, data_dir=data_dir).info.features
    rows = _read_all(ds)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
        f"{source}: could not load TFDS dataset {name!r} (data_dir "
        f"{data_dir!r}; prepare it once with `tfds build`): {one_line(e, limit=10_000)}"
    ) from None
  if not rows:
    raise UserError(f"{source}: the split has no rows")
  return _TfdsTable(rows, features)


def _read_all(ds: Any, chunk: int = 4096) -> list[Any]:
  """Every row of a random-access data source, `chunk` rows per read (not one at a time:
  array_record serves a batch of keys in one call, with its own read-ahead)."""
  rows: list[Any] = []
  try:
    for start in range(0, len(ds), chunk):
      rows.extend(ds.__getitems__(range(start, min(start + chunk, len(ds)))))
  except (AttributeError, TypeError):  # no batch reads (tfds.testing's mock): row by row
    return [ds[i] for i in range(len(ds))]
  return rows


def _tfds_own_dataset(name: str, task: Task) -> bool:
  # 'glue/sst2' (or 'glue/sst2:2.0.0') has the HF glue column names.
  return task.hf_dataset is not None and name.split(":")[0] == (
      f"glue/{task.hf_dataset[1]}")


def read_tfds(name: str, split: str, task: Task,
              label_names: Sequence[str] | None = None,
              data_dir: str | None = None, *,
              require_labels: bool = True) -> readers.Examples:
  """Reads one split of a TFDS dataset ('glue/sst2') with `tfds.data_source`.

  GLUE datasets use the same columns as the HF ones (`hf_text_fields`); other
  datasets are read by `text_fields` / `label_field`. ClassLabel columns map
  to label names as for HF datasets.
  """
  source = _tfds_source(name, split)
  table = _load_tfds(name, split, data_dir, source)
  return _examples_from_table(table, source, _tfds_own_dataset(name, task),
                              task, label_names, require_labels)


def tfds_label_names(name: str, split: str, task: Task,
                     data_dir: str | None = None) -> tuple[str, ...]:
  """The label map of a custom task from a TFDS split (ClassLabel names or values)."""
  source = _tfds_source(name, split)
  return _label_names_from_table(
      source, task, lambda: _load_tfds(name, split, data_dir, source))


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where a task's splits are read from (the config keys of the same names), first that is
  set: its own files, a GLUE directory, a TFDS dataset, a Hugging Face `datasets` one (the
  task's own when it names one)."""

  train_file: str = ""
  validation_file: str = ""
  data_dir: str = ""  # GLUE: <data_dir>/<task dir>/{train,dev}.tsv
  tfds_name: str = ""
  tfds_data_dir: str = ""
  dataset_name: str = ""
  dataset_config_name: str = ""


SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(DataSource))


def split_file(source: DataSource, task: Task, split: str) -> str | None:
  """The file (local or remote) for `split`: a *_file key, else the GLUE data_dir, else None."""
  explicit = source.train_file if split == "train" else source.validation_file
  if explicit:
    return explicit
  if source.data_dir:
    return readers.glue_file(source.data_dir, task, split)
  return None


def _hf_dataset(source: DataSource, task: Task) -> tuple[str, str | None]:
  if source.dataset_name:
    return source.dataset_name, source.dataset_config_name or None
  if task.hf_dataset is not None:
    return task.hf_dataset
  raise UserError(f"config: task {task.name!r} needs data: set train_file and validation_file, "
                  "data_dir (GLUE), or dataset_name (HF datasets)")


def read_split(source: DataSource, task: Task, split: str,
               label_names: tuple[str, ...] | None) -> readers.Examples:
  """Reads 'train' or 'validation' from a file, a GLUE dir, TFDS or HF datasets (in that order)."""
  path = split_file(source, task, split)
  if path is not None:
    examples = readers.read_file(path, task, label_names)
  elif source.tfds_name:
    examples = read_tfds(source.tfds_name, task.hf_split_name(split), task, label_names,
                         data_dir=source.tfds_data_dir or None)
  else:
    name, config_name = _hf_dataset(source, task)
    examples = read_hf_dataset(name, config_name, task.hf_split_name(split), task, label_names)
  if not len(examples):
    raise UserError(f"{examples.source}: no examples")
  return examples


def label_names_for(source: DataSource, task: Task) -> tuple[str, ...]:
  """The task's label map; for a custom task without one, built from the training data."""
  if task.label_names:
    return tuple(task.label_names)
  path = split_file(source, task, "train")
  if path is not None:
    return readers.build_label_names(path, task)
  if source.tfds_name:
    return tfds_label_names(source.tfds_name, task.hf_split_name("train"), task,
                            data_dir=source.tfds_data_dir or None)
  name, config_name = _hf_dataset(source, task)
  return hf_label_names(name, config_name, task.hf_split_name("train"), task)
