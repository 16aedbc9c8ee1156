"""Train-step benchmark: examples/s, tokens/s, compile time, peak memory, MFU.

  python benchmarks/bench.py --model=minilm --batch=32 --seq=128            # ours
  python benchmarks/bench.py --model=bert-base --vs-torch                   # + PyTorch, same run
  python benchmarks/bench.py --config=configs/demo.py --vs-torch            # sizes from a config
  python benchmarks/bench.py --lengths=sst2 --vs-torch                      # SST-2 epoch estimate
  python benchmarks/bench.py --data-only                                    # host batching cost
  python benchmarks/bench.py --model=configs/shapes/modernbert-base --batch=8 --seq=512 \
      --ab=head_groups                          # one process: attention in head groups or not
  python benchmarks/bench.py --model=minilm --json=bench.json

Each framework runs in its own subprocess, so peak host memory (ru_maxrss) is its
own; `--rounds=N` alternates the subprocesses N times and reports medians (shared,
noisy machines). `--model`: 'minilm' (the packaged pre-trained MiniLM), 'bert-tiny'
/ 'bert-base' / 'bert-large' (random init, standard sizes), or a checkpoint directory.
Timing: median of `--steps` steady-state steps after `--warmup` steps (the first
includes compilation). The torch side (bench_torch.py) is transformers'
BertForSequenceClassification with AdamW and gradient clipping, eager mode (no
torch.compile), SDPA attention (transformers' default; --torch_attention=eager: its
explicit softmax), bf16 via autocast on CUDA. `--attention_impl=''` resolves as training
does (cuDNN on a GPU in bf16, XLA elsewhere); a train step with attention dropout uses
the explicit kernel either way (`--attention_dropout=0.0` for the fused one, both sides).

`--lengths=sst2`: the real SST-2 train length distribution (MiniLM tokenizer; SST-2
from --data_dir, else $FLAXBERT_DATA, else ../shared/data). Both frameworks are timed
at each padded length; the epoch time is the sum over one epoch's batches of the step
time at that batch's padded length, for: fixed padding to --seq, length buckets
(--buckets), buckets + length grouping, and (torch) per-batch dynamic padding
(interpolated between the measured lengths). See bench_sst2.py.

`--data-only`: host batching time per step (data.train_batch + to_global) alone,
and the time the training loop waits for it with the model running (prefetch).

`--host_malloc=keep` (default): both workers keep freed memory mapped, as the
`flaxbert-cls` command does (flaxbert_cls/training/host_memory.py); `system`: glibc's
defaults for both.

`--ab=head_groups`: the jax step built twice in one process, attention in cache-sized head
groups (attention._cache_blocked, one CPU device) and in one pass, run alternately
(--steps each after --warmup); a change smaller than the machine's drift between two
processes shows here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

import bench_lib
import bench_sst2
import bench_torch


# ---------------------------------------------------------------------------- jax


def _jax_setup(args):
  """(experiment, jitted step, state) for args' model, dtype, attention and mesh."""
  from flaxbert_cls.training import starts  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import bert as model_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import attention as attention_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import train  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top

  if args.compilation_cache_dir:
    train.enable_compilation_cache(args.compilation_cache_dir)
  cfg = bench_lib.model_config(args)
  config = default_config()
  config.dtype = args.dtype
  config.attention_impl = args.attention_impl
  config.mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  config.cpu_scheduler = args.cpu_scheduler
  mesh = sharding_lib.create_mesh(config.mesh_axes, config.mesh_shape)
  bert_config = hf.model_config(  # any family hf.FAMILIES reads (BERT sizes, ModernBERT, ...)
      transformers.AutoConfig.for_model(**cfg), dtype=args.dtype, mesh=mesh,
      activation_rules=sharding_lib.activation_rules(config.logical_axis_rules, mesh))
  # '' (auto) resolves as training resolves it: cuDNN on a GPU in bf16, XLA elsewhere.
  bert_config = dataclasses.replace(
      bert_config, attention_impl=attention_lib.attention_implementation(
          args.attention_impl, mesh.devices.flat[0].platform, args.dtype, bert_config.head_dim))
  task = experiment_lib.RunTask("sst2", tasks_lib.GLUE_TASKS["sst2"], ("0", "1"), config)
  exp = experiment_lib.Experiment(config, (task,), None, None,
                                  model_lib.BertForSequenceClassification(bert_config, 2), mesh,
                                  sharding_lib.batch_sharding(mesh))
  state, state_shardings, tx, schedule = starts.create_train_state(exp, 1000, None)
  return exp, step_lib.jit_train_step(exp, state.params, state_shardings, tx, schedule), state


def run_jax(args) -> dict[str, Any]:
  """args.batch at each padded length (bench_lib.seq_list)."""
  return run_jax_batches(args, [args.batch])[0]


