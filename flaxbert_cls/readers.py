"""Reads labelled text files (TSV, CSV, JSON Lines; local or remote) into memory; labels to ids.

Named datasets (Hugging Face `datasets`, TFDS) are read into the same `Examples`
by `dataset_sources.py`. Every problem with the input raises `UserError` with one
line naming the file (or dataset), the line (or row) and the column. Nothing is
skipped silently: a bad row stops the read. GLUE file lookup is `glue_file`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import codecs
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
from typing import Any

import numpy as np

from flaxbert_cls import workdir as files
from flaxbert_cls.errors import UserError
from flaxbert_cls.tasks import Task

SUPPORTED_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")


@dataclasses.dataclass
class Examples:
  """Labelled (or unlabelled) text rows held in memory.

  Attributes:
    texts: one tuple per row, len == len(task.text_fields).
    labels: int32 label ids (classification), float32 targets (regression),
      float32 multi-hot [n, num_labels] (multi-label), or None for unlabelled
      prediction input.
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
    unit = "row" if self.source.startswith(("hf:", "tfds:")) else "line"
    return f"{self.source} {unit} {self.line_numbers[i]}"


# A row before label conversion: (line number, texts, raw label or None).
Row = tuple[int, tuple[str, ...], Any]


def _read_text(path: str) -> str:
  """Returns the file's text (local or remote); UTF-8 with an optional BOM (MRPC has one)."""
  try:
    data = files.read_bytes(path)
  except OSError as e:
    raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
  # Same as the 'utf-8-sig' codec, but error offsets stay relative to `data`.
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise UserError(
        f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at "
        f"byte column {column}); save the file as UTF-8") from None
  if not text.strip():
    raise UserError(f"{path}: file is empty")
  return text


def _split_lines(path: str, text: str) -> list[tuple[int, str]]:
  """Returns (line number, line) pairs without blank lines at the end.

  Splits on '\\n' only (and drops a '\\r' before it): str.splitlines() would
  also break lines at characters such as '\\x0c' or '\\u2028' inside text.
  """
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()  # The file ends with a newline (CoLA dev does not).
  lines = [l[:-1] if l.endswith("\r") else l for l in lines]
  while lines and not lines[-1].strip():
    lines.pop()
  out = []
  for i, line in enumerate(lines, start=1):
    if not line.strip():
      raise UserError(
          f"{path} line {i}: blank line between data rows; remove it")
    out.append((i, line))
  return out


def column_indices(source: str, columns: Sequence[str], task: Task,
                   require_labels: bool, where: str = "line 1"
                   ) -> tuple[list[int], int | None]:
  """Finds the text and label columns; label index None = no labels."""
  found = list(columns)

  def index(name: str) -> int | None:
    hits = [i for i, c in enumerate(found) if c == name]
    if len(hits) > 1:
      raise UserError(
          f"{source} {where}: column {name!r} appears {len(hits)} times; "
          f"found columns {found}")
    return hits[0] if hits else None

  text_idx = []
  for name in task.text_fields:
    i = index(name)
    if i is None:
      raise UserError(
          f"{source} {where}: no column {name!r} (text column of task "
          f"{task.name!r}); found columns {found}")
    text_idx.append(i)
  label_idx = index(task.label_field)
  if label_idx is None and require_labels:
    raise UserError(
        f"{source} {where}: no column {task.label_field!r} (label column of "
        f"task {task.name!r}); found columns {found}")
  return text_idx, label_idx


def row_texts(source: str, where: str, values: Sequence[Any],
              names: Sequence[str]) -> tuple[str, ...]:
  out = []
  for value, name in zip(values, names):
    if value is None:
      value = ""
    if not isinstance(value, str):
      raise UserError(
          f"{source} {where}: column {name!r} holds {value!r}, expected text")
    if not value.strip():
      raise UserError(f"{source} {where}: column {name!r} is empty")
    out.append(value)
  return tuple(out)


