"""Building blocks with logical axis names: Dense (+ LoRA), LayerNorm, Dropout, Embed.

Every parameter carries logical axis names; `sharding.py` maps them onto the mesh with
the rules in the config. Kernels are float32 and cast to the compute dtype at use.
LayerNorm and dropout call the custom kernels in `ops.py`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxbert_cls.model import ops
from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.model.sharding import ACTIVATION_BATCH

# Logical axis names used on parameters and activations. Rules in the config map
# them to mesh axes ('data', 'fsdp', 'tensor').
EMBED = "embed"  # hidden size
MLP = "mlp"  # intermediate (feed-forward) size
HEADS = "heads"  # attention output features (heads * head_dim), split by head
VOCAB = "vocab"
CLASSES = "classes"


def constrain(x: jax.Array, axes: tuple[str | None, ...], cfg: Any) -> jax.Array:
  """Pins an activation's sharding by logical axis names (a no-op without a mesh).

  cfg: anything with `mesh` and `activation_rules` (model.BertConfig).
  """
  if cfg.mesh is None:
    return x
  return sharding_lib.constrain(x, axes, cfg.mesh, cfg.activation_rules)


# [batch, length, hidden]: batch split over data/fsdp; hidden whole on every device.
HIDDEN_ACTIVATION = (ACTIVATION_BATCH, None, None)


def _kernel_init(std: float = 0.02):
  return nn.initializers.truncated_normal(std)


class Dense(nn.Module):
  """A dense layer with logical axis names on kernel and bias; computes in `dtype`.

  With lora_rank = r > 0 it adds a low-rank update (alpha / r) * x @ lora_a @ lora_b;
  lora_b starts at zero, so the layer starts as the pre-trained one (`merge_lora`).
  """

  features: int
  axes: tuple[str | None, str | None]
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0
  use_bias: bool = True  # ModernBERT's layers have none

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias, lora = self.weights(x.shape[-1])
    y = ops.dense(x.astype(self.dtype), kernel.astype(self.dtype))
    return self.add_low_rank(y, x, lora) + bias.astype(self.dtype)

  @nn.compact
  def weights(self, in_features: int) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """(kernel, bias, (lora_a, lora_b) or ()): callable by a parent that fuses layers."""
    kernel = self.param("kernel", nn.with_logical_partitioning(_kernel_init(), self.axes),
                        (in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                      (self.features,), jnp.float32) if self.use_bias else jnp.zeros(
                          (self.features,), jnp.float32)
    if not self.lora_rank:
      return kernel, bias, ()
    a = self.param("lora_a", nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), (self.axes[0], None)),
                   (in_features, self.lora_rank), jnp.float32)
    b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, self.axes[1])), (self.lora_rank, self.features),
                   jnp.float32)
    return kernel, bias, (a, b)

  def add_low_rank(self, y: jax.Array, x: jax.Array, lora: tuple[jax.Array, ...]) -> jax.Array:
    """y + the LoRA update of x (y itself without adapters)."""
    if not lora:
      return y
    a, b = (w.astype(self.dtype) for w in lora)
    return y + (self.lora_alpha / self.lora_rank) * jnp.einsum(
        "...r,ro->...o", jnp.einsum("...i,ir->...r", x.astype(self.dtype), a), b)


def merge_lora(params: Any, lora_alpha: float) -> Any:
  """Folds every lora_a/lora_b pair into its kernel: a plain BERT tree, equal outputs."""
  if isinstance(params, dict) or hasattr(params, "items"):
    params = dict(params)
    if "lora_a" in params:
      a, b = params.pop("lora_a"), params.pop("lora_b")
      params["kernel"] = params["kernel"] + (lora_alpha / a.shape[-1]) * (a @ b)
    return {k: merge_lora(v, lora_alpha) for k, v in params.items()}
  return params


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (HF names: LayerNorm.weight/bias -> scale/bias)."""

  eps: float
  dtype: Any = jnp.float32
  use_bias: bool = True  # ModernBERT's (norm_bias=False) have none

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
                       (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
                      (x.shape[-1],), jnp.float32) if self.use_bias else jnp.zeros(
                          (x.shape[-1],), jnp.float32)
    return ops.layer_norm(x.astype(jnp.float32), scale, bias, self.eps).astype(self.dtype)


class Dropout(nn.Module):
  """nn.Dropout's semantics ('dropout' rng, scale kept units by 1 / (1 - rate)), hash bits."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               full_shape: tuple[int, ...] | None = None) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    return ops.hash_dropout(x, jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32),
                            self.rate, full_shape)


class Embed(nn.Module):
  """An embedding table [num_embeddings, features]; config: model.BertConfig (its mesh)."""

  num_embeddings: int
  features: int
  axes: tuple[str | None, str | None]
  config: Any

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.param("embedding", nn.with_logical_partitioning(_kernel_init(), self.axes),
                       (self.num_embeddings, self.features), jnp.float32)
    # Features gathered before the lookup (as FSDP does for every kernel): a lookup into a
    # feature-sharded table gives feature-sharded rows, which the SPMD partitioner can
    # only turn into batch-sharded ones by replicating them (a full rematerialization).
    table = constrain(table, (self.axes[0], None), self.config)
    return jnp.take(table, ids, axis=0)
