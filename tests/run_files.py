"""Files for runs launched as a user launches them: a tiny checkpoint, the demo data's first
rows, a config file from a template, and the worker that runs the CLI and keeps its result."""

import importlib.util
import os
import textwrap

from model_fixtures import DEMO_DATA, make_tiny_checkpoint

# Runs the CLI unchanged; only captures train_and_evaluate's result (exact losses) as JSON.
WORKER = textwrap.dedent("""
    import json, sys
    import jax
    from flaxbert_cls import cli
    from flaxbert_cls.training import train
    out = sys.argv.pop(1)
    run = train.train_and_evaluate
    def capture(*args, **kwargs):
      result = run(*args, **kwargs)
      with open(out + f".{jax.process_index()}", "w") as f:
        json.dump({"train_log": result["train_log"], "eval": result["eval"],
                   "step": result["step"], "process_count": jax.process_count(),
                   "devices": [jax.local_device_count(), jax.device_count()]}, f)
      return result
    train.train_and_evaluate = capture
    cli.run()
""")


def head_rows(path: str, n: int, out: str) -> str:
  """The header and first `n` rows of a TSV, written to `out`."""
  with open(path) as f:
    lines = f.read().splitlines()
  with open(out, "w") as f:
    f.write("\n".join(lines[:n + 1]) + "\n")
  return out


def write_run_files(tmp, config_template: str, train_rows: int, dev_rows: int,
                    **fields) -> dict[str, str]:
  """A tiny checkpoint, the demo data's first rows, config.py (the template filled in) and
  worker.py in `tmp`; returns their paths."""
  files = {"checkpoint": make_tiny_checkpoint(str(tmp / "tiny")),
           "train_file": head_rows(os.path.join(DEMO_DATA, "train.tsv"), train_rows,
                                   str(tmp / "train.tsv")),
           "dev_file": head_rows(os.path.join(DEMO_DATA, "dev.tsv"), dev_rows,
                                 str(tmp / "dev.tsv")),
           "config": str(tmp / "config.py")}
  (tmp / "config.py").write_text(config_template.format(
      checkpoint=files["checkpoint"], train_file=files["train_file"],
      dev_file=files["dev_file"], **fields))
  (tmp / "worker.py").write_text(WORKER)
  return files


def load_config(path: str):
  """get_config() of a config file, as the CLI's --config= reads it."""
  spec = importlib.util.spec_from_file_location("run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