def run_jax_batches(args, batches: Sequence[int], deadline: float | None = None,
                    progress: Callable[[list], None] | None = None) -> list[dict[str, Any]]:
  """One result per batch size, in order, until one fails or the next would pass `deadline`.

  The state is made once. jax keeps one peak for the process: with batch sizes in
  increasing order, each result's peak_device_bytes is that batch size's own.
  `progress(results so far)` after each batch size.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import batching as data_lib  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  exp, step, state = _jax_setup(args)
  setup_s = time.perf_counter() - t0
  vocab = bench_lib.hf_config_dict(args.model)["vocab_size"]
  device = jax.devices()[0]
  peak = _jax_peak_flops(device, jax.device_count())
  holder, results, last = [state], [], 0.0
  for batch_size in batches:
    if results and bench_lib.over_deadline(deadline, last):
      break
    start = time.perf_counter()
    per_seq = {}
    try:
      for seq in bench_lib.seq_list(args):
        batch = data_lib.to_global(bench_lib.batch_numpy(batch_size, seq, vocab),
                                   exp.batch_sharding)

        def one(batch=batch):
          holder[0] = step(holder[0], batch)[0]
          jax.block_until_ready(holder[0])
        first, median = bench_lib.time_steps(one, args.warmup, args.steps)
        per_seq[str(seq)] = dict(step_s=median, compile_s=max(first - median, 0.0))
    except Exception as e:  # pylint: disable=broad-except
      results.append(bench_lib.batch_error(batch_size, e))
      break
    result = dict(framework=f"flaxbert-cls (jax {jax.__version__}, "
                  f"{exp.model.config.attention_impl} attention)", batch=batch_size,
                  per_seq=per_seq, setup_s=setup_s, peak_host_bytes=bench_lib.peak_rss_bytes(),
                  device=f"{device.platform}:{getattr(device, 'device_kind', '')}",
                  num_devices=jax.device_count(), **peak)
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
      result["peak_device_bytes"] = stats["peak_bytes_in_use"]
    results.append(result)
    last = time.perf_counter() - start
    if progress:
      progress(results)
  return results


# What --ab builds each side with: the name of a variant -> (label, value) per side.
_AB_VARIANTS = {"head_groups": (("head groups", True), ("one pass", False))}


def run_jax_ab(args) -> dict[str, Any]:
  """--ab: the step built with each side's setting in this process; sides' steps alternate."""
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import batching as data_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import attention as attention_lib  # pylint: disable=g-import-not-at-top

  vocab = bench_lib.hf_config_dict(args.model)["vocab_size"]
  real, steps = attention_lib._cache_blocked, {}  # pylint: disable=protected-access
  try:
    for label, blocked in _AB_VARIANTS[args.ab]:
      # Read when the step is traced (its first call, below), so set until then.
      attention_lib._cache_blocked = lambda mesh, blocked=blocked: blocked  # pylint: disable=protected-access
      exp, step, state = _jax_setup(args)
      batch = data_lib.to_global(bench_lib.batch_numpy(args.batch, args.seq, vocab),
                                 exp.batch_sharding)
      holder = [state]

      def one(step=step, holder=holder, batch=batch):
        holder[0] = step(holder[0], batch)[0]
        jax.block_until_ready(holder[0])
      for _ in range(max(args.warmup, 1)):
        one()
      steps[label] = one
  finally:
    attention_lib._cache_blocked = real  # pylint: disable=protected-access
  times = {label: [] for label in steps}
  for i in range(args.steps):
    for label in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
      t = time.perf_counter()
      steps[label]()
      times[label].append(time.perf_counter() - t)
  return dict(ab=args.ab, step_s={k: statistics.median(v) for k, v in times.items()},
              steps=times, load_average=os.getloadavg())


def _jax_peak_flops(device, count: int) -> dict[str, Any]:
  if device.platform == "cpu":
    return dict(peak_flops=measured_matmul_flops(), peak_flops_source="measured f32 matmul")
  peak = bench_lib.peak_flops_for(getattr(device, "device_kind", ""))
  return dict(peak_flops=peak and peak * count, peak_flops_source="table (bf16 dense)")


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


def run_data_only(args) -> dict[str, Any]:
  """Host batching per step: alone, and as the loop's wait for it with the model running."""
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import batching as data_lib  # pylint: disable=g-import-not-at-top

  split, buckets = bench_sst2.load_split(args), bench_lib.buckets(args)
  order = data_lib.TrainOrder(split.lengths, args.batch, 0, args.grouping_window)
  mixture = data_lib.TaskMixture([order], np.ones(1), 0)  # one task: training's batching path
  exp, step, state = _jax_setup(args)
  sharding = exp.batch_sharding

  def make(i):
    batch = data_lib.train_batch([split], mixture, i, buckets, args.seq, sharding=sharding)
    return data_lib.to_global(batch, sharding)
  n = args.data_steps
  t = time.perf_counter()
  for i in range(n):
    jax.block_until_ready(make(i))
  alone = (time.perf_counter() - t) / n
  seqs = sorted({int(make(i)["input_ids"].shape[1]) for i in range(n)})
  for seq in seqs:  # compile every shape first: waits below are data waits only
    batch = data_lib.to_global(
        bench_lib.batch_numpy(args.batch, seq, exp.model.config.vocab_size), sharding)
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


