"""A run's saved config as an ml_collections config file: `--config=saved_config.py:WORKDIR`.

`flaxbert-cls eval --workdir=RUN --config.validation_file=new.tsv` needs a config for its
`--config.KEY` overrides to apply to; the CLI passes this file with the run's workdir, so the
overrides are typed and checked against the keys the run was trained with.
"""

from __future__ import annotations

import json

import ml_collections

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = workdir_lib.join(workdir_lib.resolve(workdir), "config.json")
  if not workdir_lib.exists(path):
    raise UserError(f"--workdir={workdir}: not a flaxbert-cls workdir (no config.json)")
  return ml_collections.ConfigDict(json.loads(workdir_lib.read_text(path)))


def with_saved_config(argv: list[str]) -> list[str]:
  """`argv` plus --config=<this file>:<workdir> when `eval` overrides config keys without a
  --config file of its own."""
  if len(argv) < 2 or argv[1] != "eval":
    return argv
  overrides = any(a.startswith("--config.") for a in argv)
  has_file = any(a == "--config" or a.startswith("--config=") for a in argv)
  workdirs = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")]
  if not overrides or has_file or not workdirs:
    return argv
  return [*argv[:2], f"--config={__file__}:{workdirs[-1]}", *argv[2:]]
