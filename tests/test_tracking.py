"""Experiment trackers against a real MLflow tracking server (started here as users start one):
params, every metric of metrics.jsonl / train_log.jsonl at its step, artifacts; a killed and
resumed run stays one run with no step twice; a sweep is a parent with nested member runs; a
tracker that is down costs one warning, and `track` uploads the run afterwards, idempotently.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import ml_collections
import pytest

from flaxbert_cls import config as config_lib
from flaxbert_cls.errors import UserError
from flaxbert_cls.tracking import trackers as tracking
from flaxbert_cls.training import train
from conftest import free_port
from model_fixtures import DEMO_DATA, REPO, make_tiny_checkpoint
from model_fixtures import small_config

mlflow = pytest.importorskip("mlflow", reason="pip install -e '.[test]' (make test does)")
from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """`mlflow server` on a sqlite store with proxied artifacts; its URI."""
  root = tmp_path_factory.mktemp("mlflow")
  port = free_port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
       f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
       "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
      stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))
  uri = f"http://127.0.0.1:{port}"
  deadline = time.time() + 300  # ~70 s on a loaded 2-core VM
  while True:
    assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
    try:
      if urllib.request.urlopen(f"{uri}/health", timeout=2).read() == b"OK":
        break
    except OSError:
      pass
    assert time.time() < deadline, "mlflow server did not answer /health"
    time.sleep(1)
  yield uri
  proc.terminate()
  proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def _has_run(workdir, uri):
  try:
    return bool(_run_ids(workdir, uri)[0])
  except (OSError, KeyError, ValueError):
    return False


def _run_ids(workdir, uri):
  saved = json.load(open(os.path.join(workdir, tracking.TRACKING_FILE)))["mlflow"]["runs"][uri]
  return saved["run_id"], saved["members"]


def _histories(client, run_id):
  """{metric: [(step, value)]} of an MLflow run, in step order."""
  return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
          for key in client.get_run(run_id).data.metrics}


def _expected(workdir):
  """{metric: [(step, value)]} as the run's files hold them."""
  out = {}
  for step, scalars in tracking.logged_scalars(str(workdir)).items():
    for key, value in scalars.items():
      out.setdefault(key, []).append((step, value))
  return out


def _saved_config(workdir):
  return ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))


def test_run_logs_params_metrics_artifacts_and_track_is_idempotent(server, tiny_checkpoint,
                                                                    tmp_path):
  workdir = str(tmp_path / "run")
  config = small_config(tiny_checkpoint, num_train_steps=6, eval_every_steps=3,
                        report_to=("tensorboard", "mlflow"), mlflow_tracking_uri=server,
                        tracker_experiment="logs")
  train.train_and_evaluate(config, workdir)
  client = MlflowClient(server)
  run_id, members = _run_ids(workdir, server)
  assert members == []
  run = client.get_run(run_id)
  assert run.info.status == "FINISHED" and run.info.run_name == "run"
  assert client.get_experiment(run.info.experiment_id).name == "logs"
  # The resolved config, flattened: what the run used, as config.json holds it.
  assert run.data.params == tracking.flatten_config(_saved_config(workdir))
  assert run.data.params["learning_rate"] == "0.001" and run.data.params["num_train_steps"] == "6"
  assert run.data.params["seq_buckets"] == "[32, 64]"
  expected = _expected(workdir)
  assert [s for s, _ in expected["train_loss"]] == [1, 2, 3, 4, 5, 6]
  assert [s for s, _ in expected["eval_accuracy"]] == [3, 6]
  assert _histories(client, run_id) == expected  # every metric, each step once, exact values
  assert run.data.tags["jax.version"] == __import__("jax").__version__
  assert run.data.tags["device.count"] == "8" and json.loads(run.data.tags["mesh.shape"])
  assert {a.path for a in client.list_artifacts(run_id, "eval")} == {
      "eval/predictions.jsonl", "eval/eval.json"}
  # TensorBoard beside it, as before.
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))

  # `track` afterwards: the same one run, nothing new, twice.
  for _ in range(2):
    sent = tracking.upload(workdir)
    assert sent == {"mlflow": {"run_id": run_id, "new_values": 0}}
  assert _histories(client, run_id) == expected
  assert len(client.search_runs([run.info.experiment_id])) == 1


