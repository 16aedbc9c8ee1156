"""Device mesh and shardings; logical axis rules come from the config, not from code."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

# The batch dimension of every input is split over these mesh axes (major to minor).
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
  return Mesh(device_grid(axis_names, mesh_shape_for(axis_sizes, len(devices)), devices),
              tuple(axis_names))


def device_grid(axis_names: Sequence[str], shape: Sequence[int],
                devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as `shape`: topology-aware, and process-major along the batch axes.

  Every process feeds its own contiguous slice of each global batch (data.process_rows),
  so process p's devices must hold exactly the p-th block of batch rows. mesh_utils
  picks a fast order on TPU pods, but that order can interleave hosts along an axis;
  then we regroup the devices by process (locality is kept within each host).
  """
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  (CPU/odd topologies: a plain reshape is fine)
    grid = np.asarray(devices, dtype=object).reshape(shape)
  if _batch_is_process_major(grid, axis_names):
    return grid
  grid = _process_major_grid(axis_names, shape, devices)
  log.info("Regrouped the device mesh by process along %s (one batch block per host).",
           "x".join(_batch_axes(axis_names)))
  return grid


def _batch_axes(axis_names: Sequence[str]) -> list[str]:
  return [a for a in BATCH_AXES if a in axis_names]


def _batch_major(grid: np.ndarray, axis_names: Sequence[str]) -> np.ndarray:
  """The grid as [batch position, other devices]: batch axes first, data-major."""
  names = list(axis_names)
  batch = [names.index(a) for a in _batch_axes(names)]
  rest = [i for i in range(len(names)) if i not in batch]
  dp = int(np.prod([grid.shape[i] for i in batch]))
  return np.transpose(grid, batch + rest).reshape(dp, -1)


def _batch_is_process_major(grid: np.ndarray, axis_names: Sequence[str]) -> bool:
  """True if batch block p (of as many blocks as processes) lives on process p only."""
  rows = _batch_major(grid, axis_names)
  processes = sorted({d.process_index for d in grid.flat})
  if len(rows) % len(processes):
    return False
  per_process = len(rows) // len(processes)
  return all({d.process_index for d in row} == {processes[j // per_process]}
             for j, row in enumerate(rows))


def _process_major_grid(axis_names: Sequence[str], shape: Sequence[int],
                        devices: Sequence[Any]) -> np.ndarray:
  names = list(axis_names)
  by_process: dict[int, list[Any]] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  batch = [names.index(a) for a in _batch_axes(names)]
  rest = [i for i in range(len(names)) if i not in batch]
  dp = int(np.prod([shape[i] for i in batch]))
  num_processes = len(by_process)
  counts = {len(v) for v in by_process.values()}
  if dp % num_processes or len(counts) != 1:
    raise UserError(
        f"mesh {dict(zip(names, shape))} over {num_processes} processes: the batch axes "
        f"{'x'.join(_batch_axes(names)) or '(none)'} = {dp} must be a multiple of the number of "
        "processes (each process feeds its own rows), with the same device count per process")
  local_shape = (dp // num_processes, int(np.prod([shape[i] for i in rest])))
  blocks = []
  for p in sorted(by_process):
    local = sorted(by_process[p], key=lambda d: d.id)
    try:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      blocks.append(mesh_utils.create_device_mesh(local_shape, local))
    except Exception:  # pylint: disable=broad-except
      blocks.append(np.asarray(local, dtype=object).reshape(local_shape))
  stacked = np.concatenate(blocks, axis=0)  # [dp, rest]
  # Undo _batch_major: split into the axes' sizes, then back to the mesh's axis order.
  stacked = stacked.reshape([shape[i] for i in batch] + [shape[i] for i in rest])
  return np.transpose(stacked, np.argsort(batch + rest))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(_batch_axes(mesh.axis_names))))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Logical names of activation dimensions; model.py pins activations with them when it
# runs on a mesh. Unless the config's rules name them, `activation_rules` derives
# their rules: the batch is split like the inputs (over BATCH_AXES), attention heads
# and MLP features like their weights ('heads', 'mlp'). Pinning the batch is what
# makes 'fsdp' FSDP: without it XLA may keep the weights split and gather the batch.
ACTIVATION_BATCH = "activation_batch"
ACTIVATION_HEADS = "activation_heads"
ACTIVATION_MLP = "activation_mlp"


def activation_rules(rules: Sequence[tuple[str, Any]], mesh: Mesh
                     ) -> tuple[tuple[str, Any], ...]:
  """The config's rules (as hashable tuples, axes not in `mesh` dropped) + activation rules."""
  rules = tuple((str(name), _present_axes(target, mesh)) for name, target in rules)
  first: dict[str, Any] = {}
  for name, target in rules:
    first.setdefault(name, target)
  batch = tuple(_batch_axes(mesh.axis_names))
  derived = ((ACTIVATION_BATCH, batch if len(batch) > 1 else batch[0] if batch else None),
             (ACTIVATION_HEADS, first.get("heads")),
             (ACTIVATION_MLP, first.get("mlp")))
  return rules + tuple((name, target) for name, target in derived if name not in first)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh,
              rules: Sequence[tuple[str, Any]]) -> jax.Array:
  """Pins `x` (inside jit) to the sharding its logical axes get from `rules` on `mesh`.

  A mesh axis that does not divide its dimension is left out (e.g. the batch of 1
  that initializes the model), as for parameters.
  """
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), tuple(rules))
  sharding, _ = _fit(NamedSharding(mesh, spec), x.shape)
  return jax.lax.with_sharding_constraint(x, sharding)


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                         min_size_to_shard_mb: float = 0.0) -> Any:
  """NamedShardings for a tree of nn.Partitioned boxes (from jax.eval_shape of an init).

  Rule targets that are not axes of `mesh` are dropped, and so is a mesh axis that
  does not divide its dimension (BERT's vocab of 30522 over tensor=4): that
  dimension stays replicated over it instead of failing. Tensors under
  `min_size_to_shard_mb` are not split over the batch axes (FSDP): gathering many
  small tensors costs more than keeping a copy (big_vision's idea).
  """
  rules = [(name, _present_axes(target, mesh)) for name, target in rules]
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  min_bytes = min_size_to_shard_mb * 2**20

  def fit(path, s, x):
    if x.size * np.dtype(x.dtype).itemsize < min_bytes:
      s = _without_axes(s, BATCH_AXES)
    return _fit_to_shape(s, x, jax.tree_util.keystr(path))

  return jax.tree_util.tree_map_with_path(fit, shardings, nn.unbox(boxed_tree))