def _tsv_rows(path: str, text: str, task: Task, require_labels: bool
              ) -> tuple[list[Row], bool]:
  lines = _split_lines(path, text)
  has_header, columns, text_idx, label_idx = _tsv_columns(path, lines[0][1], task,
                                                          require_labels)
  records = [(n, line.split("\t")) for n, line in (lines[1:] if has_header else lines)]
  return _rows_from_fields(path, records, columns, text_idx, label_idx, task,
                           "tab-separated"), label_idx is not None


def _tsv_columns(path: str, first_line: str, task: Task, require_labels: bool
                 ) -> tuple[bool, list[str], list[int], int | None]:
  """(has a header, columns, text column indices, label index) from a TSV's first line."""
  # Quote handling is off: GLUE rows hold unbalanced '"' (MRPC, RTE).
  first = first_line.split("\t")
  # CoLA train/dev have no header, but CoLA's test.tsv does ('index sentence').
  has_header = (task.file_columns is None
                or set(task.text_fields) <= set(first))
  columns = first if has_header else list(task.file_columns)
  text_idx, label_idx = column_indices(
      path, columns, task, require_labels,
      where="line 1" if has_header else "(header-less file)")
  return has_header, columns, text_idx, label_idx


def _rows_from_fields(path: str, records: list[tuple[int, list[str]]], columns: list[str],
                      text_idx: list[int], label_idx: int | None, task: Task, kind: str,
                      hint: str = "") -> list[Row]:
  """(line, texts, raw label) per record; a record with the wrong field count names its line."""
  rows = []
  for n, fields in records:
    if len(fields) != len(columns):
      raise UserError(f"{path} line {n}: {len(fields)} {kind} fields, expected "
                      f"{len(columns)} ({columns}){hint}")
    rows.append((n, row_texts(path, f"line {n}", [fields[i] for i in text_idx],
                              task.text_fields),
                 None if label_idx is None else fields[label_idx]))
  return rows


def _csv_rows(path: str, text: str, task: Task, require_labels: bool
              ) -> tuple[list[Row], bool]:
  reader = csv.reader(io.StringIO(text, newline=""), strict=True)
  records = []  # (start line, fields)
  start = 1
  try:
    for fields in reader:
      records.append((start, fields))
      start = reader.line_num + 1
  except csv.Error as e:
    raise UserError(f"{path} line {reader.line_num}: bad CSV: {e}") from None
  while records and not any(f.strip() for f in records[-1][1]):
    records.pop()  # Blank lines at the end.
  header_line, columns = records[0]
  text_idx, label_idx = column_indices(
      path, [c.strip() for c in columns], task, require_labels,
      where=f"line {header_line}")
  for n, fields in records[1:]:
    if not any(f.strip() for f in fields):
      raise UserError(f"{path} line {n}: blank line between data rows; "
                      "remove it")
  return _rows_from_fields(path, records[1:], columns, text_idx, label_idx, task,
                           "comma-separated", "; quote fields that hold commas"
                           ), label_idx is not None


def _jsonl_rows(path: str, text: str, task: Task, require_labels: bool
                ) -> tuple[list[Row], bool]:
  lines = _split_lines(path, text)
  if lines[0][1].lstrip().startswith("["):
    raise UserError(
        f"{path} line {lines[0][0]}: found a JSON array; expected JSON Lines "
        "(one object per line), e.g. convert with: jq -c '.[]'")
  return _jsonl_line_rows(path, lines, task, require_labels)


def _jsonl_line_rows(path: str, lines: Sequence[tuple[int, str]], task: Task,
                     require_labels: bool, has_labels: bool | None = None
                     ) -> tuple[list[Row], bool]:
  """Rows of (line number, line) pairs; `has_labels` None: decided by the first line."""
  rows = []
  for n, line in lines:
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(
          f"{path} line {n} column {e.colno}: not valid JSON: {e.msg}"
      ) from None
    if not isinstance(obj, dict):
      raise UserError(
          f"{path} line {n}: expected a JSON object, got "
          f"{type(obj).__name__}")
    where = f"line {n}"
    keys = list(obj)
    for name in task.text_fields:
      if name not in obj:
        raise UserError(
            f"{path} {where}: no key {name!r} (text column of task "
            f"{task.name!r}); found keys {keys}")
    if has_labels is None:
      # Unlabelled prediction input: no label in the first row -> none at all.
      has_labels = task.label_field in obj or require_labels
    if has_labels and task.label_field not in obj:
      raise UserError(
          f"{path} {where}: no key {task.label_field!r} (label column of "
          f"task {task.name!r}); found keys {keys}")
    if not has_labels and task.label_field in obj:
      raise UserError(
          f"{path} {where}: has key {task.label_field!r} but the first row "
          "has no label; give labels on every row or on none")
    rows.append((n, row_texts(path, where, [obj[k] for k in task.text_fields],
                              task.text_fields),
                 obj[task.label_field] if has_labels else None))
  return rows, bool(has_labels)


