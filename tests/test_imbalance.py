"""Skewed single-label classes: checkpoints chosen by macro F1, not by a defaulted accuracy."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxbert_cls.config import default_config
from flaxbert_cls.config import validate
from flaxbert_cls.data import class_weights
from flaxbert_cls.errors import UserError
from flaxbert_cls.model.losses import HeadLoss, example_correct, example_losses
from flaxbert_cls.decisions import metrics as metrics_lib
from flaxbert_cls.training import checkpoints
from flaxbert_cls.training import selection
from flaxbert_cls.training import train
from model_fixtures import DEMO_DATA, make_tiny_checkpoint

SINGLE = "single_label_classification"


def test_macro_f1_is_chosen_for_weighted_or_skewed_classes_only():
  balanced = np.array([0, 1] * 50)
  skewed = np.array([0] * 95 + [1] * 5)
  pick = selection.selection_metric
  assert pick(SINGLE, "accuracy", False, False, balanced, 2) == ("accuracy", "")
  metric, why = pick(SINGLE, "accuracy", False, False, skewed, 2)
  assert metric == "f1_macro" and "skewed (smallest 5 rows, largest 95)" in why
  assert pick(SINGLE, "accuracy", False, True, balanced, 2) == (
      "f1_macro", "class_weights or logit_adjustment is set")
  # The user's own choice, another main metric, other problem types: left as they are.
  assert pick(SINGLE, "accuracy", True, True, skewed, 2)[0] == "accuracy"
  assert pick(SINGLE, "f1", False, True, skewed, 2)[0] == "f1"
  assert pick("multi_label_classification", "f1_macro", False, True, None, 3)[0] == "f1_macro"
  # A class absent from training is the smallest class there is.
  assert pick(SINGLE, "accuracy", False, False, np.array([0, 1] * 10), 3)[0] == "f1_macro"


def test_effective_number_weights():
  """Cui et al.'s weights: 1 / ((1 - beta^n) / (1 - beta)) per class, mean 1 over the examples;
  between no weighting (beta -> 0) and inverse frequency (beta -> 1)."""
  labels = np.array([0] * 900 + [1] * 100)
  weights = np.array(class_weights.resolve("effective", labels, ("a", "b"), SINGLE))
  effective = (1 - 0.999 ** np.array([900, 100])) / (1 - 0.999)
  np.testing.assert_allclose(weights[1] / weights[0], effective[0] / effective[1], rtol=1e-12)
  assert weights[1] / weights[0] == pytest.approx(6.235, abs=1e-3)  # inverse frequency: 9
  assert np.mean(weights[labels]) == pytest.approx(1.0)  # the loss keeps its scale
  np.testing.assert_allclose(class_weights.resolve("effective:1e-9", labels, "ab", SINGLE),
                             [1, 1], rtol=1e-6)
  np.testing.assert_allclose(class_weights.resolve("effective:0.9999999", labels, "ab", SINGLE),
                             class_weights.resolve("auto", labels, "ab", SINGLE), rtol=1e-3)
  assert class_weights.parse_class_weights("effective") == "effective:0.999"
  for bad in ("effective:1", "effective:0", "effective:x"):
    assert class_weights.parse_class_weights(bad) is None, bad
    with pytest.raises(UserError, match="effective"):
      class_weights.resolve(bad, labels, "ab", SINGLE)
  with pytest.raises(UserError, match="single-label"):
    class_weights.resolve("effective", np.ones((4, 2)), "ab", "multi_label_classification")


def test_logit_offsets_are_tau_log_priors():
  labels = np.array([0] * 90 + [1] * 10)
  np.testing.assert_allclose(class_weights.logit_offsets(1.0, labels, 2, SINGLE),
                             np.log([0.9, 0.1]))
  np.testing.assert_allclose(class_weights.logit_offsets(0.5, labels, 3, SINGLE),
                             0.5 * np.log(np.array([90, 10, 10]) / 110))  # absent: as the rarest
  assert class_weights.logit_offsets(0.0, labels, 2, SINGLE) == ()
  with pytest.raises(UserError, match="single-label"):
    class_weights.logit_offsets(1.0, labels, 2, "multi_label_classification")
  c = default_config()
  for key, value, problem in (("logit_adjustment", -1.0, ""),
                              ("logit_adjustment", 1.0, "multi_label_classification")):
    c.update({key: value, "problem_type": problem})
    with pytest.raises(UserError, match="logit_adjustment"):
      validate(c)


def test_the_logit_adjusted_loss_learns_prior_free_logits():
  """A model that is only a bias, fitted by gradient descent on 90/10 labels: plain CE learns
  the log priors (argmax: always the majority), the adjusted loss logits equal for both
  classes, so the evidence in a real model's logits, not the prior, decides."""
  labels = jnp.array([0] * 90 + [1] * 10)
  offsets = tuple(np.log([0.9, 0.1]).tolist())

  def fit(spec):
    loss = lambda b: example_losses(jnp.broadcast_to(b, (100, 2)), labels, spec).mean()
    opt = optax.sgd(1.0)
    bias, state = jnp.zeros(2), opt.init(jnp.zeros(2))
    for _ in range(300):
      updates, state = opt.update(jax.grad(loss)(bias), state)
      bias = optax.apply_updates(bias, updates)
    return np.asarray(bias)

  plain = fit(HeadLoss(SINGLE))
  assert plain[0] - plain[1] == pytest.approx(np.log(9), abs=1e-3)
  adjusted = fit(HeadLoss(SINGLE, logit_offsets=offsets))
  assert adjusted[0] - adjusted[1] == pytest.approx(0.0, abs=1e-3)
  # Predictions read the logits as they are: the offsets live in the loss only.
  logits = jnp.array([[0.0, 0.5]])
  assert example_correct(logits, jnp.array([1]), HeadLoss(SINGLE, (), offsets)).tolist() == [1.0]


