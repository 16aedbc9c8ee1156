"""`predict` on every process of a pod: each writes its parts of one output directory.

  flaxbert-cls predict --model=DIR --input=big.jsonl --output=OUT [--output_format=csv]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]   # as `train`

The input is one file split into line-aligned byte ranges (`data/byte_ranges.py`), one part
per process of the first run, or shards (`--input='part-*.jsonl'`) read whole, one part per
shard. Process i of P predicts parts i, i+P, ... on its own devices (no collective in the
loop) and writes `OUT/part-00003-of-00016.jsonl`, in input order; the parts concatenated are
the one-process output row for row (each CSV part has its header). Then process 0 writes
`OUT/_SUCCESS` (JSON: rows per part, the bytes and sha256 each part read, rows/s per process
and in all).

Resumable: a part is written `chunk_rows` rows at a time into `OUT/_temporary/<part>/`
(a chunk file, then `progress.json` listing it with its size and sha256), and renamed to
its name only when whole, after its record in `OUT/_parts/`. A rerun skips whole parts and
continues a part after its last intact chunk (a damaged or missing chunk and everything
after it are redone), so a preempted run loses at most one chunk per process.
`OUT/_manifest.json`, written first, pins the input (size and mtime of each file), the parts
and the model: a rerun on a changed input, or into a directory holding another input's
parts, is refused in one line. OUT may be remote (gs://, any etils.epath scheme); it must be
one directory every process sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils

from flaxbert_cls import workdir as files
from flaxbert_cls.data import byte_ranges
from flaxbert_cls.data import readers
from flaxbert_cls.errors import UserError
from flaxbert_cls.serving import output_format
from flaxbert_cls.serving import predict as predict_lib

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
SUCCESS_NAME = "_SUCCESS"
RECORDS_DIR = "_parts"  # one JSON record per whole part, one per process of the last run
TEMPORARY_DIR = "_temporary"  # parts being written: chunk files and progress.json
FORMATS = ("jsonl", "csv")


def wants_parts(input_path: str, output: str) -> bool:
  """Whether `predict` writes a directory of parts: an output without an extension (or
  ending in '/'), a glob of input shards, or several processes; a file output otherwise."""
  directory = output.endswith("/") or not os.path.splitext(output.rstrip("/"))[1]
  if not directory and is_glob(input_path):
    raise UserError(f"--input={input_path}: shards are predicted into a directory of parts; "
                    f"give --output=DIR, not the file {output}")
  if not directory and jax.process_count() > 1:
    raise UserError(f"--output={output}: with {jax.process_count()} processes each writes its "
                    "own parts; give a directory (--output=DIR)")
  return directory


def is_glob(path: str) -> bool:
  return any(c in os.path.basename(path) for c in "*?[")


def part_name(index: int, count: int, ext: str) -> str:
  return f"part-{index:05d}-of-{count:05d}.{ext}"


def plan(input_path: str, processes: int) -> tuple[list[dict[str, Any]], list[byte_ranges.ByteRange]]:
  """(identity of each input file, the parts' byte ranges): shards whole, else one file split."""
  if is_glob(input_path):
    paths = files.glob(input_path)
    if not paths:
      raise UserError(f"--input={input_path}: no file matches")
    identities = [byte_ranges.file_identity(p) for p in paths]
    for p in paths:
      readers.checked_extension(p)
    return identities, [byte_ranges.ByteRange(i["path"], 0, i["size"]) for i in identities]
  ranges = byte_ranges.split_file(input_path, processes)
  return [byte_ranges.file_identity(input_path)], ranges


def predict_parts(model: str, input_path: str, output_dir: str, output_ext: str = "jsonl",
                  step: int | str | None = None, text_fields: Sequence[str] | None = None,
                  quantize: str | None = None, batch_size: int | None = None,
                  member: int | str | None = None,
                  chunk_rows: int = predict_lib.CHUNK_ROWS) -> dict[str, Any]:
  """Every process's parts of `output_dir` (see the module doc); returns _SUCCESS's content
  plus 'process': this process's figures of this run."""
  me, count = jax.process_index(), jax.process_count()
  if output_ext not in FORMATS:
    raise UserError(f"--output_format={output_ext}: use one of {list(FORMATS)}")
  if chunk_rows < 1:
    raise UserError(f"--chunk_rows={chunk_rows}: must be >= 1")
  if quantize and count > 1:
    raise UserError(f"--quantize={quantize} with {count} processes: int8 predicts with ONNX "
                    "Runtime on one host; predict in float, or on one process")
  input_path = files.resolve(input_path)
  output_dir = files.resolve(output_dir.rstrip("/"))
  identities, ranges = plan(input_path, count)
  manifest = {"inputs": identities, "parts": [[r.path, r.start, r.stop] for r in ranges],
              "format": output_ext, "predicted_with": {
                  "model": files.resolve(model), "step": step, "member": member,
                  "text_fields": list(text_fields) if text_fields else None}}
  previous = _checked_manifest(output_dir, manifest, input_path)
  if previous is not None:  # the first run's parts, whatever this run's process count
    ranges = [byte_ranges.ByteRange(*p) for p in previous["parts"]]
  names = [part_name(i, len(ranges), output_ext) for i in range(len(ranges))]
  if me == 0 and previous is None:
    files.prepare(output_dir)
    _write_atomically(files.join(output_dir, MANIFEST_NAME), json.dumps(manifest, indent=1))
  _barrier(count, "predict: manifest")
  predictor = predict_lib.Predictor.from_path(model, step=step, text_fields=text_fields,
                                              batch_size=batch_size, quantize=quantize,
                                              member=member, devices=jax.local_devices())
  start, mine = time.perf_counter(), list(range(me, len(ranges), count))
  log.info("predict: process %d of %d: parts %s of %d (%d bytes of %d) with %s", me, count,
           mine, len(ranges), sum(ranges[i].size for i in mine),
           sum(r.size for r in ranges), predictor.source)
  rows = sum(_PartWriter(predictor, output_dir, names[i], ranges[i], output_ext,
                         chunk_rows).run() for i in mine)
  seconds = time.perf_counter() - start
  figures = {"process": me, "parts": [names[i] for i in mine], "rows": rows,
             "seconds": round(seconds, 3), "rows_per_sec": rows / max(seconds, 1e-9)}
  _write_atomically(files.join(output_dir, RECORDS_DIR, f"process-{me:05d}-of-{count:05d}.json"),
                    json.dumps(figures))
  _barrier(count, "predict: parts")
  records = _part_records(output_dir, names)  # every process: all refuse alike
  if not sum(r["rows"] for r in records):
    raise UserError(f"{input_path}: no data rows")
  if me == 0:
    _write_success(output_dir, records, identities, count)
  _barrier(count, "predict: success")
  success = json.loads(files.read_text(files.join(output_dir, SUCCESS_NAME)))
  return dict(success, process=figures)


def _barrier(count: int, name: str) -> None:
  if count > 1:
    multihost_utils.sync_global_devices(name)


def _checked_manifest(output_dir: str, manifest: dict[str, Any], input_path: str
                      ) -> dict[str, Any] | None:
  """The output's manifest if it is this input's (None: a new output); one line if not.

  Every process reads the same files, so every process refuses alike (before any barrier).
  """
  path = files.join(output_dir, MANIFEST_NAME)
  if not files.exists(path):
    if files.is_dir(output_dir) and files.glob(files.join(output_dir, "part-*")):
      raise UserError(f"--output={output_dir}: holds part files but no {MANIFEST_NAME} (not "
                      "written by this predict); give a new --output or empty it")
    return None
  try:
    previous = json.loads(files.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({e}); give a new --output or delete it") from None
  old_paths = [i["path"] for i in previous.get("inputs", [])]
  new_paths = [i["path"] for i in manifest["inputs"]]
  if old_paths != new_paths:
    shown = old_paths[0] + (f" and {len(old_paths) - 1} more" if len(old_paths) > 1 else "")
    raise UserError(f"--output={output_dir}: holds the parts of another input ({shown}), not "
                    f"of {input_path}; give a new --output or delete it")
  for old, new in zip(previous["inputs"], manifest["inputs"]):
    if (old["size"], old["mtime"]) != (new["size"], new["mtime"]):
      raise UserError(f"{new['path']}: changed since {output_dir}'s parts were written (size "
                      f"{old['size']} -> {new['size']} bytes, mtime {old['mtime']} -> "
                      f"{new['mtime']}); give a new --output or delete it")
  for key in ("format", "predicted_with"):
    if previous.get(key) != manifest[key]:
      raise UserError(f"--output={output_dir}: its parts were written with {key}="
                      f"{previous.get(key)}, this run has {manifest[key]}; give a new --output")
  return previous


def _write_atomically(path: str, data: str | bytes) -> None:
  """A reader sees the whole file or none: a local rename; an object store's put is whole."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  parent = os.path.dirname(path)
  if files.is_remote(path):
    files.prepare(parent)
    files.write_bytes(path, data)
    return
  os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


class _PartWriter:
  """One part: resumes its chunks, predicts the rest, then renames it into place."""

  def __init__(self, predictor: predict_lib.Predictor, output_dir: str, name: str,
               byte_range: byte_ranges.ByteRange, ext: str, chunk_rows: int):
    self.predictor, self.range, self.chunk_rows = predictor, byte_range, chunk_rows
    self.name, self.ext = name, ext
    self.path = files.join(output_dir, name)
    self.record_path = files.join(output_dir, RECORDS_DIR, name + ".json")
    self.temporary = files.join(output_dir, TEMPORARY_DIR, name)
    self.progress_path = files.join(self.temporary, "progress.json")

  def run(self) -> int:
    """Rows predicted by this call (0 for a part already whole)."""
    if files.exists(self.path) and files.exists(self.record_path):
      log.info("predict: %s is complete (%s); skipped", self.name, self.range.describe())
      return 0
    chunks = self._intact_chunks()
    done = sum(c["rows"] for c in chunks)
    start = chunks[-1]["stop"] if chunks else None
    if chunks:
      log.info("predict: %s: resuming after %d intact chunks (%d rows, input byte %d)",
               self.name, len(chunks), done, start)
    began, predicted = time.perf_counter(), 0
    for chunk in byte_ranges.read_range_chunks(self.range, self.predictor.task,
                                               self.chunk_rows, start):
      texts = chunk.examples.texts
      text = output_format.results_text(self.name, self.predictor.task.text_fields,
                                        self.predictor.label_names, texts,
                                        self.predictor.predict(texts)).encode("utf-8")
      chunk_name = f"chunk-{len(chunks):06d}.{self.ext}"
      _write_atomically(files.join(self.temporary, chunk_name), text)
      chunks.append({"file": chunk_name, "rows": len(texts), "stop": chunk.stop,
                     "bytes": len(text), "sha256": hashlib.sha256(text).hexdigest(),
                     "input_sha256": chunk.sha256})
      self._save_progress(chunks)
      predicted += len(texts)
      seconds = time.perf_counter() - began
      log.info("predict: process %d: %s: %d rows, %.0f%% of its bytes, %.1f rows/s",
               jax.process_index(), self.name, done + predicted,
               100 * (chunk.stop - self.range.start) / max(self.range.size, 1),
               predicted / max(seconds, 1e-9))
    self._finish(chunks, time.perf_counter() - began)
    return predicted

  def _intact_chunks(self) -> list[dict[str, Any]]:
    """The chunks written before, up to the first missing or damaged one (redone from there)."""
    if not files.exists(self.progress_path):
      return []
    try:
      progress = json.loads(files.read_text(self.progress_path))
    except (OSError, ValueError):
      log.warning("predict: %s: unreadable progress.json; redoing the part", self.name)
      return []
    if progress.get("range") != [self.range.path, self.range.start, self.range.stop]:
      return []
    intact = []
    for chunk in progress["chunks"]:
      path = files.join(self.temporary, chunk["file"])
      data = files.read_bytes(path) if files.exists(path) else b""
      if len(data) != chunk["bytes"] or hashlib.sha256(data).hexdigest() != chunk["sha256"]:
        log.warning("predict: %s: %s is damaged (%d of %d bytes); redoing the part from row "
                    "%d", self.name, chunk["file"], len(data), chunk["bytes"],
                    sum(c["rows"] for c in intact))
        break
      intact.append(chunk)
    return intact

  def _save_progress(self, chunks: list[dict[str, Any]]) -> None:
    _write_atomically(self.progress_path, json.dumps(
        {"range": [self.range.path, self.range.start, self.range.stop], "chunks": chunks}))

  def _finish(self, chunks: list[dict[str, Any]], seconds: float) -> None:
    """The chunks joined under a temporary name, the part's record, then the part's name."""
    task = self.predictor.task
    tmp = files.join(self.temporary, self.name)
    with files.open_write_binary(tmp) as out:
      out.write(output_format.header_text(self.name, task.text_fields,
                                          self.predictor.label_names).encode("utf-8"))
      for chunk in chunks:
        out.write(files.read_bytes(files.join(self.temporary, chunk["file"])))
    input_hash = hashlib.sha256("".join(c["input_sha256"] for c in chunks).encode())
    record = {"part": self.name, "rows": sum(c["rows"] for c in chunks),
              "input": {"path": self.range.path, "start": self.range.start,
                        "stop": self.range.stop, "chunks_sha256": input_hash.hexdigest()},
              "seconds_last_run": round(seconds, 3)}
    _write_atomically(self.record_path, json.dumps(record))
    files.rename(tmp, self.path)
    files.remove_tree(self.temporary)
    log.info("predict: wrote %s: %d rows", self.path, record["rows"])


def _part_records(output_dir: str, names: list[str]) -> list[dict[str, Any]]:
  """Every part's record, once every process has finished its parts."""
  records = []
  for name in names:
    record_path = files.join(output_dir, RECORDS_DIR, name + ".json")
    if not (files.exists(files.join(output_dir, name)) and files.exists(record_path)):
      raise UserError(f"{output_dir}/{name}: missing after every process finished (is "
                      f"{output_dir} one directory every process sees?)")
    records.append(json.loads(files.read_text(record_path)))
  return records


def _write_success(output_dir: str, parts: list[dict[str, Any]],
                   identities: list[dict[str, Any]], count: int) -> None:
  """OUT/_SUCCESS once every part is whole: counts per part, figures per process."""
  processes = [json.loads(files.read_text(files.join(
      output_dir, RECORDS_DIR, f"process-{i:05d}-of-{count:05d}.json"))) for i in range(count)]
  rows_this_run = sum(p["rows"] for p in processes)
  wall = max(p["seconds"] for p in processes)
  success = {"rows": sum(p["rows"] for p in parts), "parts": parts, "inputs": identities,
             "processes": processes, "rows_this_run": rows_this_run,
             "rows_per_sec": rows_this_run / max(wall, 1e-9),
             "rows_per_sec_per_process": rows_this_run / max(wall, 1e-9) / count}
  _write_atomically(files.join(output_dir, SUCCESS_NAME), json.dumps(success, indent=1))
  files.remove_tree(files.join(output_dir, TEMPORARY_DIR))  # every part is whole
  log.info("predict: %s: %d rows in %d parts; this run %d rows at %.1f rows/s in all (%d "
           "processes)", output_dir, success["rows"], len(parts), rows_this_run,
           success["rows_per_sec"], count)
