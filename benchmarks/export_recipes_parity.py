"""The mean-pooled and windowed recipes in PyTorch and ONNX Runtime vs `predict`, on real rows.

  python benchmarks/export_recipes_parity.py [--steps=30] [--rows=512] [--docs=96]
      [--workdir=/tmp/export_recipes]

1. GoEmotions (configs/goemotions.py: mean pooling, multi-label, pos_weight), the packaged
   MiniLM fine-tuned --steps steps, calibrated and threshold-tuned on the first --rows dev
   rows, exported with --format=onnx. On those rows: max |probability| difference of the
   export in PyTorch (trust_remote_code) and in ONNX Runtime against `predict`, and the tuned
   macro F1 of each (the same decisions give the same number).
2. 20 Newsgroups (configs/newsgroups.py: 4 windows of 128, mean of the windows' logits),
   trained --steps steps on 400 posts of a fixed-seed held-out split of bydate train, and
   the first --docs held-out posts longer than one window: `score_document` in PyTorch vs
   `predict`'s document logits (max |difference|, argmax agreement).
Prints one JSON summary at the end.
"""

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import common
import numpy as np
from sklearn import metrics as skm

sys.path.insert(0, os.path.join(common.REPO, "configs"))
import goemotions
import newsgroups
import newsgroups_split
from flaxbert_cls.serving import export
from flaxbert_cls.serving import predict
from flaxbert_cls.training import train


def _goemotions(root: str, steps: int, rows: int) -> dict:
  import onnxruntime as ort
  import torch
  import transformers
  config = goemotions.get_config()
  dev = os.path.join(root, "goemotions_dev.tsv")
  with open(config.validation_file) as f, open(dev, "w") as out:
    out.writelines(f.readlines()[:rows])
  config.update(validation_file=dev, num_train_steps=steps, checkpoint_every_steps=steps,
                log_every_steps=max(1, steps // 3), calibrate=True, tune_thresholds=True)
  workdir = os.path.join(root, "goemotions")
  train.train_and_evaluate(config, workdir)
  out = export.export(workdir, os.path.join(root, "goemotions_export"), export_format="onnx")
  want = predict.Predictor.from_path(workdir)
  texts = [line.split("\t")[0] for line in open(dev)]
  labels = [line.split("\t")[1] for line in open(dev)]
  truth = np.zeros((len(texts), len(want.label_names)), bool)
  for i, ids in enumerate(labels):
    truth[i, [int(x) for x in ids.split(",")]] = True
  flax_probs = want.decisions.probabilities(want.logits(want._tokenize([(t,) for t in texts])),  # pylint: disable=protected-access
                                            True)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, trust_remote_code=True).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
  session = ort.InferenceSession(os.path.join(out, "model.onnx"),
                                 providers=["CPUExecutionProvider"])
  torch_probs, onnx_probs = [], []
  for i in range(0, len(texts), 64):
    enc = tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=64,
                    return_tensors="pt")
    with torch.no_grad():
      logits = model(**enc).logits / model.config.calibration_temperature
    torch_probs.append(torch.sigmoid(logits).numpy())
    onnx_logits = session.run(None, {k: v.numpy() for k, v in enc.items()})[0]
    onnx_probs.append(1 / (1 + np.exp(-onnx_logits)))
  thresholds = np.asarray(model.config.thresholds)
  f1 = lambda p: float(skm.f1_score(truth, p >= thresholds, average="macro", zero_division=0))
  torch_probs, onnx_probs = np.concatenate(torch_probs), np.concatenate(onnx_probs)
  return {"rows": len(texts), "temperature": model.config.calibration_temperature,
          "max_abs_prob_diff_torch": float(np.abs(torch_probs - flax_probs).max()),
          "max_abs_prob_diff_onnx": float(np.abs(onnx_probs - flax_probs).max()),
          "tuned_macro_f1_predict": f1(flax_probs), "tuned_macro_f1_torch": f1(torch_probs),
          "tuned_macro_f1_onnx": f1(onnx_probs),
          "decisions_equal_torch": int(((torch_probs >= thresholds) ==
                                        (flax_probs >= thresholds)).all(-1).sum())}


def _newsgroups(root: str, steps: int, docs: int) -> dict:
  import transformers
  rows = [json.loads(line) for line in open(common.data_path("20newsgroups", "train.jsonl"))]
  train_rows, heldout = newsgroups_split.split(rows, 0.1, 400, 0)
  paths = {}
  for name, part in (("train", train_rows), ("eval", heldout[:32])):
    paths[name] = os.path.join(root, f"newsgroups_{name}.jsonl")
    with open(paths[name], "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in part)
  config = newsgroups.get_config()
  config.update(train_file=paths["train"], validation_file=paths["eval"], num_train_steps=steps,
                checkpoint_every_steps=steps,
                log_every_steps=max(1, steps // 3))
  workdir = os.path.join(root, "newsgroups")
  train.train_and_evaluate(config, workdir)
  out = export.export(workdir, os.path.join(root, "newsgroups_export"))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  sys.path.insert(0, out)
  from modeling_flaxbert_cls import score_document
  texts = [r["text"] for r in heldout if len(tokenizer(r["text"])["input_ids"]) > 128][:docs]
  want = predict.Predictor.from_path(workdir)
  split = want._tokenize([(t,) for t in texts])  # pylint: disable=protected-access
  flax_logits = want.logits(split)
  torch_logits = np.stack([score_document(model, tokenizer, t).numpy() for t in texts])
  return {"docs": len(texts), "mean_windows": float(split.window_counts.mean()),
          "max_abs_logit_diff": float(np.abs(torch_logits - flax_logits).max()),
          "max_abs_logit": float(np.abs(flax_logits).max()),
          "argmax_equal": int((torch_logits.argmax(-1) == flax_logits.argmax(-1)).sum())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--rows", type=int, default=512)
  parser.add_argument("--docs", type=int, default=96)
  parser.add_argument("--workdir", default="/tmp/export_recipes")
  args = parser.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  summary = {"goemotions": _goemotions(args.workdir, args.steps, args.rows),
             "newsgroups": _newsgroups(args.workdir, args.steps, args.docs)}
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
