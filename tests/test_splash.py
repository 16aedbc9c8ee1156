"""Splash attention (JAX's Pallas TPU kernel) in interpret mode on CPU: the same outputs and
gradients as XLA's attention with the same key lengths, padding never reaching a real token,
and the same on a mesh through shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from flaxbert_cls.model import attention as attention_lib
from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.model import splash
from numerics import assert_close

B, L, HEADS, DIM = 4, 128, 2, 8


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(B, L, HEADS, DIM)), jnp.float32) for _ in range(3))
  lengths = jnp.asarray([L, 17, 1, 0], jnp.int32)  # full, padded, [CLS] only, a padding row
  return q, k, v, lengths


def _loss(fn, q, k, v, lengths, weights):
  real = (jnp.arange(L)[None, :] < lengths[:, None])[:, :, None, None]  # a padding row: none
  return jnp.sum(jnp.where(real, fn(q, k, v, lengths) * weights, 0.0))


def test_splash_equals_xla_attention_forward_and_backward():
  q, k, v, lengths = _inputs()
  xla = lambda *a: attention_lib.attention(*a, "xla")
  kernel = lambda *a: splash.attention(*a, interpret=True)
  real = np.arange(L)[None, :] < np.asarray(lengths)[:, None]  # outputs that are ever read
  out, expected = np.asarray(kernel(q, k, v, lengths)), np.asarray(xla(q, k, v, lengths))
  assert_close(out[real], expected[real], 1e-5)  # padded queries' outputs are never read
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, L, HEADS, DIM)), jnp.float32)
  grads = jax.grad(_loss, argnums=(1, 2, 3))(kernel, q, k, v, lengths, weights)
  expected_grads = jax.grad(_loss, argnums=(1, 2, 3))(xla, q, k, v, lengths, weights)
  for name, got, want in zip("qkv", grads, expected_grads):
    assert_close(got, want, 1e-5, f"d{name}")


def test_splash_local_window_equals_xla_local_window():
  """ModernBERT's local layers: the kernel's band mask (a query sees keys <= w away) over two
  tiles, with padding; outputs and gradients as XLA's local_window_size gives them."""
  q, k, v, lengths = (jnp.concatenate([x, x[:, ::-1]], axis=1) if x.ndim == 4 else x
                      for x in _inputs(3))
  lengths = jnp.asarray([2 * L, 150, 1, 0], jnp.int32)
  xla = lambda *a: attention_lib.attention(*a, "xla", local_window=20)
  kernel = lambda *a: splash.attention(*a, interpret=True, local_window=20)
  real = np.arange(2 * L)[None, :] < np.asarray(lengths)[:, None]
  assert_close(np.asarray(kernel(q, k, v, lengths))[real],
               np.asarray(xla(q, k, v, lengths))[real], 1e-5)
  assert not np.allclose(np.asarray(xla(q, k, v, lengths))[real],
                         np.asarray(attention_lib.attention(q, k, v, lengths, "xla"))[real],
                         atol=1e-3)
  weights = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
  loss = lambda fn, *a: jnp.sum(jnp.where(real[:, :, None, None], fn(*a) * weights, 0.0))
  for name, got, want in zip("qkv", jax.grad(loss, argnums=(1, 2, 3))(kernel, q, k, v, lengths),
                             jax.grad(loss, argnums=(1, 2, 3))(xla, q, k, v, lengths)):
    assert_close(got, want, 1e-5, f"d{name}")


def test_padding_never_reaches_a_real_token():
  q, k, v, lengths = _inputs()
  k2 = k.at[1, 17:].set(100.0)
  v2 = v.at[1, 17:].set(-100.0)
  a = splash.attention(q, k, v, lengths, interpret=True)
  b = splash.attention(q, k2, v2, lengths, interpret=True)
  np.testing.assert_array_equal(np.asarray(a[1, :17]), np.asarray(b[1, :17]))


def test_splash_on_a_mesh_shards_batch_and_heads():
  devices = np.asarray(jax.devices()[:4]).reshape(2, 1, 2)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"))
  rules = sharding_lib.activation_rules((("heads", "tensor"),), mesh)
  q, k, v, lengths = _inputs(2)
  sharded = jax.jit(lambda *a: splash.attention(*a, mesh=mesh, rules=rules, interpret=True))
  real = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
  assert_close(np.asarray(sharded(q, k, v, lengths))[real],
               np.asarray(attention_lib.attention(q, k, v, lengths, "xla"))[real], 1e-5)
  one = jax.jit(lambda *a: splash.attention(*a, mesh=mesh, rules=rules, interpret=True))(
      q[:1], k[:1], v[:1], lengths[:1])  # a batch of 1 (init) does not split over 'data'
  assert one.shape == (1, L, HEADS, DIM)


def test_lengths_the_kernel_cannot_take_are_refused():
  q, k, v, lengths = _inputs()
  assert splash.supported(256) and not splash.supported(200) and not splash.supported(64)
  with pytest.raises(ValueError, match="query length 1 and key length 128"):
    splash.attention(q[:, :1], k, v, lengths, interpret=True)


def test_a_tiny_bert_through_splash_equals_xla_logits_and_gradients():
  """Every layer but the [CLS]-only last one runs the kernel; padding in every batch."""
  import dataclasses
  import flax.linen as nn
  from flaxbert_cls.model import bert as model_lib
  base = model_lib.BertConfig(vocab_size=50, hidden_size=16, num_attention_heads=2,
                              intermediate_size=32, num_hidden_layers=2,
                              attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(1, 50, size=(B, L)), jnp.int32)
  mask = jnp.asarray(np.arange(L)[None, :] < np.array([[L], [17], [1], [90]]), jnp.int32)
  xla = model_lib.BertForSequenceClassification(dataclasses.replace(base, attention_impl="xla"), 3)
  kernel = model_lib.BertForSequenceClassification(
      dataclasses.replace(base, attention_impl="splash"), 3)
  params = nn.unbox(xla.init(jax.random.key(0), ids, mask))["params"]

  def loss(model, p):
    logits = model.apply({"params": p}, ids, mask, deterministic=False,
                         rngs={"dropout": jax.random.key(1)})
    return jnp.sum(logits * jnp.arange(3.0)), logits

  (_, want), want_grads = jax.value_and_grad(lambda p: loss(xla, p), has_aux=True)(params)
  (_, got), got_grads = jax.value_and_grad(lambda p: loss(kernel, p), has_aux=True)(params)
  assert_close(got, want, 1e-5, "logits")
  wanted = dict(jax.tree_util.tree_leaves_with_path(want_grads))
  scale = max(float(np.abs(np.asarray(w)).max()) for w in wanted.values())
  for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
    # floor: a key bias's gradient is zero in exact arithmetic (rounding noise of the rest)
    assert_close(g, wanted[path], 1e-4, jax.tree_util.keystr(path), floor=scale * 1e-2)
