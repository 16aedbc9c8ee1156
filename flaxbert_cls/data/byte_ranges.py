"""A data file as line-aligned byte ranges: each process of a pod reads only its share.

  ranges = byte_ranges.split_file("big.jsonl", parts=16)   # [ByteRange(path, start, stop)]
  for chunk in byte_ranges.read_range_chunks(ranges[3], task, chunk_rows=65536):
    chunk.examples, chunk.stop   # rows in file order; the byte offset after them

A range starts after a newline and ends after one (or at the end of the file), so the
ranges' rows, in order, are exactly the rows `streaming.read_file_chunks` reads from the
whole file, with the same checks. Error messages name the file's line: the line number at
a range's start is counted (a pass over the bytes before it) only when there is an error to
report, so reading a range never reads the bytes before it. `Examples.source` of a range
says which bytes it holds; its `line_numbers` count from the range's first line.

CSV: a quoted field may hold newlines, so an offset inside a file cannot be shown to start
a record without reading everything before it; a CSV file is one range (`split_file`
refuses more), read record by record (offsets between records are exact).
"""

from __future__ import annotations

from collections.abc import Iterator
import codecs
import csv
import dataclasses
import hashlib
from typing import Any, Callable

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.data import readers
from flaxbert_cls.data.tasks import Task
from flaxbert_cls.errors import UserError

_BLOCK = 1 << 20  # bytes read at a time


@dataclasses.dataclass(frozen=True)
class ByteRange:
  """Bytes [start, stop) of `path`: whole lines (whole records for CSV)."""

  path: str
  start: int
  stop: int

  @property
  def size(self) -> int:
    return self.stop - self.start

  def describe(self) -> str:
    return f"{self.path} bytes [{self.start}, {self.stop})"


@dataclasses.dataclass
class RangeChunk:
  """Rows read from a range: they end at byte `stop`; `sha256` is of bytes [chunk start, stop)."""

  examples: readers.Examples
  stop: int
  sha256: str


def file_identity(path: str) -> dict[str, Any]:
  """{'path', 'size', 'mtime'}: what tells a file from another (or from itself, changed)."""
  try:
    size, mtime = workdir_lib.size_and_mtime(path)
  except OSError as e:
    raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
  return {"path": path, "size": size, "mtime": mtime}


