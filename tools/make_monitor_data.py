r"""Makes docs/monitor.md's drift-monitoring inputs from the shared data folder.

  python tools/make_monitor_data.py --out_dir=workdirs/monitor_data [--seed=0]

Writes, as JSON Lines with a "sentence" field (the demo model's text column):
  sst2_dev.jsonl        SST-2 dev, all 872 sentences with their labels (the reference);
  sst2_dev_a.jsonl / sst2_dev_b.jsonl   the two halves (436 + 436) of SST-2 dev shuffled
                        with random.Random(seed): same distribution, should be stable;
  news.jsonl            872 20 Newsgroups posts drawn with random.Random(seed) from
                        20newsgroups/train.jsonl (its "text" field; no labels): drift.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py: the repository on sys.path, the data folder)


def _write(path: str, rows: list[dict[str, str]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", default="workdirs/monitor_data")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  with open(common.data_path("glue", "SST-2", "dev.tsv"), encoding="utf-8", newline="") as f:
    dev = [{"sentence": r["sentence"], "label": r["label"]}
           for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
  _write(os.path.join(args.out_dir, "sst2_dev.jsonl"), dev)
  shuffled = list(dev)
  random.Random(args.seed).shuffle(shuffled)
  half = len(shuffled) // 2
  _write(os.path.join(args.out_dir, "sst2_dev_a.jsonl"), shuffled[:half])
  _write(os.path.join(args.out_dir, "sst2_dev_b.jsonl"), shuffled[half:])
  with open(common.data_path("20newsgroups", "train.jsonl"), encoding="utf-8") as f:
    posts = [json.loads(line)["text"] for line in f]
  posts = [p for p in posts if p.strip()]
  news = random.Random(args.seed).sample(posts, len(dev))
  _write(os.path.join(args.out_dir, "news.jsonl"), [{"sentence": p} for p in news])
  print(f"wrote {len(dev)} SST-2 dev rows, halves of {half} and {len(dev) - half}, and "
        f"{len(news)} 20 Newsgroups posts to {args.out_dir}")


if __name__ == "__main__":
  main()
