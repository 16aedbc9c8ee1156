r"""Writes and submits an sbatch script for multi-node, multi-GPU `flaxbert-cls train`.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu \
      --workdir=/shared/runs/bert-large-mnli [--dry-run] [-- --config.learning_rate=2e-5 ...]

One process per GPU (`--ntasks-per-node` = GPUs per node). Every task sees all of
its node's GPUs and jax's SLURM detection gives process i of a node GPU
$SLURM_LOCALID, the coordinator (the first node) and the process count: the trainer
calls `jax.distributed.initialize()` by itself when SLURM_NTASKS > 1. The repo and
its virtual environment must be on a file system every node sees, and so must
--workdir (all processes write their checkpoint shards there).

Preemption and time limits: SLURM sends SIGTERM before the limit (--signal), the
trainer saves a checkpoint and exits 75, and the script requeues the job; the
requeued job resumes from the latest checkpoint in --workdir. --dry-run prints the
script and the sbatch command and submits nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

import launcher_args  # launch/ is on sys.path: these run as scripts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED_EXIT_CODE = 75  # flaxbert_cls.errors: the run saved a checkpoint and stopped

# GPU defaults; --env KEY=VALUE adds or overrides.
DEFAULT_ENV = {
    # Preallocate 90% of each GPU (jax's default is 75%): room for bigger batches.
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
    # Overlap collectives (FSDP all-gathers, gradient reductions) with compute.
    "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "NCCL_DEBUG": "WARN",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def sbatch_script(args: argparse.Namespace) -> str:
  env = dict(DEFAULT_ENV)
  for item in args.env:
    key, _, value = item.partition("=")
    env[key] = value
  directives = [
      f"--job-name={args.job_name}",
      f"--nodes={args.nodes}",
      f"--ntasks-per-node={args.gpus_per_node}",  # one process per GPU
      f"--gpus-per-node={args.gpus_per_node}",  # all visible to every task (no per-task binding)
      f"--cpus-per-task={args.cpus_per_task}",
      f"--time={args.time}",
      f"--output={os.path.join(args.workdir, 'slurm-%j.out')}",
      "--requeue",
      f"--signal=TERM@{args.signal_s}",  # time to save a checkpoint before the limit
  ]
  if args.partition:
    directives.append(f"--partition={args.partition}")
  if args.account:
    directives.append(f"--account={args.account}")
  directives += args.sbatch
  train = ["python", "-m", "flaxbert_cls.cli", "train", f"--config={args.config}",
           f"--workdir={args.workdir}", *args.train_args]
  lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
      "",
      "# Written by launch/slurm.py. Nodes x GPUs processes; jax finds them through SLURM.",
      "set -uo pipefail",
      f"cd {shlex.quote(args.repo)}",
      f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}",
  ] + [f"export {k}={shlex.quote(v)}" for k, v in env.items()] + [
      "",
      f"srun --kill-on-bad-exit=1 {shlex.join(train)}",
      "status=$?",
      f"if [ \"$status\" -eq {PREEMPTED_EXIT_CODE} ]; then",
      "  # Saved a checkpoint on SIGTERM: go back in the queue; the rerun resumes from it.",
      "  scontrol requeue \"$SLURM_JOB_ID\"",
      "fi",
      "exit $status",
      "",
  ]
  return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = launcher_args.parser(__doc__)
  p.add_argument("--job_name", default="flaxbert-cls")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--cpus_per_task", type=int, default=8)
  p.add_argument("--time", default="24:00:00", help="wall-clock limit (HH:MM:SS)")
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--signal_s", type=int, default=300,
                 help="SIGTERM this many seconds before the time limit")
  p.add_argument("--sbatch", action="append", default=[], metavar="--KEY=VALUE",
                 help="extra #SBATCH directive (repeatable), e.g. --sbatch=--exclusive")
  p.add_argument("--workdir", required=True, help="on a shared file system")
  p.add_argument("--config", default="configs/bert_large_gpu_node.py",
                 help="config file, relative to --repo")
  p.add_argument("--repo", default=REPO, help="this repo, as the nodes see it")
  p.add_argument("--venv", default=os.path.join(REPO, ".venv"),
                 help="virtual environment with `pip install -e '.[gpu]'`")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment for the trainer (repeatable; overrides the defaults)")
  p.add_argument("--script", default="", help="where to write the script "
                 "(default: WORKDIR/flaxbert-cls.sbatch)")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the script and the sbatch command, submit nothing")
  args = launcher_args.parse(p, argv)
  args.workdir = os.path.abspath(args.workdir)
  args.script = args.script or os.path.join(args.workdir, "flaxbert-cls.sbatch")
  if args.nodes < 1 or args.gpus_per_node < 1:
    p.error("--nodes and --gpus_per_node must be >= 1")
  return args


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  script = sbatch_script(args)
  submit = ["sbatch", args.script]
  if args.dry_run:
    print(f"# {args.script}\n{script}\n# submit\n{shlex.join(submit)}")
    return 0
  os.makedirs(os.path.dirname(args.script), exist_ok=True)
  os.makedirs(args.workdir, exist_ok=True)
  with open(args.script, "w") as f:
    f.write(script)
  print(f"[slurm] wrote {args.script}; {shlex.join(submit)}", flush=True)
  return subprocess.run(submit, check=False).returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
