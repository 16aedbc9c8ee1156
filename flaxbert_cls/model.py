"""BERT-family encoder and classification heads in Flax linen.

The parameter tree mirrors Hugging Face `BertModel` names one to one
(`bert/encoder/layer/3/attention/self/query/kernel` <-> `bert.encoder.layer.3.
attention.self.query.weight`), so `hf.py` maps checkpoints mechanically. Every
parameter carries logical axis names; `sharding.py` maps them onto the mesh with
the rules in the config.

RoBERTa, DistilBERT and ELECTRA are the same encoder with a few switches in
`BertConfig` (position ids, token types, embedding projection, head); their
parameters keep the BERT names under `bert/` here, so freezing and weight-decay
patterns work for every family, and `hf.py` renames them for each family.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxbert_cls import sharding as sharding_lib
from flaxbert_cls.sharding import ACTIVATION_BATCH, ACTIVATION_HEADS, ACTIVATION_MLP

# Logical axis names used on parameters and activations. Rules in the config map
# them to mesh axes ('data', 'fsdp', 'tensor').
EMBED = "embed"  # hidden size
MLP = "mlp"  # intermediate (feed-forward) size
HEADS = "heads"  # attention output features (heads * head_dim), split by head
VOCAB = "vocab"
CLASSES = "classes"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Encoder sizes, read from a checkpoint's config.json (see `from_hf`)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  classifier_dropout: float | None = None
  pad_token_id: int = 0
  # Family switches (set by `hf.model_config` from the checkpoint's model_type).
  # > 0: RoBERTa position ids, counting non-pad tokens from this id (pad_token_id + 1).
  position_offset: int = 0
  embedding_size: int | None = None  # ELECTRA: embeddings narrower than hidden_size
  classifier_head: str = "bert"  # one of CLASSIFIER_HEADS
  # Not HF fields: how to run it.
  dtype: str = "float32"  # compute dtype; parameters stay float32
  attention_impl: str | None = None  # None/'xla'/'cudnn', for jax.nn.dot_product_attention
  lora_rank: int = 0  # > 0: low-rank adapters on lora_targets (base weights frozen by optim)
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("query", "value")
  # On a mesh, activations are pinned by these rules (sharding.activation_rules): the
  # batch stays split, so FSDP gathers weights, not activations. None: unconstrained.
  mesh: Any = None
  activation_rules: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> "BertConfig":
    """Takes the fields this module knows from a transformers config (or dict)."""
    values = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)

  def __post_init__(self):
    if self.classifier_head not in CLASSIFIER_HEADS:
      raise ValueError(f"classifier_head={self.classifier_head!r}; use one of {CLASSIFIER_HEADS}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


# bert: pooler (dense+tanh on [CLS]) -> classifier. roberta / electra: classifier/dense
# (+tanh / +gelu) -> classifier/out_proj on the first token, no pooler. distilbert:
# pre_classifier + ReLU -> classifier on the first token, no pooler.
CLASSIFIER_HEADS = ("bert", "roberta", "electra", "distilbert")


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def constrain(x: jax.Array, axes: tuple[str | None, ...], cfg: BertConfig) -> jax.Array:
  """Pins an activation's sharding by logical axis names (a no-op without a mesh)."""
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

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias, lora = self.weights(x.shape[-1])
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    return self.add_low_rank(y, x, lora) + bias.astype(self.dtype)

  @nn.compact
  def weights(self, in_features: int) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """(kernel, bias, (lora_a, lora_b) or ()): callable by a parent that fuses layers."""
    kernel = self.param("kernel", nn.with_logical_partitioning(_kernel_init(), self.axes),
                        (in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
                       (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
                      (x.shape[-1],), jnp.float32)
    return layer_norm(x.astype(jnp.float32), scale, bias, self.eps).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis whose backward keeps x_hat and 1/std only.

  Autodiff of the plain formula keeps three [batch, length, hidden] arrays per
  LayerNorm (x - mean, its square's factor, x_hat); this keeps one. Same values and
  gradients (tests/test_model.py).
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  centered = x - x.mean(-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
  x_hat, inv_std = jax.lax.optimization_barrier((centered * inv_std, inv_std))
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
  """A bijective 32-bit integer hash (lowbias32: xorshift-multiply, low avalanche bias)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits: two keyed hash rounds over each element's global index.

  For dropout masks only. Threefry costs ~100 integer ops per element; on CPU the
  attention-probability masks alone took ~30% of a train step. This is ~10 ops, fuses
  into the consumer, and, being a function of the global index, gives the same mask
  however the array is sharded. Not for anything that needs cryptographic quality.
  """
  return _hash_bits(jax.random.bits(key, (2,), jnp.uint32), shape)


def _hash_bits(seeds: jax.Array, shape: tuple[int, ...],
               full_shape: tuple[int, ...] | None = None) -> jax.Array:
  """full_shape: `shape` is the corner [:shape[0], :shape[1], ...] of a full_shape array and
  gets that array's bits there (a first-token-only layer drops what the full one would)."""
  index = jnp.zeros(shape, jnp.uint32)
  for d, size in enumerate(full_shape or shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, d)
  return _mix32(_mix32(index ^ seeds[0]) ^ seeds[1])


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
    return hash_dropout(x, jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32),
                        self.rate, full_shape)


def _drop_threshold(rate: float) -> jax.Array:
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
  keep = _hash_bits(seeds, x.shape, full_shape) >= _drop_threshold(rate)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _hash_dropout_fwd(x, seeds, rate, full_shape):
  return _apply_hash_dropout(x, seeds, rate, full_shape), seeds


def _hash_dropout_bwd(rate, full_shape, seeds, g):
  return (_apply_hash_dropout(g, seeds, rate, full_shape),
          np.zeros(seeds.shape, jax.dtypes.float0))


hash_dropout.defvjp(_hash_dropout_fwd, _hash_dropout_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def attention_with_dropout(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           seeds: jax.Array, rate: float) -> jax.Array:
  """dropout(softmax(q k^T / sqrt(d), keys where mask)) v for [batch, length, heads, dim].

  Autodiff of the plain composition keeps ~4 [b,h,q,k] float32 arrays per layer
  (masked scores, exp, probabilities, dropped probabilities); this keeps the
  probabilities only and regenerates the (hash) dropout mask from `seeds`. q, k and v
  are moved head-major for the batched matmuls (XLA's CPU dots on [b,q,h,d] operands
  insert a transpose each).
  Same values and gradients as the composition (tests/test_attention.py).
  """
  return _attention_with_dropout_fwd(q, k, v, mask, seeds, rate)[0]


def _self_attention_shape(probs: jax.Array) -> tuple[int, ...]:
  """[b, h, kv, kv]: fewer queries (first_token_only) are the first rows of self-attention."""
  return (*probs.shape[:2], probs.shape[3], probs.shape[3])


def _heads_major(x: jax.Array) -> jax.Array:  # [b,len,h,d] <-> [b,h,len,d]
  return jnp.transpose(x, (0, 2, 1, 3))


def _attention_with_dropout_fwd(q, k, v, mask, seeds, rate):
  q = q * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
  scores = jnp.einsum("bhqd,bhkd->bhqk", _heads_major(q), _heads_major(k)).astype(jnp.float32)
  probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
  dropped = _apply_hash_dropout(probs, seeds, rate, _self_attention_shape(probs)
                                ).astype(v.dtype)  # = hash_dropout's mask
  out = _heads_major(jnp.einsum("bhqk,bhkd->bhqd", dropped, _heads_major(v)))
  return out, (q, k, v, probs, mask, seeds)


def _attention_with_dropout_bwd(rate, residuals, g):
  q, k, v, probs, mask, seeds = residuals  # q carries the 1/sqrt(d) scale
  # Every matmul below is row-major x row-major ([..., m, k] @ [..., k, n]): XLA's CPU
  # dots contracting two leading dims ([q,k]^T @ [q,d]) fall back to a ~2x slower kernel,
  # so the operands are transposed (cheap, [b,h,len,d]) instead of the probabilities.
  dims_major = lambda x: jnp.transpose(x, (0, 2, 3, 1))  # [b,len,h,d] -> [b,h,d,len]
  # Written differently from the forward's (where, then scale): XLA's CSE would merge
  # equal expressions and keep the forward's dropped probabilities alive until here.
  keep = _hash_bits(seeds, probs.shape, _self_attention_shape(probs)) >= _drop_threshold(rate)
  dropped = (jnp.where(keep, probs, 0.0) * (1.0 / (1.0 - rate))).astype(v.dtype)
  g_v = jnp.einsum("bhdq,bhqk->bhdk", dims_major(g), dropped)
  g_probs = jnp.where(keep, jnp.einsum("bhqd,bhdk->bhqk", _heads_major(g), dims_major(v)
                                       ).astype(jnp.float32) / (1.0 - rate), 0.0)
  # Softmax backward; masked keys have probability 0, so their score gradient is 0.
  g_scores = (probs * (g_probs - jnp.sum(g_probs * probs, axis=-1, keepdims=True))
              ).astype(q.dtype)
  g_q = jnp.einsum("bhqk,bhkd->bhqd", g_scores, _heads_major(k)) * jnp.asarray(
      1.0 / np.sqrt(q.shape[-1]), q.dtype)
  g_k = jnp.einsum("bhdq,bhqk->bhdk", dims_major(q), g_scores)
  from_dims_major = lambda x: jnp.transpose(x, (0, 3, 1, 2))  # [b,h,d,len] -> [b,len,h,d]
  no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (_heads_major(g_q), from_dims_major(g_k), from_dims_major(g_v), no_grad(mask),
          no_grad(seeds))


attention_with_dropout.defvjp(_attention_with_dropout_fwd, _attention_with_dropout_bwd)


class Embed(nn.Module):
  num_embeddings: int
  features: int
  axes: tuple[str | None, str | None]
  config: BertConfig

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.param("embedding", nn.with_logical_partitioning(_kernel_init(), self.axes),
                       (self.num_embeddings, self.features), jnp.float32)
    # Features gathered before the lookup (as FSDP does for every kernel): a lookup into a
    # feature-sharded table gives feature-sharded rows, which the SPMD partitioner can
    # only turn into batch-sharded ones by replicating them (a full rematerialization).
    table = constrain(table, (self.axes[0], None), self.config)
    return jnp.take(table, ids, axis=0)


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
    cfg = self.config
    size = cfg.embedding_size or cfg.hidden_size
    words = Embed(cfg.vocab_size, size, (VOCAB, EMBED), cfg, name="word_embeddings")(input_ids)
    positions = Embed(cfg.max_position_embeddings, size, (None, EMBED), cfg,
                      name="position_embeddings")(position_ids)
    x = words + positions
    if cfg.type_vocab_size == 1:
      # RoBERTa has one token type; a BERT-style tokenizer's segment ids of 1 would
      # index past the table, so every token is type 0 (what HF's buffer gives).
      token_type_ids = jnp.zeros_like(input_ids)
    if cfg.type_vocab_size > 0:
      x = x + Embed(cfg.type_vocab_size, size, (None, EMBED), cfg,
                    name="token_type_embeddings")(token_type_ids)
    x = LayerNorm(cfg.layer_norm_eps, cfg.dtype, name="LayerNorm")(x)
    x = constrain(x, HIDDEN_ACTIVATION, cfg)
    return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool, first_token_only: bool = False):
    cfg = self.config
    batch = x.shape[0]
    # first_token_only: queries (and so the output) for position 0 only; keys and values
    # still come from every position.
    x_q = x[:, :1] if first_token_only else x

    # One matmul for query, key and value (kernels stacked [in, 3, out]): forward +
    # backward 34.5 vs 47.8 ms per MiniLM layer on CPU (batch 32 x 128) than three.
    layers = [Dense(cfg.hidden_size, (EMBED, HEADS), cfg.dtype,
                    cfg.lora_rank if name in cfg.lora_targets else 0, cfg.lora_alpha, name=name)
              for name in ("query", "key", "value")]
    weights = [layer.weights(x.shape[-1]) for layer in layers]
    kernel = jnp.stack([w[0] for w in weights], axis=1).astype(cfg.dtype)
    bias = jnp.stack([w[1] for w in weights]).astype(cfg.dtype)
    project = lambda inputs, parts: jnp.einsum(
        "bsi,ito->bsto", inputs.astype(cfg.dtype), kernel[:, parts]) + bias[parts]
    if first_token_only:
      key_value = project(x, slice(1, 3))
      parts = [project(x_q, slice(0, 1))[:, :, 0], key_value[:, :, 0], key_value[:, :, 1]]
    else:
      qkv = project(x, slice(0, 3))
      parts = [qkv[:, :, i] for i in range(3)]

    def split(i):
      y = layers[i].add_low_rank(parts[i], x_q if i == 0 else x, weights[i][2])
      y = y.reshape(batch, y.shape[1], cfg.num_attention_heads, cfg.head_dim)
      return constrain(y, (ACTIVATION_BATCH, None, ACTIVATION_HEADS, None), cfg)

    q, k, v = split(0), split(1), split(2)
    mask = attention_mask[:, None, None, :].astype(bool)  # [batch, 1, 1, kv_len]
    dropout = cfg.attention_probs_dropout_prob
    if deterministic or dropout == 0.0:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
    else:
      # Attention-probability dropout needs the probabilities, which fused kernels hide.
      seeds = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
      out = attention_with_dropout(q, k, v, mask, seeds, dropout)
    return out.reshape(batch, q.shape[1], cfg.hidden_size)


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool, first_token_only: bool = False):
    cfg = self.config
    h = BertSelfAttention(cfg, name="self")(x, attention_mask, deterministic, first_token_only)
    residual, full_length = (x[:, :1], x.shape[1]) if first_token_only else (x, None)
    return BertOutput(cfg, (HEADS, EMBED), name="output")(h, residual, deterministic, full_length)


class BertOutput(nn.Module):
  """dense -> dropout -> LayerNorm(residual + .); used after attention and MLP."""

  config: BertConfig
  axes: tuple[str, str]

  @nn.compact
  def __call__(self, h, residual, deterministic: bool, full_length: int | None = None):
    cfg = self.config
    h = Dense(cfg.hidden_size, self.axes, cfg.dtype, name="dense")(h)
    full_shape = None if full_length is None else (h.shape[0], full_length, h.shape[2])
    h = Dropout(cfg.hidden_dropout_prob)(h, deterministic, full_shape)
    h = LayerNorm(cfg.layer_norm_eps, cfg.dtype, name="LayerNorm")(h + residual)
    return constrain(h, HIDDEN_ACTIVATION, cfg)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = Dense(cfg.intermediate_size, (EMBED, MLP), cfg.dtype, name="dense")(x)
    # Rematerialized: backward keeps h only, not the erf/exp intermediates of exact GELU
    # (3 [batch, length, intermediate] arrays per layer); recomputing them is elementwise.
    act = jax.checkpoint(_ACTIVATIONS[cfg.hidden_act])
    return constrain(act(h), (ACTIVATION_BATCH, None, ACTIVATION_MLP), cfg)


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool, first_token_only: bool = False):
    cfg = self.config
    full_length = x.shape[1] if first_token_only else None  # dropout masks as the full layer's
    x = BertAttention(cfg, name="attention")(x, attention_mask, deterministic, first_token_only)
    h = BertIntermediate(cfg, name="intermediate")(x)
    return BertOutput(cfg, (MLP, EMBED), name="output")(h, x, deterministic, full_length)


class BertLayerCollection(nn.Module):
  """Named `layer` with children `0..N-1`, giving the HF path encoder/layer/<i>/..."""

  config: BertConfig
  first_token_only: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool):
    last = self.config.num_hidden_layers - 1
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, name=str(i))(x, attention_mask, deterministic,
                                              self.first_token_only and i == last)
    return x


