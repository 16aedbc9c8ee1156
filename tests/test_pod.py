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

from flaxbert_cls.training import runs as runs_lib
from flaxbert_cls.training import progress
from flaxbert_cls.training import resume
from flaxbert_cls.training import experiment
from flaxbert_cls.training import train
from flaxbert_cls.errors import PREEMPTED_EXIT_CODE, UserError
from model_fixtures import REPO
from conftest import free_port
from run_files import head_rows, load_config, write_run_files

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
      c.baseline = "none"  # process 0's alone: the processes' eval results would differ
      return c
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pod")
  return {"tmp": tmp, **write_run_files(tmp, CONFIG, 60, 20, steps=STEPS)}


def _start(setup, workdir, name, *overrides):
  """Both processes of one run; their output goes to files (read while they run)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("FLAXBERT_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=REPO)  # this checkout's code, whatever is installed
  port = free_port()
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
  _, params = runs_lib.load_run(str(workdir), devices=jax.devices()[:1])
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
  config = load_config(setup["config"])
  config.update(overrides)
  return config


def test_resume_refuses_another_batch_size_or_training_data(setup, runs, tmp_path):
  workdir = runs["workdir"]  # checkpoints of the 2-process runs above
  with pytest.raises(UserError, match=r"checkpoint was made with batch_size=8, this config has 16"):
    train.train_and_evaluate(_config(setup, batch_size=16), workdir)
  other = head_rows(setup["train_file"], 40, str(tmp_path / "train.tsv"))
  with pytest.raises(UserError, match=r"checkpoint was trained on other data"):
    train.train_and_evaluate(_config(setup, train_file=other), workdir)


def test_checkpoints_without_batch_size_or_data_hash_still_resume():

  class Old:  # a checkpoint written before these fields were recorded
    directory = "old"

    def read_meta(self):
      return {"label_names": ["0", "1"], "task_name": "sst2", "model_name_or_path": "m"}, 8

  run = {"label_names": ["0", "1"], "task_name": "sst2", "model_name_or_path": "m",
         "total_steps": 10, "batch_size": 32, "train_data": "abc"}
  resume.check_same_run(Old(), run)  # no UserError: the fields it lacks are not compared
  with pytest.raises(UserError, match=r"old: checkpoint was made with task_name='sst2', this "
                     r"config has 'cola'"):
    resume.check_same_run(Old(), dict(run, task_name="cola"))  # what it has still is


# Remote data, sharded checkpoints, meshes that fit the model: one process, no network.


def test_tensorboard_scalars_reach_a_remote_workdir(ram_filesystem, tmp_path):
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2

  def remote_scalars():
    [path] = ram_filesystem.io.gfile.glob("ram://tb_run/events.out.tfevents.*")
    local = tmp_path / os.path.basename(path)
    local.write_bytes(ram_filesystem.io.gfile.GFile(path, "rb").read())
    events = [event_pb2.Event.FromString(record) for record in
              event_file_loader.RawEventFileLoader(str(local)).Load()]
    return [(e.step, v.tag, round(v.simple_value, 6)) for e in events for v in e.summary.value]

  writer = progress.ScalarWriter("ram://tb_run")
  writer.write_scalars(1, {"train_loss": 0.5})
  writer.write_scalars(2, {"train_loss": 0.25, "eval_accuracy": 0.75})
  writer.flush()
  assert remote_scalars() == [(1, "train_loss", 0.5), (2, "train_loss", 0.25),
                              (2, "eval_accuracy", 0.75)]
  writer.write_scalars(3, {"train_loss": 0.125})
  writer.flush()  # the whole file again: the remote copy grows with the local one
  assert remote_scalars()[-1] == (3, "train_loss", 0.125)


def test_tensorboard_scalars_are_written_without_importing_tensorflow(tmp_path):
  """TensorFlow installed (as here), a run's scalar writer keeps it out of the process (~5 s
  and ~0.7 GB in every run): TensorBoard's own stub writes the local event files."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2
  pytest.importorskip("tensorflow")
  code = ("import sys; from flaxbert_cls.training import progress; "
          f"w = progress.ScalarWriter({str(tmp_path)!r}); "
          "w.write_scalars(1, {'train_loss': 0.5}); w.flush(); print('tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-1] == "False"
  [path] = [p for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents")]
  events = [event_pb2.Event.FromString(record) for record in
            event_file_loader.RawEventFileLoader(str(path)).Load()]
  assert [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value] == [
      (1, "train_loss", 0.5)]


def test_glue_run_reads_a_remote_data_dir(setup, ram_filesystem, tmp_path):
  data_dir = "ram://glue_data"
  ram_filesystem.io.gfile.makedirs(f"{data_dir}/SST-2")
  for name, source in (("train.tsv", setup["train_file"]), ("dev.tsv", setup["dev_file"])):
    ram_filesystem.io.gfile.copy(source, f"{data_dir}/SST-2/{name}", overwrite=True)
  config = _config(setup, train_file="", validation_file="", data_dir=data_dir,
                   num_train_steps=2, eval_every_steps=0, mesh_shape=(-1, 1, 1))
  result = train.train_and_evaluate(config, str(tmp_path / "remote"))
  # The same rows as the local files: the same run, loss for loss.
  local = train.train_and_evaluate(_config(setup, num_train_steps=2, eval_every_steps=0,
                                           mesh_shape=(-1, 1, 1)), str(tmp_path / "local"))
  assert result["step"] == 2 and result["train_log"] == local["train_log"]
  assert result["eval"]["accuracy"] == local["eval"]["accuracy"]
  with pytest.raises(UserError, match="ram://nowhere/SST-2/train.tsv: file not found"):
    train.train_and_evaluate(_config(setup, train_file="", data_dir="ram://nowhere"),
                             str(tmp_path / "x"))


def test_sharded_safetensors_are_read_lazily(setup, tmp_path, monkeypatch):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
  whole = load_file(os.path.join(setup["checkpoint"], hf.SAFETENSORS_NAME))
  names = sorted(whole)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2] + ["cls.predictions.bias"]}
  whole["cls.predictions.bias"] = np.zeros(7, np.float32)  # an MLM head's: never read
  for shard, keys in shards.items():
    save_file({k: whole[k] for k in keys}, str(tmp_path / shard))
  (tmp_path / hf.SAFETENSORS_INDEX_NAME).write_text(json.dumps(
      {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
  state = hf.load_state_dict(str(tmp_path))
  read = []
  real_getitem = type(state).__getitem__
  monkeypatch.setattr(type(state), "__getitem__",
                      lambda self, key: read.append(key) or real_getitem(self, key))
  config = _config(setup)
  exp = experiment.build_experiment(config)
  boxed, _ = exp.abstract_params()
  params, new, unused = hf.params_from_state_dict(state, __import__("flax").linen.unbox(boxed))
  assert new == ["classifier/bias", "classifier/kernel"] and unused == ["cls.predictions.bias"]
  assert "cls.predictions.bias" not in read and len(read) == len(set(read))
  np.testing.assert_array_equal(params["bert"]["embeddings"]["word_embeddings"]["embedding"],
                                whole["embeddings.word_embeddings.weight"])  # a bare encoder
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(UserError, match="model-00002-of-00002.safetensors: shard named in"):
    hf.load_state_dict(str(tmp_path))


def test_sequence_length_and_heads_must_fit_the_model(setup):
  with pytest.raises(UserError, match=r"max_seq_length=256 is above the 128 positions"):
    experiment.build_experiment(_config(setup, max_seq_length=256))
  # 4 heads (the tiny model's) over tensor=8: one line naming both numbers.
  with pytest.raises(UserError, match=r"mesh axis tensor=8 does not divide the model's 4 "
                                      r"attention heads"):
    experiment.build_experiment(_config(setup, mesh_shape=(1, 1, 8)))


def test_fsdp_splits_only_tensors_above_the_minimum_size(setup):
  exp = experiment.build_experiment(_config(setup, mesh_shape=(1, 8, 1),
                                            min_size_to_shard_mb=1.0))
  _, shardings = exp.abstract_params()
  embeddings = shardings["bert"]["embeddings"]  # word embeddings: 3.9 MB; positions: 16 kB
  assert "fsdp" in jax.tree.leaves(tuple(embeddings["word_embeddings"]["embedding"].spec))
  assert all(a is None for a in embeddings["position_embeddings"]["embedding"].spec)


def test_pod_presets_train_bert_base_data_parallel():
  for name in ("bert_base_tpu_pod", "glue_all_pod"):
    config = load_config(os.path.join(REPO, "configs", f"{name}.py"))
    assert tuple(config.mesh_shape) == (-1, 1, 1), name


def test_tfds_splits_are_read_in_chunks(monkeypatch):
  from flaxbert_cls.data import sources as dataset_sources  # pylint: disable=g-import-not-at-top

  class Source:
    calls = []

    def __len__(self):
      return 10

    def __getitem__(self, i):
      raise AssertionError("read one row at a time")

    def __getitems__(self, keys):
      self.calls.append(list(keys))
      return [{"i": k} for k in keys]

  rows = dataset_sources._read_all(Source(), chunk=4)
  assert [r["i"] for r in rows] == list(range(10))
  assert [len(c) for c in Source.calls] == [4, 4, 2]


def test_missing_preemption_service_is_said_once(monkeypatch, caplog):
  from flaxbert_cls.training import resume  # pylint: disable=g-import-not-at-top
  watcher = resume.PreemptionWatcher(check_every=2)
  watcher._sync_point = True  # as in a multi-process run

  def unavailable(step):
    raise RuntimeError("Preemption sync manager has not been initialized")

  monkeypatch.setattr(resume.multihost_utils, "reached_preemption_sync_point", unavailable)
  with caplog.at_level("WARNING"):
    assert not any(watcher.reached(step) for step in range(1, 5))
  watcher.close()
  messages = [r.getMessage() for r in caplog.records if "preemption notices" in r.getMessage()]
  assert len(messages) == 1 and "SIGTERM is checked every 2 steps" in messages[0]
