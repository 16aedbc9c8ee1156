"""Compiled programs saved by `plan --save_compiled=DIR` and loaded by a run
(`config.compiled_programs=DIR`) instead of compiling them again.

A program is saved with a key: the jax / jaxlib / libtpu versions, the platform, device kind
and count, and a fingerprint of the lowered program itself (StableHLO without source
locations). A run lowers each step as it would compile it (tracing: seconds, not the
compile's minutes) and loads the saved executable only when every key field matches, so a
saved program can never stand in for a different one; otherwise it compiles as without
saved programs and says in one line which field differs (for the program itself: the first
config key that differs from the plan's, when one does).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from typing import Any, Callable

import jax
from jax.experimental import serialize_executable

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # the plan's config, to name the key that changed a program
KEY_FIELDS = ("jax", "jaxlib", "libtpu", "platform", "device_kind", "devices", "program")


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return ""


def program_name(kind: str, args: tuple[Any, ...]) -> str:
  """'train_b32_l128': the kind and the batch's shape (args[1], the batch dict)."""
  shape = args[1]["input_ids"].shape
  return f"{kind}_b{shape[-2]}_l{shape[-1]}"


def key(lowered: jax.stages.Lowered, devices: list[Any]) -> dict[str, Any]:
  """What must match for a saved program to run in place of compiling `lowered`."""
  text = lowered.as_text(debug_info=False)
  return {"jax": jax.__version__, "jaxlib": _version("jaxlib"), "libtpu": _version("libtpu"),
          "platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "devices": len(devices), "program": hashlib.sha256(text.encode()).hexdigest()}


def save(directory: str, name: str, lowered: jax.stages.Lowered,
         compiled: jax.stages.Compiled, devices: list[Any]) -> None:
  """DIR/NAME.bin (the executable) and DIR/NAME.json (its key)."""
  try:
    serialized, _, _ = serialize_executable.serialize(compiled)
  except (ValueError, NotImplementedError) as e:
    log.warning("%s: not saved (%s)", name, e)
    return
  workdir_lib.write_bytes(workdir_lib.join(directory, name + ".bin"), serialized)
  workdir_lib.write_text(workdir_lib.join(directory, name + ".json"),
                         json.dumps(key(lowered, devices), indent=2))


def save_config(directory: str, config: Any) -> None:
  workdir_lib.write_text(workdir_lib.join(directory, CONFIG_FILE), config.to_json_best_effort(
      indent=2, sort_keys=True))


# Keys that say where things are read or written, or when: never inside a step. Only the
# mismatch line reads this (to name a likelier key first); the key itself is the program's hash.
_OUTSIDE_PROGRAMS = frozenset((
    "baseline", "baseline_max_rows", "cache_dir", "checkpoint_every_minutes",
    "checkpoint_every_steps", "compilation_cache_dir", "compiled_programs", "data_dir",
    "dataset_config_name", "dataset_name", "early_stopping_patience", "eval_every_steps",
    "keep_best_checkpoints", "log_every_steps", "max_checkpoints_to_keep", "mlflow_tracking_uri",
    "model_name_or_path", "report_to", "resume", "tfds_data_dir", "tfds_name", "tokenizer_name",
    "tracker_experiment", "train_file", "validation_file"))


def _config_differences(directory: str, config: Any) -> str:
  """The config keys that differ from the plan's, those that can enter a program first."""
  saved = workdir_lib.read_json(workdir_lib.join(directory, CONFIG_FILE)) or {}
  here = json.loads(config.to_json_best_effort(sort_keys=True))
  names = [n for n in sorted(set(saved) | set(here)) if saved.get(n) != here.get(n)]
  names = sorted(names, key=lambda n: n in _OUTSIDE_PROGRAMS)
  if not names or names[0] in _OUTSIDE_PROGRAMS:
    return ("no config key that enters a step differs from the plan's: something the plan "
            "could not know does (e.g. the number of training steps from the data's size; set "
            "num_train_steps)")
  return "; ".join(f"config.{n}={saved.get(n)!r} in the plan, {here.get(n)!r} here"
                   for n in names[:2] if n not in _OUTSIDE_PROGRAMS)


def load(directory: str, name: str, lowered: jax.stages.Lowered, devices: list[Any],
         config: Any) -> tuple[jax.stages.Compiled | None, str]:
  """(the saved executable, '') when its key matches `lowered` on `devices`, else (None, why)."""
  path = workdir_lib.join(directory, name + ".json")
  saved = workdir_lib.read_json(path)
  if saved is None:
    return None, f"no {name} in {directory}"
  here = key(lowered, devices)
  for field in KEY_FIELDS:
    if saved.get(field) != here[field]:
      if field == "program":
        return None, f"{name} in {directory} is another program: " + _config_differences(
            directory, config)
      return None, (f"{name} in {directory} was saved for {field}={saved.get(field)!r}, this "
                    f"run has {here[field]!r}")
  try:
    data = workdir_lib.read_bytes(workdir_lib.join(directory, name + ".bin"))
    return serialize_executable.deserialize_and_load(
        data, lowered.in_tree, lowered.out_tree, backend=devices[0].client,
        execution_devices=devices), ""
  except Exception as e:  # pylint: disable=broad-except  (a damaged file: any unpickling error)
    return None, f"{name}.bin in {directory} does not load ({type(e).__name__}: " + \
        " ".join(str(e).split())[:160] + ")"


class Preloaded:
  """A jitted step that runs a saved program for each batch shape whose key matches, and
  compiles the others as jit would."""

  def __init__(self, jitted: Callable, kind: str, directory: str, devices: list[Any],
               config: Any):
    self._jitted, self._kind, self._directory = jitted, kind, directory
    self._devices, self._config = devices, config
    self._programs: dict[str, Callable] = {}

  def __call__(self, *args: Any) -> Any:
    name = program_name(self._kind, args)
    program = self._programs.get(name)
    if program is None:
      lowered = self._jitted.lower(*args)
      program, why = load(self._directory, name, lowered, self._devices, self._config)
      if program is None:
        log.info("Compiling %s: %s.", name, why)
        program = lowered.compile()
      else:
        log.info("Loaded %s from %s: not compiled.", name, self._directory)
      self._programs[name] = program
    return program(*args)


def preloaded(jitted: Callable, kind: str, config: Any, mesh: jax.sharding.Mesh) -> Callable:
  """`jitted` itself when config.compiled_programs is '' (or it cannot be lowered: a sweep's
  step), else a `Preloaded` over the programs in that folder."""
  directory = config.compiled_programs
  if not directory:
    return jitted
  if not workdir_lib.is_dir(directory):
    raise UserError(f"config.compiled_programs={directory!r}: no such folder (write one with "
                    "flaxbert-cls plan --save_compiled=DIR)")
  if not hasattr(jitted, "lower"):
    log.warning("config.compiled_programs: a sweep's %s step is compiled, not loaded", kind)
    return jitted
  return Preloaded(jitted, kind, directory, list(mesh.devices.flat), config)
