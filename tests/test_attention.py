"""Attention paths agree: jax.nn.dot_product_attention (eval) vs the explicit one (training).

BertSelfAttention runs jax.nn.dot_product_attention (config.attention_impl) when
deterministic, and einsum + softmax + dropout when training. Both must equal a
NumPy reference, padded keys masked; the hash dropout keeps its rate.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert_cls.model import layers
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.model import attention as attention_lib
from flaxbert_cls.model import ops
from numerics import assert_close

B, L, H, HEADS = 3, 7, 16, 4


def _setup(attention_impl=None, dropout=1e-9):
  cfg = model_lib.BertConfig(hidden_size=H, num_attention_heads=HEADS, intermediate_size=32,
                             num_hidden_layers=1, attention_probs_dropout_prob=dropout,
                             attention_impl=attention_impl)
  module = model_lib.BertSelfAttention(cfg)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, L, H)).astype(np.float32)
  lengths = np.array([7, 4, 1])  # one full row, one padded, one with only [CLS]
  mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32)
  params = nn.unbox(module.init(jax.random.key(1), x, mask, True))["params"]
  return module, params, x, mask


def _reference(params, x, mask):
  """Scaled dot-product attention in float64 NumPy, padded keys excluded."""
  def proj(name):
    p = params[name]
    y = x.astype(np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
    return y.reshape(B, L, HEADS, H // HEADS)
  q, k, v = proj("query"), proj("key"), proj("value")
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(H // HEADS)
  scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, L, H)


@pytest.mark.parametrize("attention_impl", [None, "xla"])
def test_dot_product_attention_path_matches_reference(attention_impl):
  module, params, x, mask = _setup(attention_impl)
  out = module.apply({"params": params}, x, mask, True)
  np.testing.assert_allclose(np.asarray(out), _reference(params, x, mask), atol=1e-5, rtol=1e-5)


def test_explicit_training_path_matches_fused_path():
  # A dropout rate of 1e-9 takes the explicit einsum/softmax/dropout branch while
  # dropping (almost surely) nothing: it must equal the fused path and the reference.
  module, params, x, mask = _setup()
  fused = module.apply({"params": params}, x, mask, True)
  explicit = module.apply({"params": params}, x, mask, False, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_allclose(np.asarray(explicit), np.asarray(fused), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(explicit), _reference(params, x, mask), atol=1e-5,
                             rtol=1e-5)


def test_padded_keys_do_not_change_real_outputs():
  module, params, x, mask = _setup()
  noisy = x.copy()
  noisy[mask == 0] = 100.0  # garbage in padded positions
  for deterministic in (True, False):
    rngs = {} if deterministic else {"dropout": jax.random.key(2)}
    a = module.apply({"params": params}, x, mask, deterministic, rngs=rngs)
    b = module.apply({"params": params}, noisy, mask, deterministic, rngs=rngs)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)


def test_hash_dropout_rate_scale_and_keys():
  x = jnp.ones((64, 8, 128), jnp.float32)
  drop = layers.Dropout(0.1)
  y = drop.apply({}, x, False, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.9) < 0.005
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
  other = np.asarray(drop.apply({}, x, False, rngs={"dropout": jax.random.key(1)})) != 0
  assert abs((kept == other).mean() - (0.9 ** 2 + 0.1 ** 2)) < 0.005  # independent masks
  assert np.array_equal(np.asarray(drop.apply({}, x, True)), np.asarray(x))


def test_attention_with_dropout_gradients_match_autodiff():
  rng = np.random.default_rng(3)
  q, k, v, w = (jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(4))
  lengths = jnp.asarray([3, 5], jnp.int32)
  mask = (jnp.arange(5)[None, :] < lengths[:, None])[:, None, None, :]
  seeds = jnp.asarray([7, 11], jnp.uint32)
  rate = 0.3

  def plain(q, k, v):  # the composition autodiff differentiates
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(4.0)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    keep = ops.hash_bits(seeds, probs.shape) >= ops.drop_threshold(rate)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, probs / (1 - rate), 0.0), v)

  def fused(q, k, v):
    return attention_lib.attention_with_dropout(q, k, v, lengths, seeds, rate)

  np.testing.assert_allclose(fused(q, k, v), plain(q, k, v), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.grad(lambda *x: jnp.sum(fused(*x) * w), (0, 1, 2))(q, k, v),
                  jax.grad(lambda *x: jnp.sum(plain(*x) * w), (0, 1, 2))(q, k, v)):
    assert np.abs(np.asarray(b)).max() > 1e-3  # a real gradient, not zeros on both sides
    assert_close(a, b, 1e-5, "attention gradient")


def test_layer_norm_and_dropout_gradients_match_autodiff():
  rng = np.random.default_rng(4)
  x, w = (jnp.asarray(rng.normal(size=(3, 7, 16)) * 3 + 1, jnp.float32) for _ in range(2))
  scale, bias = (jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(2))

  def plain_ln(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-12) * scale + bias

  ours = lambda x, s, b: ops.layer_norm(x, s, b, 1e-12)
  np.testing.assert_allclose(ours(x, scale, bias), plain_ln(x, scale, bias), rtol=1e-5,
                             atol=1e-5)
  for a, b in zip(jax.grad(lambda *p: jnp.sum(ours(*p) * w), (0, 1, 2))(x, scale, bias),
                  jax.grad(lambda *p: jnp.sum(plain_ln(*p) * w), (0, 1, 2))(x, scale, bias)):
    assert_close(a, b, 1e-5, "LayerNorm gradient")

  seeds = jnp.asarray([1, 2], jnp.uint32)
  dropped = ops.hash_dropout(x, seeds, 0.25)
  g = jax.grad(lambda x: jnp.sum(ops.hash_dropout(x, seeds, 0.25) * w))(x)
  # d/dx of x -> mask * x / (1 - rate) is the same mask and scale applied to w.
  np.testing.assert_allclose(np.asarray(g), np.where(np.asarray(dropped) != 0,
                                                     np.asarray(w) / 0.75, 0.0), rtol=1e-6)


def test_first_token_only_last_layer_equals_full_model():
  """Classifiers run the last layer on [CLS] only: same output and gradients as all tokens,
  dropout included (the first token's masks are the full layer's). LoRA on query and
  value, not key: both projection paths."""
  cfg = model_lib.BertConfig(vocab_size=50, hidden_size=H, num_attention_heads=HEADS,
                             intermediate_size=32, num_hidden_layers=2, lora_rank=2,
                             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  ids = np.random.default_rng(0).integers(1, 50, size=(B, L)).astype(np.int32)
  mask = (np.arange(L)[None, :] < np.array([7, 4, 1])[:, None]).astype(np.int32)
  full = model_lib.BertModel(cfg)
  pruned = model_lib.BertModel(cfg, first_token_only=True)
  params = nn.unbox(full.init(jax.random.key(1), ids, mask))["params"]
  params = jax.tree_util.tree_map_with_path(  # lora_b starts at zero: make the adapters count
      lambda p, x: x + 0.1 if "lora_b" in jax.tree_util.keystr(p) else x, params)

  def pooled_loss(module, p):
    hidden, pooled = module.apply({"params": p}, ids, mask, deterministic=False,
                                  rngs={"dropout": jax.random.key(2)})
    return jnp.sum(pooled ** 2) + jnp.sum(hidden[:, 0] ** 3), hidden

  (loss_full, hidden_full), grads_full = jax.jit(jax.value_and_grad(
      lambda p: pooled_loss(full, p), has_aux=True))(params)
  (loss_pruned, hidden_pruned), grads_pruned = jax.jit(jax.value_and_grad(
      lambda p: pooled_loss(pruned, p), has_aux=True))(params)
  assert hidden_pruned.shape == (B, 1, H)
  # Relative to each tensor's largest entry (some gradients reach ~800: summation order
  # differs between CPUs), and at least 1e-4 of the largest gradient overall (key biases'
  # gradients are zero in exact arithmetic, rounding noise here).
  assert_close(hidden_pruned, hidden_full[:, :1], 1e-5, "hidden")
  assert_close(loss_pruned, loss_full, 1e-5, "loss")
  flat_full = dict(jax.tree_util.tree_leaves_with_path(grads_full))
  overall = max(float(np.abs(g).max()) for g in flat_full.values())
  for path, g in jax.tree_util.tree_leaves_with_path(grads_pruned):
    assert_close(g, flat_full[path], 1e-5, jax.tree_util.keystr(path), floor=1e-4 * overall)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_pruned))


@pytest.mark.parametrize("kernel", ["banded_attention", "band_masked_attention"])
def test_local_attention_kernels_equal_the_masked_full_one(kernel):
  """ModernBERT's local layers on XLA: the band's blocks alone (long sequences), or our
  einsum kernel with a band mask (short ones), give what jax's masked L x L attention gives
  (every query of real tokens, lengths not a multiple of the window), and the same
  gradients through their custom VJP."""
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 45, 2, 8)), jnp.float32) for _ in range(3))
  lengths = jnp.asarray([45, 30, 2], jnp.int32)
  real = np.arange(45)[None, :] < np.asarray(lengths)[:, None]
  masked = lambda *a: jax.nn.dot_product_attention(*a[:3], key_value_seq_lengths=a[3],
                                                   local_window_size=(6, 6))
  ours = lambda *a: getattr(attention_lib, kernel)(*a, 6)
  assert_close(np.asarray(ours(q, k, v, lengths))[real],
               np.asarray(masked(q, k, v, lengths))[real], 1e-5)
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  loss = lambda fn, *a: jnp.sum(jnp.where(real[:, :, None, None], fn(*a) * weights, 0.0))
  for name, got, want in zip("qkv", jax.grad(loss, argnums=(1, 2, 3))(ours, q, k, v, lengths),
                             jax.grad(loss, argnums=(1, 2, 3))(masked, q, k, v, lengths)):
    assert_close(got, want, 1e-5, f"d{name}")


def test_local_attention_takes_the_blocks_past_the_crossover():
  """attention.attention's XLA path: the band's blocks on sequences longer than
  BANDED_MIN_WINDOWS windows, the band-masked kernel up to it (same values either way)."""
  rng = np.random.default_rng(8)
  window = 6
  least = attention_lib.BANDED_MIN_WINDOWS * window
  for length, kernel in ((least, attention_lib.band_masked_attention),
                         (least + 1, attention_lib.banded_attention)):
    q, k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 8)), jnp.float32) for _ in range(3))
    lengths = jnp.asarray([length, length - 5], jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(attention_lib.attention(q, k, v, lengths, "xla", local_window=window)),
        np.asarray(kernel(q, k, v, lengths, window)))


_NO_SEEDS = np.zeros((2,), np.uint32)
_SEGMENTS = np.asarray([[1] * 15 + [2] * 20 + [0] * 5, [1] * 40], np.int32)
_BLOCKED_KERNELS = {  # (q, k, v, lengths, blocked) -> [batch, len, heads, dim]
    "global": lambda q, k, v, n, b: attention_lib.attention_with_dropout(q, k, v, n, _NO_SEEDS,
                                                                         0.0, b),
    "first token": lambda q, k, v, n, b: attention_lib.attention_with_dropout(
        q[:, :1], k, v, n, _NO_SEEDS, 0.0, b),
    "banded": lambda q, k, v, n, b: attention_lib.banded_attention(q, k, v, n, 8, blocked=b),
    "band mask": lambda q, k, v, n, b: attention_lib.band_masked_attention(q, k, v, n, 8, b),
    "packed": lambda q, k, v, n, b: attention_lib.packed_attention(q, k, v, _SEGMENTS, None, b),
    "packed banded": lambda q, k, v, n, b: attention_lib.packed_attention(q, k, v, _SEGMENTS, 8,
                                                                          b),
}


@pytest.mark.parametrize("budget", [1, 13000])  # bytes: groups of one pair; of two (global)
@pytest.mark.parametrize("kernel", list(_BLOCKED_KERNELS))
def test_head_groups_equal_one_pass(kernel, budget, monkeypatch):
  """On one CPU device the XLA kernels run in cache-sized groups of (batch, head) pairs (a
  lax.map, forward and backward): outputs and gradients equal one pass over every pair, with
  padding, packed segments, a band and [CLS]-only queries."""
  monkeypatch.setattr(attention_lib, "CACHE_BLOCK_BYTES_PER_CORE", budget)
  monkeypatch.setattr(attention_lib, "_cores", lambda: 1)
  rng = np.random.default_rng(9)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 40, 4, 8)), jnp.float32) for _ in range(3))
  lengths = jnp.asarray([40, 23], jnp.int32)
  fn = _BLOCKED_KERNELS[kernel]
  weights = jnp.asarray(rng.normal(size=fn(q, k, v, lengths, False).shape), jnp.float32)
  loss = lambda blocked, *a: jnp.sum(fn(*a, lengths, blocked) * weights)
  grads = {b: jax.grad(loss, argnums=(1, 2, 3))(b, q, k, v) for b in (False, True)}
  grouped = "scan" in str(jax.make_jaxpr(jax.grad(loss, argnums=1), static_argnums=0)(True, q, k, v))
  assert grouped == (kernel != "first token" or budget == 1)  # 8 one-query pairs fit 13,000 B
  assert_close(fn(q, k, v, lengths, True), fn(q, k, v, lengths, False), 1e-6)
  for name, got, want in zip("qkv", grads[True], grads[False]):
    assert_close(got, want, 1e-6, f"d{name}")


def test_head_groups_on_one_cpu_device_only():
  """attention.attention groups heads on a one-device CPU mesh, not on a mesh of several
  (a loop over sharded rows would gather them) nor, with no mesh, in a process of several."""
  devices = np.asarray(jax.devices())
  one = jax.sharding.Mesh(devices[:1].reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  many = jax.sharding.Mesh(devices.reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
  assert attention_lib._cache_blocked(one)  # pylint: disable=protected-access
  assert jax.device_count() == 1 or not attention_lib._cache_blocked(many)  # pylint: disable=protected-access
  assert attention_lib._cache_blocked(None) == (jax.device_count() == 1)  # pylint: disable=protected-access
