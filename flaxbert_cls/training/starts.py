"""Re-fine-tuning: a run that starts from a previous run's workdir or an exported directory.

`model_name_or_path` may name a flaxbert-cls workdir (its `model/` gives the HF config and
tokenizer, its checkpoint `config.start_step` the weights) or an HF directory with a
classification head (what `export` writes). The start's classification head is kept by
label NAME: a label of both runs keeps its row; a new label gets a row initialised like a
fresh head; a label of the start that this run lacks is refused unless
`config.drop_removed_labels`. The run records where it started in `started_from.json`.

`create_train_state` makes every fresh run's state on its shardings (a sweep's stacked,
each member from its own seed) and calls `load_start`, so a plain pre-trained checkpoint,
an export and a workdir load one way, into a run or into every member of a sweep: the
start's weights are broadcast over the member axis, the head grafted by label name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import hf
from flaxbert_cls.model import layers
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import members as members_lib
from flaxbert_cls.training import optimizer as optim
from flaxbert_cls.training import runs
from flaxbert_cls.training import state as state_lib
from flaxbert_cls.training.state import TrainState

log = logging.getLogger(__name__)

STARTED_FROM_NAME = workdir_lib.STARTED_FROM_NAME  # in the new run's workdir


def output_layer_paths(boxed_params: Any) -> list[tuple[str, ...]]:
  """Paths of the head's label-indexed tensors: those whose last logical axis is `classes`."""
  flat = traverse_util.flatten_dict(dict(boxed_params))
  return [path for path, leaf in flat.items()
          if getattr(leaf, "names", None) and leaf.names[-1] == layers.CLASSES]


def head_rows(old: Sequence[str] | None, new: Sequence[str] | None, drop_removed: bool,
              where: str) -> list[int | None]:
  """For each label of the new run, the row of the start's head that holds it (None: fresh).

  `old` / `new` None is a regression head (one output). Labels are matched by name, so a
  reordered label set keeps every row.
  """
  if old is None or new is None:
    if old is None and new is None:
      return [0]
    if drop_removed:
      return [None] * (1 if new is None else len(new))
    kinds = ("a regression model" if old is None else "a classifier",
             "a regression task" if new is None else "a classification task")
    raise UserError(f"{where}: the start is {kinds[0]}, this run is {kinds[1]}; set "
                    "--config.drop_removed_labels=True to train a new head")
  removed = [name for name in old if name not in new]
  if removed and not drop_removed:
    raise UserError(f"{where}: labels {removed} of the start are not in this run's label set "
                    f"{list(new)}; add them to --config.label_names to keep them, or set "
                    "--config.drop_removed_labels=True to drop their rows")
  return [list(old).index(name) if name in old else None for name in new]


def graft_head(fresh: np.ndarray, old: np.ndarray, rows: Sequence[int | None]) -> np.ndarray:
  """`fresh` (label axis last, as Flax stores it) with the start's rows where `rows` says."""
  out = np.array(fresh, dtype=np.float32, copy=True)
  for new_index, old_index in enumerate(rows):
    if old_index is not None:
      out[..., new_index] = old[..., old_index]
  return out


def params_digest(params: Mapping[tuple[str, ...], np.ndarray]) -> str:
  """A content hash of float32 parameters by path: the same weights hash the same, whether
  read from a workdir's checkpoint or its export."""
  digest = hashlib.blake2b(digest_size=16)
  for path in sorted(params):
    value = np.ascontiguousarray(params[path], dtype=np.float32)
    digest.update("/".join(path).encode() + str(value.shape).encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


class Without(Mapping):
  """`state` (a PyTorch-named state dict) without some keys, still read lazily."""

  def __init__(self, state: Mapping[str, np.ndarray], keys: set[str]):
    self._state, self._keys = state, keys

  def __getitem__(self, key: str) -> np.ndarray:
    if key in self._keys:
      raise KeyError(key)
    return self._state[key]

  def __contains__(self, key: object) -> bool:
    return key not in self._keys and key in self._state

  def __iter__(self):
    return (k for k in self._state if k not in self._keys)

  def __len__(self) -> int:
    return sum(1 for _ in self)


def create_train_state(exp: experiment_lib.Experiment, total_steps: int,
                       pretrained_dir: str | None
                       ) -> tuple[TrainState, Any, optax.GradientTransformation, Any]:
  """(state, its shardings, optimizer, schedule) of a fresh run, made on its shardings.

  A sweep's state is stacked (state.abstract_stacked_state): each member's random init comes
  from its own seed, as in its solo run, and the schedule is None (per member: the step's
  hyper rows). A frozen parameter is stored once: the first member's init when the start
  lacks it. `pretrained_dir` None: random init (a resume restores over it).
  """
  boxed, _ = exp.abstract_params()
  template = nn.unbox(boxed)
  tx, schedule = state_lib.optimizer(exp, template, total_steps)
  _, shardings = state_lib.abstract_state(exp, tx)
  if exp.members:
    frozen = optim.frozen_mask(template, exp.config)

    def init(seeds: jax.Array) -> TrainState:
      keys = jax.vmap(jax.random.key)(seeds)
      stacked = jax.vmap(lambda k: nn.unbox(state_lib.init_state(exp, tx, k)))(keys)
      first = nn.unbox(exp.init_params(keys[0]))
      params = jax.tree.map(lambda f, s, one: one if f else s, frozen, stacked.params, first)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=stacked.opt_state)

    seeds = jnp.asarray(members_lib.member_seeds(exp.config, exp.members), jnp.int32)
    state = jax.jit(init, out_shardings=shardings)(seeds)
  else:
    state = jax.jit(lambda r: nn.unbox(state_lib.init_state(exp, tx, r)),
                    out_shardings=shardings)(jax.random.key(exp.config.seed))
  if pretrained_dir is not None:
    state = state.replace(params=load_start(exp, pretrained_dir, boxed, state.params,
                                            shardings.params))
  return state, shardings, tx, schedule


