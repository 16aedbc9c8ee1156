"""The report page and what feeds it: eval files, train_log.jsonl, progress bars.

The page's numbers are checked against scikit-learn; the page itself in headless
Chromium (loads from file://, no console message, every image decoded, every section).
"""

import json
import logging
import os
import re
import shutil
import subprocess
import types

import jax
import numpy as np
import pytest

from sklearn import calibration
from sklearn import metrics as skm

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.training import checkpoints as checkpoint
from flaxbert_cls.training import evaluate
from flaxbert_cls.training import experiment
from flaxbert_cls.training import progress
from flaxbert_cls.training import step as step_lib
from flaxbert_cls.data import readers
from flaxbert_cls.report import page as report
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from flaxbert_cls.errors import UserError
from conftest import call_cli
from export_fixtures import tiny_run_config
from model_fixtures import DEMO_DATA, make_tiny_checkpoint

# --- The numbers, against scikit-learn ---------------------------------------------------


def test_confusion_and_per_class_scores_match_sklearn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 300)  # class 4 never true, class 3 never predicted below
  predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 5, 300))
  predictions[predictions == 3] = 4
  confusion = report.confusion_matrix(labels, predictions, 5)
  np.testing.assert_array_equal(confusion, skm.confusion_matrix(labels, predictions,
                                                                labels=range(5)))
  scores = report.per_class_scores(confusion)
  expected = skm.precision_recall_fscore_support(labels, predictions, labels=range(5),
                                                 zero_division=0)
  for key, want in zip(("precision", "recall", "f1", "support"), expected):
    np.testing.assert_allclose(scores[key], want, atol=1e-12, err_msg=key)


def test_calibration_bins_match_sklearn():
  rng = np.random.default_rng(1)
  confidence = np.concatenate([rng.uniform(0.5, 1.0, 500), [0.5, 0.7, 1.0]])  # inner edges too
  correct = rng.random(len(confidence)) < confidence
  bins = report.calibration_bins(confidence, correct, num_bins=10)
  accuracy, mean_confidence = calibration.calibration_curve(correct, confidence, n_bins=10)
  filled = bins["count"] > 0
  np.testing.assert_allclose(bins["accuracy"][filled], accuracy, atol=1e-12)
  np.testing.assert_allclose(bins["confidence"][filled], mean_confidence, atol=1e-12)
  assert bins["count"].sum() == len(confidence)
  assert bins["count"][4] == 1 and not filled[:4].any()  # 0.5 is on an edge: the lower bin
  gaps = np.abs(accuracy - mean_confidence) * bins["count"][filled]
  assert bins["ece"] == pytest.approx(gaps.sum() / len(confidence))


# --- Progress: bars on a terminal, log lines elsewhere -------------------------------------


def _metrics(loss, examples=8):
  """One train step's metrics, as the step returns them."""
  return step_lib.TrainMetrics.single_from_model_output(
      loss=np.full(examples, loss, np.float32), accuracy=np.full(examples, 0.5, np.float32),
      real=np.ones(examples, bool), grad_norm=np.float32(1.0), param_norm=np.float32(2.0), learning_rate=np.float32(1e-4))