class BertEncoder(nn.Module):
  config: BertConfig
  first_token_only: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool):
    return BertLayerCollection(self.config, self.first_token_only, name="layer")(
        x, attention_mask, deterministic)


class BertPooler(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    cls = constrain(x[:, 0], (ACTIVATION_BATCH, None), self.config)
    return jnp.tanh(Dense(self.config.hidden_size, (EMBED, None), self.config.dtype,
                          name="dense")(cls))


class BertModel(nn.Module):
  """Returns (last_hidden_state, pooler_output), both float32.

  first_token_only: the last layer computes position 0 only (last_hidden_state is
  [batch, 1, hidden]), which is all a classification head reads: its queries,
  attention output, feed-forward and LayerNorms run on one token instead of `length`
  (the same values; keys and values still see every token).
  """

  config: BertConfig
  add_pooling_layer: bool = True
  first_token_only: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if cfg.position_offset > 0:
      # RoBERTa (HF create_position_ids_from_input_ids): real tokens count from
      # position_offset, pad tokens get position_offset - 1. With right padding the
      # real tokens' ids do not depend on the pad id, so batches padded with 0 agree.
      real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
      position_ids = jnp.cumsum(real, axis=-1) * real + (cfg.position_offset - 1)
    else:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    x = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids,
                                               deterministic)
    if cfg.embedding_size and cfg.embedding_size != cfg.hidden_size:
      x = Dense(cfg.hidden_size, (None, EMBED), cfg.dtype, name="embeddings_project")(x)
      x = constrain(x, HIDDEN_ACTIVATION, cfg)
    x = BertEncoder(cfg, self.first_token_only, name="encoder")(x, attention_mask, deterministic)
    pooled = BertPooler(cfg, name="pooler")(x) if self.add_pooling_layer else None
    return x.astype(jnp.float32), None if pooled is None else pooled.astype(jnp.float32)


