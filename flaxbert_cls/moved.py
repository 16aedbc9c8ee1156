"""The flat module names of version 0.1 (`flaxbert_cls.train`, `flaxbert_cls.hf`, ...) as
aliases of their new homes in the layer folders, each with a one-line DeprecationWarning.

`import flaxbert_cls.hf` and `from flaxbert_cls import hf` keep working in users' configs and
scripts; the alias is the new module itself (one module object, no copy). Functions that
moved between modules in the restructure are reached at their new module only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

OLD_TO_NEW = {
    "calibration": "decisions.calibration", "checkpoint": "training.checkpoints",
    "class_weights": "data.class_weights", "data": "data.batching",
    "dataset_sources": "data.sources", "decisions": "decisions.tuning",
    "evaluate": "training.evaluate", "experiment": "training.experiment",
    "export": "serving.export", "hf": "model.hf", "layers": "model.layers",
    "long_documents": "model.long_documents", "metrics": "decisions.metrics",
    "model": "model.bert", "monitor": "serving.monitor", "ops": "model.ops",
    "optim": "training.optimizer", "predict": "serving.predict",
    "progress": "training.progress", "quantize": "serving.quantize", "readers": "data.readers",
    "refinetune": "training.starts", "report": "report.page", "report_plots": "report.plots",
    "sharding": "model.sharding", "sweep": "training.members", "tasks": "data.tasks",
    "thresholds": "decisions.thresholds", "tokenization": "data.tokenization",
    "train": "training.train",
}
# Old names that are folders now: `flaxbert_cls.data` is the data layer; its old module is
# data.batching. Only these plain names are aliased (the folders win for the rest).
FOLDERS = {"data", "decisions", "model", "report"}
PACKAGE = "flaxbert_cls"


def new_name(old: str) -> str:
  return f"{PACKAGE}.{OLD_TO_NEW[old]}"


def load(old: str) -> types.ModuleType:
  """The module `flaxbert_cls.<old>` moved to, with the deprecation line."""
  warnings.warn(f"{PACKAGE}.{old} moved to {new_name(old)}; import it from there",
                DeprecationWarning, stacklevel=3)
  return importlib.import_module(new_name(old))


class _AliasLoader(importlib.abc.Loader):

  def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    return load(spec.name.rsplit(".", 1)[1])

  def exec_module(self, module: types.ModuleType) -> None:
    del module  # already executed under its new name


class AliasFinder(importlib.abc.MetaPathFinder):
  """Finds `flaxbert_cls.<old>` for the moved flat modules (not for the folders)."""

  def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001  (importlib's API)
    del path, target
    prefix, _, old = fullname.rpartition(".")
    if prefix != PACKAGE or old not in OLD_TO_NEW or old in FOLDERS:
      return None
    return importlib.machinery.ModuleSpec(fullname, _AliasLoader())


def install() -> None:
  if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
    sys.meta_path.append(AliasFinder())
