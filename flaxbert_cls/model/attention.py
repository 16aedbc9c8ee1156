"""The encoder's attention kernels, and which backend each is for.

- `attention`: padded self-attention, padding given as key lengths (cuDNN's native padding
  mode through `jax.nn.dot_product_attention`; 'xla' builds the same mask from them in
  `attention_with_dropout`'s einsums at rate 0; 'splash': JAX's Pallas TPU kernel,
  `splash.py`). `attention_implementation` picks cuDNN flash attention on a GPU with bf16
  and a head size it supports, splash on a TPU for long sequences, XLA elsewhere.
- Local layers (ModernBERT's sliding window): `banded_attention` computes the band's blocks
  only, `band_masked_attention` one masked L x L attention for short sequences.
- Packed rows (several examples a row, segment ids): `packed_attention` on XLA, splash's own
  segment ids on a TPU.
- `attention_with_dropout`: attention-probability dropout needs the probabilities,
  which fused kernels hide. Explicit einsums with a custom VJP that keeps only the
  probabilities and regenerates the dropout mask (`ops.hash_dropout`'s hash).

Softmax runs in float32 whatever the compute dtype; matmuls accumulate in float32
(`preferred_element_type`).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from flaxbert_cls.model import ops
from flaxbert_cls.model import splash

# '' = auto (attention_implementation); 'splash': JAX's Pallas TPU kernel (model/splash.py).
ATTENTION_IMPLEMENTATIONS = ("", "xla", "cudnn", "splash")


# Auto picks splash on a TPU from this length on (by plan's figures, docs/pods.md).
SPLASH_AUTO_MIN_LENGTH = 512

# XLA's local layers run on the band's blocks (`banded_attention`) on sequences longer than
# this many windows, as one masked L x L attention up to it (benchmarks/local_attention.py:
# at ±64 and 256 tokens the masked one is 0.9x the blocks' time, at 384 1.2x, at 512 1.14x).
BANDED_MIN_WINDOWS = 4

# On one CPU device the XLA kernels below run their [q, k] work over groups of (batch, head)
# pairs in turn (`_head_groups`), each group's scores at most this many bytes per core (about
# a core's L2): scores, probabilities and their gradients then stay in the cache between the
# matmuls and the softmax (benchmarks/local_attention.py; docs/performance.md).
CACHE_BLOCK_BYTES_PER_CORE = 1 << 20


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
              rules: tuple = (), local_window: int | None = None,
              segment_ids: jax.Array | None = None) -> jax.Array:
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
  `segment_ids` [batch, len] (packed rows: several examples a row, 1, 2, ... in reading order,
  0 for padding; kv_lengths unused): a query sees the keys of its own example only. Splash
  takes them as its own segment ids; elsewhere they go to XLA as a mask (cuDNN's kernel in
  JAX has no segments).
  """
  if implementation == "splash":
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    interpret = platform != "tpu"
    if q.shape[1] == k.shape[1] and splash.supported(q.shape[1]):
      return splash.attention(q, k, v, kv_lengths, mesh, rules, interpret, local_window,
                              segment_ids)
    implementation = "xla"  # the [CLS]-only last layer; buckets under one 128-token tile
  blocked = _cache_blocked(mesh)
  if segment_ids is not None:
    return packed_attention(q, k, v, segment_ids, local_window, blocked)
  if implementation == "xla" and local_window is not None:
    if q.shape[1] == k.shape[1] and q.shape[1] > BANDED_MIN_WINDOWS * local_window:
      return banded_attention(q, k, v, kv_lengths, local_window, blocked=blocked)
    return band_masked_attention(q, k, v, kv_lengths, local_window, blocked)
  if implementation == "cudnn" and (q.shape[1] % 2 or k.shape[1] % 2):
    # cuDNN's kernels with a padding mask need even lengths (jax's check_is_flash_attention);
    # the first-token-only last layer has one query: a matvec no flash kernel helps.
    implementation = "xla"
  if implementation == "xla" and local_window is None:
    # Our einsums (attention_with_dropout at rate 0): on a CPU, fwd+bwd of a 512-token
    # layer (batch 8, 12 heads) takes ~0.6x the time of jax.nn.dot_product_attention's XLA
    # path, whose mask and grouped-query reshapes XLA does not fuse well.
    return attention_with_dropout(q, k, v, kv_lengths, _NO_SEEDS, 0.0, blocked)
  return jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=kv_lengths, implementation=implementation,
      local_window_size=None if local_window is None else (local_window, local_window))


_NO_SEEDS = np.zeros((2,), np.uint32)  # attention_with_dropout's seeds at rate 0 (unused)


def _cache_blocked(mesh: jax.sharding.Mesh | None) -> bool:
  """Whether XLA's kernels run in cache-sized head groups: on one CPU device (a loop over
  the batch would serialize an accelerator, and on a CPU mesh it would gather sharded rows)."""
  devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
  return len(devices) == 1 and devices[0].platform == "cpu"


