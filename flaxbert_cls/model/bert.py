"""BERT-family encoder and classification heads in Flax linen.

The parameter tree mirrors Hugging Face `BertModel` names one to one
(`bert/encoder/layer/3/attention/self/query/kernel` <-> `bert.encoder.layer.3.
attention.self.query.weight`), so `hf.py` maps checkpoints mechanically. Every
parameter carries logical axis names; `sharding.py` maps them onto the mesh with
the rules in the config (building blocks in `layers.py`, custom kernels in `ops.py` and
`attention.py`).

RoBERTa, DistilBERT and ELECTRA are the same encoder with a few switches in
`BertConfig` (position ids, token types, embedding projection, head); their
parameters keep the BERT names under `bert/` here, so freezing and weight-decay
patterns work for every family, and `hf.py` renames them for each family.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxbert_cls.model import long_documents
from flaxbert_cls.model import modernbert
from flaxbert_cls.model import attention as attention_lib
from flaxbert_cls.model import ops
from flaxbert_cls.model import encoder_config
from flaxbert_cls.model.encoder_config import ACTIVATIONS, BertConfig
from flaxbert_cls.model.layers import (CLASSES, EMBED, HEADS, HIDDEN_ACTIVATION, MLP, VOCAB, Dense,
                                 Dropout, Embed, LayerNorm, constrain)
from flaxbert_cls.model.sharding import ACTIVATION_BATCH, ACTIVATION_HEADS, ACTIVATION_MLP


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
    project = lambda inputs, parts: ops.dense(  # [b, s, in] @ [in, parts x out]
        inputs.astype(cfg.dtype), kernel[:, parts].reshape(kernel.shape[0], -1)).reshape(
            *inputs.shape[:2], -1, kernel.shape[2]) + bias[parts]
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
    kv_lengths = attention_lib.key_lengths(attention_mask)
    dropout = cfg.attention_probs_dropout_prob
    if deterministic or dropout == 0.0:  # fused: cuDNN flash attention where it runs
      out = attention_lib.attention(q, k, v, kv_lengths, cfg.attention_impl or "xla", cfg.mesh,
                                    cfg.activation_rules)
    else:
      # Attention-probability dropout needs the probabilities, which fused kernels hide.
      seeds = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
      out = attention_lib.attention_with_dropout(q, k, v, kv_lengths, seeds, dropout)
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
    act = jax.checkpoint(ACTIVATIONS[cfg.hidden_act])
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
    cfg = self.config
    # static: deterministic, first_token_only
    layer = encoder_config.rematerialized(BertLayer, cfg.remat_policy, static_argnums=(3, 4))
    last = cfg.num_hidden_layers - 1
    for i in range(cfg.num_hidden_layers):
      x = layer(cfg, name=str(i))(x, attention_mask, deterministic,
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
  """Encoder + one classification head per task; one task is the one-head case.

  One task (`task_names=()`): the head's parameters sit beside `bert/` under the family's
  Hugging Face names (`classifier/...`) and the model returns [batch, num_labels[0]]
  logits (num_labels 1: regression). Several tasks: heads at `heads/<task>/...`, one
  logits array per task in a tuple; every head runs on every batch (a head is one or
  two small matmuls), so one program serves all tasks and the loss picks each example's
  head by its task id. The head is the family's (`config.classifier_head`): bert reads
  the pooled [CLS] output, the others the first token's hidden state.

  Packed rows (`segment_ids` [rows, length], several examples a row, ModernBERT only): the
  output has `num_segments` examples per row, [rows * num_segments, ...] (empty slots too).
  """

  config: BertConfig
  num_labels: int | tuple[int, ...]  # an int: one task
  task_names: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True,
               window_mask=None, segment_ids=None, num_segments: int = 0):
    cfg = self.config
    mean = cfg.pooling == "mean"
    if segment_ids is not None:
      if cfg.encoder != "modernbert" or cfg.window_attention:
        raise ValueError("packed rows run on ModernBERT encoders without window attention")
      hidden = modernbert.ModernBertModel(cfg, name="bert")(
          input_ids, attention_mask, deterministic, segment_ids)
      hidden = constrain(segment_pool(hidden, segment_ids, num_segments, mean)[:, None],
                         (ACTIVATION_BATCH, None, None), cfg)
      pooled = hidden[:, 0]
    elif cfg.encoder == "modernbert":  # no token types; its head reads [CLS] or the mean
      hidden = modernbert.ModernBertModel(cfg, first_token_only=not mean, name="bert")(
          input_ids, attention_mask, deterministic)
      pooled = None
    else:
      hidden, pooled = BertModel(cfg, add_pooling_layer=cfg.classifier_head == "bert" and not mean,
                                 first_token_only=not mean, name="bert")(
          input_ids, attention_mask, token_type_ids, deterministic)
    if mean and segment_ids is None:  # every head reads position 0 (bert: `pooled`): the mean
      hidden = mean_pool(hidden, attention_mask)[:, None]
      pooled = hidden[:, 0]
    if cfg.window_attention:  # rows are documents x windows; heads read one row per document
      vector = long_documents.WindowAttention(name="window_attention")(
          pooled if cfg.classifier_head == "bert" else hidden[:, 0], window_mask)
      hidden, pooled = vector[:, None], vector
    if not self.task_names:
      num_labels = self.num_labels if isinstance(self.num_labels, int) else self.num_labels[0]
      return _head_logits(cfg, num_labels, hidden, pooled, deterministic)
    return _TaskHeads(cfg, self.num_labels, self.task_names, name="heads")(
        hidden, pooled, deterministic)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """[batch, hidden] float32 mean of `hidden` over the tokens where attention_mask is 1."""
  mask = attention_mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def segment_pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int,
                 mean: bool) -> jax.Array:
  """[rows * num_segments, hidden] float32: each packed example's mean over its tokens (or its
  first token), slot s of a row for segment id s + 1; an empty slot gets zeros."""
  slots = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
  member = segment_ids[:, None, :] == slots[None, :, None]  # [rows, slots, length]
  if not mean:
    member &= (attention_lib.segment_positions(segment_ids) == 0)[:, None, :]
  weights = member.astype(jnp.float32)
  if mean:
    weights /= jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
  pooled = jnp.einsum("rsl,rld->rsd", weights, hidden.astype(jnp.float32))
  return pooled.reshape(-1, hidden.shape[-1])


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
  if head == "modernbert":
    x = nn.Dropout(rate)(modernbert.ModernBertHead(cfg, name="head")(first),
                         deterministic=deterministic)
    return Dense(num_labels, (None, CLASSES), jnp.float32, name="classifier")(x)
  if head == "distilbert":
    x = nn.relu(Dense(cfg.hidden_size, (EMBED, None), jnp.float32, name="pre_classifier")(first))
    x = nn.Dropout(rate)(x, deterministic=deterministic)
    return Dense(num_labels, (None, CLASSES), jnp.float32, name="classifier")(x)
  activation = jnp.tanh if head == "roberta" else ACTIVATIONS["gelu"]
  return ClassificationHead(cfg, num_labels, activation, rate, name="classifier")(
      first, deterministic)


class _TaskHeads(nn.Module):
  """heads/<task>/...: each task's head, named as a one-task model names its own."""

  config: BertConfig
  num_labels: tuple[int, ...]
  task_names: tuple[str, ...]

  @nn.compact
  def __call__(self, hidden, pooled, deterministic: bool):
    return tuple(_TaskHead(self.config, n, name=name)(hidden, pooled, deterministic)
                 for n, name in zip(self.num_labels, self.task_names))


class _TaskHead(nn.Module):
  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, hidden, pooled, deterministic: bool):
    return _head_logits(self.config, self.num_labels, hidden, pooled, deterministic)


def task_params(params: Any, task_name: str) -> Any:
  """A multi-task model's params for one task, as BertForSequenceClassification names them."""
  return {"bert": params["bert"], **params["heads"][task_name]}
