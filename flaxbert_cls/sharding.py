"""Device mesh and shardings; logical axis rules come from the config, not from code."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxbert_cls.errors import UserError

# The batch dimension of every input is split over these mesh axes.
BATCH_AXES = ("data", "fsdp")


def mesh_shape_for(axis_sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry to 'the remaining devices' and checks the product."""
  sizes = list(axis_sizes)
  if sizes.count(-1) > 1:
    raise UserError(f"config.mesh_shape={tuple(axis_sizes)}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise UserError(f"config.mesh_shape={tuple(axis_sizes)} does not fit {num_devices} devices")
  if -1 in sizes:
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise UserError(f"config.mesh_shape={tuple(axis_sizes)} uses {int(np.prod(sizes))} devices, "
                    f"but {num_devices} are there")
  return tuple(sizes)


def create_mesh(axis_names: Sequence[str], axis_sizes: Sequence[int],
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all), laid out by jax's mesh_utils for locality."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape_for(axis_sizes, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  (CPU/odd topologies: a plain reshape is fine)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, tuple(axis_names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of nn.Partitioned boxes (from jax.eval_shape of an init)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def initialize_distributed() -> None:
  """Joins a multi-process run when the environment says there is one.

  Explicit: FLAXBERT_COORDINATOR=host:port, FLAXBERT_NUM_PROCESSES, FLAXBERT_PROCESS_ID.
  Otherwise jax auto-detects SLURM (more than one task) and Cloud TPU pods.
  Single-process runs need nothing.
  """
  import os  # pylint: disable=g-import-not-at-top
  coordinator = os.environ.get("FLAXBERT_COORDINATOR")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["FLAXBERT_NUM_PROCESSES"]),
                               process_id=int(os.environ["FLAXBERT_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES",
                                                                       "").count(",") > 0:
    jax.distributed.initialize()
