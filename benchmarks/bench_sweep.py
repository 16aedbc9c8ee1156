r"""Sweep speed and memory: N members in one program against solo runs; members per device.

  python benchmarks/bench_sweep.py --members=4 [--model=minilm] [--batch=32 --seq=128] [--lora]
  python benchmarks/bench_sweep.py --fit                    # members per device, MiniLM and BERT-base
  python benchmarks/bench_sweep.py --check                  # every member of a 2 lr x 2 seed MiniLM
                                                       # sweep against its solo run

Speed: one worker process times the solo train step (step_lib.jit_train_step), another the
N-member sweep step (step_lib.jit_stacked_train_step) on the same random full-length batch, after
compiling; N solo runs one after another take N solo steps per step of all N, so the ratio is
sweep examples/s over solo examples/s. Each worker reports its peak RSS (host memory: on CPU,
the device memory). Weights are random (speed does not depend on them).
--fit: per member the trained parameters + AdamW moments (12 bytes a parameter) and the
step's temporaries (XLA's memory analysis of the compiled solo step: activations and
gradients); frozen parameters (LoRA) once; members = (device memory - shared) / per member.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

import bench_lib
import common

DEVICE_BYTES = {"H100 80GB": 80e9, "H200 141GB": 141e9, "16 GB": 16e9}


def _experiment(args, members: int):
  """An Experiment for args' model (random init, no tokenizer), solo or a sweep."""
  from flaxbert_cls import config as config_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import bert as model_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import attention as attention_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top

  cfg = bench_lib.hf_config_dict(args.model)
  config = default_config()
  config.dtype = args.dtype
  config.lora_rank = args.lora_rank
  if members:
    config.sweep.learning_rate = tuple(1e-5 * (i + 1) for i in range(members))
  mesh = sharding_lib.create_mesh(*config_lib.mesh_request(config))
  bert_config = model_lib.BertConfig.from_hf(
      cfg, dtype=args.dtype, mesh=mesh, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
      lora_targets=tuple(config.lora_targets),
      activation_rules=sharding_lib.activation_rules(config.logical_axis_rules, mesh))
  bert_config = dataclasses.replace(
      bert_config, attention_impl=attention_lib.attention_implementation(
          "", mesh.devices.flat[0].platform, args.dtype, bert_config.head_dim))
  task = experiment_lib.RunTask("sst2", tasks_lib.GLUE_TASKS["sst2"], ("0", "1"), config)
  return experiment_lib.Experiment(config, (task,), None, None,
                                   model_lib.BertForSequenceClassification(bert_config, 2), mesh,
                                   sharding_lib.batch_sharding(mesh),
                                   members=tuple(config_lib.grid(config)))


def _setup(args, members: int):
  """(experiment, jitted step, state, batch) for a solo run (members 0) or a sweep."""
  from flaxbert_cls.training import members as members_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import starts  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import step as step_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import batching as data_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import members as sweep_lib  # pylint: disable=g-import-not-at-top
  exp = _experiment(args, members)
  mesh = exp.mesh
  batch = bench_lib.batch_numpy(args.batch, args.seq,
                                exp.model.config.vocab_size)
  if members:
    state, shardings, *_ = starts.create_train_state(exp, 1000, None)
    step = step_lib.jit_stacked_train_step(exp, shardings, 1000)
    batch = data_lib.to_global(sweep_lib.stack_batches([batch] * members),
                               members_lib.stacked_batch_sharding(mesh))
  else:
    state, shardings, tx, schedule = starts.create_train_state(exp, 1000, None)
    step = step_lib.jit_train_step(exp, state.params, shardings, tx, schedule)
    batch = data_lib.to_global(batch, exp.batch_sharding)
  return exp, step, state, batch, jax


