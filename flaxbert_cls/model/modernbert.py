"""ModernBERT in Flax linen (Answer.AI / LightOn; Ettin and mmBERT share the architecture).

The encoder `BertForSequenceClassification` runs when `BertConfig.encoder == 'modernbert'`.
Parameter paths mirror transformers' `ModernBertModel` under `bert/` (hf.py maps them to
`model.`): embeddings/{tok_embeddings, norm}, layers/<i>/{attn_norm, attn/Wqkv, attn/Wo,
mlp_norm, mlp/Wi, mlp/Wo}, final_norm. What differs from BERT: rotary positions (one base for
global layers, one for local), pre-norm layers (layer 0 has no attention norm: the
embeddings' norm is its), a GeGLU feed-forward (Wi's output is [input, gate]), no biases
(attention_bias, mlp_bias, norm_bias), and local layers whose queries see the keys at most
local_attention // 2 positions away (transformers' layer_types; every third layer is global
in the published checkpoints).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from flaxbert_cls.errors import UserError
from flaxbert_cls.model import encoder_config
from flaxbert_cls.model import attention as attention_lib
from flaxbert_cls.model.encoder_config import ACTIVATIONS, BertConfig
from flaxbert_cls.model.layers import (EMBED, HEADS, HIDDEN_ACTIVATION, MLP, VOCAB, Dense, Dropout,
                                       Embed, LayerNorm, constrain)
from flaxbert_cls.model.sharding import ACTIVATION_BATCH, ACTIVATION_HEADS

LOCAL = "sliding_attention"  # transformers' layer_types names
GLOBAL = "full_attention"
LORA_TARGETS = ("Wqkv", "Wo", "Wi")  # the names lora_targets can take here


def rotary(x: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of [batch, length, heads, dim] (positions 0..length-1), in
  float32: x·cos + rotate_half(x)·sin, frequencies theta^(-2i/dim), halves concatenated."""
  dim = x.shape[-1]
  # The tables from the static shape, in NumPy: constants in the program. Computed in it,
  # XLA fused cos and sin into every consumer (per batch row and head: ~5% of a CPU step).
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  freqs = np.arange(x.shape[1], dtype=np.float32)[:, None] * inv_freq
  angles = np.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
  cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
  x = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x[..., dim // 2:], x[..., :dim // 2]], axis=-1)
  return x * cos + rotated * sin


class ModernBertAttention(nn.Module):
  config: BertConfig
  local: bool

  @nn.compact
  def __call__(self, x, kv_lengths, deterministic: bool, first_token_only: bool = False,
               segment_ids=None):
    cfg = self.config
    batch, length, _ = x.shape
    lora = lambda name: cfg.lora_rank if name in cfg.lora_targets else 0  # pylint: disable=unnecessary-lambda-assignment
    # [in, (3, heads, dim)]: transformers' layout, so the kernel maps as one matrix.
    qkv = Dense(3 * cfg.hidden_size, (EMBED, None), cfg.dtype, lora("Wqkv"), cfg.lora_alpha,
                use_bias=cfg.attention_bias, name="Wqkv")(x)
    qkv = qkv.reshape(batch, length, 3, cfg.num_attention_heads, cfg.head_dim)
    theta = cfg.local_rope_theta if self.local else cfg.global_rope_theta
    axes = (ACTIVATION_BATCH, None, ACTIVATION_HEADS, None)
    # first_token_only: the query (so the output) of position 0 only; keys and values of all.
    # Packed rows (segment_ids) keep the row's positions: a rotary score depends on i - j only.
    q, k = (constrain(rotary(qkv[:, :1 if first_token_only and i == 0 else length, i], theta)
                      .astype(cfg.dtype), axes, cfg) for i in (0, 1))
    v = constrain(qkv[:, :, 2], axes, cfg)
    out = attention_lib.attention(q, k, v, kv_lengths, cfg.attention_impl or "xla", cfg.mesh,
                                  cfg.activation_rules,
                                  local_window=cfg.local_attention // 2 if self.local else None,
                                  segment_ids=segment_ids)
    out = out.reshape(batch, q.shape[1], cfg.hidden_size)
    out = Dense(cfg.hidden_size, (HEADS, EMBED), cfg.dtype, lora("Wo"), cfg.lora_alpha,
                use_bias=cfg.attention_bias, name="Wo")(out)
    return Dropout(cfg.attention_probs_dropout_prob)(out, deterministic, (batch, length,
                                                                           cfg.hidden_size))


class ModernBertMLP(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, full_length: int | None = None):
    cfg = self.config
    h = Dense(2 * cfg.intermediate_size, (EMBED, MLP), cfg.dtype,
              cfg.lora_rank if "Wi" in cfg.lora_targets else 0, cfg.lora_alpha,
              use_bias=cfg.mlp_bias, name="Wi")(x)
    inputs, gate = jnp.split(h, 2, axis=-1)
    h = jax.checkpoint(ACTIVATIONS[cfg.hidden_act])(inputs) * gate  # GeGLU (as BERT's GELU)
    # A first-token-only layer's masks are the full layer's first rows (full_length).
    h = Dropout(cfg.mlp_dropout)(h, deterministic, (*h.shape[:1], full_length or h.shape[1],
                                                    *h.shape[2:]))
    return Dense(cfg.hidden_size, (MLP, EMBED), cfg.dtype, use_bias=cfg.mlp_bias, name="Wo")(h)


class ModernBertLayer(nn.Module):
  config: BertConfig
  first: bool  # layer 0: no attention norm (the embeddings' norm precedes it)
  local: bool

  @nn.compact
  def __call__(self, x, kv_lengths, deterministic: bool, first_token_only: bool = False,
               segment_ids=None):
    cfg = self.config
    norm = lambda name: LayerNorm(cfg.layer_norm_eps, cfg.dtype, cfg.norm_bias, name=name)  # pylint: disable=unnecessary-lambda-assignment
    h = x if self.first else norm("attn_norm")(x)
    attended = ModernBertAttention(cfg, self.local, name="attn")(h, kv_lengths, deterministic,
                                                                first_token_only, segment_ids)
    full_length = x.shape[1]
    x = (x[:, :1] if first_token_only else x) + attended
    x = x + ModernBertMLP(cfg, name="mlp")(norm("mlp_norm")(x), deterministic, full_length)
    return constrain(x, HIDDEN_ACTIVATION, cfg)


class ModernBertModel(nn.Module):
  """Returns the last hidden state [batch, length, hidden], float32 (after the final norm).

  first_token_only ([CLS] pooling): the last layer computes position 0 only, as BERT's
  (`bert.BertModel`), and the state is [batch, 1, hidden]: its query, attention output,
  Wo, GeGLU and norms see one token per example; keys and values still see every token.
  `segment_ids` [batch, length]: packed rows (several examples a row, `packing.py`): each
  token attends within its example (rotary positions need no restart: scores see i - j).
  """

  config: BertConfig
  first_token_only: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask, deterministic: bool = True, segment_ids=None):
    cfg = self.config
    if segment_ids is not None and self.first_token_only:
      raise ValueError("packed rows have one first token per example: first_token_only is off")
    x = _Embeddings(cfg, name="embeddings")(input_ids, deterministic)
    # static: deterministic, first_token_only
    layer = encoder_config.rematerialized(ModernBertLayer, cfg.remat_policy,
                                          static_argnums=(3, 4))
    x = _Layers(cfg, layer, self.first_token_only, name="layers")(
        x, attention_lib.key_lengths(attention_mask), deterministic, segment_ids)
    x = LayerNorm(cfg.layer_norm_eps, cfg.dtype, cfg.norm_bias, name="final_norm")(x)
    return x.astype(jnp.float32)


