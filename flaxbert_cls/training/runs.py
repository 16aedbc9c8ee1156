"""A saved run read back: its experiment and the parameters of one checkpoint (and member).

What eval, predict, export and a re-fine-tuning start load a workdir through.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from flaxbert_cls import config as config_lib
from flaxbert_cls import saved_config
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import layers
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import members as members_lib
from flaxbert_cls.training import optimizer as optim
from flaxbert_cls.training import state as state_lib


MEAN = "mean"  # --member=mean: every member of a sweep, their probabilities averaged


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=[])
@dataclasses.dataclass
class Members:
  """A sweep's members' parameters at one step, each a single run's tree (--member=mean):
  what the eval averages (decisions/ensemble.py)."""

  params: list[Any]


def load_run(workdir: str, overrides: ml_collections.ConfigDict | None = None,
             step: int | str | None = None, devices: list[jax.Device] | None = None,
             member: int | str | None = None) -> tuple[experiment_lib.Experiment, Any]:
  """A finished (or checkpointed) run: its experiment and restored parameters.

  `step`: None = the latest, 'best' = the best by the task's main metric, or a number.
  A sweep's `member`: None / 'best' (the best member) or an index; its own best step; or
  'mean': every member at `step`, as `Members` (exp.member = 'mean'), an ensemble.
  LoRA adapters come back folded into the base kernels: eval, predict and export only
  ever see a plain BERT.
  """
  workdir = workdir_lib.resolve(workdir)
  config = saved_config.load_saved(workdir)
  if overrides is not None:  # values, not references: both come from default_config()
    config.update(overrides.to_dict())
  ckpt = checkpoint_lib.Checkpoints(workdir, read_only=True)
  members = config_lib.grid(config)  # before building: --member is checked first
  mean = bool(members) and member == MEAN
  if mean and step == "best":
    raise UserError(f"--member={MEAN} --step=best: each member has its own best step; use "
                    "--step=latest (the default) or a step number")
  if members and not mean:
    member = members_lib.member_index(member, members, ckpt.read_meta()[0], ckpt.directory)
  elif not members and member not in (None, "best"):
    raise UserError(f"--member={member}: {workdir} is not a sweep (config.sweep is empty)")
  if step == "best":
    step = ckpt.best_step(member if members else None)
    if step is None:
      raise UserError(f"{ckpt.directory}: no checkpoint was saved with eval metrics")
  meta, _ = ckpt.read_meta(step)
  label_names = meta["label_names"]  # {task: names} for a multi-task run
  if isinstance(label_names, list):
    label_names = tuple(label_names)
  model_dir = workdir_lib.local_dir(workdir_lib.join(workdir, workdir_lib.MODEL_SUBDIR))
  exp = experiment_lib.build_experiment(config, label_names=label_names, devices=devices,
                                        model_dir=model_dir)
  boxed, param_shardings = exp.abstract_params()
  tx, _ = state_lib.optimizer(exp, nn.unbox(boxed), meta["total_steps"])
  abstract_state, state_shardings = state_lib.abstract_state(exp, tx)
  state, exp.checkpoint_meta, exp.checkpoint_step = ckpt.restore(
      checkpoint_lib.abstract_with_shardings(nn.unbox(abstract_state), state_shardings), step)
  ckpt.close()
  params = state.params
  if members:
    exp.member = member
    frozen = optim.frozen_mask(nn.unbox(boxed), config)
    unstack = jax.jit(lambda p, i: members_lib.unstack(p, frozen, i),
                      out_shardings=param_shardings)
    stacked = params
    params = [unstack(stacked, i) for i in (range(len(members)) if mean else [member])]
  else:
    params = [params]
  if exp.model.config.lora_rank:
    merge = jax.jit(functools.partial(layers.merge_lora, lora_alpha=config.lora_alpha))
    params = [merge(p) for p in params]
    exp.model = exp.model.clone(config=dataclasses.replace(exp.model.config, lora_rank=0))
  return exp, Members(params) if mean else params[0]
