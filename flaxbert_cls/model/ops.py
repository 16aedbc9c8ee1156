"""Custom kernels of the encoder, and which backend each is for.

- `attention`: BERT's padded self-attention, padding given as key lengths (cuDNN's
  native padding mode through `jax.nn.dot_product_attention`; 'xla' builds the same mask
  from them in `attention_with_dropout`'s einsums at rate 0). `attention_implementation`
  picks cuDNN flash attention on a GPU with bf16 and a head size it supports, XLA
  elsewhere (every backend).
- `attention_with_dropout`: attention-probability dropout needs the probabilities,
  which fused kernels hide. Explicit einsums with a custom VJP that keeps only the
  probabilities and regenerates the dropout mask (all backends; the default when
  training with attention dropout > 0).
- `hash_dropout`: dropout masks from a keyed integer hash of each element's global
  index instead of threefry (~10 integer ops; on CPU threefry's masks were ~30% of a
  step); identical under any sharding; backward regenerates the mask (all backends).
- `layer_norm`: backward keeps x_hat and 1/std only, instead of autodiff's three
  [batch, length, hidden] arrays (all backends: memory, not speed).

Every kernel computes softmax, LayerNorm and dropout scaling in float32 whatever the
compute dtype; matmuls accumulate in float32 (`preferred_element_type`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flaxbert_cls.model import splash

# '' = auto (attention_implementation); 'splash': JAX's Pallas TPU kernel (model/splash.py).
ATTENTION_IMPLEMENTATIONS = ("", "xla", "cudnn", "splash")


# Auto picks splash on a TPU from this length on (by plan's figures, docs/pods.md).
SPLASH_AUTO_MIN_LENGTH = 512

# XLA's local layers run on the band's blocks (`banded_attention`) on sequences longer than
# this many windows, as one masked L x L attention up to it (benchmarks/local_attention.py:
# at ±64 and 256 tokens the masked one is 0.9x the blocks' time, at 384 1.2x, at 512 1.14x).
BANDED_MIN_WINDOWS = 4


def attention_implementation(requested: str, platform: str, dtype: str, head_dim: int,
                             attention_dropout: float | None = None,
                             max_seq_length: int = 0) -> str:
  """'xla', 'cudnn' or 'splash' for `attention`; '' picks by itself.

  JAX's own default (None) means XLA. cuDNN's flash attention runs on GPUs in
  bf16/fp16 with head sizes that are multiples of 8 up to 128 (256 from Hopper on;
  128 is the bound every GPU meets): there auto picks it. On a TPU auto picks splash for
  runs without attention dropout (the kernel has none) of max_seq_length >=
  SPLASH_AUTO_MIN_LENGTH, where it is what makes long sequences fit.
  """
  if requested:
    return requested
  if platform == "gpu" and dtype in ("bfloat16", "float16") and head_dim % 8 == 0 \
      and head_dim <= 128:
    return "cudnn"
  if platform == "tpu" and attention_dropout == 0 and max_seq_length >= SPLASH_AUTO_MIN_LENGTH \
      and splash.supported(max_seq_length):
    return "splash"
  return "xla"


def key_lengths(attention_mask: jax.Array) -> jax.Array:
  """int32 [batch] real-token counts of a right-padded attention mask (ours always is)."""
  return jnp.sum(attention_mask.astype(jnp.int32), axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
              implementation: str, mesh: jax.sharding.Mesh | None = None,
              rules: tuple = (), local_window: int | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over the first kv_lengths[b] keys; [batch, len, heads, dim].

  The same arguments reach cuDNN (its padding mode) and XLA (a mask built from them, in
  `attention_with_dropout` at rate 0; local layers band-masked or in `banded_attention`'s blocks),
  so the plumbing tested on CPU is the one a GPU runs. Queries are not length-masked:
  padded positions attend as in Hugging Face's BERT (their outputs are never read).
  'splash' runs on the mesh's devices (`mesh`, `rules`: the activations' sharding), in
  interpret mode where they are not TPUs (tests); lengths it cannot tile go to XLA.
  `local_window` w: each query sees the keys at most w positions away (ModernBERT's local
  layers; splash skips the tiles outside that band, and so does XLA's path, through
  `banded_attention`, on sequences longer than BANDED_MIN_WINDOWS windows; cuDNN masks it).
  """
  if implementation == "splash":
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    interpret = platform != "tpu"
    if q.shape[1] == k.shape[1] and splash.supported(q.shape[1]):
      return splash.attention(q, k, v, kv_lengths, mesh, rules, interpret, local_window)
    implementation = "xla"  # the [CLS]-only last layer; buckets under one 128-token tile
  if implementation == "xla" and local_window is not None:
    if q.shape[1] == k.shape[1] and q.shape[1] > BANDED_MIN_WINDOWS * local_window:
      return banded_attention(q, k, v, kv_lengths, local_window)
    return band_masked_attention(q, k, v, kv_lengths, local_window)
  if implementation == "cudnn" and (q.shape[1] % 2 or k.shape[1] % 2):
    # cuDNN's kernels with a padding mask need even lengths (jax's check_is_flash_attention);
    # the first-token-only last layer has one query: a matvec no flash kernel helps.
    implementation = "xla"
  if implementation == "xla" and local_window is None:
    # Our einsums (attention_with_dropout at rate 0): on a CPU, fwd+bwd of a 512-token
    # layer (batch 8, 12 heads) takes ~0.6x the time of jax.nn.dot_product_attention's XLA
    # path, whose mask and grouped-query reshapes XLA does not fuse well.
    return attention_with_dropout(q, k, v, kv_lengths, _NO_SEEDS, 0.0)
  return jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=kv_lengths, implementation=implementation,
      local_window_size=None if local_window is None else (local_window, local_window))


