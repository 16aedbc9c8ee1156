"""Skewed single-label classes: checkpoints chosen by macro F1, not by a defaulted accuracy."""

import json
import logging
import os

import numpy as np
import pytest

from flaxbert_cls.config import default_config
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
  assert pick(SINGLE, "accuracy", False, True, balanced, 2) == ("f1_macro",
                                                                 "class_weights is set")
  # The user's own choice, another main metric, other problem types: left as they are.
  assert pick(SINGLE, "accuracy", True, True, skewed, 2)[0] == "accuracy"
  assert pick(SINGLE, "f1", False, True, skewed, 2)[0] == "f1"
  assert pick("multi_label_classification", "f1_macro", False, True, None, 3)[0] == "f1_macro"
  # A class absent from training is the smallest class there is.
  assert pick(SINGLE, "accuracy", False, False, np.array([0, 1] * 10), 3)[0] == "f1_macro"


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


def test_a_skewed_run_chooses_checkpoints_by_macro_f1_and_says_so(tmp_path, caplog):
  rows = open(os.path.join(DEMO_DATA, "train.tsv")).read().splitlines()
  positives = [r for r in rows[1:] if r.endswith("\t1")][:12]
  negatives = [r for r in rows[1:] if r.endswith("\t0")][:188]
  (tmp_path / "train.tsv").write_text("\n".join([rows[0], *negatives, *positives]) + "\n")
  c = default_config()
  c.update(model_name_or_path=make_tiny_checkpoint(str(tmp_path / "tiny")),
           task_name="custom", train_file=str(tmp_path / "train.tsv"),
           validation_file=str(tmp_path / "train.tsv"), max_seq_length=32, seq_buckets=(32,),
           batch_size=32, eval_batch_size=64, num_train_steps=4, warmup_steps=0,
           eval_every_steps=2, learning_rate=1e-3, baseline="none")
  caplog.set_level(logging.INFO, logger="flaxbert_cls")
  result = train.train_and_evaluate(c, str(tmp_path / "run"))
  said = [r.getMessage() for r in caplog.records if "choosing checkpoints by" in r.getMessage()]
  assert said == ["choosing checkpoints by f1_macro, not accuracy: the training classes are "
                  "skewed (smallest 12 rows, largest 188) (set config.main_metric to choose)"]
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  best = max(records, key=lambda r: (r["f1_macro"], -r["step"]))
  ckpt = checkpoints.Checkpoints(str(tmp_path / "run"), read_only=True)
  assert ckpt.best_step() == best["step"]
  assert ckpt.read_meta(best["step"])[0]["main_metric"] == pytest.approx(best["f1_macro"])
  assert result["eval"]["f1_macro"] == records[-1]["f1_macro"]
