"""Document logits from windows (config.long_document='windows').

A window batch holds input_ids [docs, windows, seq] and window_mask [docs, windows]:
the encoder sees docs*windows rows, and each document's logits are the masked mean
(or max) of its windows' logits, or (window_pooling='attention') the head's logits on a
learned softmax-weighted sum of the windows' head inputs (`WindowAttention`). Training,
eval and predict all call `document_logits`, so the loss is always on the document's logits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ("mean", "max")  # of the windows' logits (window_pooling='attention': WindowAttention)


class WindowAttention(nn.Module):
  """[docs*windows, hidden] -> [docs, hidden]: each document's window vectors (the [CLS]
  vector its head reads) summed with softmax weights from a learned score of each vector.

  The score starts at zero (the mean of the vectors) and learns which windows to read, e.g.
  a post's first window with its headers over its quoted replies. Without `window_mask`
  (a row batch) every row is its own one-window document.
  """

  @nn.compact
  def __call__(self, vectors: jax.Array, window_mask: jax.Array | None) -> jax.Array:
    vectors = vectors.astype(jnp.float32)
    if window_mask is None:
      window_mask = jnp.ones((vectors.shape[0], 1), jnp.int32)
    docs, windows = window_mask.shape
    vectors = vectors.reshape(docs, windows, -1)
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("embed", None)),
                        (vectors.shape[-1], 1), jnp.float32)
    scores = jnp.einsum("dwh,ho->dw", vectors, kernel)
    # A finite floor, not -inf: a document with no windows (batch padding) gets finite
    # weights, so its weight-0 loss cannot turn the batch's loss into NaN.
    scores = jnp.where(window_mask > 0, scores, -1e9)
    return jnp.einsum("dw,dwh->dh", jax.nn.softmax(scores, axis=-1), vectors)


def pool_windows(logits: jax.Array, window_mask: jax.Array, pooling: str) -> jax.Array:
  """[docs, windows, ...] -> [docs, ...]: mean or max over the windows where mask > 0.

  A document without windows (batch padding) gets zeros, never NaN: its weight-0 loss
  would otherwise turn the batch's loss into NaN.
  """
  mask = window_mask.reshape(window_mask.shape + (1,) * (logits.ndim - 2)) > 0
  if pooling == "mean":
    total = jnp.sum(jnp.where(mask, logits, 0), axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1).astype(logits.dtype)
  if pooling == "max":
    best = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=1)
    return jnp.where(jnp.any(mask, axis=1), best, 0)
  raise ValueError(f"window pooling {pooling!r}: use one of {POOLINGS}")


def packed_examples(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """A packed batch's per-example arrays ([rows, examples, ...]: labels, weights, task ids)
  flattened to [rows * examples, ...], as `document_logits` orders its logits; other batches
  as they are."""
  if "segment_ids" not in batch:
    return batch
  flat = lambda x: x.reshape(-1, *x.shape[2:])  # pylint: disable=unnecessary-lambda-assignment
  return {k: flat(v) if k in ("labels", "weights", "task_ids") else v for k, v in batch.items()}


def document_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array],
                    pooling: str = "mean", **apply_kwargs: Any) -> Any:
  """`model.apply` on a batch's rows; for a window batch, one pooled row per document.

  The output keeps the model's structure (one array, or a tuple of per-task heads).
  A packed batch (`segment_ids`; data/packing.py) gives one row of logits per example slot,
  [rows * examples, ...], in the order of `packed_examples`' labels and weights.
  """
  ids = batch["input_ids"]
  if "segment_ids" in batch:
    return model.apply({"params": params}, ids, batch["attention_mask"], batch["token_type_ids"],
                       segment_ids=batch["segment_ids"],
                       num_segments=batch["weights"].shape[1], **apply_kwargs)
  if ids.ndim == 2:
    return model.apply({"params": params}, ids, batch["attention_mask"], batch["token_type_ids"],
                       **apply_kwargs)
  docs, windows = ids.shape[:2]
  rows = lambda x: x.reshape(docs * windows, *x.shape[2:])  # pylint: disable=unnecessary-lambda-assignment
  if pooling == "attention":  # the model combines each document's windows itself
    return model.apply({"params": params}, rows(ids), rows(batch["attention_mask"]),
                       rows(batch["token_type_ids"]), window_mask=batch["window_mask"],
                       **apply_kwargs)
  logits = model.apply({"params": params}, rows(ids), rows(batch["attention_mask"]),
                       rows(batch["token_type_ids"]), **apply_kwargs)
  return jax.tree.map(
      lambda x: pool_windows(x.reshape(docs, windows, *x.shape[1:]), batch["window_mask"],
                             pooling), logits)
