"""Hyper-parameter sweeps as one program: the members of a grid on a leading state axis.

  config.sweep.learning_rate = (1e-5, 2e-5, 3e-5); config.sweep.seed = (0, 1)

is a grid of 6 members, enumerated in SWEEP_KEYS order with the last key varying fastest
(lr 1e-5 seed 0, lr 1e-5 seed 1, lr 2e-5 seed 0, ...). Member m trains exactly as the solo
run of `member_config(config, m)`: its learning-rate schedule (a table of values per step),
weight decay, parameter init, dropout stream and data order come from its own values.
Trained parameters and the optimizer state are stacked [members, ...] and sharded over the
'member' mesh axis; frozen parameters (LoRA's base, config.freeze) are stored once.
The grid itself is the config's (config.grid, config.member_config); this module holds the
per-member values, stacking and the results table. The stacked state is made in
starts.py, the vmapped step is step.py's and layouts.py picks them for a sweep.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxbert_cls import config as config_lib
from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.training import optimizer as optim
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError

SWEEP_KEYS, MEMBER_AXIS = config_lib.SWEEP_KEYS, config_lib.MEMBER_AXIS


def check_mesh(members: Sequence[dict[str, Any]], mesh: jax.sharding.Mesh) -> None:
  """The member mesh axis must divide the number of members."""
  size = dict(mesh.shape).get(MEMBER_AXIS, 1)
  if members and len(members) % size:
    raise UserError(f"config.mesh_shape: the '{MEMBER_AXIS}' axis of {size} devices does not "
                    f"divide the sweep's {len(members)} members; use a divisor of "
                    f"{len(members)}")


def logical_axis_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The config's rules plus member -> 'member' (the stacked state's leading axis)."""
  rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
  if any(rule[0] == MEMBER_AXIS for rule in rules):
    return rules
  return (*rules, (MEMBER_AXIS, MEMBER_AXIS))


def member_seeds(config: ml_collections.ConfigDict, members: Sequence[dict[str, Any]]
                 ) -> list[int]:
  """Each member's seed (config.seed where seed is not swept)."""
  return [int(m.get("seed", config.seed)) for m in members]


def member_hyper(config: ml_collections.ConfigDict, members: Sequence[dict[str, Any]],
                 total_steps: int) -> dict[str, np.ndarray]:
  """Per member, what the step takes as arrays: 'lr' [M, total_steps + 1] (the member's
  schedule at every step, so warmup_ratio and the peak both sweep), 'weight_decay' [M],
  'seed' [M] (dropout stream)."""
  steps = jnp.arange(total_steps + 1)
  solos = [config_lib.member_config(config, m) for m in members]
  return {
      "lr": np.stack([np.asarray(optim.create_learning_rate_schedule(c, total_steps)(steps),
                                 np.float32) for c in solos]),
      "weight_decay": np.asarray([c.weight_decay for c in solos], np.float32),
      "seed": np.asarray(member_seeds(config, members), np.int32),
  }


def optimizer(config: ml_collections.ConfigDict, members: Sequence[dict[str, Any]], params: Any,
              total_steps: int, hyper: dict[str, jax.Array] | None = None
              ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """One member's optimizer from its `hyper` values (one row of `member_hyper`, traced).

  Without `hyper`: the template whose state structure every member shares (init, restore).
  """
  swept = members[0].keys() if members else ()
  weight_decay = None
  if "weight_decay" in swept:
    weight_decay = 0.0 if hyper is None else hyper["weight_decay"]
  schedule = None
  if hyper is not None:
    schedule = lambda count: jnp.take(hyper["lr"], count, mode="clip")  # pylint: disable=unnecessary-lambda-assignment
  return optim.create_optimizer(config, params, total_steps, schedule=schedule,
                                weight_decay=weight_decay)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def add_member_axis(x: Any, members: int) -> nn.Partitioned:
  """An abstract leaf (boxed or not) with a leading 'member' dimension, logically named."""
  if isinstance(x, nn.Partitioned):
    value = x.value
    return x.replace(value=jax.ShapeDtypeStruct((members, *value.shape), value.dtype),
                     names=(MEMBER_AXIS, *x.names))
  return nn.Partitioned(jax.ShapeDtypeStruct((members, *x.shape), x.dtype),
                        names=(MEMBER_AXIS,) + (None,) * len(x.shape))


def stack_abstract(params: Any, opt_state: Any, frozen: Any, members: int) -> tuple[Any, Any]:
  """(params, opt_state) abstract trees with the member axis on trained params and all of
  the optimizer state (frozen parameters have none)."""
  params = jax.tree.map(lambda x, f: x if f else add_member_axis(x, members), params, frozen,
                        is_leaf=_is_box)
  opt_state = jax.tree.map(lambda x: add_member_axis(x, members), opt_state, is_leaf=_is_box)
  return params, opt_state


def split_trained(params: Any, frozen: Any) -> list[Any]:
  """The trained (stacked) leaves of `params`, in tree order."""
  return [x for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)) if not f]


