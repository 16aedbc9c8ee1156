"""Files read as streams: unlabelled rows a chunk at a time, for prediction over files larger
than memory (local or remote). Same checks and one-line messages as `readers.read_file`.
"""

from __future__ import annotations

from collections.abc import Iterator
import codecs
import csv
import io
import itertools
from typing import Any

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.data import readers
from flaxbert_cls.data.tasks import Task
from flaxbert_cls.errors import UserError


def read_file_chunks(path: str, task: Task, chunk_rows: int) -> Iterator[readers.Examples]:
  """Unlabelled rows of a .tsv/.csv/.jsonl file, `chunk_rows` at a time, in file order.

  The file (local or remote) is read as a stream: memory holds one chunk of rows, never
  the whole file. Same checks and one-line messages as `read_file`; a label column, if
  any, is not read (`labels` is None).
  """
  ext = readers.checked_extension(path)
  records = _csv_records(path) if ext == ".csv" else _stream_lines(path)
  first = next(records, None)
  if first is None:
    raise UserError(f"{path}: file is empty")
  if ext in (".jsonl", ".json"):
    if first[1].lstrip().startswith("["):
      raise UserError(f"{path} line {first[0]}: found a JSON array; expected JSON Lines "
                      "(one object per line), e.g. convert with: jq -c '.[]'")
    records = itertools.chain([first], records)
    to_rows = lambda chunk: readers.jsonl_line_rows(path, chunk, task, False, has_labels=False)[0]
  else:
    if ext == ".csv":
      has_header, columns = True, [c.strip() for c in first[1]]
      text_idx, label_idx = readers.column_indices(path, columns, task, False, where=f"line {first[0]}")
      kind, hint = "comma-separated", "; quote fields that hold commas"
    else:
      has_header, columns, text_idx, label_idx = readers.tsv_columns(path, first[1], task, False)
      records = ((n, line.split("\t")) for n, line in records)
      kind, hint = "tab-separated", ""
    if not has_header:
      records = itertools.chain([(first[0], first[1].split("\t"))], records)
    to_rows = lambda chunk: readers.rows_from_fields(path, chunk, columns, text_idx, label_idx, task,
                                              kind, hint)
  any_rows = False
  while chunk := list(itertools.islice(records, chunk_rows)):
    rows = to_rows(chunk)
    any_rows = True
    yield readers.Examples(texts=[r[1] for r in rows], labels=None, source=path,
                   line_numbers=[r[0] for r in rows])
  if not any_rows:
    raise UserError(f"{path}: no data rows (only a header line)")


def _open_stream(path: str) -> Any:
  try:
    return workdir_lib.open_binary(path)
  except OSError as e:
    raise UserError(f"{path}: cannot read: {e.strerror or e}") from None


def _stream_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, line) pairs, as `readers.read_file` splits them, read as a stream."""
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
