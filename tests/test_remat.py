"""Rematerialization (config.remat_policy): the same parameters, logits and gradients, dropout
included, from fewer saved residuals; a bad policy is one line. (What a TPU's HBM gains is
`plan`'s figure, docs/pods.md: XLA's CPU scheduler does not schedule for memory.)"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert_cls import config as config_lib
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.model import encoder_config
from numerics import assert_close

B, L = 8, 128
BASE = model_lib.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4,
                            intermediate_size=64, num_hidden_layers=2)


def _inputs():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 50, size=(B, L)), jnp.int32)
  mask = jnp.asarray(np.arange(L)[None, :] < rng.integers(1, L + 1, size=(B, 1)), jnp.int32)
  return ids, mask


def _grad_fn(policy):
  model = model_lib.BertForSequenceClassification(
      dataclasses.replace(BASE, remat_policy=policy), 3)

  def loss(params, ids, mask):  # dropout on: recomputed masks must be the saved ones
    logits = model.apply({"params": params}, ids, mask, deterministic=False,
                         rngs={"dropout": jax.random.key(1)})
    return jnp.sum(logits * jnp.arange(3.0)), logits
  return model, jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_remat_policies_keep_parameters_logits_and_gradients():
  ids, mask = _inputs()
  model, plain = _grad_fn("none")
  params = nn.unbox(model.init(jax.random.key(0), ids, mask))["params"]
  (_, want), want_grads = plain(params, ids, mask)
  for policy in ("full", "minimal"):
    remat_model, step = _grad_fn(policy)
    shapes = jax.eval_shape(lambda m=remat_model: nn.unbox(m.init(jax.random.key(0), ids, mask)))
    assert jax.tree.structure(shapes["params"]) == jax.tree.structure(params), policy
    (_, got), got_grads = step(params, ids, mask)
    assert_close(got, want, 1e-5, f"{policy} logits")
    wanted = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    scale = max(float(np.abs(np.asarray(w)).max()) for w in wanted.values())
    for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
      assert_close(g, wanted[path], 1e-5, f"{policy} {jax.tree_util.keystr(path)}",
                   floor=scale * 1e-2)


def test_stronger_policies_save_fewer_residuals_for_the_backward_pass():
  """jax.vjp's backward function holds what the forward saved: its arrays' bytes."""
  ids, mask = _inputs()
  saved = {}
  for policy in ("none", "minimal", "full"):
    model = model_lib.BertForSequenceClassification(
        dataclasses.replace(BASE, remat_policy=policy), 3)
    params = nn.unbox(model.init(jax.random.key(0), ids, mask))["params"]
    _, backward = jax.vjp(lambda p, m=model: m.apply(
        {"params": p}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)}),
                          params)
    saved[policy] = sum(x.nbytes for x in jax.tree.leaves(backward))
  assert saved["full"] < saved["minimal"] < saved["none"], saved


def test_the_policy_names_agree_and_a_bad_one_is_one_line():
  assert config_lib.REMAT_POLICIES == tuple(encoder_config.REMAT_POLICIES)
  config = config_lib.default_config()
  config.remat_policy = "everything"
  with pytest.raises(UserError, match="remat_policy"):
    config_lib.validate(config)
