"""Macro F1 of a multi-label run's dev predictions: at 0.5, with per-label tuned thresholds,
and with cross-fitted thresholds.

  python tools/multilabel_scores.py --workdir=DIR   (reads DIR/eval/predictions.jsonl)

"Tuned": each label's threshold maximises its F1 on the same dev rows (thresholds.py's
exact search), the GoEmotions paper's protocol and the issue's ("tune thresholds on dev,
evaluate on dev"). "Cross-fitted": each half of dev is cut at the thresholds tuned on the
other half, an estimate for rows the thresholds have not seen.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from sklearn import metrics as skm

import common  # pylint: disable=unused-import  (puts the repo on sys.path)
from flaxbert_cls.decisions import thresholds as thresholds_lib


def read_predictions(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(label names, probabilities [n, L], gold multi-hot [n, L]) from predictions.jsonl."""
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  names = list(rows[0]["probabilities"])
  probs = np.array([[r["probabilities"][n] for n in names] for r in rows])
  gold = np.array([[n in r["label"] for n in names] for r in rows], np.int64)
  return names, probs, gold


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  names, probs, gold = read_predictions(os.path.join(args.workdir, "eval", "predictions.jsonl"))
  thresholds = thresholds_lib.per_label_thresholds(probs, gold)
  for what, decisions in (("0.5", probs >= 0.5), ("tuned per label", probs >= thresholds),
                          ("cross-fitted per label",
                           thresholds_lib.cross_fitted_decisions(probs, gold))):
    decisions = decisions.astype(np.int64)
    print(f"threshold {what}: macro F1 {skm.f1_score(gold, decisions, average='macro', zero_division=0):.4f}  "
          f"micro F1 {skm.f1_score(gold, decisions, average='micro', zero_division=0):.4f}  "
          f"exact match {skm.accuracy_score(gold, decisions):.4f}")
  per_label = skm.f1_score(gold, (probs >= thresholds).astype(np.int64), average=None,
                           zero_division=0)
  print("tuned thresholds / F1: " + "  ".join(
      f"{n} {t:.2f}/{f:.2f}" for n, t, f in zip(names, thresholds, per_label)))


if __name__ == "__main__":
  main()