def _checked_extension(path: str) -> str:
  """The data file's extension, after checking that it exists and is a known type."""
  if not files.exists(path):
    raise UserError(f"{path}: file not found")
  if files.is_dir(path):
    raise UserError(f"{path}: is a directory, expected a data file")
  ext = os.path.splitext(path)[1].lower()
  if ext not in SUPPORTED_EXTENSIONS:
    raise UserError(
        f"{path}: unknown file type {ext!r}; use one of "
        f"{list(SUPPORTED_EXTENSIONS)}")
  return ext


def _read_rows(path: str, task: Task, require_labels: bool
               ) -> tuple[list[Row], bool]:
  """Returns the rows of a file and whether it has labels."""
  ext = _checked_extension(path)
  readers = {".tsv": _tsv_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows,
             ".json": _jsonl_rows}
  rows, has_labels = readers[ext](path, _read_text(path), task,
                                  require_labels)
  if not rows:
    raise UserError(f"{path}: no data rows (only a header line)")
  return rows, has_labels


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


def _regression_target(source: str, where: str, raw: Any) -> float:
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


def _normalize_label_names(label_names: Iterable[Any]) -> tuple[str, ...]:
  names = tuple(str(n).strip() for n in label_names)
  if len(set(names)) != len(names):
    raise ValueError(f"repeated label names in {list(names)}")
  return names