def _cores() -> int:
  """The CPUs this process may run on (XLA's thread pool is as large)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _head_groups(fn, *xs):
  """fn(*xs) on [batch, heads, ...] arrays (xs[0] the queries, xs[1] the keys; batch or
  heads 1 in the others broadcast), over groups of (batch, head) pairs in turn (lax.map)
  whose float32 scores fit CACHE_BLOCK_BYTES_PER_CORE per core; fn returns [batch, heads, ...]
  arrays as well."""
  batch, heads = xs[0].shape[:2]
  pairs = batch * heads
  pair_bytes = 4 * math.prod(xs[0].shape[2:-1]) * xs[1].shape[-2]
  budget = CACHE_BLOCK_BYTES_PER_CORE * _cores()
  size = max(d for d in range(1, pairs + 1)
             if pairs % d == 0 and (d == 1 or d * pair_bytes <= budget))
  if size == pairs:
    return fn(*xs)
  grouped = lambda x: jnp.broadcast_to(x, (batch, heads, *x.shape[2:])).reshape(  # pylint: disable=unnecessary-lambda-assignment
      pairs // size, size, *x.shape[2:])
  out = jax.lax.map(lambda group: fn(*group), tuple(grouped(x) for x in xs))
  return jax.tree.map(lambda y: y.reshape(batch, heads, *y.shape[2:]), out)


def banded_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array | None,
                     window: int, segment_ids: jax.Array | None = None,
                     blocked: bool = False) -> jax.Array:
  """Self-attention where query i sees keys j with |i - j| <= window (and j < kv_lengths[b]),
  computed on the band only: XLA's masked path scores every key, L² per head; here each block
  of `window` queries scores its own and its two neighbours' keys, 3·window (at 2,048 tokens
  and ModernBERT's ±64: 192 keys a query instead of 2,048). [batch, len, heads, dim].
  The blocks run through `_masked_attention` (heads-major matmuls, probabilities kept).
  `segment_ids` (packed rows; `attention`): keys of the query's own example only.
  `blocked`: in cache-sized head groups (`_head_groups`; `attention` sets it on one CPU)."""
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
  if segment_ids is None:
    real = (k_pos[None] >= 0) & (k_pos[None] < kv_lengths[:, None, None])  # [batch, blocks, k]
    mask = near[None, None] & real[:, None, :, None, :]  # [batch, 1, blocks, q, k]
  else:  # the queries' and their neighbourhoods' segments; padding is segment 0
    q_seg = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(batch, blocks, window)
    k_seg = jnp.pad(segment_ids, ((0, 0), (window, pad + window)))
    k_seg = jnp.concatenate([k_seg[:, i * window:(i + blocks) * window].reshape(
        batch, blocks, window) for i in range(3)], axis=2)
    mask = near[None, None] & _same_segment(q_seg, k_seg)[:, None]
  out = _masked_attention(queries, neighbourhoods(k), neighbourhoods(v), mask, blocked)
  return _heads_major(out.reshape(batch, heads, blocks * window, dim)[:, :, :length])


def band_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                          window: int, blocked: bool = False) -> jax.Array:
  """What `banded_attention` computes, as one L x L masked attention (`_masked_attention`):
  on short sequences the blocks' gathers cost more than the scores they save."""
  length = k.shape[1]
  positions = np.arange(length)
  near = np.abs(positions[:q.shape[1], None] - positions[None, :]) <= window
  mask = _key_mask(kv_lengths, length) & near
  return _heads_major(_masked_attention(*(_heads_major(x) for x in (_scaled(q), k, v)), mask,
                                        blocked))


def _same_segment(q_seg: jax.Array, k_seg: jax.Array) -> jax.Array:
  """[..., q, k]: key of the query's own example, not padding (a padding query sees none:
  its softmax row is uniform over finite floors, and its output is never read)."""
  return (q_seg[..., :, None] == k_seg[..., None, :]) & (k_seg[..., None, :] > 0)


