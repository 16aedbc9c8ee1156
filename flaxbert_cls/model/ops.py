"""Dense, LayerNorm and dropout kernels with custom VJPs, for every backend.

- `dense`: x @ kernel whose backward computes the kernel's gradient on [tokens, ·] matrices
  as stored (XLA:CPU copied the output gradient transposed from einsum's own rule).
- `hash_dropout`: dropout masks from a keyed integer hash of each element's global
  index instead of threefry (~10 integer ops; on CPU threefry's masks were ~30% of a
  step); identical under any sharding; backward regenerates the mask.
- `layer_norm`: backward keeps x_hat and 1/std only, instead of autodiff's three
  [batch, length, hidden] arrays (memory, not speed).

LayerNorm and dropout scaling compute in float32 whatever the compute dtype. The attention
kernels, which use the hash dropout, are `attention.py`'s.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

DENSE_OUTPUT = "dense_output"  # the checkpoint name remat policies save dense outputs by


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] @ kernel [in, out], whose backward computes the kernel's gradient as x^T·g on
  [tokens, ·] matrices as stored: from einsum's own transpose rule XLA:CPU copied g to
  [out, tokens] first (docs/performance.md). Named DENSE_OUTPUT: remat policies see a custom
  VJP as one call, not as the dot inside."""
  return checkpoint_name(_dense(x, kernel), DENSE_OUTPUT)


@jax.custom_vjp
def _dense(x, kernel):
  return jnp.einsum("...i,io->...o", x, kernel)


def _dense_fwd(x, kernel):
  return _dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, g):
  x, kernel = residuals
  tokens = lambda a: a.reshape(-1, a.shape[-1])  # pylint: disable=unnecessary-lambda-assignment
  # The flattened form matters: contracting [batch, length] as two axes brings the copy back.
  return (jnp.einsum("...o,io->...i", g, kernel),
          jax.lax.dot_general(tokens(x), tokens(g), (((0,), (0,)), ((), ()))))


_dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis (x float32) whose backward keeps x_hat and 1/std only."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  centered = x - x.mean(-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
  x_hat = centered * inv_std
  return x_hat * scale + bias, (x_hat, inv_std, scale)


def _layer_norm_bwd(eps, residuals, g):
  del eps
  x_hat, inv_std, scale = residuals
  g_hat = g * scale
  g_x = inv_std * (g_hat - g_hat.mean(-1, keepdims=True)
                   - x_hat * (g_hat * x_hat).mean(-1, keepdims=True))
  batch_axes = tuple(range(g.ndim - 1))
  return g_x, jnp.sum(g * x_hat, batch_axes), jnp.sum(g, batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash (lowbias32); _mix32(0) == 0."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _flat_index(shape: tuple[int, ...], full_shape: tuple[int, ...], dims: range) -> jax.Array:
  """Row-major index over `dims` of full_shape, for the corner `shape` (uint32, wrapping)."""
  index = jnp.zeros(shape, jnp.uint32)
  for d in dims:
    index = index * jnp.uint32(full_shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, shape, d)
  return index


def hash_bits(seeds: jax.Array, shape: tuple[int, ...],
              full_shape: tuple[int, ...] | None = None) -> jax.Array:
  """uint32 bits: two keyed hash rounds over each element's global index.

  full_shape: `shape` is the corner [:shape[0], :shape[1], ...] of a full_shape array and
  gets that array's bits there (a first-token-only layer drops what the full one would).
  The index is two 32-bit words (high, low): arrays of 2^32 elements or more (BERT-large
  attention at 512 tokens and a large batch) get distinct bits everywhere, and arrays
  below that get exactly the one-word hash (high word 0, and _mix32(0) == 0).
  """
  full_shape = tuple(full_shape or shape)
  if math.prod(full_shape) < 2 ** 32:
    return _mix32(_mix32(_flat_index(shape, full_shape, range(len(shape))) ^ seeds[0]) ^ seeds[1])
  # Leading dims (index `outer`) over trailing blocks of `inner` elements each, inner < 2^32:
  # global index = outer * inner + i = high * 2^32 + low with per_word outers per low word.
  split = next(d for d in range(1, len(full_shape) + 1) if math.prod(full_shape[d:]) < 2 ** 32)
  if math.prod(full_shape[:split]) >= 2 ** 32:
    raise ValueError(f"dropout over shape {full_shape}: more than 2^64 elements")
  inner = math.prod(full_shape[split:])
  per_word = 2 ** 32 // inner
  outer = _flat_index(shape, full_shape, range(split))
  low = (outer % jnp.uint32(per_word)) * jnp.uint32(inner) + _flat_index(
      shape, full_shape, range(split, len(shape)))
  word = _mix32(outer // jnp.uint32(per_word))
  return _mix32(_mix32(low ^ seeds[0] ^ word) ^ seeds[1] ^ _mix32(word))


def drop_threshold(rate: float) -> jax.Array:
  """Bits below this are dropped: P(drop) = rate."""
  return jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def hash_dropout(x: jax.Array, seeds: jax.Array, rate: float,
                 full_shape: tuple[int, ...] | None = None) -> jax.Array:
  """Inverted dropout with a hash mask; backward regenerates the mask from `seeds`.

  Autodiff would keep the boolean mask and XLA the dropped output per dropout
  (1.25 x the activation's bytes); the hash is ~10 integer ops to recompute.
  """
  return apply_hash_dropout(x, seeds, rate, full_shape)


def apply_hash_dropout(x: jax.Array, seeds: jax.Array, rate: float,
                       full_shape: tuple[int, ...] | None = None) -> jax.Array:
  """`hash_dropout`'s forward, for kernels with their own VJP (attention's)."""
  keep = hash_bits(seeds, x.shape, full_shape) >= drop_threshold(rate)
  # Scaled in float32: bf16(1 - 0.1) would make the scale 1.1130 instead of 1.1111.
  scaled = (x.astype(jnp.float32) / jnp.float32(1.0 - rate)).astype(x.dtype)
  return jnp.where(keep, scaled, jnp.zeros((), x.dtype))


def _hash_dropout_fwd(x, seeds, rate, full_shape):
  return apply_hash_dropout(x, seeds, rate, full_shape), seeds


def _hash_dropout_bwd(rate, full_shape, seeds, g):
  return (apply_hash_dropout(g, seeds, rate, full_shape),
          np.zeros(seeds.shape, jax.dtypes.float0))


hash_dropout.defvjp(_hash_dropout_fwd, _hash_dropout_bwd)
