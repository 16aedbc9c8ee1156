"""Fine-tuning: create the sharded state -> one jitted train step -> the loop.

Reads like Flax's lm1b: `train_and_evaluate(config, workdir)` is the whole run; the
experiment (model, tasks, mesh, state) comes from `experiment.py`, evaluation from
`evaluate.py`, log lines and scalars from `progress.py`.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics

from flaxbert_cls import checkpoint as checkpoint_lib
from flaxbert_cls import class_weights as class_weights_lib
from flaxbert_cls import data as data_lib
from flaxbert_cls import decisions as decisions_lib
from flaxbert_cls import evaluate as evaluate_lib
from flaxbert_cls import experiment as experiment_lib
from flaxbert_cls import hf
from flaxbert_cls import long_documents
from flaxbert_cls import optim
from flaxbert_cls import progress as progress_lib
from flaxbert_cls import refinetune
from flaxbert_cls import sharding as sharding_lib
from flaxbert_cls import sweep as sweep_lib
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import Preempted, UserError
from flaxbert_cls.experiment import TrainState

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  accuracy: clu_metrics.Average.from_output("accuracy")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  param_norm: clu_metrics.LastValue.from_output("param_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


@dataclasses.dataclass(frozen=True)
class HeadLoss:
  """One head's loss, fixed at compile time: the problem type and its class weights."""

  problem_type: str = "single_label_classification"
  # Single-label: weight per class (weighted softmax CE). Multi-label: BCE pos_weight per
  # label. () = unweighted.
  class_weights: tuple[float, ...] = ()


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
  """
  if not isinstance(outputs, tuple):
    outputs, is_regression = (outputs,), (is_regression,)
  losses = correct = None
  for t, (logits, spec) in enumerate(zip(outputs, is_regression)):
    spec = _head_loss(spec)
    regression = spec.problem_type == "regression"
    task_labels = labels
    if task_ids is not None:
      task_labels = (labels.astype(jnp.float32) if regression
                     else jnp.clip(labels.astype(jnp.int32), 0, logits.shape[-1] - 1))
    loss_t = example_losses(logits, task_labels, spec)
    correct_t = example_correct(logits, task_labels, spec)
    if task_ids is None:
      return loss_t, correct_t
    mine = task_ids == t
    losses = jnp.where(mine, loss_t, 0.0 if losses is None else losses)
    correct = jnp.where(mine, correct_t, 0.0 if correct is None else correct)
  return losses, correct


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               is_regression: "bool | HeadLoss | tuple[bool | HeadLoss, ...]", dropout_seed: int,
               accumulation_steps: int = 1, frozen: Any | None = None,
               window_pooling: str = "mean"
               ) -> tuple[TrainState, TrainMetrics, jax.Array]:
  """One AdamW step on one global batch; returns (state, metrics, loss-and-grads-finite).

  With accumulation_steps = k the batch runs as k micro-batches (scan) whose summed
  gradients give exactly the full batch's update, with 1/k of the activations.
  Multi-task: `is_regression` has one entry per head and the batch holds `task_ids`.
  Window batches (long_document='windows'): the loss is on each document's logits, the
  `window_pooling` of its windows' (long_documents.py).
  """
  # Dropout randomness is a pure function of (seed, step): resume needs no RNG state.
  rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
  total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  def loss_sum(params, micro, micro_rng):
    logits = long_documents.document_logits(model, params, micro, window_pooling,
                                            deterministic=False, rngs={"dropout": micro_rng})
    losses, correct = head_losses(logits, micro["labels"], micro.get("task_ids"), is_regression)
    return jnp.sum(losses * micro["weights"]), (correct, losses)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
  k = accumulation_steps
  if k == 1:
    (total_loss, (correct, losses)), grads = grad_fn(state.params, batch, rng)
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
    (grads, total_loss), (correct, losses) = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(k), micro))
    correct, losses = jax.tree.map(
        lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), (correct, losses))
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
      loss=losses, accuracy=correct, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
      learning_rate=schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics, finite


def jit_train_step(exp: experiment_lib.Experiment, params: Any, state_shardings: Any,
                   tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
  """The train step as training compiles it: (state, batch) -> (state, metrics, finite).

  The state is donated; shardings, freezing, accumulation and the CPU scheduler come
  from exp.config (tools/bench.py times this same program).
  """
  config = exp.config
  return jax.jit(
      functools.partial(train_step, model=exp.model, tx=tx, schedule=schedule,
                        is_regression=exp.head_losses,
                        dropout_seed=config.seed,
                        accumulation_steps=config.gradient_accumulation_steps,
                        frozen=_frozen_mask(params, config),
                        window_pooling=config.get("window_pooling", "mean")),
      in_shardings=(state_shardings, exp.batch_sharding),
      out_shardings=(state_shardings, sharding_lib.replicated(exp.mesh),
                     sharding_lib.replicated(exp.mesh)),
      donate_argnums=0,
      compiler_options=train_step_compiler_options(exp.mesh, config.cpu_scheduler))


def sweep_train_step(state: TrainState, batch: dict[str, jax.Array], hyper: dict[str, jax.Array],
                     *, exp: experiment_lib.Experiment, total_steps: int, frozen: Any
                     ) -> tuple[TrainState, TrainMetrics, jax.Array]:
  """`train_step` of every sweep member at once: vmapped over the stacked state, the
  [members, batch, ...] batch and the members' `hyper` rows (sweep.member_hyper).

  Each member builds its optimizer from its own learning-rate table and weight decay and
  draws dropout from its own seed; frozen parameters (`frozen` True) are one shared copy.
  Metrics are averaged over members; the finite flag is all members'.
  """
  config = exp.config
  solo_frozen = _frozen_mask(state.params, config)

  def member_step(trained, opt_state, member_batch, member_hyper):
    params = sweep_lib.merge_trained(state.params, frozen, trained)
    tx, schedule = sweep_lib.optimizer(config, params, total_steps, member_hyper)
    new, metrics, finite = train_step(
        TrainState(step=state.step, params=params, opt_state=opt_state), member_batch,
        model=exp.model, tx=tx, schedule=schedule, is_regression=exp.head_losses,
        dropout_seed=member_hyper["seed"], accumulation_steps=config.gradient_accumulation_steps,
        frozen=solo_frozen, window_pooling=config.get("window_pooling", "mean"))
    return sweep_lib.split_trained(new.params, frozen), new.opt_state, metrics, finite

  spmd_axis = sweep_lib.MEMBER_AXIS if sweep_lib.MEMBER_AXIS in exp.mesh.axis_names else None
  trained, opt_state, metrics, finite = jax.vmap(member_step, spmd_axis_name=spmd_axis)(
      sweep_lib.split_trained(state.params, frozen), state.opt_state, batch, hyper)
  params = sweep_lib.merge_trained(state.params, frozen, trained)
  return (TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics.reduce(),
          jnp.all(finite))


def jit_sweep_train_step(exp: experiment_lib.Experiment, state_shardings: Any, total_steps: int
                         ) -> Callable:
  """The sweep's step as training compiles it: (state, batch) -> (state, metrics, finite)."""
  config = exp.config
  boxed, _ = exp.abstract_params()
  frozen = sweep_lib.frozen_mask(config, nn.unbox(boxed))
  hyper = jax.device_put(sweep_lib.member_hyper(config, total_steps),
                         sharding_lib.replicated(exp.mesh))
  step = jax.jit(
      functools.partial(sweep_train_step, exp=exp, total_steps=total_steps, frozen=frozen),
      in_shardings=(state_shardings, sweep_batch_sharding(exp.mesh),
                    sharding_lib.replicated(exp.mesh)),
      out_shardings=(state_shardings, sharding_lib.replicated(exp.mesh),
                     sharding_lib.replicated(exp.mesh)),
      donate_argnums=0,
      compiler_options=train_step_compiler_options(exp.mesh, config.cpu_scheduler))
  return lambda state, batch: step(state, batch, hyper)


