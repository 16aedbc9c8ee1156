"""Killed runs resume bit-exactly; damaged checkpoints fall back; NaNs stop cleanly."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import runs
from flaxbert_cls.training import train
from flaxbert_cls.errors import PREEMPTED_EXIT_CODE, UserError
from model_fixtures import DEMO_DATA, REPO, make_tiny_checkpoint

STEPS = 24
EVERY = 4


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def _cli_args(checkpoint, workdir, **overrides):
  settings = dict(model_name_or_path=checkpoint, num_train_steps=STEPS,
                  checkpoint_every_steps=EVERY, log_every_steps=1, seq_buckets="(32,64)",
                  max_seq_length=64, learning_rate=1e-3, warmup_steps=2,
                  train_file=os.path.join(DEMO_DATA, "train.tsv"),
                  validation_file=os.path.join(DEMO_DATA, "dev.tsv"))
  settings.update(overrides)
  return ([sys.executable, "-m", "flaxbert_cls.cli", "train",
           f"--config={REPO}/configs/default.py", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in settings.items()])


def _env():
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)  # one CPU device, like a user's run
  return env


def _params(workdir):
  _, params = runs.load_run(str(workdir), devices=jax.devices()[:1])
  return jax.tree.map(np.asarray, params)


def _wait_for_checkpoint(workdir, min_step, proc, timeout=240):
  """Waits until a finished (renamed, not tmp) checkpoint step >= min_step exists."""
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    if steps and max(steps) >= min_step:
      return max(steps)
    time.sleep(0.2)
  raise TimeoutError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  subprocess.run(_cli_args(tiny_checkpoint, workdir), env=_env(), check=True,
                 capture_output=True, timeout=600)
  return _params(workdir)


def _assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_after_a_save_then_resume_is_bit_exact(tiny_checkpoint, uninterrupted, tmp_path):
  kill_after = random.Random(0).choice(range(EVERY, STEPS - EVERY, EVERY))
  proc = subprocess.Popen(_cli_args(tiny_checkpoint, tmp_path), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  saved = _wait_for_checkpoint(str(tmp_path), kill_after, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert saved < STEPS
  resumed = subprocess.run(_cli_args(tiny_checkpoint, tmp_path), env=_env(),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert "Resumed from" in resumed.stderr
  _assert_bitwise_equal(_params(tmp_path), uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes_bit_exact(tiny_checkpoint, uninterrupted, tmp_path):
  proc = subprocess.Popen(_cli_args(tiny_checkpoint, tmp_path), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(str(tmp_path), EVERY, proc)
  proc.send_signal(signal.SIGTERM)  # lands in the middle of some step
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == PREEMPTED_EXIT_CODE, stderr
  assert "Preempted: saved step" in stderr
  resumed = subprocess.run(_cli_args(tiny_checkpoint, tmp_path), env=_env(),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  _assert_bitwise_equal(_params(tmp_path), uninterrupted)


def _config(checkpoint, **overrides):
  from model_fixtures import small_config  # pylint: disable=g-import-not-at-top
  return small_config(checkpoint, **overrides)


def test_damaged_latest_checkpoint_falls_back_to_previous(tiny_checkpoint, tmp_path, caplog):
  train.train_and_evaluate(_config(tiny_checkpoint, num_train_steps=4, checkpoint_every_steps=2,
                                   max_checkpoints_to_keep=3, keep_best_checkpoints=0),
                           str(tmp_path))
  good = _params_at(tmp_path, 2)
  for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
    for name in files:  # truncate every file of the latest step
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(f.name) // 3, 1) if name.endswith("json") else 7)
  with caplog.at_level("WARNING"):
    _, params = runs.load_run(str(tmp_path), devices=jax.devices()[:1])
  assert any("checkpoints/4 is damaged" in r.getMessage() for r in caplog.records)
  _assert_bitwise_equal(jax.tree.map(np.asarray, params), good)
  # With every step damaged: a clear error, not a traceback.
  shutil.rmtree(tmp_path / "checkpoints" / "2" / "state")
  with pytest.raises(UserError, match="damaged; none can be restored"):
    runs.load_run(str(tmp_path), devices=jax.devices()[:1])


def _params_at(workdir, step):
  _, params = runs.load_run(str(workdir), step=step, devices=jax.devices()[:1])
  return jax.tree.map(np.asarray, params)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoints(tiny_checkpoint, tmp_path):
  config = _config(tiny_checkpoint, num_train_steps=4, checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  before = _params_at(tmp_path, 4)
  # Resume with an absurd learning rate: parameters blow up, the loss turns NaN.
  config = _config(tiny_checkpoint, num_train_steps=12, checkpoint_every_steps=100,
                   learning_rate=1e30, warmup_steps=0)
  with pytest.raises(UserError, match=r"step \d+: loss or gradient is not finite"):
    train.train_and_evaluate(config, str(tmp_path))
  assert max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == 4
  _assert_bitwise_equal(_params_at(tmp_path, 4), before)
  # 'skip' keeps going and never applies a non-finite update.
  config.nonfinite_policy = "skip"
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 12
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result["state"].params))


def test_resume_refuses_a_different_optimizer(tiny_checkpoint, tmp_path):
  train.train_and_evaluate(_config(tiny_checkpoint, num_train_steps=2), str(tmp_path))
  # Decided from the saved structure (Orbax metadata), naming the first differing array.
  with pytest.raises(UserError, match=r"does not fit this config's model or optimizer "
                                      r"\(.*opt_state/"):
    train.train_and_evaluate(_config(tiny_checkpoint, num_train_steps=4, max_grad_norm=0.0),
                             str(tmp_path))


def test_resume_refuses_a_different_label_set(tiny_checkpoint, tmp_path):
  train.train_and_evaluate(_config(tiny_checkpoint, num_train_steps=2), str(tmp_path))
  custom = _config(tiny_checkpoint, num_train_steps=4, task_name="custom",
                   text_columns=("sentence",), label_column="label")
  with pytest.raises(UserError, match="checkpoint was made with task_name='sst2'"):
    train.train_and_evaluate(custom, str(tmp_path))
  custom.resume = False  # explicit: start over
  assert train.train_and_evaluate(custom, str(tmp_path))["step"] == 4


def test_best_checkpoint_and_early_stopping(tiny_checkpoint, tmp_path):
  config = _config(tiny_checkpoint, num_train_steps=40, eval_every_steps=2,
                   early_stopping_patience=2, keep_best_checkpoints=1, learning_rate=1e-12,
                   warmup_steps=0)
  # learning_rate ~0: metrics never improve after the first eval, so it stops at step 6.
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 6
  assert result["best"]["step"] == 2
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [2, 4, 6]
  exp, params = runs.load_run(str(tmp_path), step="best", devices=jax.devices()[:1])
  assert exp.task.name == "sst2"
  assert 2 in checkpoint_lib.Checkpoints(str(tmp_path), read_only=True).all_steps()
