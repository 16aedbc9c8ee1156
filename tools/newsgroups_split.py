"""A fixed-seed held-out split of 20 Newsgroups bydate train, for configs/newsgroups.py.

  python tools/newsgroups_split.py [--heldout=0.15] [--train_subset=0] [--seed=0]

Reads $FLAXBERT_DATA/20newsgroups/train.jsonl (11,314 posts) and writes
workdirs/data/newsgroups/{train,heldout}.jsonl: a stratified split (each group keeps its
share in both files), then optionally the first `train_subset` training posts of a
seeded shuffle (a smaller, still near-balanced, training set for the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py: the repository on sys.path, the data folder)
import numpy as np
from sklearn.model_selection import train_test_split

OUT_DIR = os.path.join(common.REPO, "workdirs", "data", "newsgroups")


def split(rows: list[dict], heldout: float, train_subset: int, seed: int
          ) -> tuple[list[dict], list[dict]]:
  """(train, heldout) rows: stratified by label, pure in `seed`."""
  labels = [r["label"] for r in rows]
  train, held = train_test_split(rows, test_size=heldout, random_state=seed, stratify=labels)
  if 0 < train_subset < len(train):
    keep = np.random.default_rng(seed).permutation(len(train))[:train_subset]
    train = [train[i] for i in sorted(keep)]
  return train, held


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heldout", type=float, default=0.15, help="share of posts held out")
  parser.add_argument("--train_subset", type=int, default=0, help="> 0: keep this many train posts")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out_dir", default=OUT_DIR)
  parser.add_argument("--data_dir", default="", help="default: $FLAXBERT_DATA or ../shared/data")
  args = parser.parse_args()
  path = common.data_path("20newsgroups", "train.jsonl", override=args.data_dir)
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train, held = split(rows, args.heldout, args.train_subset, args.seed)
  os.makedirs(args.out_dir, exist_ok=True)
  for name, part in (("train", train), ("heldout", held)):
    out = os.path.join(args.out_dir, f"{name}.jsonl")
    with open(out, "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n"
                   for r in part)
    print(f"{out}: {len(part)} posts, {len({r['label'] for r in part})} groups")


if __name__ == "__main__":
  main()