_NO_SEEDS = np.zeros((2,), np.uint32)  # attention_with_dropout's seeds at rate 0 (unused)


def banded_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                     window: int) -> jax.Array:
  """Self-attention where query i sees keys j with |i - j| <= window (and j < kv_lengths[b]),
  computed on the band only: XLA's masked path scores every key, L² per head; here each block
  of `window` queries scores its own and its two neighbours' keys, 3·window (at 2,048 tokens
  and ModernBERT's ±64: 192 keys a query instead of 2,048). [batch, len, heads, dim].
  The blocks run through `_masked_attention` (heads-major matmuls, probabilities kept)."""
  batch, length, heads, dim = q.shape
  blocks = -(-length // window)
  pad = blocks * window - length
  queries = jnp.pad(_heads_major(_scaled(q)), ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(
      batch, heads, blocks, window, dim)
  # Keys and values padded by one block each side: block n's neighbourhood starts at n·window.
  k, v = (jnp.pad(_heads_major(x), ((0, 0), (0, 0), (window, pad + window), (0, 0)))
          for x in (k, v))

  def neighbourhoods(x):  # [batch, heads, blocks, 3·window, dim]
    return jnp.concatenate([x[:, :, i * window:(i + blocks) * window].reshape(
        batch, heads, blocks, window, dim) for i in range(3)], axis=3)

  q_pos = (np.arange(blocks) * window)[:, None] + np.arange(window)[None, :]
  k_pos = (np.arange(blocks) * window - window)[:, None] + np.arange(3 * window)[None, :]
  near = np.abs(q_pos[:, :, None] - k_pos[:, None, :]) <= window  # [blocks, q, k]
  real = (k_pos[None] >= 0) & (k_pos[None] < kv_lengths[:, None, None])  # [batch, blocks, k]
  mask = near[None, None] & real[:, None, :, None, :]  # [batch, 1, blocks, q, k]
  out = _masked_attention(queries, neighbourhoods(k), neighbourhoods(v), mask)
  return _heads_major(out.reshape(batch, heads, blocks * window, dim)[:, :, :length])


def band_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                          window: int) -> jax.Array:
  """What `banded_attention` computes, as one L x L masked attention (`_masked_attention`):
  on short sequences the blocks' gathers cost more than the scores they save."""
  length = k.shape[1]
  positions = np.arange(length)
  near = np.abs(positions[:q.shape[1], None] - positions[None, :]) <= window
  mask = _key_mask(kv_lengths, length) & near
  return _heads_major(_masked_attention(*(_heads_major(x) for x in (_scaled(q), k, v)), mask))


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
  return _apply_hash_dropout(x, seeds, rate, full_shape)


def _apply_hash_dropout(x, seeds, rate, full_shape=None):
  keep = hash_bits(seeds, x.shape, full_shape) >= drop_threshold(rate)
  # Scaled in float32: bf16(1 - 0.1) would make the scale 1.1130 instead of 1.1111.
  scaled = (x.astype(jnp.float32) / jnp.float32(1.0 - rate)).astype(x.dtype)
  return jnp.where(keep, scaled, jnp.zeros((), x.dtype))


def _hash_dropout_fwd(x, seeds, rate, full_shape):
  return _apply_hash_dropout(x, seeds, rate, full_shape), seeds


def _hash_dropout_bwd(rate, full_shape, seeds, g):
  return (_apply_hash_dropout(g, seeds, rate, full_shape),
          np.zeros(seeds.shape, jax.dtypes.float0))


hash_dropout.defvjp(_hash_dropout_fwd, _hash_dropout_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def attention_with_dropout(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                           seeds: jax.Array, rate: float) -> jax.Array:
  """dropout(softmax(q k^T / sqrt(d), first kv_lengths keys)) v for [batch, len, heads, dim].

  Autodiff of the plain composition keeps ~4 [b,h,q,k] float32 arrays per layer
  (masked scores, exp, probabilities, dropped probabilities); this keeps the
  probabilities only, in the compute dtype, and regenerates the (hash) dropout mask
  from `seeds`. Scores and their gradients accumulate in float32 and the softmax runs in
  float32. q, k and v are moved head-major for the batched matmuls (XLA's CPU dots on
  [b,q,h,d] operands insert a transpose each).
  """
  return _attention_with_dropout_fwd(q, k, v, kv_lengths, seeds, rate)[0]


def _self_attention_shape(probs: jax.Array) -> tuple[int, ...]:
  """[b, h, kv, kv]: fewer queries (first_token_only) are the first rows of self-attention."""
  return (*probs.shape[:2], probs.shape[3], probs.shape[3])


def _heads_major(x: jax.Array) -> jax.Array:  # [b,len,h,d] <-> [b,h,len,d]
  return jnp.transpose(x, (0, 2, 1, 3))


def _key_mask(kv_lengths: jax.Array, num_keys: int) -> jax.Array:
  return (jnp.arange(num_keys)[None, :] < kv_lengths[:, None])[:, None, None, :]


def _einsum32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scaled(q: jax.Array) -> jax.Array:
  """q / sqrt(d), in float32 and rounded once to the compute dtype (exact for float32)."""
  return (q.astype(jnp.float32) * np.float32(1.0 / np.sqrt(q.shape[-1]))).astype(q.dtype)


def _softmax_attention(qh, kh, vh, mask, seeds, rate, full_shape):
  """Forward of every XLA attention here, on heads-major [..., len, dim] (qh scaled), any
  leading dims (blocks of a band too): (output, probabilities in v's dtype)."""
  scores = _einsum32("...qd,...kd->...qk", qh, kh)
  probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
  dropped = (_apply_hash_dropout(probs, seeds, rate, full_shape) if rate
             else probs).astype(vh.dtype)  # = hash_dropout's mask
  return _einsum32("...qk,...kd->...qd", dropped, vh).astype(vh.dtype), probs.astype(vh.dtype)


def _softmax_attention_bwd(qh, kh, vh, probs, seeds, rate, full_shape, g):
  """Its backward from the kept probabilities: (dq for the scaled q, dk^T, dv^T), the last two
  dims-major [..., dim, len] (the layout their matmuls produce)."""
  probs = probs.astype(jnp.float32)
  # Every matmul below is row-major x row-major ([..., m, k] @ [..., k, n]): XLA's CPU
  # dots contracting two leading dims ([q,k]^T @ [q,d]) fall back to a ~2x slower kernel,
  # so the operands are transposed (cheap, [..., len, d]) instead of the probabilities.
  dims_major = lambda x: jnp.swapaxes(x, -1, -2)
  # Written differently from the forward's (where, then scale): XLA's CSE would merge
  # equal expressions and keep the forward's dropped probabilities alive until here.
  g_probs = _einsum32("...qd,...dk->...qk", g, dims_major(vh))
  if rate:
    keep = hash_bits(seeds, probs.shape, full_shape) >= drop_threshold(rate)
    dropped = (jnp.where(keep, probs, 0.0) * (1.0 / (1.0 - rate))).astype(vh.dtype)
    g_probs = jnp.where(keep, g_probs / (1.0 - rate), 0.0)
  else:
    dropped = probs.astype(vh.dtype)
  g_v = _einsum32("...dq,...qk->...dk", dims_major(g), dropped)
  # Softmax backward; masked keys have probability 0, so their score gradient is 0.
  g_scores = (probs * (g_probs - jnp.sum(g_probs * probs, axis=-1, keepdims=True))
              ).astype(qh.dtype)
  g_q = _einsum32("...qk,...kd->...qd", g_scores, kh)
  g_k = _einsum32("...dq,...qk->...dk", dims_major(qh), g_scores)
  return g_q, g_k, g_v


def _attention_with_dropout_fwd(q, k, v, kv_lengths, seeds, rate):
  q = _scaled(q)
  mask = _key_mask(kv_lengths, k.shape[1])
  out, probs = _softmax_attention(
      _heads_major(q), _heads_major(k), _heads_major(v), mask, seeds, rate,
      (q.shape[0], q.shape[2], k.shape[1], k.shape[1]))
  return _heads_major(out), (q, k, v, probs, kv_lengths, seeds)


def _attention_with_dropout_bwd(rate, residuals, g):
  q, k, v, probs, kv_lengths, seeds = residuals  # q carries the 1/sqrt(d) scale
  g_q, g_k, g_v = _softmax_attention_bwd(
      _heads_major(q), _heads_major(k), _heads_major(v), probs, seeds, rate,
      _self_attention_shape(probs), _heads_major(g))
  from_dims_major = lambda x: jnp.transpose(x, (0, 3, 1, 2))  # [b,h,d,len] -> [b,len,h,d]
  no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (_heads_major(g_q * np.float32(1.0 / np.sqrt(q.shape[-1]))).astype(q.dtype),
          from_dims_major(g_k).astype(k.dtype), from_dims_major(g_v).astype(v.dtype),
          no_grad(kv_lengths), no_grad(seeds))


@jax.custom_vjp
def _masked_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(qh kh^T where mask) vh on heads-major [..., len, dim], qh scaled: the kernel of
  the local layers (a band mask, or a band's blocks); backward keeps the probabilities only."""
  return _softmax_attention(qh, kh, vh, mask, _NO_SEEDS, 0.0, None)[0]


def _masked_attention_fwd(qh, kh, vh, mask):
  out, probs = _softmax_attention(qh, kh, vh, mask, _NO_SEEDS, 0.0, None)
  return out, (qh, kh, vh, probs, mask)


def _masked_attention_bwd(residuals, g):
  qh, kh, vh, probs, mask = residuals
  g_q, g_k, g_v = _softmax_attention_bwd(qh, kh, vh, probs, _NO_SEEDS, 0.0, None, g)
  return (g_q.astype(qh.dtype), jnp.swapaxes(g_k, -1, -2).astype(kh.dtype),
          jnp.swapaxes(g_v, -1, -2).astype(vh.dtype), np.zeros(mask.shape, jax.dtypes.float0))


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


attention_with_dropout.defvjp(_attention_with_dropout_fwd, _attention_with_dropout_bwd)