def sweep_batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """[members, batch, ...]: members over the 'member' axis, rows as a solo run's."""
  rows = sharding_lib.batch_sharding(mesh).spec[0]
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sweep_lib.MEMBER_AXIS, rows))


def _frozen_mask(params: Any, config: ml_collections.ConfigDict) -> Any | None:
  """Static True/False per parameter (None when nothing is frozen)."""
  patterns = optim.freeze_patterns(config)
  return optim.path_mask(params, patterns) if patterns else None


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


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache (every program, however fast to compile)."""
  if not directory:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Fine-tunes per `config` in `workdir`, resuming its latest checkpoint (unless resume=False).

  Returns {'step', 'eval', 'train_log': [(step, loss)], 'state', 'best', 'seconds'}.
  """
  workdir = workdir_lib.prepare(workdir)
  config = _with_cache_dir(config, workdir)
  enable_compilation_cache(config.compilation_cache_dir)
  exp = experiment_lib.build_experiment(config, devices=devices)
  decisions_lib.check_run(exp)
  train_splits = experiment_lib.read_tokenized(exp, "train")
  class_weights_lib.resolve_for_run(exp, [split.labels for split in train_splits])
  eval_data = experiment_lib.read_examples_tokenized(exp, "validation")
  members = sweep_lib.grid(config)  # [] = one run; else a sweep: members stacked in the state
  mixture = _task_mixture(exp, train_splits)
  total_steps = _total_steps(config, mixture)
  ckpt = checkpoint_lib.Checkpoints(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                    keep_best=config.keep_best_checkpoints, members=len(members))
  run_meta = _run_meta(exp, total_steps, train_splits)
  state, state_shardings, tx, schedule, best = _restore_or_init(exp, ckpt, run_meta)
  pooling = config.get("window_pooling", "mean")
  if members:
    jit_train = jit_sweep_train_step(exp, state_shardings, total_steps)
    jit_eval = evaluate_lib.jit_eval_step(exp.model, exp.abstract_params()[1], exp.batch_sharding,
                                          pooling)
  else:
    jit_train = jit_train_step(exp, state.params, state_shardings, tx, schedule)
    jit_eval = evaluate_lib.jit_eval_step(exp.model, state_shardings.params, exp.batch_sharding,
                                          pooling)
  _write_run_files(exp, workdir)

  start_step = int(state.step)
  batches = _global_batches(exp, train_splits, mixture, range(start_step, total_steps))
  train_log = progress_lib.TrainLog(workdir, total_steps, start_step,
                                    config.batch_size * max(len(members), 1),
                                    config.log_every_steps)
  finite = _FiniteGuard(config.nonfinite_policy, ckpt)
  preemption = checkpoint_lib.PreemptionWatcher(config.log_every_steps)
  save_timer = checkpoint_lib.SaveTimer(config.checkpoint_every_minutes, config.log_every_steps)
  log.info("Training steps %d..%d (%d per epoch) of %d examples on a %s mesh.", start_step + 1,
           total_steps, mixture.steps_per_epoch, config.batch_size, dict(exp.mesh.shape))
  eval_metrics = {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, step_metrics, step_finite = jit_train(state, next(batches))
      finite.check_later(step, step_finite)
      train_log.record(step, step_metrics)
      if train_log.due(step):
        finite.check_now()
        train_log.write_train(step)
      evaluated = _eval_due(config, step, total_steps)
      if evaluated and members:
        eval_metrics = _evaluate_members(exp, state.params, eval_data, jit_eval, step,
                                         train_log, best, workdir)
      elif evaluated:
        eval_metrics = _evaluate(exp, state.params, eval_data, jit_eval, step, train_log, best,
                                 workdir)
      preempted = preemption.reached(step)
      # After every eval too: best-k checkpoints need the evaluated step on disk.
      if preempted or evaluated or _checkpoint_due(config, step, total_steps, save_timer):
        _save(ckpt, step, state, {**run_meta, **best.state()},
              best.checkpoint_metric(eval_metrics) if evaluated else None)
      if preempted:
        _exit_preempted(ckpt, step)
      if best.should_stop:
        break
  finally:
    preemption.close()
    ckpt.close()
    train_log.close()
  return _finish(state, eval_metrics, train_log, best, workdir, members)


def _with_cache_dir(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy with cache_dir set: token caches are local files, so a remote workdir caches in
  the user's cache dir."""
  config = ml_collections.ConfigDict(config)
  with config.unlocked():
    config.cache_dir = config.cache_dir or (
        os.path.expanduser("~/.cache/flaxbert_cls/tokens") if workdir_lib.is_remote(workdir)
        else os.path.join(workdir, "cache"))
  return config


def _task_mixture(exp: experiment_lib.Experiment, splits: list[data_lib.TokenizedSplit],
                  seed: int | None = None) -> data_lib.TaskMixture:
  """Which task and examples each step trains. One task is the 1-task mixture: every step
  is its step, exactly the single-task order. `seed`: a sweep member's (default config.seed)."""
  config = exp.config
  if seed is not None:
    config = sweep_lib.member_config(config, {"seed": seed})
  orders = []
  for i, (run_task, split) in enumerate(zip(exp.tasks, splits)):
    try:
      orders.append(data_lib.TrainOrder(split.document_lengths, config.batch_size, config.seed + i,
                                        config.length_grouping_window))
    except UserError as e:
      raise UserError(f"task {run_task.name}: {e}" if exp.multitask else str(e)) from None
  mixture = data_lib.TaskMixture(
      orders, data_lib.mixing_probabilities([len(s) for s in splits],
                                            [t.weight for t in exp.tasks], config.mixing,
                                            config.mixing_temperature), config.seed)
  if exp.multitask and seed is None:
    log.info("Mixing (%s): %s", config.mixing, "  ".join(
        f"{t.name} {p:.3f}" for t, p in zip(exp.tasks, mixture.probabilities)))
  return mixture


def _total_steps(config: ml_collections.ConfigDict, mixture: data_lib.TaskMixture) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return math.ceil(config.num_train_epochs * mixture.steps_per_epoch)


def _global_batches(exp: experiment_lib.Experiment, splits: list[data_lib.TokenizedSplit],
                    mixture: data_lib.TaskMixture, steps: range) -> Iterator[dict[str, jax.Array]]:
  """Global batches for `steps`, prepared in a background thread."""
  config = exp.config
  # Every task's labels in one dtype: one jit signature whichever task a step draws.
  labels_dtype = np.float32 if any(t.task.is_regression for t in exp.tasks) else np.int32
  members = sweep_lib.grid(config)
  if members:  # each member's batches in its own seed's order, stacked [members, batch, ...]
    seeds = sweep_lib.member_seeds(config)
    if len(set(seeds)) > 1 and len(config.seq_buckets) > 1:
      log.warning("Sweep: members with other seeds draw other batches; each step pads all to the "
                  "longest one's bucket, so a member's dropout masks (drawn per padded shape) "
                  "differ from its solo run's. It trains like it, not bit for bit; for exact "
                  "equality use one bucket (config.seq_buckets=(max_seq_length,)).")
    by_seed = {seed: _task_mixture(exp, splits, seed) for seed in set(seeds)}
    sharding = sweep_batch_sharding(exp.mesh)
    # Rows are each process's contiguous block (process_rows without a sharding), which
    # make_array_from_process_local_data places along the batch axis, after 'member'.
    return data_lib.prefetch(
        {k: jax.make_array_from_process_local_data(sharding, v)
         for k, v in sweep_lib.stack_batches([
             data_lib.train_batch(splits, by_seed[seed], step, config.seq_buckets,
                                  config.max_seq_length, labels_dtype) for seed in seeds]).items()}
        for step in steps)
  return data_lib.prefetch(
      data_lib.to_global(data_lib.train_batch(splits, mixture, step, config.seq_buckets,
                                              config.max_seq_length, labels_dtype,
                                              exp.batch_sharding),
                         exp.batch_sharding)
      for step in steps)


def _evaluate(exp: experiment_lib.Experiment, params: Any,
              eval_data: list[tuple[Any, data_lib.TokenizedSplit]], jit_eval: Callable,
              step: int, train_log: progress_lib.TrainLog, best: evaluate_lib.BestTracker,
              workdir: str) -> dict[str, float]:
  """Every task's dev metrics, logged and tracked; a new best also writes workdir/eval/
  (predictions and errors: the report page reads them without evaluating again)."""
  metrics, records, logits = evaluate_lib.evaluate_tasks(
      exp, params, [split for _, split in eval_data], jit_eval)
  # Temperature / thresholds fitted on these logits and saved (config.calibrate, ...).
  fitted = decisions_lib.after_eval(exp, workdir, step, logits[0], eval_data[0][1].labels)
  metrics.update(fitted)
  records[0].update(fitted)
  train_log.write_eval(step, metrics, records)
  best.update(step, metrics)
  if best.best and best.best["step"] == step and jax.process_index() == 0:
    evaluate_lib.write_eval_files(workdir, exp, [examples for examples, _ in eval_data], logits,
                                  metrics, step, step)
  return metrics


def _evaluate_members(exp: experiment_lib.Experiment, params: Any,
                      eval_data: list[tuple[Any, data_lib.TokenizedSplit]], jit_eval: Callable,
                      step: int, train_log: progress_lib.TrainLog,
                      best: evaluate_lib.MemberBests, workdir: str) -> dict[str, float]:
  """Every sweep member's dev metrics; metrics.jsonl records carry the member's index and
  values. Returns them flat as 'member<i>/<metric>'. A new best member's best step writes
  workdir/eval/ (as a solo run's best does)."""
  members = sweep_lib.grid(exp.config)
  boxed, param_shardings = exp.abstract_params()
  frozen = sweep_lib.frozen_mask(exp.config, nn.unbox(boxed))
  unstack = jax.jit(lambda p, i: sweep_lib.unstack(p, frozen, i), out_shardings=param_shardings)
  flat, member_metrics, member_logits = {}, [], []
  for i, member in enumerate(members):
    metrics, records, logits = evaluate_lib.evaluate_tasks(
        exp, unstack(params, i), [split for _, split in eval_data], jit_eval)
    train_log.write_eval(step, {f"member{i}/{k}": v for k, v in metrics.items()},
                         [{"member": i, **member, **r} for r in records])
    member_metrics.append(metrics)
    member_logits.append(logits)
    flat.update({f"member{i}/{k}": v for k, v in metrics.items()})
  best.update(step, member_metrics)
  if best.best and best.best["step"] == step and jax.process_index() == 0:
    member = best.best["member"]
    evaluate_lib.write_eval_files(workdir, exp, [examples for examples, _ in eval_data],
                                  member_logits[member], member_metrics[member], step, step)
  return flat


def _eval_due(config: ml_collections.ConfigDict, step: int, total_steps: int) -> bool:
  return bool(config.eval_every_steps and step % config.eval_every_steps == 0) or \
      step == total_steps


def _checkpoint_due(config: ml_collections.ConfigDict, step: int, total_steps: int,
                    save_timer: checkpoint_lib.SaveTimer) -> bool:
  return (step % config.checkpoint_every_steps == 0 or step == total_steps
          or save_timer.due(step))


class _FiniteGuard:
  """Stops (or warns, nonfinite_policy='skip') on a step whose loss or gradient was not finite.

  The flag is read one step late, so reading it does not stall the device.
  """

  def __init__(self, policy: str, ckpt: checkpoint_lib.Checkpoints):
    self.policy, self.ckpt = policy, ckpt
    self._pending = None

  def check_later(self, step: int, finite: jax.Array) -> None:
    self.check_now()
    self._pending = (step, finite)

  def check_now(self) -> None:
    if self._pending is None:
      return
    (step, finite), self._pending = self._pending, None
    if bool(finite):
      return
    if self.policy == "skip":
      log.warning("step %d: loss or gradient is not finite; the update was skipped", step)
      return
    raise UserError(f"step {step}: loss or gradient is not finite (NaN/inf); training stopped. "
                    f"Checkpoints in {self.ckpt.directory} are intact (latest: "
                    f"{self.ckpt.latest_step()}). Lower learning_rate, or set "
                    "config.nonfinite_policy='skip'")


def _run_meta(exp: experiment_lib.Experiment, total_steps: int,
              train_splits: list[data_lib.TokenizedSplit]) -> dict[str, Any]:
  """What every checkpoint records about the run (resume checks it)."""
  task_name, label_names = exp.run_identity()
  meta = {"label_names": label_names, "task_name": task_name, "total_steps": total_steps,
          "model_name_or_path": exp.config.model_name_or_path,
          "batch_size": exp.config.batch_size,
          "train_data": "+".join(split.content_hash for split in train_splits)}
  if sweep_lib.grid(exp.config):
    meta["sweep"] = sweep_lib.grid(exp.config)  # another grid cannot resume these members
  return meta


# Recorded since a later version: a checkpoint without them resumes unchecked.
_RECORDED_LATER = ("batch_size", "train_data")


def _check_same_run(ckpt: checkpoint_lib.Checkpoints, run_meta: dict[str, Any]) -> None:
  """Refuses to resume a checkpoint of another model, task, label set, batch size or data."""
  saved_meta, _ = ckpt.read_meta()
  for key, value in run_meta.items():
    if key == "total_steps" or (key in _RECORDED_LATER and key not in saved_meta):
      continue
    saved = saved_meta.get(key)
    if saved == value:
      continue
    if key == "train_data":
      what = (f"was trained on other data (content hash {saved}); this config's training data "
              "(train_file / data_dir / dataset) has " + repr(value))
    else:
      what = f"was made with {key}={saved!r}, this config has {value!r}"
    raise UserError(f"{ckpt.directory}: checkpoint {what}; use another --workdir, or "
                    "--config.resume=False to start over")


def _restore_or_init(exp: experiment_lib.Experiment, ckpt: checkpoint_lib.Checkpoints,
                     run_meta: dict[str, Any]
                     ) -> tuple[TrainState, Any, Any, Any, evaluate_lib.BestTracker]:
  """The latest checkpoint in the workdir, else the pre-trained weights on a fresh state.

  A checkpoint of another run (`_check_same_run`) is refused before anything compiles.
  """
  config = exp.config
  if ckpt.all_steps() and not config.resume:
    log.warning("config.resume=False: deleting the checkpoints in %s", ckpt.directory)
    ckpt.delete_all()
  resuming = bool(ckpt.all_steps())
  if resuming:
    _check_same_run(ckpt, run_meta)
  pretrained = None if resuming else hf.resolve(config.model_name_or_path)
  members = sweep_lib.grid(config)
  if members:
    state, state_shardings, tx = experiment_lib.create_sweep_state(
        exp, run_meta["total_steps"], pretrained)
    schedule = None  # per member: sweep.member_hyper
    best = evaluate_lib.MemberBests(exp.selection_key(), config.early_stopping_patience,
                                    len(members))
  else:
    state, state_shardings, tx, schedule = experiment_lib.create_train_state(
        exp, run_meta["total_steps"], pretrained)
    best = evaluate_lib.BestTracker(exp.selection_key(), config.early_stopping_patience)
  if resuming:
    state, saved_meta, restored_step = ckpt.restore(
        checkpoint_lib.abstract_with_shardings(state, state_shardings))
    ckpt.delete_after(restored_step)  # damaged later steps: saving them again would fail
    best.restore(saved_meta)
    log.info("Resumed from %s/%d.", ckpt.directory, restored_step)
  optim.log_parameters(state.params, config)
  return state, state_shardings, tx, schedule, best


def _save(ckpt: checkpoint_lib.Checkpoints, step: int, state: TrainState, meta: dict[str, Any],
          main_metric: float | None) -> None:
  """Saves asynchronously; an evaluated step is ranked by its main metric for best-k."""
  t_save = time.perf_counter()
  ckpt.save(step, state, meta, main_metric)
  log.info("checkpoint %d: the loop waited %.0f ms (the write continues in the background)",
           step, 1e3 * (time.perf_counter() - t_save))


def _exit_preempted(ckpt: checkpoint_lib.Checkpoints, step: int) -> None:
  ckpt.wait()
  log.warning("Preempted: saved step %d to %s; rerun the same command to resume.",
              step, ckpt.directory)
  raise Preempted(f"preempted at step {step}; checkpoint saved")


def _write_run_files(exp: experiment_lib.Experiment, workdir: str) -> None:
  """config.json and model/ (HF config + tokenizer): eval and export need nothing else."""
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir_lib.join(workdir, "config.json"),
                           exp.config.to_json(indent=2))
    if exp.started_from is not None:  # a fresh start (not a resume): what it started from
      workdir_lib.write_text(workdir_lib.join(workdir, refinetune.STARTED_FROM_NAME),
                             json.dumps(exp.started_from, indent=2))
  experiment_lib.save_model_dir(exp, workdir)


def _finish(state: TrainState, eval_metrics: dict[str, float], train_log: progress_lib.TrainLog,
            best: Any, workdir: str, members: list[dict[str, Any]]) -> dict[str, Any]:
  if best.best:
    log.info("Best %s %.4f at step %d%s: %s", best.key, best.best["metrics"][best.key],
             best.best["step"], f" (member {best.best['member']})" if members else "",
             evaluate_lib.format_metrics(best.best["metrics"]))
  seconds = time.time() - train_log.t_start
  log.info("Done in %s.", progress_lib.format_duration(seconds))
  result = {"step": int(state.step), "eval": eval_metrics, "train_log": train_log.history,
            "state": state, "best": best.best, "seconds": seconds}
  if members and all(t.best for t in best.trackers):
    # Each member scored by its best evaluation (the checkpoint export --member picks).
    result["sweep"] = sweep_lib.results_table(
        members, [t.best["metrics"][best.key] for t in best.trackers], best.key)
    log.info("Sweep (%d members), %s per setting over seeds:\n%s", len(members), best.key,
             sweep_lib.write_results(workdir, result["sweep"]))
  return result
