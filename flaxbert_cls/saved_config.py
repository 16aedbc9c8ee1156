"""A run's saved config read back: the one loader (`load_saved`), and as an ml_collections
config file: `--config=saved_config.py:WORKDIR`.

`flaxbert-cls eval --workdir=RUN --config.validation_file=new.tsv` needs a config for its
`--config.KEY` overrides to apply to; the CLI passes this file with the run's workdir, so the
overrides are typed and checked against the keys the run was trained with.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import ml_collections

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.config import default_config
from flaxbert_cls.errors import UserError

CONFIG_FILE = "config.json"  # a run's config, in its workdir
# Keys a saved run may carry under an older name: old -> today's name.
RENAMED_KEYS: dict[str, str] = {}


def from_saved(saved: Mapping[str, Any], where: str = CONFIG_FILE) -> ml_collections.ConfigDict:
  """A saved config's values over today's `default_config()`: a run saved before a key
  existed reads back with that key at its default, so code reads `config.key` and no
  module repeats a default. Keys today's version does not know are refused by name."""
  config = default_config()
  saved = {RENAMED_KEYS.get(k, k): v for k, v in saved.items()}
  unknown = sorted(set(saved) - set(config.keys()))
  if unknown:
    raise UserError(f"{where}: unknown key {unknown[0]!r} (saved by a newer flaxbert-cls?)")
  def as_tuples(value: Any) -> Any:  # JSON's lists back as the tuples the config holds
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value

  try:
    config.update({k: as_tuples(v) for k, v in saved.items()})
  except (TypeError, ValueError, KeyError) as e:
    raise UserError(f"{where}: {e}") from None
  return config


def load_saved(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (see `from_saved`): what eval, predict,
  export, report and track read a run's config through."""
  path = workdir_lib.join(workdir_lib.resolve(workdir), CONFIG_FILE)
  if not workdir_lib.exists(path):
    raise UserError(f"{workdir}: not a flaxbert-cls workdir (no {CONFIG_FILE})")
  try:
    saved = json.loads(workdir_lib.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  return from_saved(saved, path)


def get_config(workdir: str) -> ml_collections.ConfigDict:
  return load_saved(workdir)
