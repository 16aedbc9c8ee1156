"""Document logits from window logits (config.long_document='windows').

A window batch holds input_ids [docs, windows, seq] and window_mask [docs, windows]:
the encoder sees docs*windows rows, and each document's logits are the masked mean
(or max) of its windows' logits. Training, eval and predict all call `document_logits`,
so the loss is always on the document's pooled logits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ("mean", "max")


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


def document_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array],
                    pooling: str = "mean", **apply_kwargs: Any) -> Any:
  """`model.apply` on a batch's rows; for a window batch, one pooled row per document.

  The output keeps the model's structure (one array, or a tuple of per-task heads).
  """
  ids = batch["input_ids"]
  if ids.ndim == 2:
    return model.apply({"params": params}, ids, batch["attention_mask"], batch["token_type_ids"],
                       **apply_kwargs)
  docs, windows = ids.shape[:2]
  rows = lambda x: x.reshape(docs * windows, *x.shape[2:])  # pylint: disable=unnecessary-lambda-assignment
  logits = model.apply({"params": params}, rows(ids), rows(batch["attention_mask"]),
                       rows(batch["token_type_ids"]), **apply_kwargs)
  return jax.tree.map(
      lambda x: pool_windows(x.reshape(docs, windows, *x.shape[1:]), batch["window_mask"],
                             pooling), logits)
