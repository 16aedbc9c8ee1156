"""[CLS] pooler vs mean pooling of the frozen packaged MiniLM, probed on GoEmotions.

  python tools/pooling_probe.py --train_rows=8000

One forward pass gives both vectors of every text; a one-vs-rest logistic regression per
pooling (sklearn, balanced class weights) is fitted on the first --train_rows training rows
and scored on dev with macro F1 at 0.5 and with per-label thresholds tuned on dev (the same
protocol as tools/multilabel_scores.py). A cheap check of which vector the encoder was trained
to produce, before paying for fine-tuning with either.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import flax.linen as nn
import jax
import numpy as np
from sklearn import linear_model, metrics as skm, multiclass

import common

from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.model import hf
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.data import tokenization
import multilabel_scores


def embed(texts: list[tuple[str, ...]], tokenizer, bert, params, batch: int = 128
          ) -> tuple[np.ndarray, np.ndarray]:
  """(pooler output, masked mean of the last hidden state), float32 [n, hidden] each."""
  split = tokenization.tokenize(tokenizer, texts, None, 64)
  apply = jax.jit(lambda p, b: _both(bert, p, b))
  cls_out = mean_out = None
  for rows, b in data_lib.eval_batches(split, batch, (16, 32, 64), 64):
    pooled, mean = (np.asarray(x) for x in apply(params, b))
    if cls_out is None:
      cls_out = np.zeros((len(split), pooled.shape[-1]), np.float32)
      mean_out = np.zeros_like(cls_out)
    real = rows >= 0
    cls_out[rows[real]], mean_out[rows[real]] = pooled[real], mean[real]
  return cls_out, mean_out


def _both(bert, params, batch):
  hidden, pooled = bert.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"])
  return pooled, model_lib.mean_pool(hidden, batch["attention_mask"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--train_rows", type=int, default=8000)
  args = parser.parse_args()
  root = common.data_path("goemotions")
  names = tuple(open(os.path.join(root, "emotions.txt")).read().split())
  task = tasks_lib.Task("goemotions", ("text",), "labels", names, file_columns=(
      "text", "labels", "id"), problem_type=tasks_lib.MULTI_LABEL, metrics=("f1_macro",),
      main_metric="f1_macro")
  train = readers.read_file(os.path.join(root, "train.tsv"), task)
  dev = readers.read_file(os.path.join(root, "dev.tsv"), task)
  checkpoint = hf.packaged_minilm_dir()
  hf_config = hf.load_config(checkpoint)
  tokenizer = hf.load_tokenizer(checkpoint, hf_config.vocab_size)
  bert = model_lib.BertModel(dataclasses.replace(hf.model_config(hf_config)))
  dummy = np.ones((1, 8), np.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: bert.init(jax.random.key(0), dummy, dummy, dummy)))
  full = {"bert": shapes["params"]}
  params, _, _ = hf.params_from_state_dict(hf.load_state_dict(checkpoint), full,
                                           hf_config.model_type)
  start = time.perf_counter()
  train_vectors = embed(train.texts[:args.train_rows], tokenizer, bert, params["bert"])
  dev_vectors = embed(dev.texts, tokenizer, bert, params["bert"])
  print(f"embedded {args.train_rows} + {len(dev)} texts in {time.perf_counter() - start:.0f} s")
  y_train, y_dev = train.labels[:args.train_rows].astype(int), dev.labels.astype(int)
  keep = y_train.sum(0) > 0  # a label absent from the subset cannot be fitted
  for name, x_train, x_dev in (("cls (pooler)", train_vectors[0], dev_vectors[0]),
                               ("mean", train_vectors[1], dev_vectors[1])):
    clf = multiclass.OneVsRestClassifier(linear_model.LogisticRegression(
        C=1.0, max_iter=500, class_weight="balanced"))
    clf.fit(x_train, y_train[:, keep])
    probs = np.zeros(y_dev.shape)
    probs[:, keep] = clf.predict_proba(x_dev)
    tuned = multilabel_scores.tuned_thresholds(probs, y_dev)
    f1_05 = skm.f1_score(y_dev, probs > 0.5, average="macro", zero_division=0)
    f1_tuned = skm.f1_score(y_dev, probs > tuned, average="macro", zero_division=0)
    print(f"{name}: dev macro F1 {f1_05:.4f} at 0.5, {f1_tuned:.4f} with tuned thresholds")


if __name__ == "__main__":
  main()
