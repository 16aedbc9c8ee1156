"""benchmarks/bench.py --lengths=sst2: an SST-2 train epoch's time from step times per padded length.

The real SST-2 train length distribution (tokenized with the MiniLM tokenizer, read from
the shared data folder: common.data_dir) gives each batch of one epoch a padded length
per strategy; the epoch time is the sum of the step times at those lengths.
"""

from __future__ import annotations

import csv
from typing import Any, Sequence

import numpy as np

import bench_lib
import common


def tokenize_sst2(args, path: str) -> str:
  """Tokenizes SST-2 train with the MiniLM tokenizer into an .npz the workers read."""
  import transformers  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import tokenization  # pylint: disable=g-import-not-at-top
  train_tsv = common.data_path("glue", "SST-2", "train.tsv", override=args.data_dir)
  with open(train_tsv, newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf.packaged_minilm_dir())
  split = tokenization.tokenize(tokenizer, [(r["sentence"],) for r in rows],
                                np.asarray([int(r["label"]) for r in rows], np.int32), args.seq)
  np.savez(path, input_ids=split.input_ids, token_type_ids=split.token_type_ids,
           offsets=split.offsets, labels=split.labels)
  return path


def load_split(args) -> Any:
  """The token-length source: SST-2 train (--split_file) or 4,096 examples of --seq tokens."""
  from flaxbert_cls.data import batching as data_lib  # pylint: disable=g-import-not-at-top
  if args.split_file:
    with np.load(args.split_file) as z:
      return data_lib.TokenizedSplit(z["input_ids"], z["token_type_ids"], z["offsets"],
                                     z["labels"], 0)
  n = 4096
  return data_lib.TokenizedSplit(np.full(n * args.seq, 1000, np.int32),
                                 np.zeros(n * args.seq, np.int8),
                                 np.arange(n + 1, dtype=np.int64) * args.seq,
                                 np.zeros(n, np.int32), 0)


def epoch_lengths(lengths: np.ndarray, batch: int, max_seq: int, buckets: Sequence[int],
                  grouping_window: int) -> dict[str, np.ndarray]:
  """Padded length of each batch of one epoch (data.TrainOrder), per padding strategy."""
  from flaxbert_cls.data import batching as data_lib  # pylint: disable=g-import-not-at-top
  plain = data_lib.TrainOrder(lengths, batch, 0)._epoch_batches(0)  # pylint: disable=protected-access
  grouped = data_lib.TrainOrder(lengths, batch, 0, grouping_window)._epoch_batches(0)  # pylint: disable=protected-access
  longest = np.minimum(lengths[plain].max(1), max_seq)
  return {
      "fixed": np.full(len(plain), max_seq),
      "buckets": np.asarray([data_lib.bucket_for(int(m), buckets, max_seq) for m in longest]),
      "buckets+grouping": np.asarray([data_lib.bucket_for(int(m), buckets, max_seq)
                                      for m in lengths[grouped].max(1)]),
      "dynamic": longest,  # pad to the batch's longest (HF DataCollatorWithPadding)
      "dynamic+grouping": np.minimum(lengths[grouped].max(1), max_seq),
  }


def step_time_at(per_seq: dict[str, dict], seq: int) -> float:
  """Step seconds at padded length `seq`: measured, or interpolated linearly between."""
  xs = sorted(int(s) for s in per_seq)
  ys = [per_seq[str(s)]["step_s"] for s in xs]
  if seq < xs[0]:
    return ys[0] * seq / xs[0]
  return float(np.interp(seq, xs, ys))


def epoch_estimates(result: dict, plans: dict[str, np.ndarray], strategies: Sequence[str]
                    ) -> dict[str, float]:
  return {s: float(sum(step_time_at(result["per_seq"], int(n)) for n in plans[s]))
          for s in strategies}


def epoch_report(args, results: list[dict]) -> str:
  """Adds `epoch_s` per strategy to each result; returns the printed lines."""
  lengths = load_split(args).lengths
  plans = epoch_lengths(lengths, args.batch, args.seq, bench_lib.buckets(args),
                        args.grouping_window)
  lines = [f"SST-2 train epoch ({len(lengths)} examples, {len(plans['fixed'])} batches "
           f"of {args.batch}), estimated from step times per padded length:"]
  strategies = (("ours ", ("fixed", "buckets", "buckets+grouping")),
                ("torch", ("fixed", "dynamic", "dynamic+grouping")))
  for result, (name, kinds) in zip(results, strategies):
    result["epoch_s"] = epoch_estimates(result, plans, kinds)
    lines += [f"  {name} {k:18s} {v / 60:7.1f} min  (mean padded length "
              f"{plans[k].mean():.0f})" for k, v in result["epoch_s"].items()]
  return "\n".join(lines)