class _Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, deterministic: bool):
    cfg = self.config
    x = Embed(cfg.vocab_size, cfg.hidden_size, (VOCAB, EMBED), cfg,
              name="tok_embeddings")(input_ids)
    x = LayerNorm(cfg.layer_norm_eps, cfg.dtype, cfg.norm_bias, name="norm")(x)
    x = constrain(x, HIDDEN_ACTIVATION, cfg)
    return Dropout(cfg.embedding_dropout)(x, deterministic=deterministic)


class _Layers(nn.Module):
  """Named `layers` with children `0..N-1`: transformers' model.layers.<i>."""

  config: BertConfig
  layer: type
  first_token_only: bool = False

  @nn.compact
  def __call__(self, x, kv_lengths, deterministic: bool, segment_ids=None):
    cfg = self.config
    last = len(cfg.layer_types) - 1
    for i, kind in enumerate(cfg.layer_types):
      x = self.layer(cfg, i == 0, kind == LOCAL, name=str(i))(
          x, kv_lengths, deterministic, self.first_token_only and i == last, segment_ids)
    return x


class ModernBertHead(nn.Module):
  """transformers' ModernBertPredictionHead: dense -> activation -> norm, on the pooled vector."""

  config: BertConfig

  @nn.compact
  def __call__(self, pooled):
    cfg = self.config
    x = Dense(cfg.hidden_size, (EMBED, None), jnp.float32, use_bias=cfg.classifier_bias,
              name="dense")(pooled)
    return LayerNorm(cfg.layer_norm_eps, jnp.float32, cfg.norm_bias,
                     name="norm")(ACTIVATIONS[cfg.classifier_activation](x))


