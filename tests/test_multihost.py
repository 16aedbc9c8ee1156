"""A real 2-process run on 127.0.0.1 (4 CPU devices each) equals 1 process x 8 devices.

Both processes run the CLI (`flaxbert-cls train ... --coordinator_address=...
--num_processes=2 --process_id=i`); gloo does the cross-process collectives. The
data sizes divide neither by the processes nor by the batches, and a timeout turns
a hang into a failure.
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

from flaxbert_cls.training import runs
from flaxbert_cls.training import train
from conftest import free_port
from model_fixtures import REPO
from run_files import load_config, write_run_files

TIMEOUT_S = 300  # a healthy run takes well under a minute

CONFIG = textwrap.dedent("""
    from flaxbert_cls.config import default_config
    def get_config():
      c = default_config()
      c.model_name_or_path = {checkpoint!r}
      c.task_name = "sst2"
      c.train_file = {train_file!r}
      c.validation_file = {dev_file!r}
      c.max_seq_length = 32
      c.seq_buckets = (16, 32)
      c.batch_size = 16
      c.eval_batch_size = 16
      c.learning_rate = 1e-3
      c.num_train_steps = 8  # 6 steps per epoch: crosses into the second epoch
      c.warmup_steps = 2
      c.log_every_steps = 1
      c.eval_every_steps = 4
      c.checkpoint_every_steps = 4
      # FSDP over both processes (params and optimizer state split across hosts),
      # tensor parallelism within each.
      c.mesh_shape = (1, 4, 2)
      c.baseline = "none"  # process 0's alone: the processes' eval results would differ
      return c
""")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  # 101 training rows (6 batches of 16 and 5 left over), 37 dev rows (3 eval batches
  # of 16, the last one mostly padding): neither divides by 2 processes or the batch.
  return write_run_files(tmp_path_factory.mktemp("multihost"), CONFIG, 101, 37)["config"]


def _launch(config_file: str, workdir: str, out: str, num_processes: int,
            devices_per_process: int) -> list[dict]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("FLAXBERT_")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
             JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  worker = os.path.join(os.path.dirname(config_file), "worker.py")
  port = free_port()
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, worker, out, "train", f"--config={config_file}",
           f"--workdir={workdir}"]
    if num_processes > 1:
      cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
              f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True))
  outputs = []
  deadline = time.monotonic() + TIMEOUT_S  # one budget for all: a hang in any fails fast
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      os.killpg(p.pid, signal.SIGKILL)
    tails = [(p.communicate()[0] or "")[-3000:] for p in procs]
    pytest.fail(f"multi-process run did not finish in {TIMEOUT_S}s (hang?):\n" +
                "\n-----\n".join(tails))
  for i, (p, text) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{text[-5000:]}"
  results = []
  for i in range(num_processes):
    with open(f"{out}.{i}") as f:
      results.append(dict(json.load(f), output=outputs[i]))
  return results


def test_two_processes_match_one_process(config_file, tmp_path):
  two = _launch(config_file, str(tmp_path / "two"), str(tmp_path / "two.json"), 2, 4)
  # The reference: this (pytest) process, 8 devices.
  assert jax.process_count() == 1 and jax.device_count() == 8
  one = train.train_and_evaluate(load_config(config_file), str(tmp_path / "one"))

  assert [r["process_count"] for r in two] == [2, 2]
  assert two[0]["devices"] == [4, 8]
  assert one["step"] == two[0]["step"] == 8
  # The processes shared tokenization: each did its half of the 101 train and 37 dev rows.
  for i, r in enumerate(two):
    train_rows, dev_rows = ((0, 50), (0, 18)) if i == 0 else ((50, 101), (18, 37))
    assert f"Process {i} tokenized rows [{train_rows[0]}, {train_rows[1]}) of 101" in r["output"]
    assert f"Process {i} tokenized rows [{dev_rows[0]}, {dev_rows[1]}) of 37" in r["output"]
    assert "not found" not in r["output"]
  losses_one = np.array([loss for _, loss in one["train_log"]])
  assert len(losses_one) == 8
  for r in two:  # every process sees the same (global) numbers
    np.testing.assert_allclose([loss for _, loss in r["train_log"]], losses_one, rtol=1e-5)
    assert r["eval"]["accuracy"] == one["eval"]["accuracy"]
    assert r["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)

  # Only process 0 wrote the shared files: one record per eval, not one per process.
  records = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [4, 8]
  assert os.path.isfile(tmp_path / "two" / "config.json")
  assert os.path.isfile(tmp_path / "two" / "model" / "config.json")

  # The checkpoint both processes wrote (FSDP shards from each) restores in one
  # process and equals the single-process run's.
  _, params_two = runs.load_run(str(tmp_path / "two"))
  _, params_one = runs.load_run(str(tmp_path / "one"))
  for a, b in zip(jax.tree.leaves(params_two), jax.tree.leaves(params_one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
