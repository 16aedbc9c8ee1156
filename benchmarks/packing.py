"""Would sequence packing pay for a long-document run? Padding and step FLOPs per epoch.

  python benchmarks/packing.py [--model=configs/shapes/modernbert-base] [--max_seq_length=2048]

Tokenizes 20 Newsgroups' training posts (the shared data's 20newsgroups/train.jsonl) with the
packaged MiniLM's tokenizer (ModernBERT's own is not reachable here: its BPE counts differ
somewhat), then counts, for one epoch at --batch rows a step, the share of real tokens among
the tokens computed and the training FLOPs (`plan`'s count, 3 passes) of:
  - the trainer's batches (`TrainOrder` with --grouping_window, each batch padded to its bucket)
    for the bucket sets in --buckets;
  - packed rows: whole posts first-fit-decreasing into --max_seq_length rows, each row's global
    layers over the whole row (no kernel skips the blocks between two posts).
Counts only: no model runs. docs/long_documents.md has the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import common
import numpy as np

from flaxbert_cls.data.batching import TrainOrder, bucket_for
from flaxbert_cls.model import hf
from flaxbert_cls.plan.plan import _step_flops  # pylint: disable=protected-access


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> int:
  """The number of rows of `capacity` tokens the lengths fill, placed longest first."""
  free: list[int] = []
  for n in sorted(lengths.tolist(), reverse=True):
    for i, room in enumerate(free):
      if room >= n:
        free[i] -= n
        break
    else:
      free.append(capacity - n)
  return len(free)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=f"{common.REPO}/configs/shapes/modernbert-base")
  parser.add_argument("--pooling", default="mean", help="configs/modernbert_long_documents.py's")
  parser.add_argument("--max_seq_length", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--grouping_window", type=int, default=20)
  parser.add_argument("--buckets", default="512,1024,2048;128,256,512,1024,2048;2048",
                      help="bucket sets, ';' between sets")
  parser.add_argument("--data_dir", default="")
  args = parser.parse_args()
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf.packaged_minilm_dir())
  with open(common.data_path("20newsgroups", "train.jsonl", override=args.data_dir)) as f:
    texts = [json.loads(line)["text"] for line in f]
  ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
  lengths = np.minimum([len(row) for row in ids], args.max_seq_length)
  cfg = dataclasses.replace(hf.model_config(hf.load_config(args.model)), pooling=args.pooling)
  print(f"{len(lengths)} posts: median {np.median(lengths):.0f} tokens, mean {lengths.mean():.0f}, "
        f"90th percentile {np.percentile(lengths, 90):.0f}, {np.mean(lengths >= args.max_seq_length):.1%} "
        f"at {args.max_seq_length}; batch {args.batch}, {cfg.num_hidden_layers} layers\n")
  print("| batches | real tokens / computed | training TFLOP per epoch |")
  print("|---|---|---|")
  epoch = None
  for windows in (args.grouping_window, 0):
    for spec in args.buckets.split(";"):
      buckets = tuple(int(b) for b in spec.split(","))
      epoch = TrainOrder(lengths, args.batch, seed=0, grouping_window=windows)
      rows = [epoch.batch_indices(s) for s in range(epoch.steps_per_epoch)]
      lengths_of = [bucket_for(int(lengths[r].max()), buckets, args.max_seq_length) for r in rows]
      real = sum(int(lengths[r].sum()) for r in rows)
      flops = sum(_step_flops(3, cfg, args.batch, n) for n in lengths_of)
      grouping = f"grouped in windows of {windows} batches" if windows else "random batches"
      print(f"| buckets {spec}, {grouping} | {real / (args.batch * sum(lengths_of)):.3f} | "
            f"{flops / 1e12:,.0f} |")
  used = lengths[:epoch.steps_per_epoch * args.batch]  # the posts one epoch trains on
  packed = first_fit_decreasing(used, args.max_seq_length)
  flops = packed / args.batch * _step_flops(3, cfg, args.batch, args.max_seq_length)
  print(f"| packed: {packed} rows of {args.max_seq_length} | "
        f"{used.sum() / (packed * args.max_seq_length):.3f} | {flops / 1e12:,.0f} |")


if __name__ == "__main__":
  main()
