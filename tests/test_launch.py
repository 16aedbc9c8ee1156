"""Launchers' --dry-run output, and the scale-out config presets."""

import os
import shlex
import subprocess
import sys

import pytest

from flaxbert_cls import config as config_lib
from flaxbert_cls.model import sharding
from model_fixtures import REPO


def _dry_run(script: str, *args: str) -> str:
  argv = list(args)
  # --dry-run before any '--' (after it, arguments go to the trainer).
  argv.insert(argv.index("--") if "--" in argv else len(argv), "--dry-run")
  result = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *argv],
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout


def _commands(output: str) -> dict[str, list[str]]:
  """'# step' header lines followed by one shell command each -> {step: argv}."""
  lines = output.strip().splitlines()
  return {lines[i][2:]: shlex.split(lines[i + 1].split("   #")[0])
          for i in range(0, len(lines), 2)}


def test_tpu_vm_dry_run_v4_32_pod():
  out = _dry_run("tpu_vm.py", "--name=bert-mnli", "--zone=us-central2-b",
                 "--accelerator_type=v4-32", "--workdir=gs://bucket/runs/mnli", "--spot",
                 "--", "--config.learning_rate=3e-5")
  steps = _commands(out)
  assert list(steps) == ["archive", "create", "copy", "install", "train", "delete"]
  assert steps["archive"][:4] == ["git", "-C", REPO, "archive"]
  assert steps["create"] == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "bert-mnli", "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base", "--zone=us-central2-b", "--spot"]
  assert "--worker=all" in steps["copy"]
  for step in ("install", "train"):
    assert steps[step][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bert-mnli"]
    assert "--worker=all" in steps[step]
  assert "pip install" in steps["install"][-2] and "flaxbert-cls[tpu]" in steps["install"][-2]
  remote = next(a for a in steps["train"] if a.startswith("--command="))
  assert "FLAXBERT_DISTRIBUTED=auto" in remote  # jax finds the pod's hosts itself
  train = shlex.split(remote.split("&&", 1)[1].split("2>&1")[0])
  assert train[train.index("python3"):] == [
      "python3", "-m", "flaxbert_cls.cli", "train", "--config=configs/bert_base_tpu_pod.py",
      "--workdir=gs://bucket/runs/mnli", "--config.learning_rate=3e-5"]
  assert steps["delete"] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "bert-mnli",
                             "--quiet", "--zone=us-central2-b"]


def test_tpu_vm_dry_run_queued_resource_and_keep():
  steps = _commands(_dry_run("tpu_vm.py", "--name=q", "--zone=us-east5-a", "--project=p",
                             "--accelerator_type=v5p-64", "--workdir=gs://b/r", "--queued",
                             "--keep"))
  assert list(steps) == ["archive", "create", "wait", "copy", "install", "train"]
  assert steps["create"][3:6] == ["queued-resources", "create", "q"]
  assert "--runtime-version=v2-alpha-tpuv5" in steps["create"]
  assert "--project=p" in steps["create"]
  assert steps["wait"][3:5] == ["queued-resources", "describe"]


@pytest.mark.parametrize("args,message", [
    (["--workdir=/tmp/x", "--dry-run"], "gs://"),
    (["--workdir=gs://b/x", "--", "--dry-run"], "before --"),  # would have run it for real
])
def test_tpu_vm_refuses(args, message):
  result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu_vm.py"),
                           "--name=x", "--zone=z", *args],
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2 and message in result.stderr


def test_slurm_dry_run_two_nodes_of_eight_gpus(tmp_path):
  workdir = str(tmp_path / "run")
  out = _dry_run("slurm.py", "--nodes=2", "--gpus_per_node=8", "--partition=gpu",
                 f"--workdir={workdir}", "--env=NCCL_IB_HCA=mlx5", "--",
                 "--config.learning_rate=2e-5")
  lines = out.splitlines()
  directives = [l.split(" ", 1)[1] for l in lines if l.startswith("#SBATCH")]
  for d in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
            "--requeue"):
    assert d in directives
  assert not any(d.startswith("--gpus-per-task") for d in directives)  # all GPUs per task
  assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in lines
  assert "export NCCL_IB_HCA=mlx5" in lines
  srun = next(l for l in lines if l.startswith("srun "))
  assert shlex.split(srun)[2:] == [
      "python", "-m", "flaxbert_cls.cli", "train", "--config=configs/bert_large_gpu_node.py",
      f"--workdir={workdir}", "--config.learning_rate=2e-5"]
  assert 'scontrol requeue "$SLURM_JOB_ID"' in out  # exit 75 (preempted) goes back in the queue
  assert lines[-1] == f"sbatch {os.path.join(workdir, 'flaxbert-cls.sbatch')}"
  assert not os.path.exists(workdir)  # a dry run writes nothing


def _load_config(name: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# BERT-base fits a TPU chip many times over: data parallel (FSDP would all-gather every
# weight each step); BERT-large on a GPU node: FSDP over the node's 8 GPUs.
@pytest.mark.parametrize("name,devices,fsdp", [("bert_base_tpu_pod.py", (16, 32, 256), 1),
                                               ("bert_large_gpu_node.py", (8, 16, 64), 8)])
def test_presets_are_valid_mesh_configs(name, devices, fsdp):
  c = _load_config(name)
  config_lib.validate(c)
  assert c.dtype == "bfloat16" and c.task_name == "mnli"
  assert dict(c.logical_axis_rules)["embed"] == "fsdp"
  for n in devices:  # v4-32 .. 256 chips; 1, 2 and 8 nodes of 8 GPUs
    shape = dict(zip(c.mesh_axes, sharding.mesh_shape_for(c.mesh_shape, n)))
    assert shape["fsdp"] == fsdp and shape["data"] * shape["fsdp"] == n
    assert c.batch_size % (shape["data"] * shape["fsdp"]) == 0
    assert c.eval_batch_size % (shape["data"] * shape["fsdp"]) == 0