def label_array(source: str, rows: Sequence[Row], task: Task,
                label_names: Sequence[Any] | None, unit: str) -> np.ndarray:
  """Converts raw labels to int32 ids or float32 targets."""
  if task.is_regression:
    return np.array(
        [_regression_target(source, f"{unit} {n}", raw) for n, _, raw in rows],
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
    labels = label_array(path, rows, task, label_names, "line")
  return Examples(texts=[r[1] for r in rows], labels=labels, source=path,
                  line_numbers=[r[0] for r in rows])


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


def build_label_names(path: str, task: Task) -> tuple[str, ...]:
  """The label map of a custom task from its training file.

  Returns the distinct labels sorted by `sort_label_names` (numbers by value,
  other names in natural order), so the ids do not depend on row order.
  """
  if task.is_regression:
    raise ValueError(f"task {task.name!r} is a regression task")
  rows, _ = _read_rows(path, task, require_labels=True)
  if task.is_multilabel:
    return check_label_count(path, sort_label_names(
        label for n, _, raw in rows
        for label in multilabel_strings(path, f"line {n}", raw, task.label_delimiter)))
  _check_one_label_type(path, rows)
  labels = [label_string(path, f"line {n}", raw) for n, _, raw in rows]
  return check_label_count(path, sort_label_names(labels))


def _check_one_label_type(path: str, rows: Sequence[Row]) -> None:
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


def glue_file(data_dir: str, task: Task, split: str) -> str:
  """Path of a split's file in a GLUE data dir: <data_dir>/SST-2/train.tsv.

  `data_dir` may also be the parent of a 'glue' directory.
  """
  if task.glue_dir is None or not task.glue_files:
    raise UserError(
        f"task {task.name!r} is not a GLUE task: give its data files directly")
  if split not in task.glue_files:
    raise UserError(
        f"GLUE task {task.name!r} has no split {split!r}; known splits: "
        f"{sorted(task.glue_files)}")
  path = files.join(data_dir, task.glue_dir, task.glue_files[split])
  nested = files.join(data_dir, "glue", task.glue_dir, task.glue_files[split])
  if not files.is_file(path) and files.is_file(nested):
    return nested
  if not files.is_file(path):
    raise UserError(
        f"{path}: file not found (GLUE data dir {data_dir!r}, task "
        f"{task.name!r}, split {split!r})")
  return path


# Streaming: prediction input too large to hold whole (`predict` over a 1M-line file).


def read_file_chunks(path: str, task: Task, chunk_rows: int) -> Iterator[Examples]:
  """Unlabelled rows of a .tsv/.csv/.jsonl file, `chunk_rows` at a time, in file order.

  The file (local or remote) is read as a stream: memory holds one chunk of rows, never
  the whole file. Same checks and one-line messages as `read_file`; a label column, if
  any, is not read (`labels` is None).
  """
  ext = _checked_extension(path)
  records = _csv_records(path) if ext == ".csv" else _stream_lines(path)
  first = next(records, None)
  if first is None:
    raise UserError(f"{path}: file is empty")
  if ext in (".jsonl", ".json"):
    if first[1].lstrip().startswith("["):
      raise UserError(f"{path} line {first[0]}: found a JSON array; expected JSON Lines "
                      "(one object per line), e.g. convert with: jq -c '.[]'")
    records = itertools.chain([first], records)
    to_rows = lambda chunk: _jsonl_line_rows(path, chunk, task, False, has_labels=False)[0]
  else:
    if ext == ".csv":
      has_header, columns = True, [c.strip() for c in first[1]]
      text_idx, label_idx = column_indices(path, columns, task, False, where=f"line {first[0]}")
      kind, hint = "comma-separated", "; quote fields that hold commas"
    else:
      has_header, columns, text_idx, label_idx = _tsv_columns(path, first[1], task, False)
      records = ((n, line.split("\t")) for n, line in records)
      kind, hint = "tab-separated", ""
    if not has_header:
      records = itertools.chain([(first[0], first[1].split("\t"))], records)
    to_rows = lambda chunk: _rows_from_fields(path, chunk, columns, text_idx, label_idx, task,
                                              kind, hint)
  any_rows = False
  while chunk := list(itertools.islice(records, chunk_rows)):
    rows = to_rows(chunk)
    any_rows = True
    yield Examples(texts=[r[1] for r in rows], labels=None, source=path,
                   line_numbers=[r[0] for r in rows])
  if not any_rows:
    raise UserError(f"{path}: no data rows (only a header line)")


def _open_stream(path: str) -> Any:
  try:
    return files.open_binary(path)
  except OSError as e:
    raise UserError(f"{path}: cannot read: {e.strerror or e}") from None


def _stream_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, line) pairs, as `_split_lines` gives them, read as a stream."""
  blank = None  # the first blank line since the last data line
  with _open_stream(path) as f:
    for n, raw in enumerate(f, start=1):
      if n == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise UserError(f"{path} line {n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                        f"byte column {e.start + 1}); save the file as UTF-8") from None
      line = line[:-1] if line.endswith("\n") else line
      line = line[:-1] if line.endswith("\r") else line
      if not line.strip():
        blank = blank or n
        continue
      if blank is not None:  # blank lines at the end are fine, between rows they are not
        raise UserError(f"{path} line {blank}: blank line between data rows; remove it")
      yield n, line


def _csv_records(path: str) -> Iterator[tuple[int, list[str]]]:
  """(start line, fields) per CSV record (a quoted field may span lines), as a stream."""
  blank = None
  with _open_stream(path) as f:
    reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""), strict=True)
    start = 1
    try:
      for fields in reader:
        if not any(x.strip() for x in fields):
          blank = blank or start
        elif blank is not None:
          raise UserError(f"{path} line {blank}: blank line between data rows; remove it")
        else:
          yield start, fields
        start = reader.line_num + 1
    except csv.Error as e:
      raise UserError(f"{path} line {reader.line_num}: bad CSV: {e}") from None
    except UnicodeDecodeError:
      raise UserError(f"{path} near line {reader.line_num + 1}: not valid UTF-8; save the "
                      "file as UTF-8") from None
