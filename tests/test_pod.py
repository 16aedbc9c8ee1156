"""Pod-scale control flow with 2 real processes x 2 CPU devices, FSDP across both.

One workdir goes through the scenarios in order: SIGTERM to one process, the
resumed rerun, a damaged latest checkpoint, then resume=False over the existing
checkpoints (an uninterrupted run: the reference). Every process must report the
same step and metrics; a deadline turns a hang (one process left waiting at a
collective) into a failure. The tests depend on their order.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from flaxbert_cls import experiment
from flaxbert_cls import train
from flaxbert_cls.errors import PREEMPTED_EXIT_CODE, UserError
from model_fixtures import DEMO_DATA, REPO, make_tiny_checkpoint
from test_multihost import WORKER, _free_port, _rows

DEADLINE_S = 150  # per 2-process run; a healthy one takes ~15 s
STEPS = 12

CONFIG = textwrap.dedent("""
    from flaxbert_cls.config import default_config
    def get_config():
      c = default_config()
      c.model_name_or_path = {checkpoint!r}
      c.train_file = {train_file!r}
      c.validation_file = {dev_file!r}
      c.max_seq_length = 32
      c.seq_buckets = (32,)
      c.batch_size = 8
      c.eval_batch_size = 8
      c.learning_rate = 1e-3
      c.warmup_steps = 0
      c.num_train_steps = {steps}
      c.log_every_steps = 1
      c.eval_every_steps = 8
      c.checkpoint_every_steps = 4
      c.keep_best_checkpoints = 0
      c.mesh_shape = (1, -1, 1)  # FSDP over both processes' devices
      return c
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pod")
  checkpoint = make_tiny_checkpoint(str(tmp / "tiny"))
  train_file = _rows(os.path.join(DEMO_DATA, "train.tsv"), 60, str(tmp / "train.tsv"))
  dev_file = _rows(os.path.join(DEMO_DATA, "dev.tsv"), 20, str(tmp / "dev.tsv"))
  path = tmp / "config.py"
  path.write_text(CONFIG.format(checkpoint=checkpoint, train_file=train_file,
                                dev_file=dev_file, steps=STEPS))
  (tmp / "worker.py").write_text(WORKER)
  return {"tmp": tmp, "config": str(path), "checkpoint": checkpoint, "train_file": train_file}