def packed_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     local_window: int | None = None, blocked: bool = False) -> jax.Array:
  """Self-attention of packed rows on XLA: query i sees key j of its own segment (and, local,
  |i - j| <= local_window; on long rows in `banded_attention`'s blocks). [batch, len, heads,
  dim]. Global layers score the whole row: the pairs across examples are masked, not skipped."""
  length = q.shape[1]
  if local_window is not None and length > BANDED_MIN_WINDOWS * local_window:
    return banded_attention(q, k, v, None, local_window, segment_ids, blocked)
  mask = _same_segment(segment_ids, segment_ids)[:, None]  # [batch, 1, q, k]
  if local_window is not None:
    positions = np.arange(length)
    mask = mask & (np.abs(positions[:, None] - positions[None, :]) <= local_window)
  return _heads_major(_masked_attention(*(_heads_major(x) for x in (_scaled(q), k, v)), mask,
                                        blocked))


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """[batch, len] int32: each token's position within its segment (0 at an example's first
  token; packed rows hold examples in contiguous runs of one id)."""
  index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention_with_dropout(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                           seeds: jax.Array, rate: float, blocked: bool = False) -> jax.Array:
  """dropout(softmax(q k^T / sqrt(d), first kv_lengths keys)) v for [batch, len, heads, dim].

  Autodiff of the plain composition keeps ~4 [b,h,q,k] float32 arrays per layer
  (masked scores, exp, probabilities, dropped probabilities); this keeps the
  probabilities only, in the compute dtype, and regenerates the (hash) dropout mask
  from `seeds`. Scores and their gradients accumulate in float32 and the softmax runs in
  float32. q, k and v are moved head-major for the batched matmuls (XLA's CPU dots on
  [b,q,h,d] operands insert a transpose each). `blocked` at rate 0: in cache-sized head groups
  (`_head_groups`; the dropout hash indexes the whole array, so rates above 0 run in one).
  """
  return _attention_with_dropout_fwd(q, k, v, kv_lengths, seeds, rate, blocked)[0]


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
  dropped = (ops.apply_hash_dropout(probs, seeds, rate, full_shape) if rate
             else probs).astype(vh.dtype)  # = hash_dropout's mask
  return _einsum32("...qk,...kd->...qd", dropped, vh).astype(vh.dtype), probs.astype(vh.dtype)


def _attend(kernel, arrays, seeds, rate, full_shape, blocked):
  """kernel(*arrays, seeds, rate, full_shape) (`_softmax_attention` or its backward), in
  cache-sized head groups where blocked, at rate 0 (the dropout hash indexes whole arrays)."""
  if blocked and not rate:
    return _head_groups(lambda *xs: kernel(*xs, _NO_SEEDS, 0.0, None), *arrays)
  return kernel(*arrays, seeds, rate, full_shape)


def _softmax_attention_bwd(qh, kh, vh, probs, g, seeds, rate, full_shape):
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
    keep = ops.hash_bits(seeds, probs.shape, full_shape) >= ops.drop_threshold(rate)
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


def _attention_with_dropout_fwd(q, k, v, kv_lengths, seeds, rate, blocked):
  q = _scaled(q)
  mask = _key_mask(kv_lengths, k.shape[1])
  out, probs = _attend(
      _softmax_attention, (_heads_major(q), _heads_major(k), _heads_major(v), mask), seeds,
      rate, (q.shape[0], q.shape[2], k.shape[1], k.shape[1]), blocked)
  return _heads_major(out), (q, k, v, probs, kv_lengths, seeds)


def _attention_with_dropout_bwd(rate, blocked, residuals, g):
  q, k, v, probs, kv_lengths, seeds = residuals  # q carries the 1/sqrt(d) scale
  g_q, g_k, g_v = _attend(
      _softmax_attention_bwd, (*(_heads_major(x) for x in (q, k, v)), probs, _heads_major(g)),
      seeds, rate, _self_attention_shape(probs), blocked)
  from_dims_major = lambda x: jnp.transpose(x, (0, 3, 1, 2))  # [b,h,d,len] -> [b,len,h,d]
  no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (_heads_major(g_q * np.float32(1.0 / np.sqrt(q.shape[-1]))).astype(q.dtype),
          from_dims_major(g_k).astype(k.dtype), from_dims_major(g_v).astype(v.dtype),
          no_grad(kv_lengths), no_grad(seeds))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _masked_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array,
                      blocked: bool) -> jax.Array:
  """softmax(qh kh^T where mask) vh on heads-major [..., len, dim], qh scaled: the kernel of
  the local layers (a band mask, or a band's blocks); backward keeps the probabilities only."""
  return _attend(_softmax_attention, (qh, kh, vh, mask), _NO_SEEDS, 0.0, None, blocked)[0]


def _masked_attention_fwd(qh, kh, vh, mask, blocked):
  out, probs = _attend(_softmax_attention, (qh, kh, vh, mask), _NO_SEEDS, 0.0, None, blocked)
  return out, (qh, kh, vh, probs, mask)


def _masked_attention_bwd(blocked, residuals, g):
  qh, kh, vh, probs, mask = residuals
  g_q, g_k, g_v = _attend(_softmax_attention_bwd, (qh, kh, vh, probs, g), _NO_SEEDS, 0.0, None,
                          blocked)
  return (g_q.astype(qh.dtype), jnp.swapaxes(g_k, -1, -2).astype(kh.dtype),
          jnp.swapaxes(g_v, -1, -2).astype(vh.dtype), np.zeros(mask.shape, jax.dtypes.float0))


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


attention_with_dropout.defvjp(_attention_with_dropout_fwd, _attention_with_dropout_bwd)