def test_train_log_bar_on_a_terminal_and_train_log_file(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(progress, "live_bars", lambda: True)
  handlers = list(logging.getLogger().handlers)
  log = progress.TrainLog(str(tmp_path), total_steps=4, start_step=0, log_every=2)
  for step in range(1, 5):
    log.record(step, _metrics(1.0 / step))
    if log.due(step):
      log.write_train(step)
  log.write_eval(4, {"accuracy": 0.75}, [{"split": "validation", "accuracy": 0.75}])
  on_batch = progress.BatchProgress("eval sst2")
  for done in range(1, 4):
    on_batch(done, 3)
  log.close()
  err = capsys.readouterr().err
  assert re.search(r"train: 100%.*4/4 .*loss 0\.\d+ .*examples/s", err), err[-500:]
  assert re.search(r"eval sst2: +0%.*0/3", err)  # under the train bar; erased when done
  assert logging.getLogger().handlers == handlers  # log lines go back to their handlers
  records = [json.loads(l) for l in open(tmp_path / workdir_lib.TRAIN_LOG_FILE)]
  assert [r["step"] for r in records] == [2, 4]
  assert set(records[0]) >= {"loss", "learning_rate", "examples_per_sec"}
  assert [json.loads(l)["step"] for l in open(tmp_path / workdir_lib.METRICS_FILE)] == [4]


def test_batch_progress_logs_lines_off_a_terminal(caplog, capsys):
  caplog.set_level("INFO", logger="flaxbert_cls")
  on_batch = progress.BatchProgress("predict", log_lines=True)
  for done in range(1, 21):
    on_batch(done, 20)
  lines = [r.getMessage() for r in caplog.records]
  assert lines == [f"predict: batch {i}/20" for i in range(2, 21, 2)]
  assert "predict" not in capsys.readouterr().err  # no bar


# --- A tiny run: eval files, the page, its build time ---------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """6 steps of a tiny random BERT on 128 dev rows, evaluated at steps 3 and 6."""
  root = tmp_path_factory.mktemp("run")
  dev = root / "dev.tsv"
  dev.write_text("".join(open(os.path.join(DEMO_DATA, "dev.tsv")).readlines()[:129]))
  config = tiny_run_config(make_tiny_checkpoint(str(root / "tiny")), validation_file=str(dev),
                           learning_rate=1e-3, num_train_steps=6, log_every_steps=1,
                           eval_every_steps=3)
  workdir = str(root / "workdir")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


def test_eval_writes_predictions_and_errors(tiny_run):
  assert [json.loads(l)["step"] for l in open(os.path.join(tiny_run, "metrics.jsonl"))] == [3, 6]
  assert [json.loads(l)["step"] for l in open(os.path.join(tiny_run, "train_log.jsonl"))] == \
      list(range(1, 7))
  # Training wrote the eval files of its best evaluation (the report needs no new eval).
  evals = [json.loads(l) for l in open(os.path.join(tiny_run, "metrics.jsonl"))]
  best = max(evals, key=lambda r: (r["accuracy"], -r["step"]))  # ties: the earlier step
  trained = json.load(open(os.path.join(tiny_run, "eval", "eval.json")))
  assert trained["step"] == trained["best_step"] == best["step"]
  assert trained["metrics"]["accuracy"] == best["accuracy"]
  assert len(open(os.path.join(tiny_run, "eval", "predictions.jsonl")).readlines()) == 128
  call_cli("eval", f"--workdir={tiny_run}")
  eval_dir = os.path.join(tiny_run, "eval")
  summary = json.load(open(os.path.join(eval_dir, "eval.json")))
  rows = [json.loads(l) for l in open(os.path.join(eval_dir, "predictions.jsonl"))]
  errors = [json.loads(l) for l in open(os.path.join(eval_dir, "errors.jsonl"))]
  assert summary["step"] == 6 and summary["tasks"][0]["label_names"] == ["0", "1"]
  dev = open(os.path.join(os.path.dirname(tiny_run), "dev.tsv")).read().splitlines()[1:]
  assert [r["text"] for r in rows] == [line.split("\t")[0] for line in dev]  # file order
  assert [r["line"] for r in rows] == list(range(2, 130))
  for r in rows:
    assert sum(r["probabilities"].values()) == pytest.approx(1.0)
    assert r["confidence"] == max(r["probabilities"].values())
    assert r["probabilities"][r["prediction"]] == r["confidence"]
  accuracy = np.mean([r["label"] == r["prediction"] for r in rows])
  assert accuracy == pytest.approx(summary["metrics"]["accuracy"], abs=1e-12)
  assert errors == sorted([r for r in rows if r["label"] != r["prediction"]],
                          key=lambda r: -r["confidence"])


def test_report_page_of_a_run(tiny_run, chromium, tmp_path, capsys):
  call_cli("report", f"--workdir={tiny_run}")  # evaluates the best checkpoint if eval/ is another's
  page = os.path.join(tiny_run, "report", "index.html")
  assert f"report: {page}" in capsys.readouterr().out
  best = json.load(open(os.path.join(tiny_run, "eval", "eval.json")))["step"]
  assert best == checkpoint.Checkpoints(tiny_run, read_only=True).best_step()
  eval_files = os.path.join(tiny_run, "eval", "predictions.jsonl")
  before = os.stat(eval_files).st_mtime_ns
  report.write_report(tiny_run)  # the eval files are the best step's now: the page alone
  assert os.stat(eval_files).st_mtime_ns == before, "a second report evaluated again"
  dom = _check_in_browser(chromium, page, tmp_path / "report.png", images=4)
  for section in ("config", "training", "evaluation", "task-sst2", "task-sst2-confusion",
                  "task-sst2-per-class", "task-sst2-calibration", "task-sst2-errors"):
    assert f'id="{section}"' in dom, section
  assert dom.count("<tr>") >= 1 + 3 + 1 + 20  # config, per-class (+ average), 20 errors


def test_report_page_multitask_with_regression(tmp_path, chromium):
  """No checkpoints: a multi-task run's eval files (classification + regression) alone."""
  workdir = tmp_path / "mt"
  (workdir / "eval").mkdir(parents=True)
  config = default_config()
  config.tasks = ({"task_name": "sst2"}, {"task_name": "custom", "name": "score"})
  (workdir / "config.json").write_text(config.to_json())
  rng = np.random.default_rng(0)
  texts = [(f"sentence {i} <b>&amp;</b>",) for i in range(60)]
  sst2 = experiment.RunTask("sst2", tasks_lib.GLUE_TASKS["sst2"], ("0", "1"), config)
  score = experiment.RunTask("score", tasks_lib.GLUE_TASKS["stsb"], None, config)
  exp = types.SimpleNamespace(tasks=(sst2, score), multitask=True)
  examples = [readers.Examples(texts, rng.integers(0, 2, 60).astype(np.int32), "a.tsv",
                               list(range(2, 62))),
              readers.Examples(texts, rng.uniform(0, 5, 60).astype(np.float32), "b.tsv",
                               list(range(2, 62)))]
  logits = [rng.normal(size=(60, 2)).astype(np.float32),
            rng.uniform(0, 5, (60, 1)).astype(np.float32)]
  evaluate.write_eval_files(str(workdir), exp, examples, logits,
                            {"sst2/accuracy": 0.5, "score/pearson": 0.1, "average": 0.3},
                            step=20, best_step=20)
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in (10, 20):
      f.write(json.dumps({"step": step, "split": "validation", "task": "sst2",
                          "accuracy": step / 40}) + "\n")
      f.write(json.dumps({"step": step, "split": "validation", "task": "score",
                          "pearson": step / 100}) + "\n")
      f.write(json.dumps({"step": step, "split": "validation", "task": "average",
                          "score": step / 50}) + "\n")
  page = report.write_report(str(workdir))  # no train_log.jsonl: the page says so
  dom = _check_in_browser(chromium, page, tmp_path / "report_multitask.png", images=6)
  for section in ("task-sst2-confusion", "task-sst2-calibration", "task-score-scatter",
                  "task-score-errors"):
    assert f'id="{section}"' in dom, section
  assert "No train_log.jsonl" in dom and "&lt;b&gt;&amp;amp;" in dom  # texts escaped
  (workdir / "train_log.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2,\n')
  with pytest.raises(UserError, match=r"train_log.jsonl line 2: not JSON"):
    report.write_report(str(workdir))
  with pytest.raises(UserError, match=r"not a flaxbert-cls workdir \(no config.json\)"):
    report.write_report(str(workdir / "eval"))


def test_image_check_catches_a_broken_image(tmp_path, chromium):
  page = tmp_path / "broken.html"
  page.write_text(f'<html><body><img src="data:image/png;base64,AAAA">'
                  f"<script>{report._IMAGE_CHECK}</script></body></html>")  # pylint: disable=protected-access
  assert 'data-images="broken 1 of 1"' in _chromium(chromium, tmp_path, "--dump-dom", page)[0]


# --- Headless Chromium ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium():
  """Chromium from PATH; else installed once from Debian's packages when running as root."""
  path = shutil.which("chromium")
  if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
      subprocess.run(command, capture_output=True, timeout=900, check=False, env=env)
    path = shutil.which("chromium")
  if path is None:
    pytest.skip("no headless browser: install Chromium (apt-get install chromium) to check "
                "the report page")
  return path


def _chromium(binary, tmp_path, mode, page, *extra):
  result = subprocess.run(
      [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
       "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'chromium-profile'}",
       "--virtual-time-budget=5000", mode, *extra, f"file://{page}"],
      capture_output=True, text=True, timeout=120, check=False)
  return result.stdout, result.stderr


def _check_in_browser(binary, page, screenshot, images):
  """Loads `page` from disk: no console message, `images` images all decoded; saves a
  screenshot. Returns the DOM after load."""
  html = open(page, encoding="utf-8").read()
  assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page links outside"
  tmp = screenshot.parent
  dom, err = _chromium(binary, tmp, "--dump-dom", page)
  console = [line for line in err.splitlines() if ":CONSOLE" in line]
  assert not console, console
  assert f'data-images="ok {images}"' in dom, re.search(r"<body[^>]*>", dom)
  _chromium(binary, tmp, f"--screenshot={screenshot}", page, "--window-size=1200,3000")
  assert screenshot.stat().st_size > 10_000
  print(f"screenshot of {page}: {screenshot}")
  return dom