def test_selection_by_macro_f1_keeps_the_step_that_finds_the_rare_class():
  """Synthetic evals with a known optimum: step 1 predicts the majority class everywhere
  (accuracy 0.95, macro F1 0.487), step 2 finds most of the rare class at some cost in
  accuracy (0.93, macro F1 0.78)."""
  labels = np.array([0] * 95 + [1] * 5)
  majority = np.zeros(100, np.int64)
  finds = labels.copy()
  finds[:6] = 1  # 6 false positives
  finds[95] = 0  # 1 rare example missed
  scores = {step: metrics_lib.compute_metrics(("accuracy", "f1_macro"), p, labels)
            for step, p in ((1, majority), (2, finds))}
  assert scores[1]["accuracy"] > scores[2]["accuracy"]
  assert scores[2]["f1_macro"] > scores[1]["f1_macro"]
  for key, best_step in (("accuracy", 1), ("f1_macro", 2)):
    bests = selection.Bests(key, patience=0)
    for step, metrics in scores.items():
      bests.update(step, [metrics])
    assert bests.best["step"] == best_step, key


@pytest.mark.parametrize("logit_adjustment", [0.0, 1.0])
def test_a_skewed_run_chooses_checkpoints_by_macro_f1_and_says_so(tmp_path, caplog,
                                                                   logit_adjustment):
  rows = open(os.path.join(DEMO_DATA, "train.tsv")).read().splitlines()
  positives = [r for r in rows[1:] if r.endswith("\t1")][:12]
  negatives = [r for r in rows[1:] if r.endswith("\t0")][:188]
  (tmp_path / "train.tsv").write_text("\n".join([rows[0], *negatives, *positives]) + "\n")
  c = default_config()
  c.update(model_name_or_path=make_tiny_checkpoint(str(tmp_path / "tiny")),
           task_name="custom", train_file=str(tmp_path / "train.tsv"),
           validation_file=str(tmp_path / "train.tsv"), max_seq_length=32, seq_buckets=(32,),
           batch_size=32, eval_batch_size=64, num_train_steps=4, warmup_steps=0,
           eval_every_steps=2, learning_rate=1e-3, baseline="none",
           logit_adjustment=logit_adjustment)
  caplog.set_level(logging.INFO, logger="flaxbert_cls")
  result = train.train_and_evaluate(c, str(tmp_path / "run"))
  said = [r.getMessage() for r in caplog.records if "choosing checkpoints by" in r.getMessage()]
  why = ("class_weights or logit_adjustment is set" if logit_adjustment else
         "the training classes are skewed (smallest 12 rows, largest 188)")
  assert said == [f"choosing checkpoints by f1_macro, not accuracy: {why} (set "
                  "config.main_metric to choose)"]
  adjusted = [r.getMessage() for r in caplog.records if "logit adjustment" in r.getMessage()]
  assert adjusted == ([f"custom logit adjustment (tau * log prior, added in the loss): 0 "
                       f"{np.log(188 / 200):+.2f}  1 {np.log(12 / 200):+.2f}"]
                      if logit_adjustment else [])
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  best = max(records, key=lambda r: (r["f1_macro"], -r["step"]))
  ckpt = checkpoints.Checkpoints(str(tmp_path / "run"), read_only=True)
  assert ckpt.best_step() == best["step"]
  assert ckpt.read_meta(best["step"])[0]["main_metric"] == pytest.approx(best["f1_macro"])
  assert result["eval"]["f1_macro"] == records[-1]["f1_macro"]