def split_file(path: str, parts: int) -> list[ByteRange]:
  """`parts` line-aligned ranges of about size/parts bytes each (some empty on tiny files)."""
  ext = readers.checked_extension(path)
  size = file_identity(path)["size"]
  if size == 0:
    raise UserError(f"{path}: file is empty")
  if ext == ".csv" and parts > 1:
    raise UserError(f"{path}: a CSV file cannot be split into {parts} byte ranges (a quoted "
                    "field may hold newlines, so no offset provably starts a record); give "
                    "TSV or JSONL, or the data as shards read whole (--input='part-*.csv')")
  bounds = [0] + [_line_start_at(path, k * size // parts, size) for k in range(1, parts)]
  bounds = [max(bounds[:i + 1]) for i in range(len(bounds))] + [size]  # non-decreasing
  return [ByteRange(path, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _line_start_at(path: str, offset: int, size: int) -> int:
  """The first line start at or after `offset` (a line starts after b'\\n')."""
  with _open(path) as f:
    f.seek(offset - 1)
    position = offset - 1
    while block := f.read(1 << 16):
      newline = block.find(b"\n")
      if newline >= 0:
        return position + newline + 1
      position += len(block)
  return size


def line_at(path: str, offset: int) -> int:
  """The 1-based line number of the line starting at byte `offset` (reads the bytes before)."""
  count, done = 0, 0
  with _open(path) as f:
    while done < offset and (block := f.read(min(_BLOCK, offset - done))):
      count += block.count(b"\n")
      done += len(block)
  return count + 1


def _open(path: str) -> Any:
  try:
    return workdir_lib.open_binary(path)
  except OSError as e:
    raise UserError(f"{path}: cannot read: {e.strerror or e}") from None


def _raw_lines(path: str, start: int, stop: int) -> Iterator[tuple[bytes, int]]:
  """(line with its b'\\n', offset after it) for each line of bytes [start, stop)."""
  with _open(path) as f:
    f.seek(start)
    position, pending = start, b""
    while position < stop and (block := f.read(min(_BLOCK, stop - position))):
      position += len(block)
      lines = (pending + block).split(b"\n")
      pending = lines.pop()
      end = position - len(pending)
      offsets = []
      for line in reversed(lines):
        offsets.append(end)
        end -= len(line) + 1
      for line, after in zip(lines, reversed(offsets)):
        yield line + b"\n", after
    if pending:
      yield pending, position


def _decode(path: str, raw: bytes, offset: int, at_file_start: bool) -> str:
  if at_file_start and raw.startswith(codecs.BOM_UTF8):
    raw = raw[len(codecs.BOM_UTF8):]
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} line {line_at(path, offset)}: not valid UTF-8 (byte "
                    f"0x{raw[e.start]:02x} at byte column {e.start + 1}); save the file as "
                    "UTF-8") from None


def _data_follows(path: str, offset: int) -> bool:
  """Whether anything but whitespace comes at or after byte `offset`."""
  with _open(path) as f:
    f.seek(offset)
    while block := f.read(1 << 16):
      if block.strip():
        return True
  return False


def _first_line(path: str) -> str:
  raw, after = next(_raw_lines(path, 0, file_identity(path)["size"]))
  return _strip_newline(_decode(path, raw, after, True))


def _strip_newline(line: str) -> str:
  line = line[:-1] if line.endswith("\n") else line
  return line[:-1] if line.endswith("\r") else line


class _Lines:
  """The range's lines as `(local line number, text)`, as `streaming` splits them; remembers
  the byte offset after the last line handed out and hashes the bytes read."""

  def __init__(self, byte_range: ByteRange, start: int):
    self.range, self.start, self.hash = byte_range, start, hashlib.sha256()
    self.position = self.line_start = start
    self._lines = _raw_lines(byte_range.path, start, byte_range.stop)
    self.number = 0  # lines handed out, counted from `start`

  def raw(self) -> Iterator[tuple[int, str]]:
    """Every line, blank ones too, with its line ending (what csv.reader needs)."""
    for raw, after in self._lines:
      text = _decode(self.range.path, raw, self.position, self.position == 0)
      self.hash.update(raw)
      self.number += 1
      self.line_start, self.position = self.position, after
      yield self.number, text

  def file_line(self, n: int) -> int:
    """The file's line number of local line `n` (counts the bytes before `start` if any)."""
    return n if self.start == 0 else line_at(self.range.path, self.start) - 1 + n

  def rows(self) -> Iterator[tuple[int, str]]:
    """Non-blank lines; a blank line between data rows (here or after the range) is an error."""
    blank = None
    for n, text in self.raw():
      line = _strip_newline(text)
      if not line.strip():
        blank = blank or (n, self.line_start)
        continue
      if blank is not None:
        self._blank_line(blank[1])
      yield n, line
    if blank is not None and _data_follows(self.range.path, self.range.stop):
      self._blank_line(blank[1])

  def _blank_line(self, offset: int) -> None:
    raise UserError(f"{self.range.path} line {line_at(self.range.path, offset)}: blank line "
                    "between data rows; remove it")


def read_range_chunks(byte_range: ByteRange, task: Task, chunk_rows: int,
                      start: int | None = None) -> Iterator[RangeChunk]:
  """Unlabelled rows of the range, `chunk_rows` at a time, from byte `start` (default: the
  range's; else an earlier chunk's `stop`, to resume). Same checks and messages as
  `streaming.read_file_chunks` (the file's line numbers); an empty range yields nothing."""
  path = byte_range.path
  ext = readers.checked_extension(path)
  start = byte_range.start if start is None else start
  lines = _Lines(byte_range, start)
  if ext == ".csv":
    records, to_rows = _csv_records(byte_range, lines, task)
  elif ext == ".tsv":
    records, to_rows = _tsv_records(byte_range, lines, task)
  else:
    records, to_rows = _jsonl_records(byte_range, lines, task)
  source = f"{path} bytes [{start}, {byte_range.stop})"  # line_numbers count from `start`
  while True:
    chunk = []
    for record in records:
      chunk.append(record)
      if len(chunk) == chunk_rows:
        break
    if not chunk:
      return
    rows = _with_file_lines(path, start, chunk, to_rows)
    yield RangeChunk(readers.Examples(texts=[r[1] for r in rows], labels=None, source=source,
                                      line_numbers=[r[0] for r in rows]),
                     lines.position, lines.hash.hexdigest())
    lines.hash = hashlib.sha256()


def _with_file_lines(path: str, offset: int, chunk: list[tuple[int, Any]],
                     to_rows: Callable[[list[tuple[int, Any]]], list]) -> list:
  """`to_rows(chunk)` (line numbers counted from byte `offset`); on an error, the chunk again
  with the file's line numbers (counted only now), so the message names the file's line."""
  try:
    return to_rows(chunk)
  except UserError:
    shift = line_at(path, offset) - 1
    to_rows([(n + shift, record) for n, record in chunk])
    raise


def _jsonl_records(byte_range: ByteRange, lines: _Lines, task: Task):
  records = lines.rows()
  if lines.position == 0:
    first = next(records, None)
    if first is not None and first[1].lstrip().startswith("["):
      raise UserError(f"{byte_range.path} line 1: found a JSON array; expected JSON Lines "
                      "(one object per line), e.g. convert with: jq -c '.[]'")
    records = _chain(first, records)
  path = byte_range.path
  return records, lambda chunk: readers.jsonl_line_rows(path, chunk, task, False,
                                                        has_labels=False)[0]


def _tsv_records(byte_range: ByteRange, lines: _Lines, task: Task):
  path = byte_range.path
  at_header = lines.position == 0
  has_header, columns, text_idx, label_idx = readers.tsv_columns(path, _first_line(path), task,
                                                                 False)
  records = lines.rows()
  if at_header and has_header:
    next(records, None)
  records = ((n, line.split("\t")) for n, line in records)
  return records, lambda chunk: readers.rows_from_fields(path, chunk, columns, text_idx,
                                                          label_idx, task, "tab-separated")


def _csv_records(byte_range: ByteRange, lines: _Lines, task: Task):
  path = byte_range.path
  if byte_range.start != 0:  # `split_file` never makes one; a caller's own range might
    raise UserError(f"{byte_range.describe()}: a CSV file is read from its start")
  with _open(path) as f:
    header = next(csv.reader([_decode(path, f.readline(), 0, True)]), [])
  columns = [c.strip() for c in header]
  text_idx, label_idx = readers.column_indices(path, columns, task, False)
  at_header = lines.position == 0

  def records():
    reader = csv.reader((text for _, text in lines.raw()), strict=True)
    first, blank = 1, None
    try:
      for fields in reader:
        if at_header and first == 1:
          pass  # the header
        elif not any(x.strip() for x in fields):
          blank = blank or first
        elif blank is not None:
          raise UserError(f"{path} line {lines.file_line(blank)}: blank line between data "
                          "rows; remove it")
        else:
          yield first, fields
        first = lines.number + 1
    except csv.Error as e:
      raise UserError(f"{path} line {lines.file_line(lines.number)}: bad CSV: {e}") from None

  return records(), lambda chunk: readers.rows_from_fields(
      path, chunk, columns, text_idx, label_idx, task, "comma-separated",
      "; quote fields that hold commas")


def _chain(first, rest):
  if first is not None:
    yield first
  yield from rest
