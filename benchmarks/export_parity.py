"""Export parity and predict throughput on SST-2 dev, with a briefly fine-tuned MiniLM.

  python benchmarks/export_parity.py [--steps=48] [--workdir=/tmp/export_parity]

1. Fine-tunes the packaged MiniLM (all-MiniLM-L6-v2) for --steps steps on the demo
   SST-2 train sample, exports it, and compares PyTorch logits from the exported
   directory with Flax logits on all 872 dev sentences (max abs difference, argmax
   agreement, accuracy of both).
2. Times `predict` on the 872 dev sentences from the workdir and from the export,
   cold (first call: compiles) and warm (second call), and PyTorch on the same
   sentences for reference. Prints one JSON summary at the end.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from common import DEMO_DATA, short_run_config
from flaxbert_cls.training import evaluate as evaluate_lib
from flaxbert_cls.serving import export
from flaxbert_cls.serving import predict
from flaxbert_cls.data import readers
from flaxbert_cls.training import train

DEV = os.path.join(DEMO_DATA, "dev.tsv")


def _config(steps: int):
  return short_run_config(
      steps, task_name="sst2", train_file=os.path.join(DEMO_DATA, "train.tsv"),
      validation_file=DEV, seq_buckets=(16, 32, 64), batch_size=32, eval_batch_size=64,
      checkpoint_every_steps=10_000)


def _torch_logits(directory, sentences, max_length):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      directory, output_loading_info=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  model.eval()
  out = []
  start = time.perf_counter()
  with torch.no_grad():
    for i in range(0, len(sentences), 64):
      enc = tokenizer(sentences[i:i + 64], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
      out.append(model(**enc).logits.numpy())
  seconds = time.perf_counter() - start
  return np.concatenate(out), info, len(sentences) / seconds, torch.get_num_threads()


def main():
  from flaxbert_cls.training import runs  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=48)
  parser.add_argument("--workdir", default="/tmp/export_parity")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("flaxbert_cls").setLevel(logging.INFO)
  shutil.rmtree(args.workdir, ignore_errors=True)
  workdir = os.path.join(args.workdir, "run")
  exported = os.path.join(args.workdir, "hf")

  t0 = time.perf_counter()
  result = train.train_and_evaluate(_config(args.steps), workdir)
  train_seconds = time.perf_counter() - t0
  export.export(workdir, exported)

  exp, params = runs.load_run(workdir)
  examples = readers.read_file(DEV, exp.task, exp.label_names)
  sentences = [t[0] for t in examples.texts]
  jit_eval = evaluate_lib.jit_eval_step(exp.model)
  metrics, flax_logits = evaluate_lib.evaluate(exp, params, exp.tokenize(examples), jit_eval)
  torch_logits, info, torch_rate, torch_threads = _torch_logits(exported, sentences, 64)
  labels = examples.labels

  timings = {}
  for name, source in (("workdir", workdir), ("exported", exported)):
    predictor = predict.Predictor.from_path(source)
    out = os.path.join(args.workdir, f"pred_{name}.csv")
    cold = predictor.predict_file(DEV, out)
    warm = predictor.predict_file(DEV, out)
    timings[name] = {"cold_sentences_per_sec": round(cold["sentences_per_sec"], 1),
                     "warm_sentences_per_sec": round(warm["sentences_per_sec"], 1)}

  summary = {
      "model": "all-MiniLM-L6-v2 (packaged), fine-tuned on the SST-2 demo sample",
      "train_steps": args.steps, "train_seconds": round(train_seconds, 1),
      "flax_dev_accuracy": round(float(metrics["accuracy"]), 4),
      "torch_dev_accuracy": round(float((torch_logits.argmax(-1) == labels).mean()), 4),
      "dev_sentences": len(sentences),
      "max_abs_logit_diff": float(np.abs(torch_logits - flax_logits).max()),
      "argmax_agreement": f"{int((torch_logits.argmax(-1) == flax_logits.argmax(-1)).sum())}"
                          f"/{len(sentences)}",
      "loading_info": {k: list(v) for k, v in info.items() if k != "error_msgs"},
      "predict": timings,
      "torch_sentences_per_sec": round(torch_rate, 1), "torch_threads": torch_threads,
      "jax_devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
      "load_average": os.getloadavg(),
  }
  print(json.dumps(summary, indent=2))
  assert summary["max_abs_logit_diff"] < 1e-4, summary
  return 0 if result else 1


if __name__ == "__main__":
  sys.exit(main())
