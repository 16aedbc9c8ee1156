"""De-duplicate a labelled TSV by text, then split it into train/dev with a fixed seed.

For data sets without an official split (the SMS Spam Collection: 403 of its 5,574 rows
repeat an earlier text; split before de-duplicating and the copies leak into dev):

  python tools/dedup_split.py --input=$FLAXBERT_DATA/sms_spam/SMSSpamCollection \
      --columns=label,sentence --output_dir=workdirs/data/sms_spam --dev_fraction=0.2 --seed=0

The first row of each distinct text is kept (a text seen with two labels is an error, named
with both lines); the rows are shuffled with numpy's default_rng(seed), stratified by label
so dev keeps the class ratio; train.tsv and dev.tsv get a header line of `--columns`.
Quoting is off, as the SMS data needs (a stray '"' would swallow lines).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py: the repository on sys.path, the data folder)

from flaxbert_cls.errors import UserError


def dedup_split(lines: list[str], columns: list[str], text_column: str, label_column: str,
                dev_fraction: float, seed: int, source: str = "input"
                ) -> tuple[list[list[str]], list[list[str]], int]:
  """(train rows, dev rows, duplicates dropped) from header-less tab-separated `lines`."""
  text_at, label_at = columns.index(text_column), columns.index(label_column)
  first_seen: dict[str, tuple[int, str]] = {}
  rows, dropped = [], 0
  for n, line in enumerate(lines, start=1):
    fields = line.rstrip("\r").split("\t")
    if len(fields) != len(columns):
      raise UserError(f"{source} line {n}: {len(fields)} tab-separated fields, expected "
                      f"{len(columns)} ({columns})")
    text, label = fields[text_at], fields[label_at]
    if text in first_seen:
      first_line, first_label = first_seen[text]
      if first_label != label:
        raise UserError(f"{source} line {n}: text of line {first_line} again with label "
                        f"{label!r} (was {first_label!r}); fix the data first")
      dropped += 1
      continue
    first_seen[text] = (n, label)
    rows.append(fields)
  rng = np.random.default_rng(seed)
  by_label = collections.defaultdict(list)
  for i, fields in enumerate(rows):
    by_label[fields[label_at]].append(i)
  dev = set()
  for label in sorted(by_label):
    members = np.array(by_label[label])
    rng.shuffle(members)
    dev.update(members[:round(dev_fraction * len(members))].tolist())
  order = rng.permutation(len(rows))
  train_rows = [rows[i] for i in order if i not in dev]
  dev_rows = [rows[i] for i in order if i in dev]
  return train_rows, dev_rows, dropped


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True)
  parser.add_argument("--columns", default="label,sentence",
                      help="column names of the header-less input, comma-separated")
  parser.add_argument("--text_column", default="sentence")
  parser.add_argument("--label_column", default="label")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--dev_fraction", type=float, default=0.2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  columns = args.columns.split(",")
  with open(args.input, encoding="utf-8", newline="") as f:
    lines = [l for l in f.read().split("\n") if l.strip()]
  train, dev, dropped = dedup_split(lines, columns, args.text_column, args.label_column,
                                    args.dev_fraction, args.seed, args.input)
  os.makedirs(args.output_dir, exist_ok=True)
  for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
    with open(os.path.join(args.output_dir, name), "w", encoding="utf-8", newline="") as f:
      f.write("\t".join(columns) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
  label_at = columns.index(args.label_column)
  counts = {n: collections.Counter(r[label_at] for r in rows) for n, rows in
            (("train", train), ("dev", dev))}
  print(f"{args.input}: {len(lines)} rows, {dropped} duplicate texts dropped; "
        f"train {len(train)} {dict(counts['train'])}, dev {len(dev)} {dict(counts['dev'])} "
        f"-> {args.output_dir}")


if __name__ == "__main__":
  main()
