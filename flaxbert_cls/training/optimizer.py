"""Optimizer: schedule, AdamW with a decay mask, freezing; all masks from parameter paths."""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Sequence

import jax
import optax
from clu import parameter_overview
from flax import traverse_util
from ml_collections import ConfigDict


log = logging.getLogger(__name__)


def param_paths(params: Any) -> Any:
  """A tree like `params` whose leaves are 'bert/encoder/layer/0/.../kernel' strings."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: "/".join(k) for k in flat})


def path_mask(params: Any, patterns: Sequence[str]) -> Any:
  """True where any regex in `patterns` matches (re.search) the parameter's path."""
  compiled = [re.compile(p) for p in patterns]
  return _map_paths(params, lambda path: any(c.search(path) for c in compiled))


def _map_paths(params: Any, fn: Callable[[str], Any]) -> Any:
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: fn("/".join(k)) for k in flat})


def frozen_mask(params: Any, config: ConfigDict) -> Any:
  """True per parameter that stays fixed (`freeze_patterns`): its gradient is zeroed
  statically, it has no optimizer state, and a sweep's members share one copy of it."""
  return path_mask(params, freeze_patterns(config))


def freeze_patterns(config: ConfigDict) -> tuple[str, ...]:
  """`config.freeze` regexes plus the `freeze_bottom_layers` shortcut."""
  patterns = list(config.freeze)
  k = int(config.freeze_bottom_layers)
  if k:
    # BERT's encoder/layer/<i>, ModernBERT's layers/<i>
    patterns += ["bert/embeddings/"] + [f"bert/(encoder/layer|layers)/{i}/" for i in range(k)]
  if int(config.lora_rank):
    # LoRA: everything but the adapters and the classification head stays fixed.
    patterns.append(
        r"^(?!.*/lora_[ab]$)(?!classifier/|pre_classifier/|heads/|head/|window_attention/)")
  return tuple(patterns)


def warmup_steps_for(config: ConfigDict, total_steps: int) -> int:
  if config.warmup_steps >= 0:
    return int(config.warmup_steps)
  return int(round(config.warmup_ratio * total_steps))


def create_learning_rate_schedule(config: ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then linear / cosine decay to 0, or constant."""
  lr = config.learning_rate
  warmup = warmup_steps_for(config, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  decay = {"linear": lambda: optax.linear_schedule(lr, 0.0, decay_steps),  # config.LR_SCHEDULES
           "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps),
           "constant": lambda: optax.constant_schedule(lr)}[config.lr_schedule]()
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


_LAYER = re.compile(r"/layers?/(\d+)/")  # BERT's encoder/layer/<i>, ModernBERT's layers/<i>


def layer_depths(params: Any) -> tuple[Any, int]:
  """(depth of each parameter, L): embeddings 0, encoder layer i -> i + 1, the rest L + 1."""
  paths = jax.tree.leaves(param_paths(params))
  num_layers = 1 + max((int(m.group(1)) for p in paths if (m := _LAYER.search(p))), default=-1)

  def depth(path: str) -> int:
    match = _LAYER.search(path)
    if match:
      return int(match.group(1)) + 1
    return 0 if "/embeddings/" in f"/{path}" else num_layers + 1
  return _map_paths(params, depth), num_layers


def learning_rate_multipliers(params: Any, config: ConfigDict) -> Any:
  """Layer-wise LR decay: parameter at depth d trains at lr * decay^(L + 1 - d).

  The head (and pooler) keep the full rate, the top encoder layer gets `decay`,
  the embeddings `decay^(L+1)`. A decay of 1 gives 1.0 everywhere.
  """
  decay = config.layerwise_lr_decay
  depths, num_layers = layer_depths(params)
  return jax.tree.map(lambda d: float(decay ** (num_layers + 1 - d)), depths)


def _scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-parameter factor (no state)."""
  def update(updates, state, params=None):  # pylint: disable=unused-argument
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create_optimizer(config: ConfigDict, params: Any, total_steps: int,
                     schedule: optax.Schedule | None = None, weight_decay: Any = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (HF recipe: eps 1e-6, no decay on biases and LayerNorm) + clipping + freezing.

  Built from optax parts so layer-wise LR decay scales the whole AdamW step
  (decay included), as a per-layer learning rate does. Frozen parameters go
  through optax.set_to_zero, so they get no optimizer state.
  A sweep member (training/members.py) passes its own `schedule` and `weight_decay` (traced values);
  an explicit `weight_decay` always adds the decay step, so every member's state matches.
  """
  schedule = schedule or create_learning_rate_schedule(config, total_steps)
  decay_mask = _map_paths(params, lambda p: not any(
      re.search(pat, p) for pat in config.weight_decay_exclude))
  parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm > 0 else []
  parts += [optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)]
  if weight_decay is not None or config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(
        config.weight_decay if weight_decay is None else weight_decay, decay_mask))
  if config.layerwise_lr_decay != 1.0:
    parts.append(_scale_by_tree(learning_rate_multipliers(params, config)))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  frozen = freeze_patterns(config)
  if frozen:
    labels = _map_paths(params, lambda p: "frozen" if any(re.search(f, p) for f in frozen)
                        else "trained")
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def log_parameters(params: Any, config: ConfigDict) -> None:
  """Logs the parameter table and how many are trained and frozen."""
  frozen = path_mask(params, freeze_patterns(config))
  sizes = [(x.size, f) for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen))]
  num_frozen = sum(n for n, f in sizes if f)
  total = sum(n for n, _ in sizes)
  log.info("Parameters: %d (%d trained, %d frozen)\n%s", total, total - num_frozen, num_frozen,
           parameter_overview.get_parameter_overview(params, include_stats=False))
