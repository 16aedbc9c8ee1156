"""Reads labelled text (TSV, CSV, JSON Lines, Hugging Face datasets) into memory.

Every problem with the input raises `UserError` with one line naming the file
(or dataset) and the line (or row) and column. Nothing is skipped silently:
a bad row stops the read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import codecs
import csv
import dataclasses
import io
import json
import math
import os
import re
from typing import Any

import numpy as np

from flaxbert_cls.errors import UserError
from flaxbert_cls.tasks import Task

SUPPORTED_EXTENSIONS = ('.tsv', '.csv', '.jsonl', '.json')
# `datasets` builders that read local files (`data_files=`), not the Hub.
_LOCAL_BUILDERS = ('csv', 'json', 'text', 'parquet', 'arrow', 'pandas')


@dataclasses.dataclass
class Examples:
  """Labelled (or unlabelled) text rows held in memory.

  Attributes:
    texts: one tuple per row, len == len(task.text_fields).
    labels: int32 label ids (classification), float32 targets (regression),
      or None for unlabelled prediction input.
    source: file path or 'hf:<name>/<config>:<split>', used in messages.
    line_numbers: 1-based line in the file of each row (the line a CSV record
      starts on); for Hugging Face datasets the 0-based row index.
  """
  texts: list[tuple[str, ...]]
  labels: np.ndarray | None
  source: str
  line_numbers: list[int]

  def __len__(self) -> int:
    return len(self.texts)

  def where(self, i: int) -> str:
    """'<source> line N' for row i, for messages."""
    unit = 'row' if self.source.startswith(('hf:', 'tfds:')) else 'line'
    return f'{self.source} {unit} {self.line_numbers[i]}'


# A row before label conversion: (line number, texts, raw label or None).
_Row = tuple[int, tuple[str, ...], Any]


def _read_text(path: str) -> str:
  """Returns the file's text; UTF-8 with an optional BOM (MRPC has one)."""
  with open(path, 'rb') as f:
    data = f.read()
  # Same as the 'utf-8-sig' codec, but error offsets stay relative to `data`.
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    column = e.start - (data.rfind(b'\n', 0, e.start) + 1) + 1
    raise UserError(
        f'{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at '
        f'byte column {column}); save the file as UTF-8') from None
  if not text.strip():
    raise UserError(f'{path}: file is empty')
  return text


def _split_lines(path: str, text: str) -> list[tuple[int, str]]:
  """Returns (line number, line) pairs without blank lines at the end.

  Splits on '\\n' only (and drops a '\\r' before it): str.splitlines() would
  also break lines at characters such as '\\x0c' or '\\u2028' inside text.
  """
  lines = text.split('\n')
  if lines and lines[-1] == '':
    lines.pop()  # The file ends with a newline (CoLA dev does not).
  lines = [l[:-1] if l.endswith('\r') else l for l in lines]
  while lines and not lines[-1].strip():
    lines.pop()
  out = []
  for i, line in enumerate(lines, start=1):
    if not line.strip():
      raise UserError(
          f'{path} line {i}: blank line between data rows; remove it')
    out.append((i, line))
  return out


def _column_indices(source: str, columns: Sequence[str], task: Task,
                    require_labels: bool, where: str = 'line 1'
                    ) -> tuple[list[int], int | None]:
  """Finds the text and label columns; label index None = no labels."""
  found = list(columns)

  def index(name: str) -> int | None:
    hits = [i for i, c in enumerate(found) if c == name]
    if len(hits) > 1:
      raise UserError(
          f'{source} {where}: column {name!r} appears {len(hits)} times; '
          f'found columns {found}')
    return hits[0] if hits else None

  text_idx = []
  for name in task.text_fields:
    i = index(name)
    if i is None:
      raise UserError(
          f'{source} {where}: no column {name!r} (text column of task '
          f'{task.name!r}); found columns {found}')
    text_idx.append(i)
  label_idx = index(task.label_field)
  if label_idx is None and require_labels:
    raise UserError(
        f'{source} {where}: no column {task.label_field!r} (label column of '
        f'task {task.name!r}); found columns {found}')
  return text_idx, label_idx