def test_sweep_is_a_parent_with_nested_member_runs(server, tiny_checkpoint, tmp_path):
  workdir = str(tmp_path / "sweep")
  config = small_config(tiny_checkpoint, num_train_steps=4, seq_buckets=(64,),
                        report_to=("mlflow",), mlflow_tracking_uri=server,
                        tracker_experiment="sweep")
  config.sweep.learning_rate = (1e-3, 2e-3)
  train.train_and_evaluate(config, workdir)
  client = MlflowClient(server)
  parent, members = _run_ids(workdir, server)
  assert len(members) == 2
  expected = _expected(workdir)
  parent_run = client.get_run(parent)
  assert set(parent_run.data.metrics) == {k for k in expected if k.startswith("train_")}
  assert {a.path for a in client.list_artifacts(parent)} >= {"sweep_results.md",
                                                           "sweep_results.json"}
  for i, (run_id, lr) in enumerate(zip(members, (1e-3, 2e-3))):
    child = client.get_run(run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.params["learning_rate"] == str(lr)
    assert child.data.params["sweep.learning_rate"] == "[]"  # the member's own solo config
    assert _histories(client, run_id) == {
        k.replace(f"eval_member{i}/", "eval_"): v for k, v in expected.items()
        if k.startswith(f"eval_member{i}/")}
  assert not any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_tracker_down_costs_one_warning_then_track_uploads_everything(
    server, tiny_checkpoint, tmp_path, caplog, monkeypatch):
  workdir = str(tmp_path / "down")
  down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
  config = small_config(tiny_checkpoint, num_train_steps=4, report_to=("mlflow",),
                        mlflow_tracking_uri=down, tracker_experiment="down")
  with caplog.at_level(logging.WARNING, logger="flaxbert_cls"):
    result = train.train_and_evaluate(config, workdir)
  ours = [r for r in caplog.records if r.name.startswith("flaxbert_cls") and
          r.levelno >= logging.WARNING]
  assert len(ours) == 1 and "mlflow" in ours[0].getMessage() and \
      "flaxbert-cls track" in ours[0].getMessage(), [r.getMessage() for r in ours]
  assert result["step"] == 4
  expected = _expected(workdir)
  assert [s for s, _ in expected["train_loss"]] == [1, 2, 3, 4]

  # Later, with the server up: `track` sends everything, then nothing more.
  saved = _saved_config(workdir)
  with saved.unlocked():
    saved.mlflow_tracking_uri = ""  # as a user pointing the upload at the server that is up
  open(os.path.join(workdir, "config.json"), "w").write(saved.to_json())
  monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
  first = tracking.upload(workdir, ("mlflow",))["mlflow"]
  assert first["new_values"] == sum(len(v) for v in expected.values())
  args, env = _cli("track", f"--workdir={workdir}", "--report_to=mlflow")  # again: nothing new
  second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"mlflow: run {first['run_id']} (0 new metric values)" in second.stdout
  client = MlflowClient(server)
  assert _histories(client, first["run_id"]) == expected
  assert client.get_run(first["run_id"]).data.params == tracking.flatten_config(saved)


def _cli(*args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)  # one CPU device, like a user's run
  return [sys.executable, "-m", "flaxbert_cls.cli", *args], env


def _train_args(checkpoint, workdir, uri, **overrides):
  settings = dict(model_name_or_path=checkpoint, num_train_steps=16, checkpoint_every_steps=4,
                  log_every_steps=1, seq_buckets="(32,64)", max_seq_length=64,
                  learning_rate=1e-3, warmup_steps=2, report_to="('mlflow',)",
                  mlflow_tracking_uri=uri, tracker_experiment="resumed",
                  train_file=os.path.join(DEMO_DATA, "train.tsv"),
                  validation_file=os.path.join(DEMO_DATA, "dev.tsv"))
  settings.update(overrides)
  return _cli("train", f"--config={REPO}/configs/default.py", f"--workdir={workdir}",
              *[f"--config.{k}={v}" for k, v in settings.items()])


@pytest.mark.slow
def test_killed_and_resumed_run_is_one_mlflow_run_without_a_step_twice(server, tiny_checkpoint,
                                                                       tmp_path):
  workdir = str(tmp_path / "killed")
  args, env = _train_args(tiny_checkpoint, workdir, server)
  proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  # Killed once step 8 is saved and the tracker has made its run (a loaded machine can be
  # slower to reach the server than to train 8 steps).
  while not (os.path.isdir(checkpoints) and any(d.isdigit() and int(d) >= 8
                                                for d in os.listdir(checkpoints))
             and _has_run(workdir, server)):
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  run_id, _ = _run_ids(workdir, server)
  resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from" in resumed.stderr
  assert _run_ids(workdir, server)[0] == run_id
  client = MlflowClient(server)
  run = client.get_run(run_id)
  assert run.info.status == "FINISHED"
  assert len(client.search_runs([run.info.experiment_id])) == 1
  # `flaxbert-cls train` ends with the report page among the run's artifacts.
  assert "report/index.html" in {a.path for a in client.list_artifacts(run_id, "report")}
  histories, expected = _histories(client, run_id), _expected(workdir)
  # Each step once, with the values of train_log.jsonl (a resume repeats its steps
  # bit-exactly; examples/s is a timing: which attempt's value a repeated step keeps varies).
  assert [s for s, _ in histories["train_loss"]] == list(range(1, 17))
  assert set(histories) == set(expected)
  for key, series in histories.items():
    assert [s for s, _ in series] == [s for s, _ in expected[key]]
    if key != "train_examples_per_sec":
      assert series == expected[key], key


def test_bad_tracker_input_is_one_line_before_training(tmp_path, monkeypatch):
  config = config_lib.default_config()
  config.report_to = ("tensorboard", "neptune")
  with pytest.raises(UserError, match=r"config.report_to=.*unknown tracker 'neptune'") as e:
    config_lib.validate(config)
  assert "\n" not in str(e.value)
  monkeypatch.setitem(config_lib.TRACKERS, "mlflow", "no_such_tracker_package")
  config.report_to = ("mlflow",)
  with pytest.raises(UserError,
                     match=r"mlflow is not installed; pip install 'flaxbert-cls\[mlflow\]'"):
    config_lib.validate(config)
  monkeypatch.undo()
  config_lib.validate(config)  # installed: fine
  for uri in ("htp://host:5000", "localhost:5000", "http://"):
    config.mlflow_tracking_uri = uri
    with pytest.raises(UserError, match=r"config.mlflow_tracking_uri=.*not a tracking URI"):
      tracking.check(config)
  config.mlflow_tracking_uri = ""
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp//nowhere:1")
  with pytest.raises(UserError, match=r"\$MLFLOW_TRACKING_URI=.*not a tracking URI"):
    tracking.check(config)
  monkeypatch.delenv("MLFLOW_TRACKING_URI")
  config.report_to = ("mlflow", "wandb")
  with pytest.raises(UserError, match=r"config.report_to=.*the W&B writer is not built yet"):
    config_lib.validate(config)
  # On the command line: one line, exit status 2, before any data is read.
  args, env = _cli("train", f"--config={REPO}/configs/default.py", f"--workdir={tmp_path}/w",
                   "--config.report_to=('mlflow','comet')",
                   "--config.train_file=/no/such/file.tsv")
  bad = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      "flaxbert-cls: error: config.report_to=('mlflow', 'comet'): unknown tracker "
      "'comet'; use any of ('tensorboard', 'mlflow'), or ('none',)")
