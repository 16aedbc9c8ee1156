"""Chips and topologies the compiler can target without the hardware (`flaxbert-cls plan`).

libtpu describes a TPU topology on any host ("deviceless" ahead-of-time compilation):
`topology_devices('v5e:4x4')` gives its 16 compile-only devices, on which a Mesh, jit
lowering and compilation work as on the pod. jax's CUDA plugin does the same for GPUs from
XLA's own description of the card (`GPU_TARGETS`): `topology_devices('h100:8')` is one host
of 8 H100s, 'h100:2x8' two. `CHIPS` holds each chip's public figures (HBM, bf16 peak, HBM
bandwidth) for the fit check and the roofline estimates.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from typing import Any

import jax
from jax.experimental import topologies

from flaxbert_cls.errors import UserError

# libtpu builds matching the project's jax (jax[tpu]==0.10.2 pins libtpu==0.0.42.1).
INSTALL_HINT = "pip install 'flaxbert-cls[tpu]' (libtpu==0.0.42.1)"
GPU_INSTALL_HINT = f"pip install 'jax[cuda12]=={jax.__version__}'"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's public figures (per chip: v4's two TensorCores count as one, 'megacore')."""

  name: str
  hbm_bytes: int
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s


_GB, _GIB, _T = 1e9, 2**30, 1e12
# Per chip, from Google Cloud's "TPU v4", "TPU v5e", "TPU v5p" and "TPU v6e (Trillium)"
# system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
CHIPS = {
    "v4": Chip("v4", 32 * _GIB, 275 * _T, 1200 * _GB),
    "v5e": Chip("v5e", 16 * _GIB, 197 * _T, 819 * _GB),
    "v5p": Chip("v5p", 95 * _GIB, 459 * _T, 2765 * _GB),
    "v6e": Chip("v6e", 32 * _GIB, 918 * _T, 1640 * _GB),
    # NVIDIA's H100 SXM datasheet (dense bf16, HBM3); the memory is XLA's figure below.
    "h100": Chip("h100", 84_978_434_048, 989 * _T, 3352 * _GB),
}
# jax's Device.device_kind of each chip.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e", "NVIDIA H100 80GB HBM3": "h100"}

# The CUDA plugin compiles for a GPU it does not have from a GpuTargetConfigProto: XLA's own
# (xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb), so its cost model and fusions are the card's.
GPU_TARGETS = {
    "h100": """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}

# What `plan --list` probes: the slice shapes Cloud TPU sells per generation (2-D for the
# 'lite' chips, 3-D for v4 / v5p); the ones this libtpu accepts are listed.
_CANDIDATES = {
    "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16"),
    "v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16"),
    "v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
}
HOST = "host"
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_GPU_NAME = re.compile(r"^(h100):(?:(\d+)x)?(\d+)$")  # GPUS[:HOSTSx]PER_HOST


def chip_for(device: Any) -> Chip | None:
  """The chip of a jax device (a real or a topology one); None for CPU and GPUs."""
  return CHIPS.get(DEVICE_KINDS.get(str(getattr(device, "device_kind", "")), ""))


def libtpu_available() -> bool:
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import  (a small wrapper module)
  except ImportError:
    return False
  return True


def _require_libtpu() -> None:
  if not libtpu_available():
    raise UserError(f"compiling for a TPU topology needs libtpu: {INSTALL_HINT}")


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
  """The compile-only devices of TPU topology `name` ('v5e:4x4', 'v4:2x2x1', ...); 'host': this
  host's own devices (programs a run here loads: plan --save_compiled)."""
  if name == HOST:
    if num_slices != 1:
      raise UserError(f"--topology={HOST} --num_slices={num_slices}: one slice only")
    return list(jax.devices())
  if num_slices < 1:
    raise UserError(f"--num_slices={num_slices}: must be >= 1")
  gpu = _GPU_NAME.match(name)
  if gpu:
    return _gpu_devices(name, gpu.group(1), int(gpu.group(2) or 1), int(gpu.group(3)),
                        num_slices)
  match = _NAME.match(name)
  if not match:
    raise UserError(f"--topology={name!r}: use GENERATION:SHAPE with a generation in "
                    f"{sorted(set(CHIPS) - set(GPU_TARGETS))}, e.g. v5e:4x4 or v4:2x2x1 "
                    f"(plan --list), GPU:[HOSTSx]GPUS_PER_HOST with a GPU in "
                    f"{sorted(GPU_TARGETS)}, e.g. h100:8, or host")
  _require_libtpu()
  kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if match.group(1) == "v4" else {}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    return list(topologies.get_topology_desc(name, platform="tpu", **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's JaxRuntimeError)
    detail = " ".join(str(e).split("\n")[0].split())[:200]
    raise UserError(f"--topology={name}: libtpu refuses it: {detail} (plan --list)") from None


def gpu_plugin_available() -> bool:
  try:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
               for v in (12, 13))
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def _gpu_devices(name: str, gpu: str, hosts: int, per_host: int, num_slices: int) -> list[Any]:
  """Compile-only devices of `num_slices` x `hosts` hosts x `per_host` GPUs (the CUDA plugin's
  "slices x hosts x devices" topology; a slice is one NVLink domain)."""
  if not gpu_plugin_available():
    raise UserError(f"--topology={name}: compiling for a GPU needs jax's CUDA plugin: "
                    f"{GPU_INSTALL_HINT} (on a host without a GPU, run plan with "
                    "JAX_PLATFORMS=cpu)")
  try:
    return list(topologies.get_topology_desc(
        platform="cuda", target_config=GPU_TARGETS[gpu],
        topology=f"{num_slices}x{hosts}x{per_host}").devices)
  except Exception as e:  # pylint: disable=broad-except  (the plugin's JaxRuntimeError)
    detail = " ".join(str(e).split("\n")[0].split())[:200]
    raise UserError(f"--topology={name}: the CUDA plugin refuses it: {detail}") from None


def accepted_topologies() -> list[str]:
  """Every candidate name this libtpu accepts, per generation."""
  _require_libtpu()
  accepted = []
  for generation, shapes in _CANDIDATES.items():
    for shape in shapes:
      try:
        topology_devices(f"{generation}:{shape}")
      except UserError:
        continue
      accepted.append(f"{generation}:{shape}")
  return accepted
