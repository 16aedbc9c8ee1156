r"""Runs `flaxbert-cls train` on a Cloud TPU VM (one host or a pod slice), start to finish.

  python launch/tpu_vm.py --name=bert-mnli --zone=us-central2-b --accelerator_type=v4-32 \
      --workdir=gs://BUCKET/runs/bert-mnli [--spot] [--queued] [--dry-run] \
      [-- --config.learning_rate=3e-5 ...]

Steps: pack the repo at --ref (git archive) -> create the TPU VM (or a queued
resource; --spot for spot capacity) -> copy and pip-install the package on every
worker -> run the training command on all workers at once (`gcloud compute tpus
tpu-vm ssh --worker=all`), streaming their logs here -> delete the TPU (--keep to
keep it). --dry-run prints the exact commands and runs nothing. Only the Python
standard library is used, so it runs anywhere gcloud does.

Preemption: the checkpoints are in --workdir (gs://), so the same command again
(new TPU, same --workdir) resumes from the latest one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

import launcher_args  # launch/ is on sys.path: these run as scripts
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED_EXIT_CODE = 75  # flaxbert_cls.errors: the run saved a checkpoint and stopped
REMOTE_ARCHIVE = "/tmp/flaxbert-cls.tar.gz"

# Default TPU VM software per generation (see the Cloud TPU "TPU software versions" page).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
}


def default_runtime_version(accelerator_type: str) -> str:
  generation = accelerator_type.rsplit("-", 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise SystemExit(f"--accelerator_type={accelerator_type}: pass --runtime_version too "
                     f"(known generations: {', '.join(RUNTIME_VERSIONS)})")
  return RUNTIME_VERSIONS[generation]


def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd


def archive_command(args: argparse.Namespace) -> list[str]:
  # Committed files at --ref: what runs on the pod is exactly a commit.
  return ["git", "-C", REPO, "archive", "--format=tar.gz", "--prefix=flaxbert-cls/",
          f"--output={args.local_archive}", args.ref]


def create_command(args: argparse.Namespace) -> list[str]:
  if args.queued:
    cmd = _gcloud(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                  f"--accelerator-type={args.accelerator_type}",
                  f"--runtime-version={args.runtime_version}")
  else:
    cmd = _gcloud(args, "tpu-vm", "create", args.name,
                  f"--accelerator-type={args.accelerator_type}",
                  f"--version={args.runtime_version}")
  if args.spot:
    cmd.append("--spot")
  return cmd


def queued_state_command(args: argparse.Namespace) -> list[str]:
  return _gcloud(args, "queued-resources", "describe", args.name, "--format=value(state.state)")


def copy_command(args: argparse.Namespace) -> list[str]:
  return _gcloud(args, "tpu-vm", "scp", args.local_archive, f"{args.name}:{REMOTE_ARCHIVE}",
                 "--worker=all")


def ssh_all(args: argparse.Namespace, remote: str) -> list[str]:
  return _gcloud(args, "tpu-vm", "ssh", args.name, "--worker=all", f"--command={remote}")


def install_remote(args: argparse.Namespace) -> str:
  return ("set -e; rm -rf $HOME/flaxbert-cls; "
          f"tar -xzf {REMOTE_ARCHIVE} -C $HOME; "
          "python3 -m pip install -q -U \"$HOME/flaxbert-cls[tpu]\" "
          + " ".join(shlex.quote(r) for r in args.pip_extra)).rstrip()


def train_remote(args: argparse.Namespace) -> str:
  """The training command every worker runs (the same on all; jax finds the pod)."""
  train = ["python3", "-m", "flaxbert_cls.cli", "train", f"--config={args.config}",
           f"--workdir={args.workdir}", *args.train_args]
  env = ["FLAXBERT_DISTRIBUTED=auto", "TF_CPP_MIN_LOG_LEVEL=2", *args.env]
  # Each worker keeps its own log too; pipefail keeps the trainer's exit status.
  return (f"set -o pipefail; cd $HOME/flaxbert-cls && {' '.join(shlex.quote(e) for e in env)} "
          f"{shlex.join(train)} 2>&1 | tee -a $HOME/flaxbert-cls-train.log")


def delete_command(args: argparse.Namespace) -> list[str]:
  if args.queued:
    return _gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet")
  return _gcloud(args, "tpu-vm", "delete", args.name, "--quiet")


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
  """(step name, argv) in order; 'wait' is polled until the queued resource is ACTIVE."""
  steps = [("archive", archive_command(args))]
  if not args.reuse:
    steps.append(("create", create_command(args)))
    if args.queued:
      steps.append(("wait", queued_state_command(args)))
  steps += [("copy", copy_command(args)), ("install", ssh_all(args, install_remote(args))),
            ("train", ssh_all(args, train_remote(args)))]
  if not args.keep:
    steps.append(("delete", delete_command(args)))
  return steps


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = launcher_args.parser(__doc__)
  p.add_argument("--name", required=True, help="TPU (and queued resource) name")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p)")
  p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  p.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-8, v4-32, v5p-64, v6e-16")
  p.add_argument("--runtime_version", default="", help="default: by TPU generation")
  p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  p.add_argument("--queued", action="store_true",
                 help="create through a queued resource (waits for capacity)")
  p.add_argument("--workdir", required=True,
                 help="gs://BUCKET/PATH: every worker writes its checkpoint shards there")
  p.add_argument("--config", default="configs/bert_base_tpu_pod.py",
                 help="config file, relative to the repo root")
  p.add_argument("--ref", default="HEAD", help="git commit/branch/tag to run")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="extra environment for the trainer (repeatable)")
  p.add_argument("--pip_extra", action="append", default=[],
                 help="extra pip requirement to install on the workers (repeatable)")
  p.add_argument("--reuse", action="store_true", help="the TPU exists already: skip create")
  p.add_argument("--keep", action="store_true", help="do not delete the TPU at the end")
  p.add_argument("--wait_timeout_s", type=int, default=6 * 3600,
                 help="queued resource: give up waiting for ACTIVE after this long")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the commands, run nothing")
  args = launcher_args.parse(p, argv)
  if not args.workdir.startswith("gs://"):
    p.error("--workdir must be gs://...: a pod's workers share nothing else")
  args.runtime_version = args.runtime_version or default_runtime_version(args.accelerator_type)
  args.local_archive = f"/tmp/flaxbert-cls-{args.name}.tar.gz"
  return args


def _wait_active(cmd: list[str], timeout_s: int) -> None:
  deadline = time.time() + timeout_s
  while True:
    state = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    print(f"[tpu_vm] queued resource: {state}", flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise SystemExit(f"queued resource is {state}")
    if time.time() > deadline:
      raise SystemExit(f"queued resource not ACTIVE after {timeout_s}s")
    time.sleep(30)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  steps = plan(args)
  if args.dry_run:
    for name, cmd in steps:
      suffix = "   # repeat until it prints ACTIVE" if name == "wait" else ""
      print(f"# {name}\n{shlex.join(cmd)}{suffix}")
    return 0
  created = False
  status = 0
  try:
    for name, cmd in steps:
      if name == "delete":
        break
      print(f"[tpu_vm] {name}: {shlex.join(cmd)}", flush=True)
      if name == "wait":
        _wait_active(cmd, args.wait_timeout_s)
        continue
      status = subprocess.run(cmd, check=False).returncode
      # Only a TPU this run made (or --reuse named) is deleted: a failed create may
      # mean the name belongs to another TPU.
      created = created or (name == "create" and status == 0)
      if status:
        break
  finally:
    if not args.keep and (created or args.reuse):
      print(f"[tpu_vm] delete: {shlex.join(delete_command(args))}", flush=True)
      subprocess.run(delete_command(args), check=False)
  if status == PREEMPTED_EXIT_CODE:
    print("[tpu_vm] preempted; the checkpoint is saved: run the same command to resume",
          file=sys.stderr)
  elif status:
    print(f"[tpu_vm] failed with exit status {status}; the same command resumes from the "
          f"latest checkpoint in {args.workdir}", file=sys.stderr)
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
