"""Serving benchmarks: int8 vs float32 predict, and inputs for a large streamed predict.

  # int8 (ONNX Runtime) vs float32 (JAX) on a labelled file, same process, interleaved:
  python benchmarks/bench_predict.py int8 --model=EXPORTED_DIR [--data=glue/SST-2/dev.tsv]
  python benchmarks/bench_predict.py int8 --model=GOEMOTIONS_EXPORT --data=goemotions/dev.tsv \
      --label_column=labels   (multi-label: macro F1 of the model's own decisions)
  # a JSON Lines file of N rows (SST-2 train sentences repeated) and a tiny random model:
  python benchmarks/bench_predict.py make_input --output=/tmp/big.jsonl --rows=1000000
  python benchmarks/bench_predict.py make_tiny --output=/tmp/tiny_cls
  # then: /usr/bin/time -v flaxbert-cls predict --model=/tmp/tiny_cls --input=/tmp/big.jsonl ...
  # predict into parts: 1 process, then --processes on 127.0.0.1 (pod_predict.py), same input:
  python benchmarks/bench_predict.py pod --model=/tmp/tiny_cls --input=/tmp/big.jsonl --processes=2

Each timed pass tokenizes and predicts the whole file; the first pass of each (compiles)
is not timed; the best of --repeats timed passes is reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time

import numpy as np

import common


def bench_int8(args) -> dict:
  from flaxbert_cls.serving import predict  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import readers  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import tokenization  # pylint: disable=g-import-not-at-top
  float32 = predict.Predictor.from_path(args.model)
  int8 = predict.Predictor.from_path(args.model, quantize="int8")
  task = dataclasses.replace(float32.task, label_field=args.label_column,
                             label_names=float32.label_names)
  if task.is_multilabel:
    task = dataclasses.replace(task, label_delimiter=args.label_delimiter)
  examples = readers.read_file(common.data_path(args.data), task)
  score, metric = _scorer(float32, examples.labels)
  results = {"model": args.model, "data": args.data, "rows": len(examples)}
  passes = {"float32": [], "int8": []}
  logits = {}
  for repeat in range(args.repeats + 1):
    for name, predictor in (("float32", float32), ("int8", int8)):
      start = time.perf_counter()
      split = tokenization.tokenize(predictor.tokenizer, examples.texts, None,
                                    predictor.max_seq_length)
      logits[name] = predictor.logits(split)
      if repeat:  # the first pass compiles
        passes[name].append(time.perf_counter() - start)
  for name in passes:
    results[name] = {metric: score(logits[name])}
    if float32.task.is_multilabel:  # the saved thresholds were fitted on float32's dev logits
      results[name].update(_unbiased_multilabel_scores(logits[name], examples.labels))
    if passes[name]:  # --repeats=0: scores only
      results[name].update(examples_per_sec=len(examples) / min(passes[name]),
                           seconds=passes[name])
  if args.repeats:
    results["speedup"] = (results["int8"]["examples_per_sec"]
                          / results["float32"]["examples_per_sec"])
  results[f"{metric}_drop"] = results["float32"][metric] - results["int8"][metric]
  results["decisions_agree"] = float(np.mean(_decide(float32, logits["int8"])
                                             == _decide(float32, logits["float32"])))
  return results


def _decide(predictor, logits: np.ndarray) -> np.ndarray:
  """The predictor's decisions (its temperature and thresholds): class ids, or [N, L] bools."""
  from flaxbert_cls.decisions import tuning as decisions_lib  # pylint: disable=g-import-not-at-top
  decisions = predictor.decisions or decisions_lib.Decisions()
  multilabel = predictor.task.is_multilabel
  return decisions.predictions(decisions.probabilities(logits, multilabel), multilabel)


def _unbiased_multilabel_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Macro F1 at 0.5, and with per-label thresholds cross-fitted (tuned on one half of the
  rows, scored on the other, both ways): neither model's own dev logits pick its thresholds."""
  from sklearn.metrics import f1_score  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.decisions import calibration  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.decisions import thresholds  # pylint: disable=g-import-not-at-top
  gold = labels.astype(bool)
  decided = thresholds.cross_fitted_decisions(calibration.sigmoid(logits), labels)
  return {"macro_f1_at_0.5": float(f1_score(gold, logits >= 0, average="macro", zero_division=0)),
          "macro_f1_cross_fitted": float(f1_score(gold, decided, average="macro",
                                                  zero_division=0))}


