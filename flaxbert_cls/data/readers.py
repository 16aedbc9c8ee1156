"""Reads labelled text files (TSV, CSV, JSON Lines; local or remote) into memory; labels to ids.

Named datasets (Hugging Face `datasets`, TFDS) are read into the same `Examples`
by `data/sources.py`. Every problem with the input raises `UserError` with one
line naming the file (or dataset), the line (or row) and the column. Nothing is
skipped silently: a bad row stops the read. GLUE file lookup is `glue_file`.
"""

from __future__ import annotations

from collections.abc import Sequence
import codecs
import csv
import dataclasses
import io
import json
import os
from typing import Any

import numpy as np

from flaxbert_cls import workdir as files
from flaxbert_cls.errors import UserError
from flaxbert_cls.data import labels as labels_lib
from flaxbert_cls.data.labels import Row
from flaxbert_cls.data.tasks import Task

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
  has_header, columns, text_idx, label_idx = tsv_columns(path, lines[0][1], task,
                                                          require_labels)
  records = [(n, line.split("\t")) for n, line in (lines[1:] if has_header else lines)]
  return rows_from_fields(path, records, columns, text_idx, label_idx, task,
                           "tab-separated"), label_idx is not None


def tsv_columns(path: str, first_line: str, task: Task, require_labels: bool
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


def rows_from_fields(path: str, records: list[tuple[int, list[str]]], columns: list[str],
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
  return rows_from_fields(path, records[1:], columns, text_idx, label_idx, task,
                           "comma-separated", "; quote fields that hold commas"
                           ), label_idx is not None


def _jsonl_rows(path: str, text: str, task: Task, require_labels: bool
                ) -> tuple[list[Row], bool]:
  lines = _split_lines(path, text)
  if lines[0][1].lstrip().startswith("["):
    raise UserError(
        f"{path} line {lines[0][0]}: found a JSON array; expected JSON Lines "
        "(one object per line), e.g. convert with: jq -c '.[]'")
  return jsonl_line_rows(path, lines, task, require_labels)


def jsonl_line_rows(path: str, lines: Sequence[tuple[int, str]], task: Task,
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


def checked_extension(path: str) -> str:
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
  ext = checked_extension(path)
  readers = {".tsv": _tsv_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows,
             ".json": _jsonl_rows}
  rows, has_labels = readers[ext](path, _read_text(path), task,
                                  require_labels)
  if not rows:
    raise UserError(f"{path}: no data rows (only a header line)")
  return rows, has_labels


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
    labels = labels_lib.label_array(path, rows, task, label_names, "line")
  return Examples(texts=[r[1] for r in rows], labels=labels, source=path,
                  line_numbers=[r[0] for r in rows])


def build_label_names(path: str, task: Task) -> tuple[str, ...]:
  """The label map of a custom task from its training file.

  Returns the distinct labels sorted by `sort_label_names` (numbers by value,
  other names in natural order), so the ids do not depend on row order.
  """
  if task.is_regression:
    raise ValueError(f"task {task.name!r} is a regression task")
  rows, _ = _read_rows(path, task, require_labels=True)
  if task.is_multilabel:
    return labels_lib.check_label_count(path, labels_lib.sort_label_names(
        label for n, _, raw in rows
        for label in labels_lib.multilabel_strings(path, f"line {n}", raw, task.label_delimiter)))
  labels_lib.check_one_label_type(path, rows)
  labels = [labels_lib.label_string(path, f"line {n}", raw) for n, _, raw in rows]
  return labels_lib.check_label_count(path, labels_lib.sort_label_names(labels))


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