def load_start(exp: experiment_lib.Experiment, pretrained_dir: str, boxed: Any, fresh: Any,
               shardings: Any) -> Any:
  """`fresh` params with the start's weights loaded onto their shardings (head by label)."""
  state_dict, exp.started_from = _start_weights(exp, pretrained_dir)
  # The head's label-indexed tensors load by label name below, not by position.
  head_names = hf.torch_names(output_layer_paths(boxed), exp.hf_config.model_type)
  old_head = {path: np.asarray(state_dict[key]).T if path[-1] == "kernel"
              else np.asarray(state_dict[key])
              for path, key in head_names.items() if key in state_dict}
  loaded, new, unused = hf.params_from_state_dict(
      Without(state_dict, set(head_names.values())), nn.unbox(boxed),
      exp.hf_config.model_type)
  new = [n for n in new if tuple(n.split("/")) not in old_head]  # grafted below
  log.info("Loaded %s. Newly initialised: %s. Unused from the checkpoint: %s",
           pretrained_dir, ", ".join(new) or "none", ", ".join(unused) or "none")
  params = jax.tree.map(_place, fresh, loaded, shardings)
  if old_head:
    params = _graft_head(exp, params, shardings, old_head)
  else:  # a pre-trained encoder: its config's label map (if any) names no head
    exp.started_from.update(label_names=None, head={"kept": [], "new": list(
        exp.label_names or ["score"]), "dropped": []})
  flat_loaded = {p: v for p, v in traverse_util.flatten_dict(loaded).items()
                 if not isinstance(v, jax.ShapeDtypeStruct)}
  exp.started_from["params_blake2b"] = params_digest(flat_loaded | old_head)
  return params


def _place(current: jax.Array, start: Any, sharding: Any) -> jax.Array:
  """The start's value on `current`'s sharding; broadcast over a sweep's member axis (a host
  view: each device copies its slice). No value (a new parameter): `current`, as initialised."""
  if isinstance(start, jax.ShapeDtypeStruct):
    return current
  full = start if start.shape == current.shape else np.broadcast_to(start, current.shape)
  return jax.make_array_from_callback(full.shape, sharding, lambda idx: full[idx])


def _start_weights(exp: experiment_lib.Experiment, path: str) -> tuple[Any, dict[str, Any]]:
  """(PyTorch-named state dict, where it came from) of a checkpoint, an export or a workdir."""
  record = {"path": os.path.abspath(path), "kind": "hf_directory", "step": None,
            "label_names": None}
  if not workdir_lib.is_workdir(path):
    start_config = hf.load_config(path)
    if not (start_config.problem_type == "regression" or start_config.num_labels == 1):
      record["label_names"] = [str(start_config.id2label[i])
                               for i in range(start_config.num_labels)]
    return hf.load_state_dict(path), record
  step = checkpoint_lib.parse_step(exp.config.start_step)
  checkpoint_lib.check_step(path, step)
  start, params = runs.load_run(path, step=step)
  if start.multitask:
    raise UserError(f"model_name_or_path={path}: a multi-task run; export it (flaxbert-cls "
                    "export --output=OUT) and start from OUT/<task>")
  record.update(kind="workdir", step=start.checkpoint_step,
                label_names=list(start.label_names) if start.label_names else None)
  return hf.state_dict_from_params(jax.device_get(params), start.hf_config.model_type), record


def _unnamed(labels: Sequence[str] | None) -> bool:
  return labels is not None and list(labels) == [f"LABEL_{i}" for i in range(len(labels))]


def _graft_head(exp: experiment_lib.Experiment, params: Any, shardings: Any,
                old_head: dict[tuple[str, ...], np.ndarray]) -> Any:
  """The start's head rows moved to this run's label order; new labels keep fresh rows."""
  record = exp.started_from
  old_labels = record["label_names"]
  sizes = {value.shape[-1] for value in old_head.values()}
  if sizes != {1 if old_labels is None else len(old_labels)}:
    raise UserError(f"{record['path']}: its head has {sorted(sizes)} outputs but its label "
                    f"map {old_labels} has {len(old_labels or [0])}")
  if _unnamed(old_labels):
    # transformers' default names (LABEL_0, ...) say nothing: the head keeps its rows by
    # position when the sizes agree (as a checkpoint's head always loaded), else is new.
    same = exp.label_names is not None and len(exp.label_names) == len(old_labels)
    rows = list(range(len(old_labels))) if same else [None] * len(exp.label_names or [0])
  else:
    rows = head_rows(old_labels, exp.label_names,
                     bool(exp.config.drop_removed_labels), record["path"])
  names = exp.label_names or ["score"]
  record["head"] = {"kept": [n for n, r in zip(names, rows) if r is not None],
                    "new": [n for n, r in zip(names, rows) if r is None],
                    "dropped": [n for n in old_labels or [] if n not in names
                                and not _unnamed(old_labels)]}
  log.info("Head from %s: kept %s, new %s, dropped %s", record["path"], record["head"]["kept"],
           record["head"]["new"], record["head"]["dropped"])
  flat = traverse_util.flatten_dict(params)
  flat_shardings = traverse_util.flatten_dict(shardings)
  for path, old in old_head.items():
    grafted = graft_head(np.asarray(flat[path]), old, rows)
    flat[path] = jax.make_array_from_callback(grafted.shape, flat_shardings[path],
                                              lambda idx, g=grafted: g[idx])
  return traverse_util.unflatten_dict(flat)