class ClassificationHead(nn.Module):
  """RoBERTa / ELECTRA head: dropout, dense, activation, dropout, out_proj."""

  config: BertConfig
  num_labels: int
  activation: Callable[[jax.Array], jax.Array]
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = nn.Dropout(self.rate)(x, deterministic=deterministic)
    x = self.activation(Dense(self.config.hidden_size, (EMBED, None), jnp.float32,
                              name="dense")(x))
    x = nn.Dropout(self.rate)(x, deterministic=deterministic)
    return Dense(self.num_labels, (None, CLASSES), jnp.float32, name="out_proj")(x)


class BertForSequenceClassification(nn.Module):
  """Encoder + the family's head (`config.classifier_head`). num_labels == 1 is regression.

  bert: dropout + dense on the pooled [CLS] output; the others see the first token's
  hidden state (see CLASSIFIER_HEADS).
  """

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
    cfg = self.config
    hidden, pooled = BertModel(cfg, add_pooling_layer=cfg.classifier_head == "bert",
                               first_token_only=True, name="bert")(
        input_ids, attention_mask, token_type_ids, deterministic)
    return _head_logits(cfg, self.num_labels, hidden, pooled, deterministic)


def _head_logits(cfg: BertConfig, num_labels: int, hidden: jax.Array, pooled: jax.Array | None,
                 deterministic: bool) -> jax.Array:
  """The family's head; called inside a compact method, so its params nest under the caller."""
  head = cfg.classifier_head
  rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
  # The heads run in float32: logits and loss stay exact under bf16 compute.
  if head == "bert":
    pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
    return Dense(num_labels, (EMBED, CLASSES), jnp.float32, name="classifier")(pooled)
  first = constrain(hidden[:, 0], (ACTIVATION_BATCH, None), cfg)
  if head == "distilbert":
    x = nn.relu(Dense(cfg.hidden_size, (EMBED, None), jnp.float32, name="pre_classifier")(first))
    x = nn.Dropout(rate)(x, deterministic=deterministic)
    return Dense(num_labels, (None, CLASSES), jnp.float32, name="classifier")(x)
  activation = jnp.tanh if head == "roberta" else _ACTIVATIONS["gelu"]
  return ClassificationHead(cfg, num_labels, activation, rate, name="classifier")(
      first, deterministic)


