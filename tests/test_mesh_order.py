"""Meshes keep mesh_utils' device order even where it alternates hosts (TPU ICI rings).

A real 2-process run on 127.0.0.1 (4 CPU devices each) builds meshes whose batch blocks
alternate processes, and whose tensor axis spans both; each process feeds the rows its
devices hold (data.process_rows / data.to_global), and the assembled global batches equal
the 1-process batches exactly.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.training import experiment
from flaxbert_cls.model import sharding
from flaxbert_cls.config import default_config
from flaxbert_cls.errors import UserError
from model_fixtures import DEMO_DATA, REPO, make_tiny_checkpoint
from conftest import free_port

TIMEOUT_S = 180

WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flaxbert_cls.data import batching as data_lib
    from flaxbert_cls.data.tokenization import TokenizedSplit

    port, pid, out = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(pid))
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=53)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    split = TokenizedSplit(rng.integers(1, 999, offsets[-1]).astype(np.int32),
                           np.zeros(offsets[-1], np.int8), offsets,
                           rng.integers(0, 3, 53).astype(np.int32), 0, "")
    # Process-interleaved order, as mesh_utils can give on a pod: p0d0, p1d0, p0d1, ...
    devices = sorted(jax.devices(), key=lambda d: (d.id % 4, d.process_index))
    assert [d.process_index for d in devices[:4]] == [0, 1, 0, 1]
    gathered = {}
    for shape in ((8, 1, 1), (2, 2, 2), (4, 1, 2), (1, 1, 8)):
      mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), ("data", "fsdp", "tensor"))
      batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
      order = data_lib.TrainOrder(split.lengths, 16, 0, 0)
      mixture = data_lib.TaskMixture([order], np.ones(1), 0)
      for step in range(4):
        local = data_lib.train_batch([split], mixture, step, (8, 16, 32), 32,
                                     sharding=batch_sharding)
        batch = data_lib.to_global(local, batch_sharding)
        for k, v in batch.items():
          gathered[f"train/{shape}/{step}/{k}"] = np.asarray(
              multihost_utils.process_allgather(v, tiled=True))
      for i, (rows, local) in enumerate(data_lib.eval_batches(split, 24, (8, 16, 32), 32,
                                                              batch_sharding)):
        gathered[f"eval/{shape}/{i}/rows"] = rows
        for k, v in data_lib.to_global(local, batch_sharding).items():
          gathered[f"eval/{shape}/{i}/{k}"] = np.asarray(
              multihost_utils.process_allgather(v, tiled=True))
    np.savez(f"{out}.{pid}.npz", **gathered)
""")


def _split_and_expected():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 30, size=53)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  split = data_lib.TokenizedSplit(rng.integers(1, 999, offsets[-1]).astype(np.int32),
                                  np.zeros(offsets[-1], np.int8), offsets,
                                  rng.integers(0, 3, 53).astype(np.int32), 0, "")
  order = data_lib.TrainOrder(split.lengths, 16, 0, 0)
  expected = {}
  for step in range(4):
    rows = order.batch_indices(step)
    seq = data_lib.bucket_for(int(split.lengths[rows].max()), (8, 16, 32), 32)
    expected[step] = data_lib.pad_rows(split, rows, seq)
  return split, expected


def test_interleaved_meshes_feed_the_same_global_batches_as_one_process(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("FLAXBERT_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  (tmp_path / "worker.py").write_text(WORKER)
  out, port = str(tmp_path / "out"), free_port()
  procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(port), str(i), out],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True) for i in range(2)]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    texts = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      os.killpg(p.pid, signal.SIGKILL)
    pytest.fail(f"2-process mesh test did not finish in {TIMEOUT_S}s (hang?)")
  for p, text in zip(procs, texts):
    assert p.returncode == 0, text[-4000:]
  split, expected = _split_and_expected()
  for pid in range(2):
    with np.load(f"{out}.{pid}.npz") as got:
      keys = list(got.keys())
      assert len([k for k in keys if k.startswith("train/")]) == 4 * 4 * 5
      for key in keys:
        kind, shape, i, name = key.split("/")
        if kind == "train":
          np.testing.assert_array_equal(got[key], expected[int(i)][name], err_msg=key)
        elif name != "rows":
          rows = got[f"eval/{shape}/{i}/rows"]
          seq = got[f"eval/{shape}/{i}/input_ids"].shape[1]
          np.testing.assert_array_equal(got[key], data_lib.pad_rows(split, rows, seq)[name],
                                        err_msg=key)


def test_device_grid_keeps_mesh_utils_order():
  devices = jax.devices()
  grid = sharding.device_grid((len(devices), 1, 1), devices)
  assert list(grid.flat) == list(mesh_utils.create_device_mesh((len(devices), 1, 1), devices).flat)


def test_single_process_positions_cover_the_batch():
  mesh = Mesh(np.asarray(jax.devices()).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  n = 8 * len(jax.devices())
  np.testing.assert_array_equal(data_lib.local_positions(n, batch_sharding), np.arange(n))
  local = {"x": np.arange(n * 3).reshape(n, 3)}
  np.testing.assert_array_equal(np.asarray(data_lib.to_global(local, batch_sharding)["x"]),
                                local["x"])


class _Device:
  def __init__(self, memory_bytes):
    self.memory_bytes = memory_bytes

  def memory_stats(self):
    return {"bytes_limit": self.memory_bytes} if self.memory_bytes else None


def test_automatic_mesh_is_data_parallel_when_the_state_fits_else_fsdp_over_the_fewest():
  names = ("data", "fsdp", "tensor")
  gib = 2**30
  # BERT-base: 110M params x 16 bytes = 1.8 GB of state; a 16 GiB chip holds it easily.
  assert sharding.auto_mesh_shape(names, 110_000_000 * 16, [_Device(16 * gib)] * 8) == (8, 1, 1)
  # 20 GiB of state on 16 GiB chips: 35% is 5.6 GiB, so 4 devices per FSDP group.
  assert sharding.auto_mesh_shape(names, 20 * gib, [_Device(16 * gib)] * 8) == (2, 4, 1)
  assert sharding.auto_mesh_shape(names, 20 * gib, [_Device(None)] * 8) == (8, 1, 1)  # CPU
  with pytest.raises(UserError, match=r"does not fit .* even over all 8 devices"):
    sharding.auto_mesh_shape(names, 400 * gib, [_Device(16 * gib)] * 8)


def test_automatic_mesh_shape_builds_the_experiment_on_the_chosen_mesh(tmp_path):
  n = len(jax.devices())
  c = default_config()
  c.model_name_or_path = make_tiny_checkpoint(str(tmp_path / "tiny"))
  c.train_file = os.path.join(DEMO_DATA, "train.tsv")
  c.validation_file = os.path.join(DEMO_DATA, "dev.tsv")
  c.mesh_shape = ()
  c.batch_size = c.eval_batch_size = 8 * n
  exp = experiment.build_experiment(c)
  assert tuple(exp.config.mesh_shape) == (n, 1, 1)  # CPU devices report no memory: DP
  assert exp.mesh.shape["data"] == n
