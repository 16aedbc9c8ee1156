"""Saved programs: `plan --topology=host --save_compiled=DIR` in one process, a run in another
loading them instead of compiling (config.compiled_programs), and each way a saved program
does not match falling back to compiling with one line that says why."""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxbert_cls.errors import UserError
from flaxbert_cls.training import programs
from flaxbert_cls.training import train
from model_fixtures import REPO, make_tiny_checkpoint, small_config

# The program's own keys: the same in the plan's process and the run's.
SETTINGS = dict(num_train_steps=3, seq_buckets=(32, 64), compilation_cache_dir="")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  checkpoint = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))
  directory = str(tmp_path_factory.mktemp("programs"))
  config = small_config(checkpoint, **SETTINGS)
  overrides = [f"--config.{k}={v}" for k, v in (
      ("model_name_or_path", checkpoint), ("train_file", config.train_file),
      ("validation_file", config.validation_file), ("max_seq_length", 64),
      ("seq_buckets", "(32,64)"), ("batch_size", 32), ("eval_batch_size", 64),
      ("learning_rate", 1e-3), ("num_train_steps", 3), ("warmup_steps", 2),
      ("log_every_steps", 1), ("checkpoint_every_steps", 1000), ("baseline", "none"),
      ("compilation_cache_dir", ""))]
  done = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), "flaxbert-cls"), "plan",
       f"--config={REPO}/configs/default.py", "--topology=host",
       f"--save_compiled={directory}", *overrides],
      capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| train seq 64 | 32 |" in done.stdout, done.stdout
  return checkpoint, directory


def _train(config, workdir, caplog):
  caplog.clear()
  with caplog.at_level(logging.INFO, logger=programs.__name__):
    result = train.train_and_evaluate(config, workdir)
  lines = [r.getMessage() for r in caplog.records if r.name == programs.__name__]
  return jax.tree.leaves(jax.device_get(result["state"].params)), lines


def test_a_run_loads_the_plans_programs_and_trains_bit_for_bit(saved, tmp_path, caplog):
  checkpoint, directory = saved
  assert sorted(f for f in os.listdir(directory) if f.endswith(".bin")) == [
      "eval_b64_l32.bin", "eval_b64_l64.bin", "train_b32_l32.bin", "train_b32_l64.bin"]
  fresh, fresh_lines = _train(small_config(checkpoint, **SETTINGS), str(tmp_path / "a"), caplog)
  assert not fresh_lines  # no compiled_programs: jit as always
  loaded, lines = _train(small_config(checkpoint, compiled_programs=directory, **SETTINGS),
                         str(tmp_path / "b"), caplog)
  assert lines and all(line.startswith("Loaded ") and line.endswith("not compiled.")
                       for line in lines), lines
  assert any(line.startswith("Loaded train_b32_") for line in lines), lines
  for got, want in zip(loaded, fresh):
    np.testing.assert_array_equal(got, want)


def test_a_changed_program_or_a_damaged_file_is_compiled_with_one_line(saved, tmp_path, caplog):
  checkpoint, directory = saved
  _, lines = _train(small_config(checkpoint, compiled_programs=directory,
                                 **{**SETTINGS, "learning_rate": 2e-3}),
                    str(tmp_path / "lr"), caplog)
  train_lines = [l for l in lines if "train_b32" in l]
  assert train_lines and all(
      l.startswith("Compiling train_b32_") and "is another program: config.learning_rate=0.001 "
      "in the plan, 0.002 here" in l for l in train_lines), lines
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  for name in os.listdir(directory):
    data = open(os.path.join(directory, name), "rb").read()
    (damaged / name).write_bytes(data[:len(data) // 2] if name.endswith(".bin") else data)
  _, lines = _train(small_config(checkpoint, compiled_programs=str(damaged), **SETTINGS),
                    str(tmp_path / "damaged_run"), caplog)
  assert lines and all(l.startswith("Compiling ") and "does not load" in l for l in lines), lines


def test_a_missing_folder_is_refused_in_one_line(tmp_path):
  config = small_config("unused", compiled_programs=str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="config.compiled_programs=.*no such folder"):
    programs.preloaded(lambda *a: None, "train", config, None)
