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

`--time`: also times the trainer's jitted train step (random weights, float32, this host) of a
smaller ModernBERT (--time_model: hidden 256, 6 layers) at each shape an epoch uses: --time_batch
posts at each bucket of the first --buckets set, and --time_rows packed rows (`packing=True`,
data/packing.py's own batches of the same posts); an epoch's time is each shape's median step
time x its number of steps (one step per row of the epoch's packing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

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


def _time_step(model_dir: str, max_seq_length: int, batches: dict[str, dict[str, np.ndarray]],
               steps: int) -> dict[str, float]:
  """Median seconds of the trainer's train step on each named batch (one compile each)."""
  import jax  # pylint: disable=g-import-not-at-top
  import bench_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import batching  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import bert as model_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import starts  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config = default_config()
  config.max_seq_length = max_seq_length
  config.pooling = "mean"
  config.mesh_shape = (1, 1, 1)
  mesh = sharding_lib.create_mesh(config.mesh_axes, config.mesh_shape)
  cfg = hf.model_config(hf.load_config(model_dir), mesh=mesh, pooling="mean")
  task = experiment_lib.RunTask("sst2", tasks_lib.GLUE_TASKS["sst2"], ("0", "1"), config)
  exp = experiment_lib.Experiment(config, (task,), None, None,
                                  model_lib.BertForSequenceClassification(cfg, 2), mesh,
                                  sharding_lib.batch_sharding(mesh))
  state, shardings, tx, schedule = starts.create_train_state(exp, 1000, None)
  step = step_lib.jit_train_step(exp, state.params, shardings, tx, schedule)
  holder, seconds = [state], {}
  for name, host in batches.items():
    batch = batching.to_global(host, exp.batch_sharding)

    def one(batch=batch):
      holder[0] = step(holder[0], batch)[0]
      jax.block_until_ready(holder[0])
    seconds[name] = bench_lib.time_steps(one, 1, steps)[1]
    print(f"  {name}: {seconds[name]:.2f} s a step (load average {os.getloadavg()[0]:.2f})",
          flush=True)
  return seconds


def _time_epoch(args, ids: list[list[int]], lengths: np.ndarray) -> None:
  """--time: the epoch's wall time, bucketed batches against packed rows (module doc)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import packing  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data.batching import pad_rows  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data.tokenization import TokenizedSplit  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  width, layers = (int(n) for n in args.time_model.split("x"))
  model_dir = tempfile.mkdtemp()
  transformers.ModernBertConfig(
      vocab_size=30522, hidden_size=width, num_attention_heads=width // 64,
      intermediate_size=3 * width // 2, num_hidden_layers=layers, global_attn_every_n_layers=3,
      local_attention=128, max_position_embeddings=8192, pad_token_id=0, cls_token_id=101,
      sep_token_id=102, bos_token_id=101, eos_token_id=102,
      classifier_pooling="mean").save_pretrained(model_dir)
  capped = [row[:args.max_seq_length] for row in ids]
  split = TokenizedSplit(np.concatenate(capped).astype(np.int32),
                         np.zeros(int(lengths.sum()), np.int8),
                         np.concatenate([[0], np.cumsum(lengths)]),
                         np.zeros(len(lengths), np.int32))
  buckets = tuple(int(b) for b in args.buckets.split(";")[0].split(","))
  order = TrainOrder(lengths, args.time_batch, seed=0, grouping_window=args.grouping_window)
  shapes = [bucket_for(int(lengths[order.batch_indices(s)].max()), buckets, args.max_seq_length)
            for s in range(order.steps_per_epoch)]
  packed = packing.PackedOrder(lengths, args.time_rows, 0, args.max_seq_length,
                               args.max_examples)
  batches = {f"{args.time_batch} posts at {b}": pad_rows(split, np.flatnonzero(
      lengths <= b)[-args.time_batch:], b) for b in sorted(set(shapes))}
  batches[f"{args.time_rows} packed rows"] = packing.pad_packed(split, packed.batch_indices(0),
                                                                args.max_seq_length)
  print(f"\nTrain step of a {width}x{layers} ModernBERT (this host, float32):", flush=True)
  seconds = _time_step(model_dir, args.max_seq_length, batches, args.time_steps)
  bucketed = sum(seconds[f"{args.time_batch} posts at {b}"] for b in shapes)
  packed_s = packed.steps_per_epoch * seconds[f"{args.time_rows} packed rows"]
  posts = sum(int((packed.batch_indices(s) >= 0).sum())
              for s in range(packed.steps_per_epoch)) / packed.steps_per_epoch
  print(f"\n| batches | steps | epoch s | posts a step |\n|---|---|---|---|\n"
        f"| {args.time_batch} posts, buckets {args.buckets.split(';')[0]}, grouped | "
        f"{len(shapes)} | {bucketed:,.0f} | {args.time_batch} |\n"
        f"| {args.time_rows} packed rows of {args.max_seq_length} | {packed.steps_per_epoch} | "
        f"{packed_s:,.0f} | {posts:.1f} (mean) |\n\npacked / bucketed epoch time: "
        f"{packed_s / bucketed:.2f}x")


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
  parser.add_argument("--max_examples", type=int, default=16, help="packing_max_examples")
  parser.add_argument("--time", action="store_true", help="time the train step (module doc)")
  parser.add_argument("--time_model", default="256x6", help="hidden x layers")
  parser.add_argument("--time_batch", type=int, default=8, help="posts a bucketed step")
  parser.add_argument("--time_rows", type=int, default=4, help="packed rows a step")
  parser.add_argument("--time_steps", type=int, default=2)
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
  if args.time:
    _time_epoch(args, ids, lengths)


if __name__ == "__main__":
  main()