def merge_trained(params: Any, frozen: Any, trained: Sequence[Any]) -> Any:
  """`params` with its trained leaves replaced by `trained` (split_trained's order)."""
  rest = iter(trained)
  leaves = [x if f else next(rest) for x, f in zip(jax.tree.leaves(params),
                                                   jax.tree.leaves(frozen))]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def unstack(params: Any, frozen: Any, index: int | jax.Array) -> Any:
  """Member `index`'s parameters (a solo run's tree)."""
  return jax.tree.map(lambda x, f: x if f else x[index], params, frozen)


def member_index(member: int | str | None, members: Sequence[dict[str, Any]],
                 meta: dict[str, Any], where: str) -> int:
  """--member: None or 'best' (the best member by its best dev metric so far) or an index."""
  if member is None or member == "best":
    best = meta.get("best_member")
    if best is None:
      raise UserError(f"{where}: no member has been evaluated yet; pass --member=INDEX "
                      f"(0..{len(members) - 1})")
    return int(best)
  if isinstance(member, str) and not member.isdigit():
    raise UserError(f"--member={member!r}: use 'best' or a member index 0..{len(members) - 1}")
  if not 0 <= int(member) < len(members):
    raise UserError(f"--member={member}: the sweep in {where} has members 0..{len(members) - 1}")
  return int(member)


def stacked_batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """[members, batch, ...]: members over the 'member' axis, rows as a solo run's."""
  rows = sharding_lib.batch_sharding(mesh).spec[0]
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MEMBER_AXIS, rows))


# A batch's [rows, length] arrays (a packed batch's [rows, examples] labels and weights are not).
TOKEN_ARRAYS = ("input_ids", "token_type_ids", "attention_mask", "segment_ids")


def stack_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Members' batches as one [M, B, ...] batch, padded to the longest member's length.

  The extra positions are masked padding, which changes no logit: a member sees the same
  loss as alone (up to float summation order).
  """
  seq_len = max(b["input_ids"].shape[1] for b in batches)
  out = {}
  for key in batches[0]:
    arrays = [b[key] for b in batches]
    if key in TOKEN_ARRAYS and arrays[0].ndim == 2:  # [B, S] token arrays
      arrays = [np.pad(a, ((0, 0), (0, seq_len - a.shape[1]))) for a in arrays]
    out[key] = np.stack(arrays)
  return out


def results_table(members: Sequence[dict[str, Any]], values: Sequence[float], metric: str
                  ) -> dict[str, Any]:
  """Per setting (the members' values other than seed): mean, std (ddof=1) and median of
  `metric` over its seeds; the best setting by mean and the best member."""
  settings: dict[tuple, list[int]] = {}
  for i, member in enumerate(members):
    settings.setdefault(tuple((k, v) for k, v in member.items() if k != "seed"), []).append(i)
  rows = []
  for setting, indices in settings.items():
    v = np.asarray([values[i] for i in indices], np.float64)
    rows.append({**dict(setting), "members": indices, "n": len(indices),
                 "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                 "median": float(np.median(v))})
  finite = [i for i, r in enumerate(rows) if math.isfinite(r["mean"])]
  best_setting = max(finite, key=lambda i: rows[i]["mean"]) if finite else None
  scored = [i for i, v in enumerate(values) if math.isfinite(v)]
  best_member = max(scored, key=lambda i: values[i]) if scored else None
  return {"metric": metric, "settings": rows, "best_setting": best_setting,
          "best_member": best_member,
          "members": [{"index": i, **m, metric: float(values[i])} for i, m in enumerate(members)]}


def results_markdown(results: dict[str, Any]) -> str:
  """The table as Markdown: one row per setting, the best one marked."""
  metric, rows = results["metric"], results["settings"]
  keys = [k for k in rows[0] if k not in ("members", "n", "mean", "std", "median")] if rows else []
  lines = ["| " + " | ".join([*keys, "seeds", f"{metric} mean ± std", "median"]) + " |",
           "|" + "---|" * (len(keys) + 3)]
  for i, row in enumerate(rows):
    mark = " **(best)**" if i == results["best_setting"] else ""
    lines.append("| " + " | ".join([*(f"{row[k]:g}" for k in keys), str(row["n"]),
                                    f"{row['mean']:.4f} ± {row['std']:.4f}{mark}",
                                    f"{row['median']:.4f}"]) + " |")
  best = results["best_member"]
  if best is not None:
    member = results["members"][best]
    lines.append(f"\nBest member: {best} ({', '.join(f'{k}={v:g}' for k, v in member.items())})")
  return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict[str, Any]) -> str:
  """workdir/sweep_results.json and .md (process 0); returns the Markdown."""
  markdown = results_markdown(results)
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir_lib.join(workdir, workdir_lib.SWEEP_RESULTS_JSON), json.dumps(results, indent=2))
    workdir_lib.write_text(workdir_lib.join(workdir, workdir_lib.SWEEP_RESULTS_MARKDOWN), markdown)
  return markdown
