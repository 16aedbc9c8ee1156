"""The run + baseline blend: its weight's optimum on known scores, its cross-fitted estimate,
and a blended run's predict and export."""

import json
import os

import numpy as np
import pytest

from flaxbert_cls.config import validate
from flaxbert_cls.decisions import baseline as baseline_lib
from flaxbert_cls.decisions import blend
from flaxbert_cls.decisions import calibration
from flaxbert_cls.decisions import tuning
from flaxbert_cls.errors import UserError
from flaxbert_cls.serving import export
from flaxbert_cls.serving import predict
from flaxbert_cls.training import train
from model_fixtures import DEMO_DATA, make_tiny_checkpoint, small_config


def _complementary(n: int = 200, seed: int = 0):
  """Three classes; the run is right (0.9) on half the rows and narrowly wrong (0.4 vs 0.5)
  on the other half, the baseline the other way round. Any w in (0.105, 0.895) is right on
  every row: the grid's plateau is 0.15 .. 0.85, its middle 0.5."""
  rng = np.random.default_rng(seed)
  gold = rng.integers(0, 3, n)
  wrong = (gold + 1 + rng.integers(0, 2, n)) % 3
  confident = np.full((n, 3), 0.05)
  confident[np.arange(n), gold] = 0.9
  narrow = np.full((n, 3), 0.1)
  narrow[np.arange(n), gold] = 0.4
  narrow[np.arange(n), wrong] = 0.5
  run_right = np.arange(n) < n // 2
  run = np.where(run_right[:, None], confident, narrow)
  baseline = np.where(run_right[:, None], narrow, confident)
  return run, baseline, gold


def test_the_weight_is_the_middle_of_the_best_plateau():
  run, baseline, gold = _complementary()
  assert blend.best_weight(run, baseline, gold, "accuracy") == pytest.approx(0.5)
  accuracy = lambda p: np.mean(p.argmax(-1) == gold)
  assert accuracy(blend.blend(run, baseline, 1.0)) == 0.5  # the run alone
  assert accuracy(blend.blend(run, baseline, 0.0)) == 0.5  # the baseline alone
  assert accuracy(blend.blend(run, baseline, 0.5)) == 1.0
  np.testing.assert_allclose(blend.blend(run, baseline, 0.25), 0.25 * run + 0.75 * baseline)


def test_one_sided_scores_choose_that_side_alone():
  run, baseline, gold = _complementary()
  perfect = np.eye(3)[gold] * 0.8 + 0.1
  assert blend.best_weight(perfect, baseline, gold, "accuracy") == pytest.approx(
      np.median(blend.WEIGHTS[blend.WEIGHTS > 0.105]), abs=0.026)
  # The baseline is wrong wherever it is narrow: weights above 0.105 all score 1.0.
  assert blend.best_weight(baseline, perfect, gold, "accuracy") < 0.5


def test_cross_fitted_decides_each_half_at_the_other_halfs_weight():
  run, baseline, gold = _complementary()
  decided = blend.cross_fitted(run, baseline, gold, "accuracy", seed=3)
  assert decided.shape == gold.shape and np.mean(decided == gold) == 1.0
  # Noisy scores, where the halves choose different weights: each half is decided at the
  # weight chosen on the other, never at one chosen on itself.
  rng = np.random.default_rng(2)
  gold = rng.integers(0, 4, 300)
  run = rng.dirichlet(np.ones(4), 300) + 0.3 * np.eye(4)[gold]
  baseline = rng.dirichlet(np.ones(4), 300) + 0.3 * np.eye(4)[gold]
  halves = np.array_split(np.random.default_rng(0).permutation(300), 2)
  weights = [blend.best_weight(run[h], baseline[h], gold[h], "f1_macro") for h in halves]
  assert weights[0] != weights[1]
  decided = blend.cross_fitted(run, baseline, gold, "f1_macro")
  for tune, score in ((0, 1), (1, 0)):
    rows = halves[score]
    np.testing.assert_array_equal(
        decided[rows], blend.blend(run[rows], baseline[rows], weights[tune]).argmax(-1))


def test_scores_name_the_estimate_the_tuned_figure_and_the_weight():
  run, baseline, gold = _complementary()
  assert blend.scores(run, baseline, gold, "accuracy") == {
      "blend/accuracy": 1.0, "blend/accuracy_tuned": 1.0, "blend/weight": 0.5}


def test_a_blended_run_predicts_and_exports_the_blend(tmp_path):
  checkpoint = make_tiny_checkpoint(str(tmp_path / "tiny"))
  config = small_config(checkpoint, num_train_steps=3, baseline="tfidf", blend_baseline=True,
                        baseline_max_rows=2000)
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  weight = tuning.load(workdir, 3, 2, False).blend_weight
  assert weight in blend.WEIGHTS
  assert result["eval"]["blend/weight"] == weight and "blend/accuracy" in result["eval"]

  # predict: w x the run's probabilities + (1 - w) x the baseline pipeline's.
  texts = [(line.rsplit("\t", 1)[0],) for line in
           open(f"{DEMO_DATA}/dev.tsv").read().splitlines()[1:41]]
  predictor = predict.Predictor.from_path(workdir)
  run = calibration.softmax(predictor.logits(predictor._tokenize(texts)))  # pylint: disable=protected-access
  expected = blend.blend(run, baseline_lib.model_probabilities(predictor.baseline, texts, 2),
                         weight)
  got = [r["probabilities"] for r in predictor.predict([t for t, in texts])]
  np.testing.assert_allclose([[p["0"], p["1"]] for p in got], expected, rtol=1e-5, atol=1e-6)

  # export: the baseline beside the model, the weight in config.json; predict on it agrees.
  out = export.export(workdir, str(tmp_path / "export"))
  assert os.path.isfile(os.path.join(out, baseline_lib.MODEL_FILE))
  assert json.load(open(os.path.join(out, "config.json")))["blend_weight"] == weight
  exported = predict.Predictor.from_path(out).predict([t for t, in texts])
  np.testing.assert_allclose([[r["probabilities"]["0"], r["probabilities"]["1"]]
                              for r in exported], expected, rtol=1e-4, atol=1e-5)
  os.remove(os.path.join(out, baseline_lib.MODEL_FILE))
  with pytest.raises(UserError, match=r"blend_weight=.* but baseline_model.joblib is missing"):
    predict.Predictor.from_path(out)

  for overrides, why in ((dict(baseline="none"), "needs baseline='tfidf'"),
                         (dict(tune_thresholds=True, baseline="tfidf"), "and a threshold")):
    with pytest.raises(UserError, match=rf"^config\.blend_baseline=True: {why}"):
      validate(small_config(checkpoint, blend_baseline=True, **overrides))