def _texts(source: str, where: str, values: Sequence[Any],
           names: Sequence[str]) -> tuple[str, ...]:
  out = []
  for value, name in zip(values, names):
    if value is None:
      value = ''
    if not isinstance(value, str):
      raise UserError(
          f'{source} {where}: column {name!r} holds {value!r}, expected text')
    if not value.strip():
      raise UserError(f'{source} {where}: column {name!r} is empty')
    out.append(value)
  return tuple(out)


def _tsv_rows(path: str, text: str, task: Task, require_labels: bool
              ) -> tuple[list[_Row], bool]:
  lines = _split_lines(path, text)
  # Quote handling is off: GLUE rows hold unbalanced '"' (MRPC, RTE).
  first = lines[0][1].split('\t')
  # CoLA train/dev have no header, but CoLA's test.tsv does ('index sentence').
  has_header = (task.file_columns is None
                or set(task.text_fields) <= set(first))
  columns = first if has_header else list(task.file_columns)
  text_idx, label_idx = _column_indices(
      path, columns, task, require_labels,
      where='line 1' if has_header else '(header-less file)')
  records = [(n, line.split('\t')) for n, line in (lines[1:] if has_header else lines)]
  return _rows_from_fields(path, records, columns, text_idx, label_idx, task,
                           'tab-separated'), label_idx is not None


def _rows_from_fields(path: str, records: list[tuple[int, list[str]]], columns: list[str],
                      text_idx: list[int], label_idx: int | None, task: Task, kind: str,
                      hint: str = '') -> list[_Row]:
  """(line, texts, raw label) per record; a record with the wrong field count names its line."""
  rows = []
  for n, fields in records:
    if len(fields) != len(columns):
      raise UserError(f'{path} line {n}: {len(fields)} {kind} fields, expected '
                      f'{len(columns)} ({columns}){hint}')
    rows.append((n, _texts(path, f'line {n}', [fields[i] for i in text_idx],
                           task.text_fields),
                 None if label_idx is None else fields[label_idx]))
  return rows


def _csv_rows(path: str, text: str, task: Task, require_labels: bool
              ) -> tuple[list[_Row], bool]:
  reader = csv.reader(io.StringIO(text, newline=''), strict=True)
  records = []  # (start line, fields)
  start = 1
  try:
    for fields in reader:
      records.append((start, fields))
      start = reader.line_num + 1
  except csv.Error as e:
    raise UserError(f'{path} line {reader.line_num}: bad CSV: {e}') from None
  while records and not any(f.strip() for f in records[-1][1]):
    records.pop()  # Blank lines at the end.
  header_line, columns = records[0]
  text_idx, label_idx = _column_indices(
      path, [c.strip() for c in columns], task, require_labels,
      where=f'line {header_line}')
  for n, fields in records[1:]:
    if not any(f.strip() for f in fields):
      raise UserError(f'{path} line {n}: blank line between data rows; '
                      'remove it')
  return _rows_from_fields(path, records[1:], columns, text_idx, label_idx, task,
                           'comma-separated', '; quote fields that hold commas'
                           ), label_idx is not None