class TaskHead(nn.Module):
  """One task's head of a multi-task model: the same layers (and HF names) as a single task."""

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, hidden, pooled, deterministic: bool):
    return _head_logits(self.config, self.num_labels, hidden, pooled, deterministic)


class MultiTaskClassifier(nn.Module):
  """One shared encoder, one head per task: params `bert/...` and `heads/<task>/classifier/...`.

  Returns a tuple of logits, one [batch, num_labels[t]] array per task. Every head runs
  on every batch (a head is one or two small matmuls), so one program serves all tasks;
  the loss picks each example's head by its task id.
  """

  config: BertConfig
  num_labels: tuple[int, ...]
  task_names: tuple[str, ...]

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
    cfg = self.config
    hidden, pooled = BertModel(cfg, add_pooling_layer=cfg.classifier_head == "bert",
                               first_token_only=True, name="bert")(
        input_ids, attention_mask, token_type_ids, deterministic)
    heads = _Heads(cfg, self.num_labels, self.task_names, name="heads")
    return heads(hidden, pooled, deterministic)


class _Heads(nn.Module):
  config: BertConfig
  num_labels: tuple[int, ...]
  task_names: tuple[str, ...]

  @nn.compact
  def __call__(self, hidden, pooled, deterministic: bool):
    return tuple(TaskHead(self.config, n, name=name)(hidden, pooled, deterministic)
                 for n, name in zip(self.num_labels, self.task_names))


def task_params(params: Any, task_name: str) -> Any:
  """A multi-task model's params for one task, as BertForSequenceClassification names them."""
  return {"bert": params["bert"], **params["heads"][task_name]}
