"""monitor: PSI and the two-sample tests, and the CLI's verdict on stable and shifted data."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy import stats

from flaxbert_cls.model import hf
from flaxbert_cls.serving import monitor
from flaxbert_cls.serving import predict
from flaxbert_cls.errors import UserError
from conftest import call_cli
from model_fixtures import DEMO_DATA, make_tiny_checkpoint


def test_psi_matches_the_hand_computed_value():
  # r = (.5, .3, .2), c = (.3, .3, .4): -.2 ln .6 + 0 + .2 ln 2
  expected = -0.2 * np.log(0.6) + 0.2 * np.log(2.0)
  assert monitor.psi(np.array([50, 30, 20]), np.array([30, 30, 40])) == pytest.approx(
      expected, rel=1e-12)
  assert monitor.psi(np.array([5, 5]), np.array([50, 50])) == 0.0


def test_quantile_bins_split_zero_from_nonzero():
  reference = np.array([0.0] * 90 + [1.0] * 10)
  edges = monitor.quantile_edges(reference)
  np.testing.assert_allclose(edges, [0.0, 0.1], rtol=1e-12)  # nine deciles, two distinct
  assert monitor.bin_counts(reference, edges).tolist() == [90, 0, 10]
  current = np.array([0.0] * 50 + [1.0] * 50)
  assert monitor.bin_counts(current, edges).tolist() == [50, 0, 50]
  result = monitor.compare_feature(reference, current)
  # The empty middle bin adds nothing; (.5-.9) ln(.5/.9) + (.5-.1) ln(.5/.1).
  expected = -0.4 * np.log(0.5 / 0.9) + 0.4 * np.log(5.0)
  assert result["psi"] == pytest.approx(expected, rel=1e-12)
  assert result["reference_counts"] == [90, 0, 10] and result["bin_edges"] == edges.tolist()


def test_two_sample_tests_are_scipys():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0, 1, 300), rng.normal(0.3, 1, 200)
  result = monitor.compare_feature(a, b)
  ks = stats.ks_2samp(a, b)
  assert result["test"] == "ks"
  assert result["statistic"] == ks.statistic and result["p_value"] == ks.pvalue
  ref, cur = rng.integers(0, 3, 300), rng.choice(3, 200, p=[0.2, 0.3, 0.5])
  result = monitor.compare_feature(ref, cur, num_classes=4)  # class 3: never predicted
  table = np.stack([np.bincount(ref, minlength=3), np.bincount(cur, minlength=3)])
  chi2, p = stats.chi2_contingency(table, correction=False)[:2]
  assert result["test"] == "chi2" and result["statistic"] == pytest.approx(chi2, rel=1e-12)
  assert result["p_value"] == pytest.approx(p, rel=1e-9)
  assert result["reference_counts"][3] == 0
  # One class everywhere: nothing to test.
  assert monitor.compare_feature(np.zeros(5, int), np.zeros(7, int), 2)["p_value"] == 1.0


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  """A tiny random BERT with a random 2-label head, saved as an HF classifier directory."""
  directory = make_tiny_checkpoint(str(tmp_path_factory.mktemp("clf")), hidden=16, layers=1,
                                   heads=2, id2label={"0": "neg", "1": "pos"},
                                   label2id={"neg": 0, "pos": 1})
  path = os.path.join(directory, hf.SAFETENSORS_NAME)
  state = load_file(path)
  rng = np.random.default_rng(0)
  state["classifier.weight"] = rng.normal(0, 2.0, (2, 16)).astype(np.float32)
  state["classifier.bias"] = np.zeros(2, np.float32)
  save_file(state, path)
  # One bucket: each Predictor compiles its eval step once.
  with open(os.path.join(directory, "flaxbert_cls.json"), "w") as f:
    json.dump({"text_fields": ["sentence"], "max_seq_length": 64, "seq_buckets": [64]}, f)
  return directory


def _write(path, texts, labels=None):
  with open(path, "w") as f:
    for i, text in enumerate(texts):
      row = {"sentence": text} | ({"label": labels[i]} if labels else {})
      f.write(json.dumps(row) + "\n")
  return str(path)


def _sentences():
  rows = open(os.path.join(DEMO_DATA, "train.tsv")).read().splitlines()[1:]
  return [r.split("\t")[0].strip() for r in rows]


def test_cli_stable_exits_0_and_shifted_exits_3(classifier, tmp_path, capsys):
  sentences = _sentences()
  reference = _write(tmp_path / "ref.jsonl", sentences[:400], ["neg", "pos"] * 200)
  same = _write(tmp_path / "same.jsonl", sentences[400:800], ["pos", "neg"] * 200)
  # Longer texts with characters the vocabulary lacks: length and unknown-token shift.
  shifted = _write(tmp_path / "shifted.jsonl",
                   [f"{a} {b} \u2603\u2604 {c} \U0001F9EA" for a, b, c in
                    zip(sentences[800:1200], sentences[1200:1600], sentences[1600:2000])])

  call_cli("monitor", f"--model={classifier}", f"--reference={reference}", f"--current={same}",
       f"--output={tmp_path / 'stable'}", "--label_column=label")
  out = capsys.readouterr().out
  assert out.splitlines()[-1].startswith("monitor: STABLE")
  report = json.load(open(tmp_path / "stable" / monitor.REPORT_NAME))
  assert report["verdict"] == "stable" and report["drifted"] == []
  assert set(report["features"]) == {"predicted_label", "confidence", "entropy", "length",
                                     "unknown_rate"}
  predicted = [r["label"] for r in predict.Predictor.from_path(classifier).predict(
      sentences[400:800])]
  assert report["sets"]["current"]["metrics"]["accuracy"] == pytest.approx(
      np.mean([p == y for p, y in zip(predicted, ["pos", "neg"] * 200)]), abs=1e-12)
  assert open(tmp_path / "stable" / monitor.FIGURE_NAME, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

  with pytest.raises(SystemExit) as e:
    call_cli("monitor", f"--model={classifier}", f"--reference={reference}",
         f"--current={shifted}", f"--output={tmp_path / 'drift'}")
  assert e.value.code == monitor.DRIFT_EXIT_CODE
  assert capsys.readouterr().out.splitlines()[-1].startswith("monitor: DRIFT")
  report = json.load(open(tmp_path / "drift" / monitor.REPORT_NAME))
  assert {"length", "unknown_rate"} <= set(report["drifted"])
  assert report["features"]["unknown_rate"]["current_mean"] > 0.05
  assert report["features"]["unknown_rate"]["reference_mean"] < 0.01
  assert os.path.getsize(tmp_path / "drift" / monitor.FIGURE_NAME) > 1000

  # A threshold above every PSI: the same data is stable.
  call_cli("monitor", f"--model={classifier}", f"--reference={reference}", f"--current={shifted}",
       "--psi_threshold=1000")
  assert capsys.readouterr().out.splitlines()[-1].startswith("monitor: STABLE")


def test_bad_monitor_input_is_one_line(classifier, tmp_path):
  reference = _write(tmp_path / "ref.jsonl", _sentences()[:20])
  with pytest.raises(UserError, match="monitor needs --current"):
    call_cli("monitor", f"--model={classifier}", f"--reference={reference}")
  with pytest.raises(UserError, match="p_value"):
    monitor.monitor(classifier, reference, reference, p_value=1.5)
  labelled = _write(tmp_path / "labelled.jsonl", ["fine", "good"], ["pos", "neg"])
  bad = _write(tmp_path / "bad.jsonl", ["fine", "good"], ["pos", "x"])
  with pytest.raises(UserError, match="bad.jsonl line 2: label 'x' is not one of"):
    monitor.monitor(classifier, labelled, bad, label_column="label")