def _jsonl_rows(path: str, text: str, task: Task, require_labels: bool
                ) -> tuple[list[_Row], bool]:
  lines = _split_lines(path, text)
  if lines[0][1].lstrip().startswith('['):
    raise UserError(
        f'{path} line {lines[0][0]}: found a JSON array; expected JSON Lines '
        "(one object per line), e.g. convert with: jq -c '.[]'")
  has_labels = None
  rows = []
  for n, line in lines:
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(
          f'{path} line {n} column {e.colno}: not valid JSON: {e.msg}'
      ) from None
    if not isinstance(obj, dict):
      raise UserError(
          f'{path} line {n}: expected a JSON object, got '
          f'{type(obj).__name__}')
    where = f'line {n}'
    keys = list(obj)
    for name in task.text_fields:
      if name not in obj:
        raise UserError(
            f'{path} {where}: no key {name!r} (text column of task '
            f'{task.name!r}); found keys {keys}')
    if has_labels is None:
      # Unlabelled prediction input: no label in the first row -> none at all.
      has_labels = task.label_field in obj or require_labels
    if has_labels and task.label_field not in obj:
      raise UserError(
          f'{path} {where}: no key {task.label_field!r} (label column of '
          f'task {task.name!r}); found keys {keys}')
    if not has_labels and task.label_field in obj:
      raise UserError(
          f'{path} {where}: has key {task.label_field!r} but the first row '
          'has no label; give labels on every row or on none')
    rows.append((n, _texts(path, where, [obj[k] for k in task.text_fields],
                           task.text_fields),
                 obj[task.label_field] if has_labels else None))
  return rows, bool(has_labels)


def _read_rows(path: str, task: Task, require_labels: bool
               ) -> tuple[list[_Row], bool]:
  """Returns the rows of a file and whether it has labels."""
  if not os.path.exists(path):
    raise UserError(f'{path}: file not found')
  if os.path.isdir(path):
    raise UserError(f'{path}: is a directory, expected a data file')
  ext = os.path.splitext(path)[1].lower()
  readers = {'.tsv': _tsv_rows, '.csv': _csv_rows, '.jsonl': _jsonl_rows,
             '.json': _jsonl_rows}
  if ext not in readers:
    raise UserError(
        f'{path}: unknown file type {ext!r}; use one of '
        f'{list(SUPPORTED_EXTENSIONS)}')
  rows, has_labels = readers[ext](path, _read_text(path), task,
                                  require_labels)
  if not rows:
    raise UserError(f'{path}: no data rows (only a header line)')
  return rows, has_labels


def _label_string(source: str, where: str, raw: Any) -> str:
  """A classification label as a string; JSON / pandas ints become '1'."""
  if isinstance(raw, (bool, np.bool_)):
    raise UserError(
        f'{source} {where}: label {raw!r} is a boolean; use a string or an '
        'integer')
  if isinstance(raw, (int, np.integer)):
    return str(int(raw))
  if isinstance(raw, str):
    label = raw.strip()
    if not label:
      raise UserError(f'{source} {where}: label is empty')
    return label
  if raw is None or isinstance(raw, float) and math.isnan(raw):
    raise UserError(f'{source} {where}: label is missing')
  raise UserError(
      f'{source} {where}: label {raw!r} ({type(raw).__name__}) must be a '
      'string or an integer')


def _regression_target(source: str, where: str, raw: Any) -> float:
  if isinstance(raw, (bool, np.bool_)) or raw is None:
    value = math.nan
  else:
    try:
      value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
      raise UserError(
          f'{source} {where}: label {raw!r} is not a number (regression '
          'task)') from None
  if not math.isfinite(value):
    raise UserError(
        f'{source} {where}: label {raw!r} is not a finite number (regression '
        'task)')
  return value


def _normalize_label_names(label_names: Iterable[Any]) -> tuple[str, ...]:
  names = tuple(str(n).strip() for n in label_names)
  if len(set(names)) != len(names):
    raise ValueError(f'repeated label names in {list(names)}')
  return names


def _label_array(source: str, rows: Sequence[_Row], task: Task,
                 label_names: Sequence[Any] | None, unit: str) -> np.ndarray:
  """Converts raw labels to int32 ids or float32 targets."""
  if task.is_regression:
    return np.array(
        [_regression_target(source, f'{unit} {n}', raw) for n, _, raw in rows],
        dtype=np.float32)
  names = _resolve_label_names(task, label_names)
  index = {name: i for i, name in enumerate(names)}
  ids = np.empty(len(rows), dtype=np.int32)
  for k, (n, _, raw) in enumerate(rows):
    label = _label_string(source, f'{unit} {n}', raw)
    if label not in index:
      raise UserError(
          f'{source} {unit} {n}: label {label!r} is not one of {list(names)}')
    ids[k] = index[label]
  return ids


