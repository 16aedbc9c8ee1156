"""Temperature scaling, ECE and F1 thresholds; saved with a run, applied by eval/predict/export."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from flaxbert_cls.decisions import calibration
from flaxbert_cls.decisions import tuning as decisions
from flaxbert_cls.training import evaluate
from flaxbert_cls.serving import export
from flaxbert_cls.serving import predict
from flaxbert_cls.decisions import thresholds
from flaxbert_cls.data import tokenization
from flaxbert_cls.training import train
from flaxbert_cls.errors import UserError
import export_fixtures
from model_fixtures import DEMO_DATA, REPO
from numerics import assert_close


@pytest.mark.parametrize("multi_label", [False, True])
def test_fit_temperature_recovers_a_known_temperature(multi_label):
  rng = np.random.default_rng(0)
  true_temperature = 2.5
  logits = rng.normal(0.0, 4.0, size=(20000, 4))
  if multi_label:
    labels = rng.random(logits.shape) < calibration.sigmoid(logits, true_temperature)
  else:
    p = calibration.softmax(logits, true_temperature)
    labels = (rng.random((len(p), 1)) > p.cumsum(-1)).sum(-1)  # a draw from each row's p
  fitted = calibration.fit_temperature(logits, labels, multi_label)
  assert_close(fitted, true_temperature, rel=0.05, err_msg="temperature")
  # The fitted T is the NLL's minimum: both neighbours are worse.
  nll = lambda t: calibration.negative_log_likelihood(logits, labels, t, multi_label)
  assert nll(fitted) <= min(nll(fitted * 0.98), nll(fitted * 1.02))


def test_ece_matches_a_hand_computation():
  # Top-1 confidences 0.9, 0.8, 0.6, 0.55, 0.3 (of 4 classes); right: yes, no, yes, yes, no.
  probs = np.array([[0.9, 0.1, 0, 0], [0.2, 0.8, 0, 0], [0.6, 0.4, 0, 0], [0.45, 0.55, 0, 0],
                    [0.3, 0.25, 0.25, 0.2]])
  labels = np.array([0, 0, 0, 1, 1])
  # 10 bins, a value on an edge in the lower one: 0.9 in (0.8, 0.9], 0.8 in (0.7, 0.8],
  # 0.6 and 0.55 in (0.5, 0.6], 0.3 in (0.2, 0.3]. Sum over bins of count * |acc - conf|:
  hand = (abs(1 - 0.9) + abs(0 - 0.8) + 2 * abs(1 - (0.6 + 0.55) / 2) + abs(0 - 0.3)) / 5
  assert_close(calibration.expected_calibration_error(probs, labels), hand, rel=1e-12)
  # Multi-label: every (example, label) probability against presence, pooled.
  p = np.array([[0.05, 0.95], [0.15, 0.7], [0.12, 0.75]])
  y = np.array([[0, 1], [1, 1], [0, 0]])
  # Bins {probability: present}: (0, 0.1] {0.05: 0}, (0.1, 0.2] {0.15: 1, 0.12: 0},
  # (0.6, 0.7] {0.7: 1}, (0.7, 0.8] {0.75: 0}, (0.9, 1] {0.95: 1}.
  hand = (0.05 + 2 * abs(0.5 - 0.135) + 0.3 + 0.75 + 0.05) / 6
  assert_close(calibration.expected_calibration_error(p, y, multi_label=True), hand, rel=1e-12)


def _brute_force_best_f1(scores, labels):
  """Max F1 over every cut 'score >= c' for c in the scores (sklearn's f1_score)."""
  return max(skm.f1_score(labels, scores >= c, zero_division=0) for c in np.unique(scores))


def test_thresholds_maximise_f1_against_brute_force():
  rng = np.random.default_rng(1)
  probs = np.round(rng.random((200, 4)), 1)  # rounded: many ties
  labels = rng.random((200, 4)) < probs * 0.6
  labels[:, 3] = False  # no positives: keeps 0.5
  per_label = thresholds.per_label_thresholds(probs, labels)
  for j in range(3):
    f1 = skm.f1_score(labels[:, j], probs[:, j] >= per_label[j])
    assert f1 == pytest.approx(_brute_force_best_f1(probs[:, j], labels[:, j]), rel=1e-12)
  assert per_label[3] == 0.5
  # Global: micro F1 over all labels.
  g = thresholds.global_threshold(probs, labels)
  micro = skm.f1_score(labels, probs >= g, average="micro")
  assert micro == pytest.approx(_brute_force_best_f1(probs.ravel(), labels.ravel()), rel=1e-12)
  # Binary single-label: F1 of class 1 from P(class 1).
  p1 = probs[:, 0]
  two = np.stack([1 - p1, p1], 1)
  t = thresholds.binary_threshold(two, labels[:, 0].astype(int))
  predicted = thresholds.apply_binary(two, t)
  assert skm.f1_score(labels[:, 0].astype(int), predicted) == pytest.approx(
      _brute_force_best_f1(p1, labels[:, 0]), rel=1e-12)
  # Ties: predicting the top 1 (threshold 0.85) and the top 4 (0.2) both give F1 2/3; the
  # threshold closer to 0.5 wins.
  t, f1 = thresholds.best_f1_threshold(np.array([0.9, 0.8, 0.6, 0.3, 0.1]),
                                       np.array([1, 0, 0, 1, 0]))
  assert f1 == pytest.approx(2 / 3) and t == pytest.approx(0.2)


def test_bad_thresholds_and_temperature_are_one_line(tmp_path):
  bad = tmp_path / "thr.json"
  bad.write_text("[0.3, 0.4, 0.5]")
  with pytest.raises(UserError, match=r"thr.json: 3 thresholds for 2 labels; give one per"):
    thresholds.read_thresholds_file(str(bad), 2)
  bad.write_text("[0.3, 1.0]")
  with pytest.raises(UserError, match=r"thr.json: threshold 1 is 1.0; .* in \(0, 1\)"):
    thresholds.read_thresholds_file(str(bad), 2)
  with pytest.raises(UserError, match=r"x/config.json: temperature=0; it must be a number > 0"):
    decisions.Decisions.from_dict({"temperature": 0}, 2, False, "x/config.json")


def test_saved_decisions_round_trip(tmp_path, caplog):
  saved = decisions.Decisions(temperature=1.7, threshold=0.42, step=10)
  decisions.save(str(tmp_path), saved)
  decisions.save(str(tmp_path), decisions.Decisions(temperature=1.3, threshold=0.5, step=20))
  assert decisions.load(str(tmp_path), 10, 2, False) == saved
  # A step without its own entry gets the last one fitted, with a warning.
  assert decisions.load(str(tmp_path), 15, 2, False).step == 20
  assert "no decisions fitted at step 15" in caplog.text
  assert decisions.load(str(tmp_path / "none"), 10, 2, False) is None


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
  """The tiny BERT fine-tuned 3 steps with calibrate and a tuned binary threshold."""
  root = tmp_path_factory.mktemp("calibrated")
  checkpoint = export_fixtures.tiny_bert(str(root / "tiny"))
  workdir = str(root / "run")
  # Few rows: the decisions need only a fitted run, not a good one.
  files = {}
  for name, rows in (("train.tsv", 96), ("dev.tsv", 300)):
    files[name] = str(root / name)
    with open(files[name], "w") as f:
      f.writelines(open(os.path.join(DEMO_DATA, name)).readlines()[:rows + 1])
  config = export_fixtures.tiny_run_config(
      checkpoint, train_file=files["train.tsv"], validation_file=files["dev.tsv"],
      num_train_steps=3, warmup_steps=1, calibrate=True, tune_thresholds=True)
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir, export.export(workdir, str(root / "exported"))


def _pytorch_lines(kind: str = "binary single-label") -> str:
  """docs/decisions.md's PyTorch lines for a `kind` export."""
  page = open(os.path.join(REPO, "docs", "decisions.md")).read()
  block = re.search(rf"```python\n# {kind} export.*?\n(.*?)```", page, re.S)
  return block.group(1)


def test_train_eval_predict_export_apply_the_decisions(calibrated_run, tmp_path):
  workdir, exported = calibrated_run
  fitted = decisions.load(workdir, 3, 2, False)
  assert fitted.temperature > 0 and fitted.temperature != 1.0 and 0 < fitted.threshold < 1
  record = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert {"ece", "ece_calibrated", "accuracy_tuned", "f1", "f1_tuned"} <= set(record)
  # The threshold maximises F1 of class 1 on the validation set.
  assert record["f1_tuned"] >= record["f1"]

  # eval recomputes the same scores from the saved decisions.
  results = evaluate.evaluate_workdir(workdir)
  for key in ("ece", "ece_calibrated", "accuracy_tuned", "f1_tuned"):
    assert results[key] == pytest.approx(record[key], rel=1e-6), key

  # predict: probabilities of logits / T, labels by the threshold (workdir and export alike).
  sentences = [l.split("\t")[0] for l in open(export_fixtures.DEV).readlines()[1:41]]
  from_workdir = predict.Predictor.from_path(workdir)
  logits = from_workdir.logits(tokenization.tokenize(
      from_workdir.tokenizer, [(s,) for s in sentences], None, from_workdir.max_seq_length))
  expected = calibration.softmax(logits, fitted.temperature)
  expected_labels = np.where(expected[:, 1] >= fitted.threshold, "1", "0")
  for predictor in (from_workdir, predict.Predictor.from_path(exported)):
    out = predictor.predict(sentences)
    probs = np.array([[r["probabilities"]["0"], r["probabilities"]["1"]] for r in out])
    assert_close(probs, expected, rel=1e-5, err_msg=predictor.source)
    assert [r["label"] for r in out] == expected_labels.tolist()

  # The export's config.json, and docs/decisions.md's PyTorch lines on it.
  config = json.load(open(os.path.join(exported, "config.json")))
  assert config["calibration_temperature"] == pytest.approx(fitted.temperature)
  assert config["threshold"] == pytest.approx(fitted.threshold)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForSequenceClassification.from_pretrained(exported)
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  with torch.no_grad():
    logits = model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits
  scope = {"torch": torch, "model": model, "logits": logits}
  exec(_pytorch_lines(), scope)  # pylint: disable=exec-used
  assert_close(scope["probs"].numpy(), expected, rel=1e-4, err_msg="docs/decisions.md lines")
  assert scope["label_names"] == expected_labels.tolist()

  # A hand-edited export with a temperature <= 0 is refused in one line.
  broken = shutil.copytree(exported, tmp_path / "broken")
  config["calibration_temperature"] = -1.0
  json.dump(config, open(broken / "config.json", "w"))
  with pytest.raises(UserError, match=r"broken/config.json: calibration_temperature=-1.0; it "
                     r"must be a number > 0"):
    predict.Predictor.from_path(str(broken))


def test_thresholds_file_of_the_wrong_length_stops_before_training(tmp_path):
  bad = tmp_path / "thresholds.json"
  bad.write_text("[0.2, 0.4]")
  config = export_fixtures.tiny_run_config(export_fixtures.minilm_dir(),
                                           thresholds_file=str(bad))
  with pytest.raises(UserError, match=r"thresholds.json: 2 thresholds for 1 label"):
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
  """A tiny multi-label run (labels a, b, c; c never in validation), calibrated, exported."""
  root = tmp_path_factory.mktemp("multilabel")
  checkpoint = export_fixtures.tiny_bert(str(root / "tiny"))
  sentences = [l.split("\t")[0] for l in open(export_fixtures.DEV).readlines()[1:161]]
  rng = np.random.default_rng(0)
  files = {}
  for name, rows, names in (("train", sentences[:96], "abc"), ("dev", sentences[96:], "ab")):
    files[name] = str(root / f"{name}.jsonl")
    with open(files[name], "w") as f:
      for s in rows:
        labels = [n for n in names if rng.random() < 0.4]
        f.write(json.dumps({"sentence": s, "labels": labels}) + "\n")
  config = export_fixtures.tiny_run_config(
      checkpoint, task_name="custom", problem_type="multi_label_classification",
      label_column="labels", train_file=files["train"], validation_file=files["dev"],
      num_train_steps=3, warmup_steps=1, calibrate=True)
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir, export.export(workdir, str(root / "exported")), sentences[96:]


def test_multilabel_thresholds_in_predict_export_and_pytorch(multilabel_run):
  workdir, exported, sentences = multilabel_run
  fitted = decisions.load(workdir, 3, 3, True)  # tuned per label by default
  assert fitted.temperature != 1.0 and fitted.thresholds[2] == 0.5  # 'c': no positives
  assert 0 < fitted.global_threshold < 1
  record = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert {"ece", "ece_calibrated", "f1_macro_tuned", "f1_micro_global"} <= set(record)
  assert record["f1_micro_global"] >= record["f1_micro"]  # the global threshold's objective
  config = json.load(open(os.path.join(exported, "config.json")))
  assert config["problem_type"] == "multi_label_classification"
  assert config["thresholds"] == pytest.approx(fitted.thresholds)

  from_workdir = predict.Predictor.from_path(workdir)
  logits = from_workdir.logits(tokenization.tokenize(
      from_workdir.tokenizer, [(s,) for s in sentences], None, from_workdir.max_seq_length))
  expected = calibration.sigmoid(logits, fitted.temperature)
  expected_labels = [[n for n, q, t in zip("abc", p, fitted.thresholds) if q >= t]
                     for p in expected]
  for predictor in (from_workdir, predict.Predictor.from_path(exported)):
    out = predictor.predict(sentences)
    assert_close([[r["probabilities"][n] for n in "abc"] for r in out], expected, rel=1e-5)
    assert [r["label"] for r in out] == expected_labels

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForSequenceClassification.from_pretrained(exported)
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  with torch.no_grad():
    logits = model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits
  scope = {"torch": torch, "model": model, "logits": logits}
  exec(_pytorch_lines("multi-label"), scope)  # pylint: disable=exec-used
  assert_close(scope["probs"].numpy(), expected, rel=1e-4, err_msg="docs/decisions.md lines")
  assert scope["label_names"] == expected_labels


def test_cross_fitted_decisions_use_thresholds_tuned_on_the_other_half():
  rng = np.random.default_rng(3)
  labels = (rng.random((200, 3)) < 0.3).astype(np.int64)
  probabilities = np.clip(0.35 * labels + rng.random((200, 3)) * 0.6, 0, 1)
  decided = thresholds.cross_fitted_decisions(probabilities, labels, seed=7)
  halves = np.array_split(np.random.default_rng(7).permutation(200), 2)
  for tune, score in (halves, halves[::-1]):
    cut = thresholds.per_label_thresholds(probabilities[tune], labels[tune])
    np.testing.assert_array_equal(decided[score], probabilities[score] >= cut)
  # Separable labels (positives above 0.6, negatives below 0.4): every decision right.
  separable = np.where(labels == 1, 0.6 + 0.4 * rng.random((200, 3)), 0.4 * rng.random((200, 3)))
  np.testing.assert_array_equal(thresholds.cross_fitted_decisions(separable, labels), labels == 1)
