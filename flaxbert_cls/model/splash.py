"""Splash attention: JAX's fused Pallas TPU kernel for the encoder's padded self-attention.

`attention` has `attention.attention`'s contract ([batch, len, heads, dim] in and out, padding
as key lengths). Padding becomes segment ids (real tokens 1, padding 0): a real query sees the
real keys only, as the key-length mask gives; a padded query sees padding (its output is
never read), so no softmax row is empty. The kernel does not scale its logits: q is divided
by sqrt(dim) first. It takes one example's [heads, len, dim] (vmapped over the batch); on a
mesh it runs under `shard_map` with the activations' own sharding (batch over the batch axes,
heads over the heads rule's axis), since a Pallas call is opaque to XLA's partitioner. Like
cuDNN's kernel it has no attention dropout. `interpret=True` runs the kernel's Pallas
program on any backend (slow: tests on CPU). The kernel's module is imported when first
used: importing it loads libtpu, which only a splash run needs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.model.sharding import ACTIVATION_BATCH, ACTIVATION_HEADS

BLOCK = 128  # the kernel's tile along both sequence axes on a TPU (its lane width)


def _kernel_module() -> Any:
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import splash_attention  # loads libtpu: on first use
  return splash_attention


def supported(length: int) -> bool:
  """Whether a self-attention of `length` tokens runs in the kernel: whole 128-token tiles
  (its block checks hold in interpret mode too)."""
  return length >= BLOCK and length % BLOCK == 0


def _kernel(heads: int, length: int, interpret: bool, local_window: int | None = None) -> Any:
  """The kernel for `heads` x [length, length] full attention, or local attention (keys at
  most `local_window` away: the kernel skips the tiles outside the band). Padding is in the
  segment ids, so one static mask serves every batch. Made per trace, not cached: it holds
  arrays made inside the trace."""
  splash = _kernel_module()
  block = BLOCK
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  if local_window is None:
    head_mask = splash.FullMask((length, length))
  else:
    head_mask = splash.LocalMask((length, length), (local_window, local_window), offset=0)
  mask = splash.MultiHeadMask([head_mask] * heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _on_device(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
               interpret: bool, local_window: int | None) -> jax.Array:
  """One device's examples: [batch, len, heads, dim] -> the kernel's [heads, len, dim] each."""
  splash = _kernel_module()
  _, length, heads, dim = q.shape
  kernel = _kernel(heads, length, interpret, local_window)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(kernel)(heads_first(q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)),
                         heads_first(k), heads_first(v), splash.SegmentIds(segments, segments))
  return heads_first(out).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
              mesh: Mesh | None = None, rules: tuple[tuple[str, object], ...] = (),
              interpret: bool = False, local_window: int | None = None,
              segment_ids: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over the first kv_lengths[b] keys, through the splash kernel.

  q, k, v: [batch, len, heads, dim] with one length (self-attention); `mesh` and `rules`
  (the model's activation rules) shard it like the activations around it. `local_window` w:
  each query sees the keys at most w positions away (ModernBERT's local layers).
  `segment_ids` [batch, len] (packed rows, 0 = padding; kv_lengths unused): the kernel's own
  segment ids, so a query sees its own example's keys only.
  """
  if q.shape[1] != k.shape[1] or not supported(q.shape[1]):
    raise ValueError(f"splash attention: query length {q.shape[1]} and key length "
                     f"{k.shape[1]} must be equal and whole {BLOCK}-token tiles")
  local = functools.partial(_on_device, interpret=interpret, local_window=local_window)
  if segment_ids is None:
    segment_ids = jnp.arange(q.shape[1])[None, :] < kv_lengths[:, None]
  segment_ids = segment_ids.astype(jnp.int32)
  if mesh is None or mesh.size == 1:
    return local(q, k, v, segment_ids)
  # Axes that do not divide their dimension (a batch of 1 at init) are left out.
  spec = sharding_lib.activation_sharding((ACTIVATION_BATCH, None, ACTIVATION_HEADS, None),
                                          q.shape, mesh, rules).spec
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None)),
                       out_specs=spec, check_vma=False)(q, k, v, segment_ids)