def _resolve_label_names(task: Task, label_names: Sequence[Any] | None
                         ) -> tuple[str, ...]:
  names = label_names if label_names is not None else task.label_names
  if names is None:
    raise ValueError(
        f'task {task.name!r} has no label names: build them with '
        'build_label_names() from the training data first')
  return _normalize_label_names(names)


def read_file(path: str, task: Task,
              label_names: Sequence[str] | None = None,
              require_labels: bool = True) -> Examples:
  """Reads a .tsv / .csv / .jsonl file.

  Args:
    path: the file; its extension picks the format.
    task: which columns hold text and label.
    label_names: the label map (id order); None = `task.label_names`.
      Integers are accepted and matched as strings.
    require_labels: if False (prediction input), a file without the label
      column is read with `labels=None`.

  Returns:
    The rows, in file order.
  """
  rows, has_labels = _read_rows(path, task, require_labels)
  labels = None
  if has_labels:
    labels = _label_array(path, rows, task, label_names, 'line')
  return Examples(texts=[r[1] for r in rows], labels=labels, source=path,
                  line_numbers=[r[0] for r in rows])


def _natural_key(name: str) -> tuple[Any, ...]:
  # Odd chunks of re.split with a group are the digit runs: 'c10' > 'c2'.
  parts = re.split(r'([0-9]+)', name)
  return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def sort_label_names(labels: Iterable[Any]) -> tuple[str, ...]:
  """Unique label strings, sorted numerically if all are numbers ('2' < '10'),
  else in natural order ('class2' < 'class10'), else alphabetically."""
  names = {_label_string('labels', 'value', l) for l in labels}
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


def _check_label_count(source: str, names: tuple[str, ...]) -> tuple[str, ...]:
  if len(names) < 2:
    raise UserError(
        f'{source}: found only the label(s) {list(names)}; a classifier '
        'needs at least 2 classes')
  return names


def build_label_names(path: str, task: Task) -> tuple[str, ...]:
  """The label map of a custom task from its training file.

  Returns the distinct labels sorted by `sort_label_names` (numbers by value,
  other names in natural order), so the ids do not depend on row order.
  """
  if task.is_regression:
    raise ValueError(f'task {task.name!r} is a regression task')
  rows, _ = _read_rows(path, task, require_labels=True)
  _check_one_label_type(path, rows)
  labels = [_label_string(path, f'line {n}', raw) for n, _, raw in rows]
  return _check_label_count(path, sort_label_names(labels))


def _check_one_label_type(path: str, rows: Sequence[_Row]) -> None:
  """JSON labels mixing numbers and words (1 and "pos") are almost surely a data bug."""
  def kind(raw: Any) -> str:
    if isinstance(raw, (int, float, np.number)) and not isinstance(raw, bool):
      return 'number'
    if isinstance(raw, str) and re.fullmatch(r'\s*-?\d+\s*', raw):
      return 'number'  # "1" and 1 are the same label
    return type(raw).__name__

  first = {}
  for n, _, raw in rows:
    first.setdefault(kind(raw), (n, raw))
  if len(first) > 1:
    (k1, (n1, v1)), (k2, (n2, v2)) = list(first.items())[:2]
    raise UserError(
        f'{path}: label column mixes types: line {n1} has {k1} {v1!r}, line '
        f'{n2} has {k2} {v2!r}; use one type for every label')


