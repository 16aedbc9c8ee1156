"""The heads' losses: one spec per head, per-example loss and correctness from its logits.

Fixed at compile time (`HeadLoss` is hashable), so the train step of a multi-task run
compiles every head's loss into one program and picks each row's by its task id.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class HeadLoss:
  """One head's loss, fixed at compile time: the problem type and its class weights."""

  problem_type: str = "single_label_classification"
  # Single-label: weight per class (weighted softmax CE). Multi-label: BCE pos_weight per
  # label. () = unweighted.
  class_weights: tuple[float, ...] = ()
  # Single-label: added to the logits before the cross-entropy (tau * log prior per class:
  # the logit-adjusted loss); () = none. In the loss only: predictions use the logits as is.
  logit_offsets: tuple[float, ...] = ()


def _head_loss(spec: "bool | HeadLoss") -> HeadLoss:
  """A bool (is_regression, the older form) or a HeadLoss."""
  if isinstance(spec, HeadLoss):
    return spec
  return HeadLoss("regression" if spec else "single_label_classification")


def example_losses(logits: jax.Array, labels: jax.Array, spec: "bool | HeadLoss") -> jax.Array:
  """Per-example loss in float32: squared error (regression), softmax cross-entropy (weighted
  by the label's class weight) or binary cross-entropy averaged over labels (multi-label,
  positives weighted by pos_weight, as torch's BCEWithLogitsLoss)."""
  spec = _head_loss(spec)
  logits = logits.astype(jnp.float32)
  if spec.problem_type == "regression":
    return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
  weights = jnp.asarray(spec.class_weights, jnp.float32) if spec.class_weights else None
  if spec.problem_type == "multi_label_classification":
    labels = labels.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    if weights is not None:  # pos_weight scales the positive term -log(sigmoid(x)) only
      bce = bce + (weights - 1.0) * labels * optax.sigmoid_binary_cross_entropy(
          logits, jnp.ones_like(logits))
    return jnp.mean(bce, axis=-1)
  if spec.logit_offsets:
    logits = logits + jnp.asarray(spec.logit_offsets, jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return losses if weights is None else losses * weights[labels]


def example_correct(logits: jax.Array, labels: jax.Array, spec: "bool | HeadLoss") -> jax.Array:
  """1.0 where the prediction is right (multi-label: every label at 0.5); 0 for regression."""
  spec = _head_loss(spec)
  if spec.problem_type == "regression":
    return jnp.zeros(logits.shape[0], jnp.float32)
  if spec.problem_type == "multi_label_classification":
    return jnp.all((logits > 0) == (labels > 0.5), axis=-1).astype(jnp.float32)
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def head_losses(outputs: jax.Array | tuple[jax.Array, ...], labels: jax.Array,
                task_ids: jax.Array | None,
                is_regression: "bool | HeadLoss | tuple[bool | HeadLoss, ...]"
                ) -> tuple[jax.Array, jax.Array]:
  """(per-example loss, per-example correct) from each example's own task head.

  `outputs` is one logits array (single task) or one per task (MultiTaskClassifier),
  with `task_ids` naming each row's task; other heads' values are masked out with
  `where`, so they get no gradient and a wrong-range label cannot leak a NaN.
  `is_regression`: per head, a bool or a `HeadLoss` (problem type and class weights).
  With task ids, labels may be [batch, width] rows (batching.train_batch's label_width): a
  multi-label head reads its first num_labels columns, the others column 0.
  """
  if not isinstance(outputs, tuple):
    outputs, is_regression = (outputs,), (is_regression,)
  losses = correct = None
  for t, (logits, spec) in enumerate(zip(outputs, is_regression)):
    spec = _head_loss(spec)
    regression = spec.problem_type == "regression"
    task_labels = labels
    if task_ids is not None and labels.ndim == 2:
      task_labels = (labels[:, :logits.shape[-1]] if spec.problem_type ==
                     "multi_label_classification" else labels[:, 0])
    if task_ids is not None and task_labels.ndim == 1:
      task_labels = (task_labels.astype(jnp.float32) if regression
                     else jnp.clip(task_labels.astype(jnp.int32), 0, logits.shape[-1] - 1))
    loss_t = example_losses(logits, task_labels, spec)
    correct_t = example_correct(logits, task_labels, spec)
    if task_ids is None:
      return loss_t, correct_t
    mine = task_ids == t
    losses = jnp.where(mine, loss_t, 0.0 if losses is None else losses)
    correct = jnp.where(mine, correct_t, 0.0 if correct is None else correct)
  return losses, correct