def _scorer(predictor, labels: np.ndarray):
  """(logits -> score, name): accuracy, or macro F1 over labels for a multi-label model."""
  if predictor.task.is_multilabel:
    from sklearn.metrics import f1_score  # pylint: disable=g-import-not-at-top
    return (lambda logits: float(f1_score(labels.astype(bool), _decide(predictor, logits),
                                          average="macro", zero_division=0))), "macro_f1"
  return (lambda logits: float(np.mean(_decide(predictor, logits) == labels))), "accuracy"


def make_input(args) -> dict:
  """SST-2 train sentences, repeated to --rows JSON Lines rows (streamed out)."""
  import csv  # pylint: disable=g-import-not-at-top
  with open(common.data_path("glue", "SST-2", "train.tsv"), newline="") as f:
    sentences = [r["sentence"] for r in csv.DictReader(f, delimiter="\t",
                                                       quoting=csv.QUOTE_NONE)]
  with open(args.output, "w") as f:
    for i, s in zip(range(args.rows), itertools.cycle(sentences)):
      f.write(json.dumps({"id": i, "sentence": s}) + "\n")
  return {"output": args.output, "rows": args.rows, "bytes": os.path.getsize(args.output)}


def make_tiny(args) -> dict:
  """A random-init BERT classifier (hidden 32, 2 layers) with the MiniLM tokenizer."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
  config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=128,
                                   num_labels=2)
  torch.manual_seed(0)
  transformers.BertForSequenceClassification(config).save_pretrained(args.output)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(hf.packaged_minilm_dir(), name), args.output)
  return {"output": args.output}


def bench_pod(args) -> dict:
  """rows/s in all and per process (from each run's _SUCCESS: prediction time, after the model
  loaded) and rows per CPU-second of the whole command (imports, load and compile too): 1
  process, then --processes (one CPU device each), each into a fresh output directory."""
  import resource  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  results = {"input": args.input, "bytes": os.path.getsize(args.input), "cores": os.cpu_count()}
  for count in (1, args.processes):
    output = tempfile.mkdtemp(prefix=f"bench_pod_{count}_")
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "flaxbert_cls.cli", "predict", f"--model={args.model}",
           f"--input={args.input}", f"--output={output}"]
    distributed = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}"]
    start = time.perf_counter()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [subprocess.Popen(cmd + (distributed + [f"--process_id={i}"] if count > 1 else []),
                              env=env, cwd=repo, stdout=subprocess.DEVNULL) for i in range(count)]
    if any(p.wait() for p in procs):
      raise SystemExit(f"{count} processes: a predict failed")
    with open(os.path.join(output, "_SUCCESS")) as f:
      success = json.load(f)
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
    results[f"processes_{count}"] = {
        "rows": success["rows"], "wall_seconds": time.perf_counter() - start,
        "rows_per_sec": success["rows_per_sec"],
        "rows_per_sec_per_process": [p["rows_per_sec"] for p in success["processes"]],
        "cpu_seconds": cpu, "rows_per_cpu_second": success["rows"] / cpu,
        "bytes_read_per_part": [p["input"]["stop"] - p["input"]["start"]
                                for p in success["parts"]]}
    shutil.rmtree(output)
  results["speedup"] = (results[f"processes_{args.processes}"]["rows_per_sec"]
                        / results["processes_1"]["rows_per_sec"])
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("mode", choices=["int8", "make_input", "make_tiny", "pod"])
  parser.add_argument("--model", help="int8: an exported directory (or a workdir)")
  parser.add_argument("--data", default="glue/SST-2/dev.tsv",
                      help="int8: a labelled file under the shared data folder")
  parser.add_argument("--label_column", default="label")
  parser.add_argument("--label_delimiter", default=",", help="multi-label: between label ids")
  parser.add_argument("--repeats", type=int, default=2, help="timed passes (0: scores only)")
  parser.add_argument("--output", help="make_input: the .jsonl; make_tiny: a new directory")
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--input", help="pod: the file to predict")
  parser.add_argument("--processes", type=int, default=2, help="pod: processes of the pod run")
  args = parser.parse_args()
  print(json.dumps({"int8": bench_int8, "make_input": make_input,
                    "make_tiny": make_tiny, "pod": bench_pod}[args.mode](args), indent=2))


if __name__ == "__main__":
  main()