def glue_file(data_dir: str, task: Task, split: str) -> str:
  """Path of a split's file in a GLUE data dir: <data_dir>/SST-2/train.tsv.

  `data_dir` may also be the parent of a 'glue' directory.
  """
  if task.glue_dir is None or not task.glue_files:
    raise UserError(
        f'task {task.name!r} is not a GLUE task: give its data files directly')
  if split not in task.glue_files:
    raise UserError(
        f'GLUE task {task.name!r} has no split {split!r}; known splits: '
        f'{sorted(task.glue_files)}')
  path = os.path.join(data_dir, task.glue_dir, task.glue_files[split])
  nested = os.path.join(data_dir, 'glue', task.glue_dir,
                        task.glue_files[split])
  if not os.path.isfile(path) and os.path.isfile(nested):
    return nested
  if not os.path.isfile(path):
    raise UserError(
        f'{path}: file not found (GLUE data dir {data_dir!r}, task '
        f'{task.name!r}, split {split!r})')
  return path


def _hf_offline() -> bool:
  truthy = ('1', 'true', 'yes', 'on')
  return any(os.environ.get(v, '').strip().lower() in truthy
             for v in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'))


def _hf_source(name, config_name, split, data_files) -> str:
  source = f'hf:{name}' + (f'/{config_name}' if config_name else '')
  if data_files is not None:
    source += f'[{data_files}]'
  return f'{source}:{split}'


def _one_line(e: BaseException) -> str:
  return ' '.join(f'{type(e).__name__}: {e}'.split())


def read_hf_dataset(name: str, config_name: str | None, split: str,
                    task: Task, label_names: Sequence[str] | None = None,
                    data_files: Any = None, *, require_labels: bool = True,
                    cache_dir: str | None = None) -> Examples:
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
      task.hf_dataset[0], task.hf_dataset[0].split('/')[-1])
  return _examples_from_table(ds, source, own_dataset, task, label_names,
                              require_labels)


def _examples_from_table(ds: Any, source: str, own_dataset: bool, task: Task,
                         label_names: Sequence[str] | None,
                         require_labels: bool) -> Examples:
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
  text_idx, label_idx = _column_indices(
      source, ds.column_names, hf_task, require_labels, where='columns')
  del text_idx
  columns = [list(ds[c]) for c in text_fields]
  rows: list[_Row] = []
  for i, values in enumerate(zip(*columns)):
    rows.append((i, _texts(source, f'row {i}', values, text_fields), None))

  labels = None
  if label_idx is not None:
    raw = list(ds[label_field])
    feature = ds.features[label_field]
    class_names = getattr(feature, 'names', None)
    if class_names is not None:
      # GLUE test splits carry -1 for "no label".
      if all(v == -1 for v in raw) and not require_labels:
        raw = None
      else:
        raw, label_names = _map_class_label(source, raw, class_names, task,
                                            label_names)
    if raw is not None:
      rows = [(i, t, r) for (i, t, _), r in zip(rows, raw)]
      labels = _label_array(source, rows, task, label_names, 'row')
  return Examples(texts=[r[1] for r in rows], labels=labels, source=source,
                  line_numbers=[r[0] for r in rows])


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
          f'{source}: Hugging Face dataset {name!r} could not be loaded '
          'offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and is not '
          f'in the local cache; download it once online, or use local files '
          f'({_one_line(e)})') from None
    raise UserError(
        f'{source}: could not load Hugging Face dataset {name!r}: '
        f'{_one_line(e)}') from None
  if not isinstance(ds, datasets.Dataset):
    raise UserError(f'{source}: expected one split, got {type(ds).__name__}')
  if len(ds) == 0:
    raise UserError(f'{source}: the split has no rows')
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
    raise UserError(f'{source}: the label column holds classes '
                    f'{list(class_names)} but the task is a regression task')
  if label_names is None and task.label_names is None:
    # Custom task without a label map: the ClassLabel names are the map.
    label_names = tuple(class_names)
  names = _resolve_label_names(task, label_names)
  class_names = [str(c) for c in class_names]
  if set(class_names) <= set(names):
    table = class_names
  elif len(class_names) == len(names) and (
      task.name != 'custom' or names == tuple(map(str, range(len(names))))):
    table = list(names)
  else:
    raise UserError(
        f'{source}: the dataset\'s classes {class_names} do not match the '
        f'label names {list(names)}')
  out = []
  for i, v in enumerate(ids):
    if v is None or not 0 <= v < len(table):
      raise UserError(f'{source} row {i}: no label (class id {v!r})')
    out.append(table[v])
  return out, names