def _without_axes(sharding: NamedSharding, drop: Sequence[str]) -> NamedSharding:
  spec = []
  for entry in sharding.spec:
    axes = () if entry is None or entry is P.UNCONSTRAINED else (
        (entry,) if isinstance(entry, str) else tuple(entry))
    kept = tuple(a for a in axes if a not in drop)
    spec.append(entry if kept == axes else (None if not kept else kept[0] if len(kept) == 1
                                            else kept))
  return NamedSharding(sharding.mesh, P(*spec))


def check_heads(rules: Sequence[tuple[str, Any]], mesh: Mesh, num_heads: int) -> None:
  """The mesh axes that split attention heads must divide their number (one line if not)."""
  target = dict((str(name), _present_axes(t, mesh)) for name, t in reversed(tuple(rules)))
  axes = target.get("heads")
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  size = int(np.prod([mesh.shape[a] for a in axes]))
  if num_heads % size:
    raise UserError(f"mesh axis {'x'.join(axes)}={size} does not divide the model's "
                    f"{num_heads} attention heads; set config.mesh_shape so that it does")


def _present_axes(target: Any, mesh: Mesh) -> Any:
  if target is None:
    return None
  axes = (target,) if isinstance(target, str) else tuple(target)
  kept = tuple(a for a in axes if a in mesh.axis_names)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def _fit_to_shape(sharding: NamedSharding, x: Any, path: str) -> NamedSharding:
  fitted, dropped = _fit(sharding, x.shape)
  for dim, axes in dropped:
    log.info("%s: dimension %d of size %d does not divide over mesh axes %s; replicated "
             "over them", path, dim, x.shape[dim], axes)
  return fitted


def _fit(sharding: NamedSharding, shape: Sequence[int]
         ) -> tuple[NamedSharding, list[tuple[int, tuple[str, ...]]]]:
  """`sharding` without the mesh axes that do not divide their dimension (and which)."""
  mesh = sharding.mesh
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  dropped = []
  for i, entry in enumerate(spec):
    if entry is None or entry is P.UNCONSTRAINED:
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    kept: list[str] = []
    for a in axes:  # the longest prefix of axes whose product divides the dimension
      if shape[i] % (int(np.prod([mesh.shape[k] for k in kept])) * mesh.shape[a]):
        break
      kept.append(a)
    if len(kept) != len(axes):
      dropped.append((i, axes[len(kept):]))
      spec[i] = None if not kept else kept[0] if len(kept) == 1 else tuple(kept)
  return (NamedSharding(mesh, P(*spec)) if dropped else sharding), dropped


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run when the flags or the environment say there is one.

  Explicit (flags override the environment): coordinator host:port, number of
  processes and this process's id; env FLAXBERT_COORDINATOR, FLAXBERT_NUM_PROCESSES,
  FLAXBERT_PROCESS_ID. FLAXBERT_DISTRIBUTED=auto lets jax detect the cluster (Cloud
  TPU VM pods are found through the metadata server, which no env var shows;
  launch/tpu_vm.py sets it). SLURM with more than one task and GKE TPU pods are
  detected without it. Single-process runs need nothing.
  """
  coordinator = coordinator_address or os.environ.get("FLAXBERT_COORDINATOR")
  if num_processes is None and os.environ.get("FLAXBERT_NUM_PROCESSES"):
    num_processes = int(os.environ["FLAXBERT_NUM_PROCESSES"])
  if process_id is None and os.environ.get("FLAXBERT_PROCESS_ID"):
    process_id = int(os.environ["FLAXBERT_PROCESS_ID"])
  if coordinator:
    if num_processes is None or process_id is None:
      raise UserError(f"coordinator {coordinator}: also give --num_processes and --process_id "
                      "(or FLAXBERT_NUM_PROCESSES and FLAXBERT_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id={process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif num_processes is not None or process_id is not None:
    raise UserError("--num_processes and --process_id need --coordinator_address=host:port")
  elif (os.environ.get("FLAXBERT_DISTRIBUTED") == "auto"
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0):
    jax.distributed.initialize()
  else:
    return
  log.info("Process %d of %d: %d of the %d devices.", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
