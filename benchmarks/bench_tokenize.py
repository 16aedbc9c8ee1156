"""Read + tokenize throughput of a large JSONL: this trainer's path against its peers.

  python benchmarks/bench_tokenize.py --repeat=15      # SST-2 train x15 = 1,010,235 rows

Each path runs in its own subprocess (peak RSS is then its own) on the same file:
  ours:          readers.read_file + tokenization.cached_tokenize (content hash included,
                 no cache), the path `train` takes;
  hf_call:       the same rows through `tokenizer(texts, truncation=True)` in batches of
                 1,000 (what a `datasets.map(batched=True)` function does), into flat arrays;
  datasets_map:  HF datasets' own engine: Dataset.from_json + map(batched, num_proc=2)
                 with its Arrow cache in a temporary folder.
Prints rows/s, CPU seconds and peak RSS per path, and ours / each peer as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import common

PATHS = ("ours", "hf_call", "datasets_map")


def write_jsonl(path: str, repeat: int) -> int:
  """SST-2 train repeated `repeat` times as {"sentence", "label"} lines; returns rows."""
  with open(common.data_path("glue", "SST-2", "train.tsv"), encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t") for line in f][1:]
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(repeat):
      for sentence, label in rows:
        f.write(json.dumps({"sentence": sentence, "label": int(label)}) + "\n")
  return len(rows) * repeat


def run_path(name: str, path: str, max_seq_length: int) -> dict[str, float]:
  """One path, timed in this process; returns rows, seconds, CPU seconds, peak RSS."""
  from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
  tokenizer = hf.load_tokenizer(hf.packaged_minilm_dir())
  start, cpu = time.perf_counter(), time.process_time()
  if name == "ours":
    from flaxbert_cls.data import readers  # pylint: disable=g-import-not-at-top
    from flaxbert_cls.data import tasks  # pylint: disable=g-import-not-at-top
    from flaxbert_cls.data import tokenization  # pylint: disable=g-import-not-at-top
    task = tasks.Task("custom", ("sentence",), "label", ("0", "1"))
    examples = readers.read_file(path, task)
    rows = len(tokenization.cached_tokenize(tokenizer, examples.texts, examples.labels,
                                            max_seq_length, None))
  elif name == "hf_call":
    import numpy as np  # pylint: disable=g-import-not-at-top
    with open(path, encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
    texts = [r["sentence"] for r in records]
    ids, lengths = [], []
    for i in range(0, len(texts), 1000):
      encoded = tokenizer(texts[i:i + 1000], truncation=True, max_length=max_seq_length)
      ids.extend(np.asarray(row, np.int32) for row in encoded["input_ids"])
      lengths.extend(len(row) for row in encoded["input_ids"])
    np.concatenate(ids)
    rows = len(lengths)
  else:
    import datasets  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as cache:
      dataset = datasets.Dataset.from_json(path, cache_dir=cache)
      dataset = dataset.map(
          lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=max_seq_length),
          batched=True, num_proc=2, cache_file_name=os.path.join(cache, "tok.arrow"))
      rows = len(dataset)
  cpu_children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return {"rows": rows, "seconds": time.perf_counter() - start,
          "cpu_seconds": time.process_time() - cpu + cpu_children.ru_utime + cpu_children.ru_stime,
          "peak_rss_gb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                             cpu_children.ru_maxrss) / 1e6}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeat", type=int, default=15, help="copies of SST-2 train")
  parser.add_argument("--max_seq_length", type=int, default=128)
  parser.add_argument("--paths", default=",".join(PATHS))
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one path, print JSON
  parser.add_argument("--file", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_path(args.one, args.file, args.max_seq_length)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "rows.jsonl")
    rows = write_jsonl(path, args.repeat)
    print(f"{rows:,} rows, {os.path.getsize(path) / 1e6:.0f} MB, max_seq_length "
          f"{args.max_seq_length}, {os.cpu_count()} CPUs")
    results = {}
    for name in args.paths.split(","):
      out = subprocess.run([sys.executable, __file__, f"--one={name}", f"--file={path}",
                            f"--max_seq_length={args.max_seq_length}"],
                           capture_output=True, text=True, check=True)
      results[name] = r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{name:13s} {r['rows'] / r['seconds']:9,.0f} rows/s  {r['seconds']:6.1f} s  "
            f"{r['cpu_seconds']:6.1f} CPU-s  peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
  if "ours" in results:
    for name, r in results.items():
      if name != "ours":
        print(f"ours / {name}: {r['seconds'] / results['ours']['seconds']:.2f}x rows/s")


if __name__ == "__main__":
  main()