def hf_label_names(name: str, config_name: str | None, split: str,
                   task: Task, data_files: Any = None,
                   cache_dir: str | None = None) -> tuple[str, ...]:
  """The label map of a custom task from a Hugging Face dataset split.

  A ClassLabel column gives its own names in id order; other columns give
  their distinct values sorted by `sort_label_names`.
  """
  if task.is_regression:
    raise ValueError(f'task {task.name!r} is a regression task')
  source = _hf_source(name, config_name, split, data_files)
  ds = _load_hf(name, config_name, split, data_files, cache_dir, source)
  if task.label_field not in ds.column_names:
    raise UserError(
        f'{source} columns: no column {task.label_field!r}; found columns '
        f'{ds.column_names}')
  class_names = getattr(ds.features[task.label_field], 'names', None)
  if class_names is not None:
    return _check_label_count(source, tuple(str(c) for c in class_names))
  labels = [_label_string(source, f'row {i}', v)
            for i, v in enumerate(ds[task.label_field])]
  return _check_label_count(source, sort_label_names(labels))


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
    return [v.decode('utf-8') if isinstance(v, bytes)
            else v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v
            for v in values]


def _load_tfds(name: str, split: str, data_dir: str | None,
               source: str) -> _TfdsTable:
  """`tfds.data_source` (array_record, no TensorFlow) read into memory."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Slow import.
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir)
    features = tfds.builder(name, data_dir=data_dir).info.features
    rows = [ds[i] for i in range(len(ds))]
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
        f'{source}: could not load TFDS dataset {name!r} (data_dir '
        f'{data_dir!r}; prepare it once with `tfds build`): {_one_line(e)}'
    ) from None
  if not rows:
    raise UserError(f'{source}: the split has no rows')
  return _TfdsTable(rows, features)


def _tfds_own_dataset(name: str, task: Task) -> bool:
  # 'glue/sst2' (or 'glue/sst2:2.0.0') has the HF glue column names.
  return task.hf_dataset is not None and name.split(':')[0] == (
      f'glue/{task.hf_dataset[1]}')


def read_tfds(name: str, split: str, task: Task,
              label_names: Sequence[str] | None = None,
              data_dir: str | None = None, *,
              require_labels: bool = True) -> Examples:
  """Reads one split of a TFDS dataset ('glue/sst2') with `tfds.data_source`.

  GLUE datasets use the same columns as the HF ones (`hf_text_fields`); other
  datasets are read by `text_fields` / `label_field`. ClassLabel columns map
  to label names as for HF datasets.
  """
  source = f'tfds:{name}:{split}'
  table = _load_tfds(name, split, data_dir, source)
  return _examples_from_table(table, source, _tfds_own_dataset(name, task),
                              task, label_names, require_labels)


def tfds_label_names(name: str, split: str, task: Task,
                     data_dir: str | None = None) -> tuple[str, ...]:
  """The label map of a custom task from a TFDS split (ClassLabel names or values)."""
  if task.is_regression:
    raise ValueError(f'task {task.name!r} is a regression task')
  source = f'tfds:{name}:{split}'
  table = _load_tfds(name, split, data_dir, source)
  if task.label_field not in table.column_names:
    raise UserError(
        f'{source} columns: no column {task.label_field!r}; found columns '
        f'{table.column_names}')
  class_names = getattr(table.features[task.label_field], 'names', None)
  if class_names is not None:
    return _check_label_count(source, tuple(str(c) for c in class_names))
  labels = [_label_string(source, f'row {i}', v)
            for i, v in enumerate(table[task.label_field])]
  return _check_label_count(source, sort_label_names(labels))