def _start(setup, workdir, name, *overrides):
  """Both processes of one run; their output goes to files (read while they run)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("FLAXBERT_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=REPO)  # this checkout's code, whatever is installed
  port = _free_port()
  out = str(setup["tmp"] / name)
  procs = []
  for i in range(2):
    log = open(f"{out}.log.{i}", "w")
    procs.append((subprocess.Popen(
        [sys.executable, str(setup["tmp"] / "worker.py"), out + ".json", "train",
         f"--config={setup['config']}", f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         *[f"--config.{o}" for o in overrides]],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                  f"{out}.log.{i}"))
  return procs, out, time.monotonic() + DEADLINE_S


def _finish(run, expect_rc=0):
  """Waits for both processes (one deadline); returns (their JSON results or None, logs)."""
  procs, out, deadline = run
  try:
    for p, _ in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for p, _ in procs:
      os.killpg(p.pid, signal.SIGKILL)
    pytest.fail("2-process run did not finish in time (hang?):\n" +
                "\n-----\n".join(open(f).read()[-3000:] for _, f in procs))
  logs = [open(f).read() for _, f in procs]
  for i, (p, _) in enumerate(procs):
    assert p.returncode == expect_rc, f"process {i} exited {p.returncode}:\n{logs[i][-4000:]}"
  results = None
  if expect_rc == 0:
    results = [json.load(open(f"{out}.json.{i}")) for i in range(2)]
    assert results[0]["process_count"] == 2 and results[0]["devices"] == [2, 4]
    for key in ("step", "eval", "train_log"):  # every process reports the same
      assert results[0][key] == results[1][key], key
  return results, logs


def _params(workdir):
  _, params = experiment.load_run(str(workdir), devices=jax.devices()[:1])
  return jax.tree.map(np.asarray, params)


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def runs(setup):
  """What the scenarios below leave for the next: one workdir, results by name."""
  return {"workdir": str(setup["tmp"] / "run")}


def test_sigterm_to_one_process_both_save_the_same_step_and_exit_75(setup, runs):
  run = _start(setup, runs["workdir"], "sigterm")
  procs, _, deadline = run
  while "Training steps" not in open(procs[1][1]).read():  # the loop is about to start
    assert time.monotonic() < deadline and procs[1][0].poll() is None, open(procs[1][1]).read()
    time.sleep(0.05)
  procs[1][0].send_signal(signal.SIGTERM)  # process 1 only
  _, logs = _finish(run, expect_rc=PREEMPTED_EXIT_CODE)
  saved = [text.split("Preempted: saved step ")[1].split()[0] for text in logs]
  assert saved[0] == saved[1] and int(saved[0]) < STEPS, saved
  assert _steps(runs["workdir"])[-1] == int(saved[0])
  runs["preempted_at"] = int(saved[0])


def test_rerun_resumes_where_both_saved(setup, runs):
  step = runs["preempted_at"]
  results, logs = _finish(_start(setup, runs["workdir"], "rerun"))
  for text in logs:
    assert f"Resumed from {runs['workdir']}/checkpoints/{step}" in text
  assert results[0]["step"] == STEPS and [s for s, _ in results[0]["train_log"]] == list(
      range(step + 1, STEPS + 1))
  assert _steps(runs["workdir"]) == [8, 12]
  runs["resumed"] = results[0]
  runs["resumed_params"] = _params(runs["workdir"])


def test_damaged_latest_checkpoint_every_process_falls_back_to_the_same_step(setup, runs):
  workdir = runs["workdir"]
  # Damage only what process 1 wrote of step 12: process 0 alone could restore it.
  state = os.path.join(workdir, "checkpoints", "12", "state")
  damaged = [os.path.join(root, f) for root, _, files in os.walk(state) for f in files
             if "process_1" in root]
  assert damaged, os.listdir(state)
  for path in damaged:
    with open(path, "r+b") as f:
      f.truncate(7)
  results, logs = _finish(_start(setup, workdir, "damaged"))
  for text in logs:
    assert text.count("checkpoints/12 is damaged") == 1, text[-3000:]
    assert f"Resumed from {workdir}/checkpoints/8" in text
  assert results[0]["eval"] == runs["resumed"]["eval"]
  assert results[0]["train_log"] == runs["resumed"]["train_log"][-4:]


def test_resume_false_starts_over_on_every_process_and_matches_the_interrupted_run(
    setup, runs):
  workdir = runs["workdir"]
  results, logs = _finish(_start(setup, workdir, "over", "resume=False"))
  assert not any("Resumed from" in text for text in logs)
  assert "config.resume=False: deleting" in logs[1]
  log = results[0]["train_log"]
  assert [s for s, _ in log] == list(range(1, STEPS + 1)) and _steps(workdir) == [8, 12]
  # The uninterrupted run equals SIGTERM + resume, bit for bit.
  assert log[runs["preempted_at"]:] == runs["resumed"]["train_log"]
  assert results[0]["eval"] == runs["resumed"]["eval"]
  _assert_same_params(_params(workdir), runs["resumed_params"])


def _config(setup, **overrides):
  from test_multihost import _load_config  # pylint: disable=g-import-not-at-top
  config = _load_config(setup["config"])
  config.update(overrides)
  return config


def test_resume_refuses_another_batch_size_or_training_data(setup, runs, tmp_path):
  workdir = runs["workdir"]  # checkpoints of the 2-process runs above
  with pytest.raises(UserError, match=r"checkpoint was made with batch_size=8, this config has 16"):
    train.train_and_evaluate(_config(setup, batch_size=16), workdir)
  other = _rows(setup["train_file"], 40, str(tmp_path / "train.tsv"))
  with pytest.raises(UserError, match=r"checkpoint was trained on other data"):
    train.train_and_evaluate(_config(setup, train_file=other), workdir)


def test_checkpoints_without_batch_size_or_data_hash_still_resume():

  class Old:  # a checkpoint written before these fields were recorded
    directory = "old"

    def read_meta(self):
      return {"label_names": ["0", "1"], "task_name": "sst2", "model_name_or_path": "m"}, 8

  train._check_same_run(Old(), {"label_names": ["0", "1"], "task_name": "sst2",
                                "model_name_or_path": "m", "total_steps": 10,
                                "batch_size": 32, "train_data": "abc"})
