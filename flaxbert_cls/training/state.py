"""The train state: step, parameters and optimizer state, and its shardings from abstract shapes.

A sweep's state is the same dataclass with a leading [members] axis on the trained
parameters and the optimizer state (members.py); frozen parameters are stored once.
Nothing here allocates: `starts.py` creates the state on its shardings, `runs.py` restores it.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import members as members_lib
from flaxbert_cls.training import optimizer as optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(exp: experiment_lib.Experiment, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """A boxed (logically partitioned) random-init state of one run."""
  params = exp.init_params(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(exp: experiment_lib.Experiment, tx: optax.GradientTransformation
                         ) -> tuple[Any, Any]:
  """(boxed abstract TrainState, its NamedShardings from the config's logical axis rules)."""
  abstract = jax.eval_shape(functools.partial(init_state, exp, tx), jax.random.key(0))
  return abstract, sharding_lib.logical_to_shardings(
      abstract, exp.mesh, exp.config.logical_axis_rules,
      exp.config.min_size_to_shard_mb)


def abstract_stacked_state(exp: experiment_lib.Experiment, tx: optax.GradientTransformation
                           ) -> tuple[Any, Any]:
  """(boxed abstract stacked TrainState, its NamedShardings): trained params and the optimizer
  state get a leading [members] axis named 'member'; frozen params stay single."""
  abstract, _ = abstract_train_state(exp, tx)
  params, opt_state = members_lib.stack_abstract(
      abstract.params, abstract.opt_state,
      optim.frozen_mask(abstract.params, exp.config), len(exp.members))
  stacked = abstract.replace(params=params, opt_state=opt_state)
  return stacked, sharding_lib.logical_to_shardings(
      stacked, exp.mesh, members_lib.logical_axis_rules(exp.config),
      exp.config.min_size_to_shard_mb)


def abstract_state(exp: experiment_lib.Experiment, tx: optax.GradientTransformation
                   ) -> tuple[Any, Any]:
  """The run's abstract state and shardings: stacked for a sweep, single otherwise."""
  return (abstract_stacked_state if exp.members else abstract_train_state)(exp, tx)


def optimizer(exp: experiment_lib.Experiment, params: Any, total_steps: int
              ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's optimizer: a sweep's template (members.optimizer) or the config's."""
  if exp.members:
    return members_lib.optimizer(exp.config, exp.members, params, total_steps)
  return optim.create_optimizer(exp.config, params, total_steps)
