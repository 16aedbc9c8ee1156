"""The train step: one AdamW update of a global batch, and the program training compiles.

`train_step` is one run's step (gradient accumulation, frozen parameters, window pooling,
non-finite guard); `stacked_train_step` is every sweep member's at once, vmapped over the
stacked state (members.py). `jit_train_step` / `jit_stacked_train_step` are the jitted
programs the loop, the benchmarks and `plan` compile.
"""

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from flaxbert_cls.model import long_documents
from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.model.losses import HeadLoss, head_losses
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import members as members_lib
from flaxbert_cls.training import optimizer as optim
from flaxbert_cls.training.state import TrainState


def _over_real(name: str) -> type:
  """The mean of output `name` over the real examples (`real`: a packed batch's empty slots,
  weight 0, are no examples)."""
  return clu_metrics.Average.from_fun(lambda real, **outputs: {"values": outputs[name],
                                                               "mask": real})


# No `from __future__ import annotations` here: clu reads the metric classes from the
# annotations of TrainMetrics.
@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: _over_real("loss")
  accuracy: _over_real("accuracy")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  param_norm: clu_metrics.LastValue.from_output("param_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               head_loss: "bool | HeadLoss | tuple[bool | HeadLoss, ...]", dropout_seed: int,
               accumulation_steps: int = 1, frozen: Any | None = None,
               window_pooling: str = "mean"
               ) -> tuple[TrainState, TrainMetrics, jax.Array]:
  """One AdamW step on one global batch; returns (state, metrics, loss-and-grads-finite).

  With accumulation_steps = k the batch runs as k micro-batches (scan) whose summed
  gradients give exactly the full batch's update, with 1/k of the activations.
  `head_loss`: the head's loss (losses.HeadLoss; a bool is_regression also works). Multi-task:
  `head_loss` has one entry per head and the batch holds `task_ids`.
  Window batches (long_document='windows'): the loss is on each document's logits, the
  `window_pooling` of its windows' (long_documents.py).
  """
  # Dropout randomness is a pure function of (seed, step): resume needs no RNG state.
  rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
  total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  def loss_sum(params, micro, micro_rng):
    logits = long_documents.document_logits(model, params, micro, window_pooling,
                                            deterministic=False, rngs={"dropout": micro_rng})
    examples = long_documents.packed_examples(micro)  # packed rows: one entry per example slot
    losses, correct = head_losses(logits, examples["labels"], examples.get("task_ids"), head_loss)
    return jnp.sum(losses * examples["weights"]), (correct, losses, examples["weights"] > 0)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
  k = accumulation_steps
  if k == 1:
    (total_loss, (correct, losses, real)), grads = grad_fn(state.params, batch, rng)
  else:
    # Micro-batch i holds rows i, i+k, ...: every micro-batch stays spread over all
    # data shards (a [k, B/k] split would put each on a slice of the devices).
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]),
                                                0, 1), batch)

    def accumulate(carry, inputs):
      index, micro_batch = inputs
      (value, aux), g = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
      return (jax.tree.map(jnp.add, carry[0], g), carry[1] + value), aux

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, total_loss), (correct, losses, real) = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(k), micro))
    correct, losses, real = jax.tree.map(
        lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), (correct, losses, real))
  loss = total_loss / total_weight
  grads = jax.tree.map(lambda g: g / total_weight, grads)
  if frozen is not None:
    # Frozen parameters' gradients are never used; zeroing them statically lets XLA skip
    # computing them (the gradient norm below would otherwise keep them alive).
    grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # A non-finite loss or gradient leaves parameters and optimizer state untouched;
  # the host then stops or skips (config.nonfinite_policy).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                   (params, opt_state), (state.params, state.opt_state))
  metrics = TrainMetrics.single_from_model_output(
      loss=losses, accuracy=correct, real=real, grad_norm=grad_norm,
      param_norm=optax.tree.norm(params), learning_rate=schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics, finite


def jit_train_step(exp: experiment_lib.Experiment, params: Any, state_shardings: Any,
                   tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
  """The train step as training compiles it: (state, batch) -> (state, metrics, finite).

  The state is donated; shardings, freezing, accumulation and the CPU scheduler come
  from exp.config (benchmarks/bench.py times this same program).
  """
  config = exp.config
  return jax.jit(
      functools.partial(train_step, model=exp.model, tx=tx, schedule=schedule,
                        head_loss=exp.head_losses,
                        dropout_seed=config.seed,
                        accumulation_steps=config.gradient_accumulation_steps,
                        frozen=optim.frozen_mask(params, config),
                        window_pooling=config.window_pooling),
      in_shardings=(state_shardings, exp.batch_sharding),
      out_shardings=(state_shardings, sharding_lib.replicated(exp.mesh),
                     sharding_lib.replicated(exp.mesh)),
      donate_argnums=0,
      compiler_options=train_step_compiler_options(exp.mesh, config.cpu_scheduler))


def stacked_train_step(state: TrainState, batch: dict[str, jax.Array], hyper: dict[str, jax.Array],
                     *, exp: experiment_lib.Experiment, total_steps: int, frozen: Any
                     ) -> tuple[TrainState, TrainMetrics, jax.Array]:
  """`train_step` of every sweep member at once: vmapped over the stacked state, the
  [members, batch, ...] batch and the members' `hyper` rows (sweep.member_hyper).

  Each member builds its optimizer from its own learning-rate table and weight decay and
  draws dropout from its own seed; frozen parameters (`frozen` True) are one shared copy.
  Metrics are averaged over members; the finite flag is all members'.
  """
  config = exp.config
  solo_frozen = optim.frozen_mask(state.params, config)

  def member_step(trained, opt_state, member_batch, member_hyper):
    params = members_lib.merge_trained(state.params, frozen, trained)
    tx, schedule = members_lib.optimizer(config, exp.members, params, total_steps, member_hyper)
    new, metrics, finite = train_step(
        TrainState(step=state.step, params=params, opt_state=opt_state), member_batch,
        model=exp.model, tx=tx, schedule=schedule, head_loss=exp.head_losses,
        dropout_seed=member_hyper["seed"], accumulation_steps=config.gradient_accumulation_steps,
        frozen=solo_frozen, window_pooling=config.window_pooling)
    return members_lib.split_trained(new.params, frozen), new.opt_state, metrics, finite

  spmd_axis = members_lib.MEMBER_AXIS if members_lib.MEMBER_AXIS in exp.mesh.axis_names else None
  trained, opt_state, metrics, finite = jax.vmap(member_step, spmd_axis_name=spmd_axis)(
      members_lib.split_trained(state.params, frozen), state.opt_state, batch, hyper)
  params = members_lib.merge_trained(state.params, frozen, trained)
  return (TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics.reduce(),
          jnp.all(finite))


def jit_stacked_train_step(exp: experiment_lib.Experiment, state_shardings: Any, total_steps: int
                         ) -> Callable:
  """The sweep's step as training compiles it: (state, batch) -> (state, metrics, finite)."""
  step, hyper = stacked_step_program(exp, state_shardings, total_steps)
  hyper = jax.device_put(hyper, sharding_lib.replicated(exp.mesh))
  return lambda state, batch: step(state, batch, hyper)


def stacked_step_program(exp: experiment_lib.Experiment, state_shardings: Any, total_steps: int
                         ) -> tuple[Callable, dict[str, Any]]:
  """(the sweep's jitted (state, batch, hyper) step, the members' host `hyper` rows):

  what jit_stacked_train_step binds, and what `plan` lowers without devices.
  """
  config = exp.config
  boxed, _ = exp.abstract_params()
  frozen = optim.frozen_mask(nn.unbox(boxed), config)
  hyper = members_lib.member_hyper(config, exp.members, total_steps)
  step = jax.jit(
      functools.partial(stacked_train_step, exp=exp, total_steps=total_steps, frozen=frozen),
      in_shardings=(state_shardings, members_lib.stacked_batch_sharding(exp.mesh),
                    sharding_lib.replicated(exp.mesh)),
      out_shardings=(state_shardings, sharding_lib.replicated(exp.mesh),
                     sharding_lib.replicated(exp.mesh)),
      donate_argnums=0,
      compiler_options=train_step_compiler_options(exp.mesh, config.cpu_scheduler))
  return step, hyper


_CPU_SCHEDULERS = {"memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                   "concurrency": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}


def train_step_compiler_options(mesh: jax.sharding.Mesh, cpu_scheduler: str = "memory"
                                ) -> dict[str, str] | None:
  """XLA options for the jitted train step: on CPU, the scheduler `cpu_scheduler` names.

  XLA's default CPU scheduler starts independent work early for concurrency; in a
  train step that hoists backward-pass recomputations (dropout masks, ...) up to the
  forward pass and keeps them alive. The memory-optimized one: MiniLM batch 32 x 128
  temp memory 1.18 -> 0.92 GB, BERT-base 4.22 -> 3.37 GB, same speed (docs/design.md).
  """
  if mesh.devices.flat[0].platform != "cpu":
    return None
  return {"xla_cpu_scheduler_type": _CPU_SCHEDULERS[cpu_scheduler]}
