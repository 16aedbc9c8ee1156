"""Re-fine-tuning: a run that starts from a previous run's workdir or an exported directory.

`model_name_or_path` may name a flaxbert-cls workdir (its `model/` gives the HF config and
tokenizer, its checkpoint `config.start_step` the weights) or an HF directory with a
classification head (what `export` writes). The start's classification head is kept by
label NAME: a label of both runs keeps its row; a new label gets a row initialised like a
fresh head; a label of the start that this run lacks is refused unless
`config.drop_removed_labels`. The run records where it started in `started_from.json`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Sequence

import numpy as np
from flax import traverse_util

from flaxbert_cls import layers
from flaxbert_cls.errors import UserError

STARTED_FROM_NAME = "started_from.json"  # in the new run's workdir


def is_workdir(path: str) -> bool:
  """A flaxbert-cls workdir: its run config and checkpoints (an HF directory has neither)."""
  return (os.path.isfile(os.path.join(path, "config.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


def model_source(path: str) -> str:
  """Where a start's HF config and tokenizer are: a workdir's model/, else `path` itself."""
  if is_workdir(path):
    model_dir = os.path.join(path, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
      raise UserError(f"{path}: a workdir without model/config.json (the run never started "
                      "training); use another model_name_or_path")
    return model_dir
  return path


def output_layer_paths(boxed_params: Any) -> list[tuple[str, ...]]:
  """Paths of the head's label-indexed tensors: those whose last logical axis is `classes`."""
  flat = traverse_util.flatten_dict(dict(boxed_params))
  return [path for path, leaf in flat.items()
          if getattr(leaf, "names", None) and leaf.names[-1] == layers.CLASSES]


def head_rows(old: Sequence[str] | None, new: Sequence[str] | None, drop_removed: bool,
              where: str) -> list[int | None]:
  """For each label of the new run, the row of the start's head that holds it (None: fresh).

  `old` / `new` None is a regression head (one output). Labels are matched by name, so a
  reordered label set keeps every row.
  """
  if old is None or new is None:
    if old is None and new is None:
      return [0]
    if drop_removed:
      return [None] * (1 if new is None else len(new))
    kinds = ("a regression model" if old is None else "a classifier",
             "a regression task" if new is None else "a classification task")
    raise UserError(f"{where}: the start is {kinds[0]}, this run is {kinds[1]}; set "
                    "--config.drop_removed_labels=True to train a new head")
  removed = [name for name in old if name not in new]
  if removed and not drop_removed:
    raise UserError(f"{where}: labels {removed} of the start are not in this run's label set "
                    f"{list(new)}; add them to --config.label_names to keep them, or set "
                    "--config.drop_removed_labels=True to drop their rows")
  return [list(old).index(name) if name in old else None for name in new]


def graft_head(fresh: np.ndarray, old: np.ndarray, rows: Sequence[int | None]) -> np.ndarray:
  """`fresh` (label axis last, as Flax stores it) with the start's rows where `rows` says."""
  out = np.array(fresh, dtype=np.float32, copy=True)
  for new_index, old_index in enumerate(rows):
    if old_index is not None:
      out[..., new_index] = old[..., old_index]
  return out


def params_digest(params: Mapping[tuple[str, ...], np.ndarray]) -> str:
  """A content hash of float32 parameters by path: the same weights hash the same, whether
  read from a workdir's checkpoint or its export."""
  digest = hashlib.blake2b(digest_size=16)
  for path in sorted(params):
    value = np.ascontiguousarray(params[path], dtype=np.float32)
    digest.update("/".join(path).encode() + str(value.shape).encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


class Without(Mapping):
  """`state` (a PyTorch-named state dict) without some keys, still read lazily."""

  def __init__(self, state: Mapping[str, np.ndarray], keys: set[str]):
    self._state, self._keys = state, keys

  def __getitem__(self, key: str) -> np.ndarray:
    if key in self._keys:
      raise KeyError(key)
    return self._state[key]

  def __contains__(self, key: object) -> bool:
    return key not in self._keys and key in self._state

  def __iter__(self):
    return (k for k in self._state if k not in self._keys)

  def __len__(self) -> int:
    return sum(1 for _ in self)