def worker(args) -> dict[str, Any]:
  """Times --members (0: solo) steps; peak RSS and the state's bytes."""
  exp, step, state, batch, jax = _setup(args, args.members)
  holder = [state]

  def one():
    holder[0], metrics, _ = step(holder[0], batch)
    jax.block_until_ready(metrics)

  first, seconds = bench_lib.time_steps(one, args.warmup, args.steps)
  examples = args.batch * max(args.members, 1)
  return dict(members=args.members, model=args.model, batch=args.batch, seq=args.seq,
              lora_rank=args.lora_rank, device=str(jax.devices()[0].device_kind),
              compile_s=round(first, 2), step_s=round(seconds, 4),
              examples_per_s=round(examples / seconds, 2),
              state_bytes=int(sum(x.nbytes for x in jax.tree.leaves(holder[0]))),
              peak_rss_bytes=bench_lib.peak_rss_bytes(),
              peak_device_bytes=(jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"))


def _in_subprocess(args, members: int) -> dict[str, Any]:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--members={members}",
         f"--model={args.model}", f"--batch={args.batch}", f"--seq={args.seq}",
         f"--steps={args.steps}", f"--warmup={args.warmup}", f"--dtype={args.dtype}",
         f"--lora_rank={args.lora_rank}"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:  # -9: killed, out of memory most often
    raise SystemExit(f"worker {members} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args) -> dict[str, Any]:
  """Solo, then the N-member sweep, each in its own process (own peak RSS)."""
  solo = _in_subprocess(args, 0)
  print(f"solo: {json.dumps(solo)}", file=sys.stderr, flush=True)
  swept = _in_subprocess(args, args.members)
  n = args.members
  # Frozen parameters are stored once (LoRA). Only then: fit_sizes starts jax in this process.
  shared = fit_sizes(args.model, args.lora_rank)["shared_bytes"] if args.lora_rank else 0
  result = dict(solo=solo, sweep=swept,
                speedup_vs_sequential_solo=round(swept["examples_per_s"] / solo["examples_per_s"], 3),
                memory_ratio_vs_solo=round(swept["peak_rss_bytes"] / solo["peak_rss_bytes"], 3),
                memory_limit_bytes=n * solo["peak_rss_bytes"] - (n - 1) * shared)
  result["memory_within_limit"] = swept["peak_rss_bytes"] <= result["memory_limit_bytes"]
  return result


def fit_sizes(model: str, lora_rank: int) -> dict[str, int]:
  """Trained and frozen parameter bytes of `model` (abstract: nothing allocated)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import bert as model_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import optimizer as optim  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top
  config = default_config()
  config.lora_rank = lora_rank
  bert = model_lib.BertForSequenceClassification(model_lib.BertConfig.from_hf(
      bench_lib.hf_config_dict(model), lora_rank=lora_rank, lora_alpha=16.0,
      lora_targets=("query", "value")), 2)
  dummy = np.ones((1, 8), np.int32)
  params = nn.unbox(jax.eval_shape(lambda r: bert.init(r, dummy, dummy, dummy),
                                   jax.random.key(0))["params"])
  frozen = optim.path_mask(params, optim.freeze_patterns(config))
  trained = sum(x.size for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)) if not f)
  total = sum(x.size for x in jax.tree.leaves(params))
  return dict(trained_params=int(trained), frozen_params=int(total - trained),
              member_state_bytes=int(12 * trained), shared_bytes=int(4 * (total - trained)))


def temp_bytes(model: str, batch: int, seq: int, lora_rank: int) -> int:
  """XLA's temporary bytes of the compiled solo train step (activations + gradients),
  compiled from abstract shapes (nothing allocated)."""
  from flaxbert_cls.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import step as step_lib  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import checkpoints as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import optimizer as optim  # pylint: disable=g-import-not-at-top
  exp = _experiment(argparse.Namespace(model=model, dtype="float32", lora_rank=lora_rank), 0)
  boxed, _ = exp.abstract_params()
  tx, schedule = optim.create_optimizer(exp.config, nn.unbox(boxed), 1000)
  abstract, shardings = state_lib.abstract_train_state(exp, tx)
  abstract = nn.unbox(abstract)
  step = step_lib.jit_train_step(exp, abstract.params, shardings, tx, schedule)
  batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=exp.batch_sharding)
                  for k, v in bench_lib.batch_numpy(batch, seq, 30522).items()}
  compiled = step.lower(checkpoint_lib.abstract_with_shardings(abstract, shardings),
                        batch_shapes).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def fit(args) -> list[dict[str, Any]]:
  rows = []
  for model in args.fit_models.split(","):
    for lora_rank in (0, 8):
      sizes = fit_sizes(model, lora_rank)
      temp = temp_bytes(model, args.batch, args.seq, lora_rank)
      per_member = sizes["member_state_bytes"] + temp
      row = dict(model=model, lora_rank=lora_rank, batch=args.batch, seq=args.seq, **sizes,
                 temp_bytes=temp, per_member_bytes=per_member)
      for name, capacity in DEVICE_BYTES.items():
        row[f"members_on_{name.replace(' ', '_')}"] = int((capacity - sizes["shared_bytes"])
                                                          // per_member)
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def check(args) -> list[dict[str, Any]]:
  """Every member of a 2 lr x 2 seed MiniLM sweep against its solo run (SST-2 sample)."""
  from flaxbert_cls import config as config_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import runs  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import train  # pylint: disable=g-import-not-at-top
  config = common.short_run_config(
      args.steps, train_file=os.path.join(common.DEMO_DATA, "train.tsv"),
      validation_file=os.path.join(common.DEMO_DATA, "dev.tsv"), seq_buckets=(64,),
      batch_size=16, eval_batch_size=64)
  config.sweep.learning_rate = (5e-5, 1e-4)
  config.sweep.seed = (0, 1)
  workdir = os.path.join(args.workdir, "sweep")
  result = train.train_and_evaluate(config, workdir)
  rows = []
  for i, member in enumerate(config_lib.grid(config)):
    solo = train.train_and_evaluate(config_lib.member_config(config, member),
                                    os.path.join(args.workdir, f"solo{i}"))
    _, params = runs.load_run(workdir, member=i)
    ratios = [float(np.abs(a - b).max() / max(np.abs(b).max(), member["learning_rate"]))
              for a, b in zip(jax.tree.leaves(jax.device_get(params)),
                              jax.tree.leaves(jax.device_get(solo["state"].params)))]
    row = dict(member=i, **member, max_relative_param_diff=max(ratios),
               sweep_accuracy=result["eval"][f"member{i}/accuracy"],
               solo_accuracy=solo["eval"]["accuracy"])
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="minilm", help="minilm, bert-base, ... or a directory")
  parser.add_argument("--members", type=int, default=4)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--lora_rank", type=int, default=0)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--fit", action="store_true", help="members per device (analytic)")
  parser.add_argument("--fit_models", default="minilm,bert-base")
  parser.add_argument("--check", action="store_true", help="members == solo runs (MiniLM)")
  parser.add_argument("--workdir", default="/tmp/bench_sweep")
  parser.add_argument("--json", default="", help="also write the result here")
  args = parser.parse_args()
  t = time.time()
  if args.worker:
    print(json.dumps(worker(args)), flush=True)
    return
  result = fit(args) if args.fit else check(args) if args.check else compare(args)
  text = json.dumps(result, indent=1)
  print(text)
  print(f"({time.time() - t:.0f} s)", file=sys.stderr)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