# --------------------------------------------------------------------------- main


def _in_subprocess(args, worker: str) -> dict[str, Any]:
  skip = ("worker", "vs_torch", "json", "rounds", "config", "data_only")
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={worker}"] + [
      f"--{k}={v}" for k, v in vars(args).items() if k not in skip]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{worker} benchmark failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _merge_rounds(rounds: list[dict]) -> dict[str, Any]:
  """Median step times over rounds; max memory; the first round's other fields."""
  merged = dict(rounds[0], rounds=len(rounds))
  merged["per_seq"] = {s: {k: statistics.median(r["per_seq"][s][k] for r in rounds)
                           for k in rounds[0]["per_seq"][s]} for s in rounds[0]["per_seq"]}
  merged["peak_host_bytes"] = max(r["peak_host_bytes"] for r in rounds)
  if rounds[0].get("peak_flops"):
    merged["peak_flops"] = statistics.median(r["peak_flops"] for r in rounds)
  return merged


def apply_config(args) -> None:
  """--config=path/to/config.py: model, batch, seq, buckets, dtype, attention, mesh from it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("bench_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  model = c.model_name_or_path
  args.model = "minilm" if "minilm" in model.lower() and not os.path.isdir(model) else model
  args.batch, args.seq, args.dtype = c.batch_size, c.max_seq_length, c.dtype
  args.attention_impl, args.cpu_scheduler = c.attention_impl, c.cpu_scheduler
  args.attention_dropout = c.get("attention_dropout", -1.0)
  args.mesh = ",".join(str(x) for x in c.mesh_shape)
  args.buckets = ",".join(str(b) for b in c.seq_buckets)
  args.grouping_window = c.length_grouping_window or args.grouping_window


def summarize(args, results: list[dict]) -> None:
  """Adds examples/s, tokens/s, MFU and the torch ratio at --seq to each result."""
  cfg = bench_lib.hf_config_dict(args.model)
  flops = bench_lib.train_flops(cfg, args.batch, args.seq)
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


def build_parser() -> argparse.ArgumentParser:
  """The flags (benchmarks/gpu_check.py builds its workers' arguments with it too)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="", help="a configs/*.py file (overrides the below)")
  parser.add_argument("--model", default="minilm")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128, help="padded (max) sequence length")
  parser.add_argument("--lengths", default="", choices=["", "sst2"])
  parser.add_argument("--data_dir", default="",
                      help="--lengths=sst2: folder holding glue/SST-2 (default: "
                      "$FLAXBERT_DATA, else ../shared/data)")
  parser.add_argument("--buckets", default="16,32,64")
  parser.add_argument("--grouping_window", type=int, default=50)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--attention_impl", default="", choices=["", "xla", "cudnn"])
  parser.add_argument("--attention_dropout", type=float, default=-1.0,
                      help=">= 0: instead of the checkpoint's (config.attention_dropout)")
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
  parser.add_argument("--host_malloc", default="keep", choices=["keep", "system"],
                      help="both workers: keep freed memory mapped, as flaxbert-cls does, "
                      "or glibc's defaults")
  parser.add_argument("--ab", default="", choices=["", *_AB_VARIANTS],
                      help="the jax step both ways in one process, steps alternated")
  parser.add_argument("--data-only", dest="data_only", action="store_true")
  parser.add_argument("--data_steps", type=int, default=20)
  parser.add_argument("--json", default="")
  parser.add_argument("--split_file", default="", help=argparse.SUPPRESS)
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  return parser


def main() -> None:
  args = build_parser().parse_args()
  if args.worker:
    if args.host_malloc == "keep":  # before the frameworks start their threads
      from flaxbert_cls.training import host_memory  # pylint: disable=g-import-not-at-top
      host_memory.keep_freed_memory()
    worker = {"jax": run_jax, "torch": bench_torch.run_torch, "data": run_data_only,
              "jax_ab": run_jax_ab}[args.worker]
    print(json.dumps(worker(args)))
    return
  if args.config:
    apply_config(args)

  with tempfile.TemporaryDirectory() as tmp:
    if args.lengths == "sst2":
      args.split_file = bench_sst2.tokenize_sst2(args, os.path.join(tmp, "sst2.npz"))
    if args.ab:
      r = _in_subprocess(args, "jax_ab")
      (a, ta), (b, tb) = r["step_s"].items()
      print(f"{args.model}, batch {args.batch}, seq {args.seq}, {args.steps} steps each, "
            f"alternated: {a} {ta:.2f} s, {b} {tb:.2f} s per step ({ta / tb:.2f}x)")
      results = [r]
    elif args.data_only:
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
        print(bench_sst2.epoch_report(args, results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), load_average=os.getloadavg(), results=results), f,
                indent=2)


if __name__ == "__main__":
  main()
