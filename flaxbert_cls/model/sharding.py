"""Device mesh and shardings; logical axis rules come from the config, not from code."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxbert_cls.errors import UserError
from flaxbert_cls.model import topologies

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


def device_memory(device: Any) -> tuple[int | None, str]:
  """(bytes XLA may use on `device`, where that figure comes from).

  The device's own memory_stats() where it reports them; else its chip's HBM
  (topologies.CHIPS: compile-only TPU topology devices report nothing); None on CPU.
  """
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (not implemented on some platforms)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "memory_stats"
  chip = topologies.chip_for(device)
  if chip is not None and chip.name in topologies.GPU_TARGETS:
    # jax's GPU client takes this fraction of the card at start (XLA_PYTHON_CLIENT_MEM_FRACTION).
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    return int(fraction * chip.hbm_bytes), f"{fraction:.0%} of the {chip.name}'s memory"
  if chip is not None:
    return chip.hbm_bytes, f"the {chip.name} chip's HBM"
  return None, "not reported"


def device_memory_bytes(device: Any) -> int | None:
  """The memory XLA may use on `device`; None where the platform does not say (CPU)."""
  return device_memory(device)[0]


def auto_mesh_shape(axis_names: Sequence[str], state_bytes: int, devices: Sequence[Any],
                    memory_fraction: float = 0.35) -> tuple[int, ...]:
  """Pure data parallelism when the train state fits `memory_fraction` of one device's
  memory (the rest is for activations), else FSDP over the fewest devices that fit it.

  The fewest: every all-gather then stays within as small a group as possible (one host's
  devices first). Devices that do not report their memory (CPU) get data parallelism.
  """
  names = list(axis_names)
  if "data" not in names or "fsdp" not in names:
    raise UserError(f"config.mesh_shape=(): the automatic mesh needs 'data' and 'fsdp' in "
                    f"config.mesh_axes={tuple(names)}; give mesh_shape explicitly")
  n, fsdp = len(devices), 1
  limit, source = device_memory(devices[0])
  if limit:
    budget = memory_fraction * limit
    fitting = [f for f in range(1, n + 1) if n % f == 0 and state_bytes / f <= budget]
    if not fitting:
      raise UserError(
          f"config.mesh_shape=(): the train state ({state_bytes / 2**30:.1f} GiB) does not fit "
          f"{memory_fraction:.0%} of a device's {limit / 2**30:.1f} GiB even over all {n} devices; "
          "use LoRA (lora_rank), freeze layers, or more devices")
    fsdp = fitting[0]
  shape = [1] * len(names)
  shape[names.index("data")], shape[names.index("fsdp")] = n // fsdp, fsdp
  log.info("Automatic mesh %s: train state %.2f GiB, device memory %s.",
           dict(zip(names, shape)), state_bytes / 2**30,
           f"{limit / 2**30:.1f} GiB ({source})" if limit else source)
  return tuple(shape)


def create_mesh(axis_names: Sequence[str], axis_sizes: Sequence[int],
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all), laid out by jax's mesh_utils for locality."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_grid(mesh_shape_for(axis_sizes, len(devices)), devices),
              tuple(axis_names))


def _batch_axes(axis_names: Sequence[str]) -> list[str]:
  return [a for a in BATCH_AXES if a in axis_names]


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as `shape` in mesh_utils' topology-aware order (ICI rings on TPU).

  That order may alternate hosts along the batch axes; each process then feeds exactly
  the batch rows its devices hold (data.process_rows / data.to_global ask the sharding).
  """
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except Exception as e:  # pylint: disable=broad-except  (mesh_utils refuses odd shapes)
    if devices and getattr(devices[0], "platform", "cpu") != "cpu":  # CPU: no interconnect
      log.warning("Mesh %s: jax's mesh_utils cannot lay it out on these %d %s devices (%s); "
                  "a plain reshape is used, which ignores the interconnect: choose "
                  "config.mesh_shape to match the topology.", tuple(shape), len(devices),
                  devices[0].platform, " ".join(str(e).split())[:160])
    return np.asarray(devices, dtype=object).reshape(shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(_batch_axes(mesh.axis_names))))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Logical names of activation dimensions; bert.py pins activations with them when it
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
  return jax.lax.with_sharding_constraint(x, activation_sharding(logical_axes, x.shape, mesh,
                                                                 rules))


def activation_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                        rules: Sequence[tuple[str, Any]]) -> NamedSharding:
  """The sharding an activation of `shape` gets from its logical axes (`constrain`'s; a
  kernel under shard_map takes its spec)."""
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), tuple(rules))
  return _fit(NamedSharding(mesh, spec), shape)[0]


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
