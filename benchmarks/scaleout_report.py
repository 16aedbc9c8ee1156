r"""Scale-out figures: the same fine-tune on several meshes, and state memory per device.

Trains the packaged pre-trained MiniLM for 20 steps (sequence length 16, batch 16,
dropout as in its config) on 8 simulated CPU devices with each mesh
(data, fsdp, tensor), with the package's experiment, state, sharding and train step, and
compares losses, final parameters and dev accuracy with one device.
Then measures the per-device bytes of parameters + optimizer state, from the
arrays' addressable shards, replicated vs FSDP over 8 devices.

  python benchmarks/scaleout_report.py [--steps=20]

tests/test_scaleout.py asserts on the same runs (tests/scaleout_fixtures.py).
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: 8 simulated CPU devices (a no-op when the caller set XLA_FLAGS).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# benchmarks/ itself, for `common`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,g-bad-import-order
import argparse
import logging
import tempfile

import jax

import common  # noqa: F401  (the repository on sys.path)
sys.path.insert(0, os.path.join(common.REPO, "tests"))
from scaleout_fixtures import (MESHES, initial_state_bytes, max_param_diff, max_rel_loss_diff,
                               run_mesh, small_dev_file)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  assert jax.device_count() == 8, f"needs 8 devices, found {jax.device_count()}"
  with tempfile.TemporaryDirectory() as tmp:
    dev = small_dev_file(tmp)
    results = {m: run_mesh(m, dev, args.steps, evaluate=True) for m in MESHES}
    ref = results[MESHES[0]]
    print(f"MiniLM-L6 (22.7M parameters), {args.steps} steps, batch 16, seq 16, dropout 0.1, "
          "8 simulated CPU devices\n")
    print(f"{'mesh (data,fsdp,tensor)':>24} {'final loss':>11} {'max rel loss diff':>18} "
          f"{'max |param diff|':>17} {'eval acc':>9} {'state MB/device':>16} {'wall s':>7} "
          f"{'CPU s':>6}")
    for mesh, r in results.items():
      print(f"{str(mesh):>24} {r['losses'][-1]:>11.6f} "
            f"{max_rel_loss_diff(r['losses'], ref['losses']):>18.2e} "
            f"{max_param_diff(r['params'], ref['params']):>17.2e} {r['eval']['accuracy']:>9.4f} "
            f"{r['state_bytes'] / 2**20:>16.1f} {r['seconds']:>7.1f} {r['cpu_seconds']:>6.1f}")
    replicated = initial_state_bytes((8, 1, 1), dev)
    fsdp = initial_state_bytes((1, 8, 1), dev)
    print(f"\nparams + optimizer state per device: replicated (8,1,1) {replicated / 2**20:.1f} MB, "
          f"fsdp=8 (1,8,1) {fsdp / 2**20:.1f} MB = 1/{replicated / fsdp:.2f}")


if __name__ == "__main__":
  main()
