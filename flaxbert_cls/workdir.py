"""The run's files, local or remote (gs://bucket/run on Cloud TPU), via etils.epath.

Orbax writes checkpoints to either kind itself; this module covers the rest
(config.json, metrics.jsonl, the model/ directory) and the data files readers.py
reads (train_file, GLUE data_dir, predict input). Files that libraries must read
from a local directory (tokenizer, HF config) are staged through a temp dir.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import Any

from etils import epath

from flaxbert_cls.errors import UserError


def is_remote(path: str) -> bool:
  return "://" in str(path)


def resolve(workdir: str) -> str:
  """An absolute local path, or the URL unchanged."""
  return str(workdir) if is_remote(workdir) else os.path.abspath(workdir)


def prepare(workdir: str) -> str:
  """Creates the workdir (the user's umask applies); a clear error if it cannot."""
  workdir = resolve(workdir)
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"workdir {workdir}: cannot create: {e.strerror or e}") from None
  except Exception as e:  # pylint: disable=broad-except  (remote file systems raise their own)
    raise UserError(f"workdir {workdir}: cannot create: {e}") from None
  if not is_remote(workdir) and not os.access(workdir, os.W_OK):
    raise UserError(f"workdir {workdir}: not writable")
  return workdir


def join(workdir: str, *parts: str) -> str:
  return str(epath.Path(workdir).joinpath(*parts))


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def is_file(path: str) -> bool:
  return epath.Path(path).is_file()


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def size_and_mtime(path: str) -> tuple[int, float]:
  """(bytes, modification time in seconds): nanoseconds locally, what the store says remotely."""
  if not is_remote(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns / 1e9
  st = epath.Path(path).stat()
  return int(st.length), float(st.mtime)


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def open_binary(path: str):
  """The file opened for reading bytes as a stream (local or remote)."""
  return epath.Path(path).open("rb")


def open_write_binary(path: str):
  """The file opened for writing bytes (local or remote; an object appears when closed),
  its directory created if needed."""
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  return epath.Path(path).open("wb")


def write_bytes(path: str, data: bytes) -> None:
  epath.Path(path).write_bytes(data)


def glob(pattern: str) -> list[str]:
  """The files matching a pattern in its last component (`data/part-*.jsonl`), sorted."""
  directory, name = os.path.split(pattern)
  return sorted(str(p) for p in epath.Path(directory or ".").glob(name))


def rename(source: str, destination: str) -> None:
  """Moves a file (replacing `destination`); a copy and a delete on object stores."""
  epath.Path(source).replace(destination)


def remove_tree(path: str) -> None:
  if exists(path):
    epath.Path(path).rmtree()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a JSON Lines file; [] when it does not exist."""
  if not exists(path):
    return []
  records = []
  for number, line in enumerate(read_text(path).splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except ValueError as e:
        raise UserError(f"{path} line {number}: not JSON ({e})") from None
  return records


def read_json(path: str) -> Any:
  """A JSON file's value; None when it does not exist; UserError naming it when not JSON."""
  if not exists(path):
    return None
  try:
    return json.loads(read_text(path))
  except ValueError as e:
    raise UserError(f"{path}: not JSON: {e}") from None


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(path: str, error: OSError, kept: str) -> UserError:
  """A full disk (or quota) while writing `path`, as the CLI's one line; `kept`: what is intact."""
  return UserError(f"{path}: cannot write: {os.strerror(error.errno).lower()}; {kept}")


def write_text(path: str, text: str) -> None:
  """Replaces the file whole: written beside it, then renamed, so a full disk leaves the
  previous version as it was (and raises UserError naming the path)."""
  if is_remote(path):
    epath.Path(path).write_text(text)
    return
  temporary = f"{path}.partial"
  try:
    with open(temporary, "w") as f:
      f.write(text)
    os.replace(temporary, path)
  except OSError as e:
    if os.path.exists(temporary):
      os.remove(temporary)
    if e.errno in NO_SPACE:
      raise no_space(path, e, "its previous version is kept") from None
    raise


def append_line(path: str, line: str) -> None:
  """Appends one line. Object stores cannot append: there the file is rewritten. A full disk
  cuts the file back to its earlier lines (UserError naming it)."""
  if not is_remote(path):
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
      with open(path, "a") as f:
        f.write(line + "\n")
    except OSError as e:
      if e.errno not in NO_SPACE:
        raise
      os.truncate(path, size)
      raise no_space(path, e, "its earlier lines are kept") from None
    return
  p = epath.Path(path)
  p.write_text((p.read_text() if p.exists() else "") + line + "\n")


def upload_dir(local_dir: str, destination: str) -> None:
  """Copies a flat local directory (config + tokenizer files) into the workdir."""
  if not is_remote(destination) and os.path.abspath(local_dir) == os.path.abspath(destination):
    return
  target = epath.Path(destination)
  target.mkdir(parents=True, exist_ok=True)
  for name in os.listdir(local_dir):
    source = os.path.join(local_dir, name)
    if os.path.isfile(source):
      epath.Path(source).copy(target / name, overwrite=True)


def local_dir(path: str) -> str:
  """`path` itself if local, else a local temp copy (for libraries that need a local dir)."""
  if not is_remote(path):
    return path
  copy = tempfile.mkdtemp(prefix="flaxbert_cls_")
  for item in epath.Path(path).iterdir():
    if item.is_file():
      item.copy(epath.Path(copy) / item.name, overwrite=True)
  return copy


# What a run writes in its workdir (the loop, `eval`, a sweep); the report and trackers read it.
METRICS_FILE = "metrics.jsonl"  # evaluations
TRAIN_LOG_FILE = "train_log.jsonl"  # training steps' summaries, apart from evaluations
EVAL_DIR = "eval"  # what `flaxbert-cls eval` (or the best evaluation) found, for the report
PREDICTIONS_FILE = "predictions.jsonl"  # in EVAL_DIR
ERRORS_FILE = "errors.jsonl"  # in EVAL_DIR
SUMMARY_FILE = "eval.json"  # in EVAL_DIR
SWEEP_RESULTS_JSON = "sweep_results.json"
SWEEP_RESULTS_MARKDOWN = "sweep_results.md"

# A run's workdir as a start (re-fine-tuning, training/starts.py): its layout's names.
MODEL_SUBDIR = "model"  # HF config.json (with the label map) + tokenizer files
STARTED_FROM_NAME = "started_from.json"  # where a run's weights came from


def is_workdir(path: str) -> bool:
  """A flaxbert-cls workdir: its run config and checkpoints (an HF directory has neither)."""
  return (os.path.isfile(os.path.join(path, "config.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


def model_source(path: str) -> str:
  """Where a start's HF config and tokenizer are: a workdir's model/, else `path` itself."""
  if is_workdir(path):
    model_dir = os.path.join(path, MODEL_SUBDIR)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
      raise UserError(f"{path}: a workdir without model/config.json (the run never started "
                      "training); use another model_name_or_path")
    return model_dir
  return path
