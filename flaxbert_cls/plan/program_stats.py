"""What a compiled program needs per chip: XLA's memory and cost analysis and its collectives.

Everything here is read from the compiled executable (`jax.stages.Compiled`), not
estimated: memory_analysis() for the bytes, cost_analysis() for FLOPs and bytes
accessed, and the optimized HLO text for the collectives. XLA's cost analysis counts a
while-loop body once (gradient accumulation's scan, loops XLA builds itself), so
`while_loops` says when the FLOPs and bytes are a lower bound.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import jax
import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = TYPE op(` with TYPE one shape or a tuple of them; async forms end in -start.
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)"
                    r"\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")  # e.g. /*index=5*/ inside long tuple shapes
_WHILE = re.compile(r"=\s*\S.*?\swhile\(")
_KERNEL = re.compile(r'custom_call_target="tpu_custom_call"')  # a Pallas kernel (splash)
_BITS = {"pred": 8, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8, "s16": 16, "u16": 16,
         "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64}


@dataclasses.dataclass
class Collective:
  count: int = 0
  bytes: int = 0  # of the results, per chip
  bytes_by_dtype: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ProgramStats:
  """One compiled program's per-chip figures."""

  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs that reuse donated arguments
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  collectives: dict[str, Collective]
  while_loops: int
  kernel_calls: int = 0  # Pallas TPU kernels: XLA's cost analysis sees no FLOPs inside them
  cost_reported: bool = True  # False: XLA gave no cost analysis (GPU compile-only targets)

  @property
  def total_bytes(self) -> int:
    """Arguments + outputs not aliased to them + temporaries + code: the HBM it holds."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)


def from_compiled(compiled: Any) -> ProgramStats:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per program
  reported = bool(cost)
  cost = cost or {}
  text = compiled.as_text()
  return ProgramStats(
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      collectives=collectives(text),
      while_loops=len(_WHILE.findall(text)), kernel_calls=len(_KERNEL.findall(text)),
      cost_reported=reported)


def collectives(hlo_text: str) -> dict[str, Collective]:
  """Each collective op of an optimized HLO module: how many there are and their result bytes.

  An async all-gather / collective-permute start returns (operand, result): only the result
  counts. A collective inside a loop body is counted once, like XLA's cost analysis.
  """
  found: dict[str, Collective] = collections.defaultdict(Collective)
  for line in hlo_text.splitlines():
    match = _OP.search(_COMMENT.sub("", line))
    if not match:
      continue
    shapes = _SHAPE.findall(match.group(1))
    if match.group(3) and match.group(2) in ("all-gather", "collective-permute") \
        and len(shapes) >= 2:
      shapes = shapes[len(shapes) // 2:]
    entry = found[match.group(2)]
    entry.count += 1
    for dtype, dims in shapes:
      size = int(np.prod([int(d) for d in dims.split(",") if d])) * _BITS[dtype] // 8
      entry.bytes += size
      entry.bytes_by_dtype[dtype] = entry.bytes_by_dtype.get(dtype, 0) + size
  return dict(found)


def shard_bytes(tree: Any) -> int:
  """Bytes per chip of a tree of sharded jax.ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total