def config_fields(c: Any) -> dict[str, Any]:
  """`BertConfig` fields from transformers' ModernBertConfig (hf.FAMILIES); what this
  implementation does not cover is refused by key."""
  where = os.path.join(getattr(c, "name_or_path", "") or ".", "config.json")
  rope = c.rope_parameters or {}
  for kind in ("full_attention", "sliding_attention"):
    if (rope.get(kind) or {}).get("rope_type", "default") != "default":
      raise UserError(f"{where}: rope_parameters.{kind}.rope_type="
                      f"{rope[kind]['rope_type']!r}: only 'default' rotary embeddings are "
                      "implemented")
  for key in ("hidden_activation", "classifier_activation"):
    if getattr(c, key) not in ACTIVATIONS:
      raise UserError(f"{where}: {key}={getattr(c, key)!r}: not implemented; use one of "
                      f"{sorted(ACTIVATIONS)}")
  if c.attention_dropout:
    raise UserError(f"{where}: attention_dropout={c.attention_dropout}: ModernBERT's attention "
                    "runs through fused kernels here, without dropout; set it to 0 (the "
                    "published checkpoints' value)")
  if c.hidden_size % c.num_attention_heads:
    raise UserError(f"{where}: hidden_size={c.hidden_size} is not a multiple of "
                    f"num_attention_heads={c.num_attention_heads}")
  return {"encoder": "modernbert", "classifier_head": "modernbert", "type_vocab_size": 0,
          "hidden_act": c.hidden_activation, "layer_norm_eps": c.norm_eps,
          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
          "embedding_dropout": c.embedding_dropout, "mlp_dropout": c.mlp_dropout,
          "classifier_dropout": c.classifier_dropout, "layer_types": tuple(c.layer_types),
          "local_attention": c.local_attention, "attention_bias": c.attention_bias,
          "mlp_bias": c.mlp_bias, "norm_bias": c.norm_bias, "classifier_bias": c.classifier_bias,
          "classifier_activation": c.classifier_activation,
          "global_rope_theta": rope["full_attention"]["rope_theta"],
          "local_rope_theta": rope["sliding_attention"]["rope_theta"],
          "pooling": c.classifier_pooling}
