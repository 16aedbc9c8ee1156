"""predict: a workdir and its export predict what eval scored, in input order."""

import csv
import json

import numpy as np
import pytest

from flaxbert_cls.serving import export
from flaxbert_cls.serving import predict
from flaxbert_cls.errors import UserError
from conftest import call_cli
import export_fixtures

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run():
  return export_fixtures.trained_run()


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_workdir_and_export_predict_eval_logits_in_input_order(run, tmp_path, caplog):
  expected = _softmax(run.logits)
  # A workdir; the GLUE TSV with its label column (ignored), written as CSV.
  caplog.set_level("INFO", logger="flaxbert_cls")
  call_cli("predict", f"--model={run.workdir}", f"--input={export_fixtures.DEV}",
       f"--output={tmp_path / 'dev.csv'}")
  assert any("examples/s" in r.getMessage() for r in caplog.records)
  rows = list(csv.DictReader(open(tmp_path / "dev.csv", newline="")))
  assert [r["sentence"] for r in rows] == run.sentences
  probs = np.array([[float(r["p_0"]), float(r["p_1"])] for r in rows])
  np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
  assert [r["label"] for r in rows] == [str(i) for i in expected.argmax(-1)]

  # The exported HF directory, unlabelled JSON Lines in, JSON Lines out.
  with open(tmp_path / "dev.jsonl", "w") as f:
    for s in run.sentences:
      f.write(json.dumps({"id": 1, "sentence": s}) + "\n")
  stats = predict.predict_file(run.exported, str(tmp_path / "dev.jsonl"),
                               str(tmp_path / "out.jsonl"))
  assert stats["rows"] == 872 and stats["sentences_per_sec"] > 0
  results = [json.loads(l) for l in open(tmp_path / "out.jsonl")]
  assert [r["sentence"] for r in results] == run.sentences
  probs = np.array([[r["probabilities"]["0"], r["probabilities"]["1"]] for r in results])
  np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
  assert [r["label"] for r in results] == [str(i) for i in expected.argmax(-1)]


def test_python_api(run):
  predictor = predict.Predictor.from_path(run.exported)
  out = predictor.predict(run.sentences[:3])
  assert [set(r) for r in out] == [{"label", "probabilities"}] * 3
  np.testing.assert_allclose([r["probabilities"]["1"] for r in out],
                             _softmax(run.logits[:3])[:, 1], atol=1e-5)
  assert len(predictor.predict([("a film", "a review")])) == 1  # pairs are accepted
  with pytest.raises(UserError, match=r"texts\[1\]: empty text"):
    predictor.predict(["fine", "  "])
  with pytest.raises(UserError, match="non-empty list"):
    predictor.predict("one string")


def test_regression_model_gives_scores(run, tmp_path):
  """A one-output head exported with problem_type=regression predicts {'score'}."""
  params = dict(run.params, classifier={"kernel": run.params["classifier"]["kernel"][:, 1:],
                                        "bias": run.params["classifier"]["bias"][1:]})
  directory = export.save_hf_model(str(tmp_path / "reg"), params, run.exp.hf_config,
                                   run.exp.tokenizer, label_names=None)
  out = predict.Predictor.from_path(directory).predict(run.sentences[:4])
  np.testing.assert_allclose([r["score"] for r in out], run.logits[:4, 1], atol=1e-5)


def test_bad_input_names_file_and_line(run, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"sentence": "good"}\n{"text": "no sentence key"}\n')
  with pytest.raises(UserError, match=r"bad.jsonl line 2: no key 'sentence'"):
    predict.predict_file(run.exported, str(bad), str(tmp_path / "out.csv"))
  empty = tmp_path / "empty.tsv"
  empty.write_text("sentence\tlabel\nfine\t1\n \t0\n")
  with pytest.raises(UserError, match=r"empty.tsv line 3: column 'sentence' is empty"):
    predict.predict_file(run.exported, str(empty), str(tmp_path / "out.csv"))
  with pytest.raises(UserError, match=r"unknown file type '.txt'"):
    predict.predict_file(run.exported, export_fixtures.DEV, str(tmp_path / "out.txt"))
  with pytest.raises(UserError, match="neither a flaxbert-cls workdir"):
    predict.Predictor.from_path(str(tmp_path))
