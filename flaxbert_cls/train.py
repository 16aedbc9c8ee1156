"""Fine-tuning: create the sharded state -> one jitted train step -> the loop.

Reads like Flax's lm1b: `train_and_evaluate(config, workdir)` is the whole run.
"""


import dataclasses
import functools
import io
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.experimental import multihost_utils

from flaxbert_cls import checkpoint as checkpoint_lib
from flaxbert_cls import config as config_lib
from flaxbert_cls import data as data_lib
from flaxbert_cls import hf
from flaxbert_cls import metrics as metrics_lib
from flaxbert_cls import model as model_lib
from flaxbert_cls import optim
from flaxbert_cls import sharding as sharding_lib
from flaxbert_cls import tasks as tasks_lib
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import Preempted, UserError

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"  # HF config.json (with the label map) + tokenizer files
METRICS_FILE = "metrics.jsonl"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  accuracy: clu_metrics.Average.from_output("accuracy")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  param_norm: clu_metrics.LastValue.from_output("param_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


def example_losses(logits: jax.Array, labels: jax.Array, is_regression: bool) -> jax.Array:
  """Per-example loss in float32: squared error (regression) or softmax cross-entropy."""
  logits = logits.astype(jnp.float32)
  if is_regression:
    return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def head_losses(outputs: jax.Array | tuple[jax.Array, ...], labels: jax.Array,
                task_ids: jax.Array | None, is_regression: bool | tuple[bool, ...]
                ) -> tuple[jax.Array, jax.Array]:
  """(per-example loss, per-example correct) from each example's own task head.

  `outputs` is one logits array (single task) or one per task (MultiTaskClassifier),
  with `task_ids` naming each row's task; other heads' values are masked out with
  `where`, so they get no gradient and a wrong-range label cannot leak a NaN.
  """
  if not isinstance(outputs, tuple):
    outputs, is_regression = (outputs,), (is_regression,)
  losses = correct = None
  for t, (logits, regression) in enumerate(zip(outputs, is_regression)):
    task_labels = labels
    if task_ids is not None:
      task_labels = (labels.astype(jnp.float32) if regression
                     else jnp.clip(labels.astype(jnp.int32), 0, logits.shape[-1] - 1))
    loss_t = example_losses(logits, task_labels, regression)
    correct_t = (jnp.zeros_like(loss_t) if regression
                 else (jnp.argmax(logits, -1) == task_labels).astype(jnp.float32))
    if task_ids is None:
      return loss_t, correct_t
    mine = task_ids == t
    losses = jnp.where(mine, loss_t, 0.0 if losses is None else losses)
    correct = jnp.where(mine, correct_t, 0.0 if correct is None else correct)
  return losses, correct


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               is_regression: bool | tuple[bool, ...], dropout_seed: int,
               accumulation_steps: int = 1, frozen: Any | None = None
               ) -> tuple[TrainState, TrainMetrics, jax.Array]:
  """One AdamW step on one global batch; returns (state, metrics, loss-and-grads-finite).

  With accumulation_steps = k the batch runs as k micro-batches (scan) whose summed
  gradients give exactly the full batch's update, with 1/k of the activations.
  Multi-task: `is_regression` has one entry per head and the batch holds `task_ids`.
  """
  # Dropout randomness is a pure function of (seed, step): resume needs no RNG state.
  rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
  total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  def loss_sum(params, micro, micro_rng):
    logits = model.apply({"params": params}, micro["input_ids"], micro["attention_mask"],
                         micro["token_type_ids"], deterministic=False,
                         rngs={"dropout": micro_rng})
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


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> jax.Array:
  """Logits [batch, classes]; for a multi-task model [batch, task, max classes] (zero-padded)."""
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"], deterministic=True)
  if isinstance(logits, tuple):  # every head in one program: one compile per length bucket
    width = max(x.shape[-1] for x in logits)
    logits = jnp.stack([jnp.pad(x, ((0, 0), (0, width - x.shape[-1]))) for x in logits], 1)
  return logits.astype(jnp.float32)


@dataclasses.dataclass
class TaskHead:
  """One task of a run: its head's name, task, label map, data config and mixing weight."""

  name: str
  task: tasks_lib.Task
  label_names: tuple[str, ...] | None
  config: ml_collections.ConfigDict  # the run's config with this task's keys on top
  weight: float = 1.0

  @property
  def num_labels(self) -> int:
    return 1 if self.task.is_regression else len(self.label_names)


@dataclasses.dataclass
class Experiment:
  """What a config resolves to: task, labels, model, tokenizer, mesh and shardings."""

  config: ml_collections.ConfigDict
  task: tasks_lib.Task
  label_names: tuple[str, ...] | None
  hf_config: Any
  tokenizer: Any
  model: model_lib.BertForSequenceClassification
  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  heads: tuple[TaskHead, ...] = ()  # one per task; () = the single `task`

  def __post_init__(self):
    if not self.heads:
      self.heads = (TaskHead(self.task.name if self.task else "", self.task, self.label_names,
                             self.config),)

  @property
  def is_regression(self) -> bool:
    return self.task.is_regression

  @property
  def multitask(self) -> bool:
    """A MultiTaskClassifier (config.tasks set): params bert/... and heads/<task>/..."""
    return bool(self.config.get("tasks"))

  def selection_key(self) -> str:
    """The eval metric that picks best checkpoints and stops early."""
    if not self.multitask:
      return self.task.main_metric
    if self.config.selection_metric == "average":
      return "average"
    head = {h.name: h for h in self.heads}[self.config.selection_metric]
    return f"{head.name}/{head.task.main_metric}"

  def run_identity(self) -> tuple[str, Any]:
    """(task name, label map) as checkpoints record them (resume checks they match)."""
    if not self.multitask:
      return self.task.name, list(self.label_names) if self.label_names else None
    return ("+".join(h.name for h in self.heads),
            {h.name: list(h.label_names) if h.label_names else None for h in self.heads})

  def abstract_params(self) -> tuple[Any, Any]:
    """(boxed abstract params, their NamedShardings), without allocating anything."""
    boxed = jax.eval_shape(self._init_params, jax.random.key(0))
    shardings = sharding_lib.logical_to_shardings(boxed, self.mesh, self.config.logical_axis_rules)
    return boxed, shardings

  def _init_params(self, rng):
    dummy = jnp.ones((1, 8), jnp.int32)
    return self.model.init({"params": rng}, dummy, dummy, dummy)["params"]

  def tokenize(self, examples: Any) -> data_lib.TokenizedSplit:
    return data_lib.cached_tokenize(self.tokenizer, examples.texts, examples.labels,
                                    self.config.max_seq_length, self.config.cache_dir or None)


def _build_heads(config: ml_collections.ConfigDict, label_names: Any) -> tuple[TaskHead, ...]:
  """The run's tasks; `label_names`: a tuple (single task) or {head: names} (multi-task)."""
  heads = []
  multitask = bool(config.get("tasks"))
  for i, (name, weight, task_config) in enumerate(config_lib.task_configs(config)):
    where = f"config.tasks[{i}] ({name}): " if multitask else ""
    try:
      task = tasks_lib.get_task(task_config)
      names = (label_names or {}).get(name) if multitask else label_names
      if names is None and not task.is_regression:
        names = data_lib.label_names_for(task_config, task)
    except UserError as e:
      raise UserError(f"{where}{e}") from None
    heads.append(TaskHead(name or task.name, task, tuple(names) if names else None, task_config,
                          weight))
  if multitask and config.selection_metric not in ("average", *(h.name for h in heads)):
    raise UserError(f"config.selection_metric={config.selection_metric!r}: use 'average' or a "
                    f"task name {[h.name for h in heads]}")
  return tuple(heads)


def build_experiment(config: ml_collections.ConfigDict, model_dir: str | None = None,
                     label_names: Any = None,
                     devices: list[jax.Device] | None = None) -> Experiment:
  """Resolves the checkpoint (or a run's saved `model_dir`), task(s), labels and mesh.

  `label_names`: a tuple (single task) or {task: names} (multi-task); None = from the data.
  """
  config_lib.validate(config)
  heads = _build_heads(config, label_names)
  task, label_names = heads[0].task, heads[0].label_names
  source = model_dir or hf.resolve(config.model_name_or_path)
  hf_config = hf.load_config(source)
  tokenizer_source = model_dir or (hf.resolve(config.tokenizer_name) if config.tokenizer_name
                                   else source)
  tokenizer = hf.load_tokenizer(tokenizer_source, vocab_size=hf_config.vocab_size)
  mesh = sharding_lib.create_mesh(config.mesh_axes, config.mesh_shape, devices)
  bert_config = hf.model_config(  # any supported family (hf.FAMILIES)
      hf_config, dtype=config.dtype, attention_impl=config.attention_impl or None,
      mesh=mesh, activation_rules=sharding_lib.activation_rules(config.logical_axis_rules, mesh),
      lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
      lora_targets=tuple(config.lora_targets),
      **({"classifier_dropout": config.classifier_dropout} if config.classifier_dropout >= 0
         else {}))
  if config.batch_size % sharding_lib.data_parallel_size(mesh):
    raise UserError(f"config.batch_size={config.batch_size} is not divisible by the "
                    f"{sharding_lib.data_parallel_size(mesh)} data shards of the mesh")
  micro_batch = config.batch_size // config.gradient_accumulation_steps
  if micro_batch % sharding_lib.data_parallel_size(mesh):
    raise UserError(f"config.gradient_accumulation_steps={config.gradient_accumulation_steps}: "
                    f"micro-batches of {micro_batch} do not split over the "
                    f"{sharding_lib.data_parallel_size(mesh)} data shards of the mesh")
  if config.eval_batch_size % sharding_lib.data_parallel_size(mesh):
    raise UserError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by the "
                    f"{sharding_lib.data_parallel_size(mesh)} data shards of the mesh")
  if config.get("tasks"):
    model = model_lib.MultiTaskClassifier(bert_config, tuple(h.num_labels for h in heads),
                                          tuple(h.name for h in heads))
  else:
    model = model_lib.BertForSequenceClassification(bert_config, heads[0].num_labels)
  return Experiment(config, task, label_names, hf_config, tokenizer, model, mesh,
                    sharding_lib.batch_sharding(mesh), heads)


def _init_state(exp: Experiment, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  params = exp._init_params(rng)  # pylint: disable=protected-access
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(exp: Experiment, tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """(boxed abstract TrainState, its NamedShardings from the config's logical axis rules)."""
  abstract = jax.eval_shape(functools.partial(_init_state, exp, tx), jax.random.key(0))
  return abstract, sharding_lib.logical_to_shardings(abstract, exp.mesh,
                                                     exp.config.logical_axis_rules)


def create_train_state(exp: Experiment, total_steps: int, pretrained_dir: str | None
                       ) -> tuple[TrainState, Any, optax.GradientTransformation, optax.Schedule]:
  """The train state, created directly on its shardings; pre-trained weights loaded onto them."""
  boxed, param_shardings = exp.abstract_params()
  tx, schedule = optim.create_optimizer(exp.config, nn.unbox(boxed), total_steps)

  abstract_state, state_shardings = abstract_train_state(exp, tx)
  rng = jax.random.key(exp.config.seed)
  state = jax.jit(lambda r: nn.unbox(_init_state(exp, tx, r)), out_shardings=state_shardings)(rng)
  if pretrained_dir is not None:
    loaded, new, unused = hf.params_from_state_dict(hf.load_state_dict(pretrained_dir),
                                                    nn.unbox(boxed), exp.hf_config.model_type)
    log.info("Loaded %s. Newly initialised: %s. Unused from the checkpoint: %s",
             pretrained_dir, ", ".join(new) or "none", ", ".join(unused) or "none")
    params = jax.tree.map(
        lambda cur, pre, sh: cur if isinstance(pre, jax.ShapeDtypeStruct)
        else jax.make_array_from_callback(pre.shape, sh, lambda idx, pre=pre: pre[idx]),
        state.params, loaded, param_shardings)
    state = state.replace(params=params)
  return state, state_shardings, tx, schedule


def evaluate(exp: Experiment, params: Any, split: data_lib.TokenizedSplit, jit_eval: Any,
             head: int = 0) -> tuple[dict[str, float], np.ndarray]:
  """Exact metrics over every example once; returns (metrics, per-example logits).

  `head`: which task of a multi-task run `split` belongs to.
  """
  cfg = exp.config
  task = exp.heads[head].task
  logits_out = None
  for rows, batch in data_lib.eval_batches(split, cfg.eval_batch_size, cfg.seq_buckets,
                                           cfg.max_seq_length):
    logits = jit_eval(params, data_lib.to_global(batch, exp.batch_sharding))
    logits = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
    if logits.ndim == 3:  # multi-task: [batch, task, max classes]
      logits = logits[:, head, :exp.heads[head].num_labels]
    if logits_out is None:
      logits_out = np.zeros((len(split), logits.shape[-1]), np.float32)
    real = rows >= 0
    logits_out[rows[real]] = logits[real]
  labels = split.labels
  if task.is_regression:
    predictions = logits_out[:, 0]
    loss = float(np.mean(np.square(predictions - labels)))
  else:
    predictions = logits_out.argmax(-1)
    shifted = logits_out - logits_out.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = float(-np.mean(log_probs[np.arange(len(labels)), labels]))
  results = {"loss": loss, **metrics_lib.compute_metrics(task.metrics, predictions, labels)}
  return results, logits_out


def evaluate_tasks(exp: Experiment, params: Any, splits: list[data_lib.TokenizedSplit],
                   jit_eval: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """Every task on its own dev set: (flat metrics, metrics.jsonl records without 'step').

  Single task: the task's metrics, one record. Multi-task: '<task>/<metric>' keys plus
  'average' (the mean of the tasks' main metrics); a record per task and an 'average' one.
  """
  if not exp.multitask:
    metrics, _ = evaluate(exp, params, splits[0], jit_eval)
    return metrics, [{"split": "validation", **metrics}]
  flat, records, main = {}, [], []
  for i, (head, split) in enumerate(zip(exp.heads, splits)):
    metrics, _ = evaluate(exp, params, split, jit_eval, head=i)
    flat.update({f"{head.name}/{k}": v for k, v in metrics.items()})
    main.append(metrics[head.task.main_metric])
    records.append({"split": "validation", "task": head.name, **metrics})
  flat["average"] = float(np.mean(main))
  records.append({"split": "validation", "task": "average", "score": flat["average"],
                  "tasks": {h.name: m for h, m in zip(exp.heads, main)}})
  return flat, records


def read_tokenized(exp: Experiment, split: str) -> list[data_lib.TokenizedSplit]:
  """Each task's `split` ('train' / 'validation'), read and tokenized (cached on disk)."""
  out = []
  for head in exp.heads:
    examples = data_lib.read_split(head.config, head.task, split, head.label_names)
    tokenized = exp.tokenize(examples)
    log.info("%s: %d examples from %s, mean length %.1f tokens, %d truncated to %d",
             head.name, len(tokenized), examples.source, tokenized.lengths.mean(),
             tokenized.num_truncated, exp.config.max_seq_length)
    out.append(tokenized)
  return out


def _write_metrics_jsonl(workdir: str, record: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    workdir_lib.append_line(workdir_lib.join(workdir, METRICS_FILE), json.dumps(record))


def _save_model_dir(exp: Experiment, workdir: str) -> None:
  """workdir/model: HF config with the label map + tokenizer, so eval/export need no hub."""
  if jax.process_index() != 0:
    return
  hf_config = exp.hf_config
  if exp.multitask:  # the shared encoder's config; export writes one per task
    pass
  elif exp.label_names is not None:
    hf_config.num_labels = len(exp.label_names)
    hf_config.id2label = dict(enumerate(exp.label_names))
    hf_config.label2id = {n: i for i, n in enumerate(exp.label_names)}
  else:
    hf_config.num_labels = 1
  if not exp.multitask:
    hf_config.problem_type = ("regression" if exp.is_regression
                              else "single_label_classification")
  with tempfile.TemporaryDirectory() as staging:  # save_pretrained writes local files only
    hf_config.save_pretrained(staging)
    exp.tokenizer.save_pretrained(staging)
    workdir_lib.upload_dir(staging, workdir_lib.join(workdir, MODEL_SUBDIR))


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
         f"{seconds // 60}m{seconds % 60:02d}s"


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


def _check_resumable(meta: dict[str, Any], exp: Experiment, config: ml_collections.ConfigDict,
                     directory: str) -> None:
  """Refuses to resume a checkpoint made for another model or label set."""
  task_name, label_names = exp.run_identity()
  mine = {"model_name_or_path": config.model_name_or_path, "task_name": task_name,
          "label_names": label_names}
  for key, value in mine.items():
    if meta.get(key) != value:
      raise UserError(
          f"{directory}: checkpoint was made with {key}={meta.get(key)!r}, this config has "
          f"{value!r}; use another --workdir, or --config.resume=False to start over")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Fine-tunes per `config`, writing logs, metrics and checkpoints to `workdir`.

  An existing checkpoint in `workdir` is resumed (config.resume=False starts over).
  Returns {'step', 'eval': last eval metrics, 'train_log': [(step, loss)], 'state',
  'best_step'}.
  """
  workdir = workdir_lib.prepare(workdir)
  config = ml_collections.ConfigDict(config)
  with config.unlocked():
    # Token caches are local files: a remote workdir caches in the user's cache dir.
    config.cache_dir = config.cache_dir or (
        os.path.expanduser("~/.cache/flaxbert_cls/tokens") if workdir_lib.is_remote(workdir)
        else os.path.join(workdir, "cache"))

  enable_compilation_cache(config.compilation_cache_dir)
  exp = build_experiment(config, devices=devices)
  train_splits, eval_splits = read_tokenized(exp, "train"), read_tokenized(exp, "validation")
  # One task is the 1-task mixture: every step is its step, exactly the single-task order.
  orders = []
  for i, (head, split) in enumerate(zip(exp.heads, train_splits)):
    try:
      orders.append(data_lib.TrainOrder(split.lengths, config.batch_size, config.seed + i,
                                        config.length_grouping_window))
    except UserError as e:
      raise UserError(f"task {head.name}: {e}" if exp.multitask else str(e)) from None
  mixture = data_lib.TaskMixture(
      orders, data_lib.mixing_probabilities([len(s) for s in train_splits],
                                            [h.weight for h in exp.heads], config.mixing,
                                            config.mixing_temperature), config.seed)
  if exp.multitask:
    log.info("Mixing (%s): %s", config.mixing, "  ".join(
        f"{h.name} {p:.3f}" for h, p in zip(exp.heads, mixture.probabilities)))
  # Every task's labels in one dtype: one jit signature whichever task a step draws.
  labels_dtype = (np.float32 if any(h.task.is_regression for h in exp.heads) else np.int32)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else math.ceil(config.num_train_epochs * mixture.steps_per_epoch))
  ckpt = checkpoint_lib.Checkpoints(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                    keep_best=config.keep_best_checkpoints)
  run_task_name, run_label_names = exp.run_identity()
  meta = {"label_names": run_label_names, "task_name": run_task_name, "total_steps": total_steps,
          "model_name_or_path": config.model_name_or_path, "best": None,
          "evals_without_improvement": 0}
  if ckpt.all_steps() and not config.resume:
    log.warning("config.resume=False: deleting the checkpoints in %s", ckpt.directory)
    ckpt.delete_all()
  resuming = bool(ckpt.all_steps())
  state, state_shardings, tx, schedule = create_train_state(
      exp, total_steps, None if resuming else hf.resolve(config.model_name_or_path))
  if resuming:
    state, saved_meta, restored_step = ckpt.restore(
        checkpoint_lib.abstract_with_shardings(state, state_shardings))
    _check_resumable(saved_meta, exp, config, ckpt.directory)
    meta.update(best=saved_meta.get("best"),
                evals_without_improvement=saved_meta.get("evals_without_improvement", 0))
    log.info("Resumed from %s/%d.", ckpt.directory, restored_step)
  _log_parameters(state.params, config)

  jit_train = jit_train_step(exp, state.params, state_shardings, tx, schedule)
  jit_eval = jax.jit(functools.partial(eval_step, model=exp.model),
                     in_shardings=(state_shardings.params, exp.batch_sharding),
                     out_shardings=exp.batch_sharding)

  if jax.process_index() == 0:
    workdir_lib.write_text(workdir_lib.join(workdir, "config.json"), config.to_json(indent=2))
  _save_model_dir(exp, workdir)
  # clu's writers import TensorFlow (~0.7 GB resident): only this loop needs them,
  # not importers of train_step (bench, export, predict).
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                asynchronous=False)
  start_step = int(state.step)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  batches = data_lib.prefetch(
      data_lib.to_global(data_lib.train_batch(train_splits, mixture, step, config.seq_buckets,
                                                config.max_seq_length, labels_dtype),
                         exp.batch_sharding)
      for step in range(start_step, total_steps))
  preemption = checkpoint_lib.PreemptionWatcher()
  save_timer = checkpoint_lib.SaveTimer(config.checkpoint_every_minutes, config.log_every_steps)

  selection = exp.selection_key()
  log.info("Training steps %d..%d (%d per epoch) of %d examples on a %s mesh.", start_step + 1,
           total_steps, mixture.steps_per_epoch, config.batch_size, dict(exp.mesh.shape))
  train_log, train_metrics, eval_metrics = [], None, {}
  t_start = t_last = time.time()
  last_logged, pending_finite = start_step, None
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, step_metrics, finite = jit_train(state, next(batches))
      # Check the previous step's finiteness now: reading it does not stall the device.
      if pending_finite is not None:
        _check_finite(*pending_finite, config, ckpt)
      pending_finite = (step, finite)
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      report(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        _check_finite(*pending_finite, config, ckpt)
        now = time.time()
        summary = {k: float(v) for k, v in train_metrics.compute().items()}
        summary["examples_per_sec"] = (step - last_logged) * config.batch_size / (now - t_last)
        train_log.append((step, summary["loss"]))
        log.info("step %d/%d  loss %.4f  acc %.4f  %.1f examples/s  ETA %s", step, total_steps,
                 summary["loss"], summary["accuracy"], summary["examples_per_sec"],
                 _format_duration((total_steps - step) * (now - t_start) / (step - start_step)))
        writer.write_scalars(step, {f"train_{k}": v for k, v in summary.items()})
        train_metrics, t_last, last_logged = None, now, step
      stop_early = False
      main_metric = None
      if (config.eval_every_steps and step % config.eval_every_steps == 0) or step == total_steps:
        eval_metrics, records = evaluate_tasks(exp, state.params, eval_splits, jit_eval)
        main_metric = eval_metrics[selection]
        stop_early = _update_best(meta, step, eval_metrics, selection, config)
        log.info("eval at step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in
                                                         eval_metrics.items()))
        writer.write_scalars(step, {f"eval_{k}": v for k, v in eval_metrics.items()})
        for record in records:
          _write_metrics_jsonl(workdir, {"step": step, **record})
      preempted = preemption.reached(step)
      if (step % config.checkpoint_every_steps == 0 or step == total_steps or preempted
          or stop_early or main_metric is not None or save_timer.due(step)):
        t_save = time.perf_counter()
        ckpt.save(step, state, meta, main_metric)
        save_timer.saved()
        log.info("checkpoint %d: the loop waited %.0f ms (the write continues in the background)",
                 step, 1e3 * (time.perf_counter() - t_save))
      if preempted:
        ckpt.wait()
        log.warning("Preempted: saved step %d to %s; rerun the same command to resume.",
                    step, ckpt.directory)
        raise Preempted(f"preempted at step {step}; checkpoint saved")
      if stop_early:
        log.info("Early stopping at step %d: %s did not improve for %d evaluations.", step,
                 selection, config.early_stopping_patience)
        break
  finally:
    preemption.close()
    ckpt.close()
    writer.flush()
  best = meta["best"]
  if best:
    log.info("Best %s %.4f at step %d: %s", selection,
             best["metrics"][selection], best["step"],
             "  ".join(f"{k} {v:.4f}" for k, v in best["metrics"].items()))
  log.info("Done in %s.", _format_duration(time.time() - t_start))
  return {"step": int(state.step), "eval": eval_metrics, "train_log": train_log, "state": state,
          "best": best, "seconds": time.time() - t_start}


def _update_best(meta: dict[str, Any], step: int, metrics: dict[str, float], main_metric: str,
                 config: ml_collections.ConfigDict) -> bool:
  """Tracks the best eval in `meta` (saved with checkpoints); True = stop early."""
  value = metrics[main_metric]
  best = meta["best"]
  if best is None or value > best["metrics"][main_metric]:
    meta["best"] = {"step": step, "metrics": metrics}
    meta["evals_without_improvement"] = 0
    return False
  meta["evals_without_improvement"] += 1
  patience = config.early_stopping_patience
  return patience > 0 and meta["evals_without_improvement"] >= patience


def _check_finite(step: int, finite: jax.Array, config: ml_collections.ConfigDict,
                  ckpt: checkpoint_lib.Checkpoints) -> None:
  if bool(finite):
    return
  if config.nonfinite_policy == "skip":
    log.warning("step %d: loss or gradient is not finite; the update was skipped", step)
    return
  raise UserError(f"step {step}: loss or gradient is not finite (NaN/inf); training stopped. "
                  f"Checkpoints in {ckpt.directory} are intact (latest: "
                  f"{ckpt.latest_step()}). Lower learning_rate, or set "
                  "config.nonfinite_policy='skip'")


def jit_train_step(exp: Experiment, params: Any, state_shardings: Any,
                   tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
  """The train step as training compiles it: (state, batch) -> (state, metrics, finite).

  The state is donated; shardings, freezing, accumulation and the CPU scheduler come
  from exp.config (tools/bench.py times this same program).
  """
  config = exp.config
  return jax.jit(
      functools.partial(train_step, model=exp.model, tx=tx, schedule=schedule,
                        is_regression=(tuple(h.task.is_regression for h in exp.heads)
                                       if exp.multitask else exp.is_regression),
                        dropout_seed=config.seed,
                        accumulation_steps=config.gradient_accumulation_steps,
                        frozen=_frozen_mask(params, config)),
      in_shardings=(state_shardings, exp.batch_sharding),
      out_shardings=(state_shardings, sharding_lib.replicated(exp.mesh),
                     sharding_lib.replicated(exp.mesh)),
      donate_argnums=0,
      compiler_options=train_step_compiler_options(exp.mesh, config.cpu_scheduler))


def _frozen_mask(params: Any, config: ml_collections.ConfigDict) -> Any | None:
  """Static True/False per parameter (None when nothing is frozen)."""
  patterns = optim.freeze_patterns(config)
  return optim.path_mask(params, patterns) if patterns else None


def _log_parameters(params: Any, config: ml_collections.ConfigDict) -> None:
  frozen = optim.path_mask(params, optim.freeze_patterns(config))
  sizes = [(x.size, f) for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen))]
  num_frozen = sum(n for n, f in sizes if f)
  total = sum(n for n, _ in sizes)
  log.info("Parameters: %d (%d trained, %d frozen)\n%s", total, total - num_frozen, num_frozen,
           parameter_overview.get_parameter_overview(params, include_stats=False))


def load_run(workdir: str, overrides: ml_collections.ConfigDict | None = None,
             step: int | str | None = None, devices: list[jax.Device] | None = None
             ) -> tuple[Experiment, Any]:
  """A finished (or checkpointed) run: its experiment and restored parameters.

  `step`: None = the latest, 'best' = the best by the task's main metric, or a number.
  """
  workdir = workdir_lib.resolve(workdir)
  config_path = workdir_lib.join(workdir, "config.json")
  if not workdir_lib.exists(config_path):
    raise UserError(f"{workdir}: not a flaxbert-cls workdir (no config.json)")
  with io.StringIO(workdir_lib.read_text(config_path)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if overrides is not None:
    config.update(overrides)
  ckpt = checkpoint_lib.Checkpoints(workdir, read_only=True)
  if step == "best":
    step = ckpt.best_step()
    if step is None:
      raise UserError(f"{ckpt.directory}: no checkpoint was saved with eval metrics")
  meta, _ = ckpt.read_meta(step)
  label_names = meta["label_names"]  # {task: names} for a multi-task run
  if isinstance(label_names, list):
    label_names = tuple(label_names)
  exp = build_experiment(config, model_dir=workdir_lib.local_dir(workdir_lib.join(workdir, MODEL_SUBDIR)),
                         label_names=label_names, devices=devices)
  boxed, _ = exp.abstract_params()
  tx, _ = optim.create_optimizer(config, nn.unbox(boxed), meta["total_steps"])
  abstract_state, state_shardings = abstract_train_state(exp, tx)
  state, _, _ = ckpt.restore(
      checkpoint_lib.abstract_with_shardings(nn.unbox(abstract_state), state_shardings), step)
  ckpt.close()
  params = state.params
  if exp.model.config.lora_rank:
    # Eval, predict and export see a plain BERT: adapters folded into the base kernels.
    params = jax.jit(functools.partial(model_lib.merge_lora, lora_alpha=config.lora_alpha))(params)
    exp.model = exp.model.clone(config=dataclasses.replace(exp.model.config, lora_rank=0))
  return exp, params


def evaluate_workdir(workdir: str, overrides: ml_collections.ConfigDict | None = None,
                     step: int | str | None = None) -> dict[str, float]:
  """Re-evaluates a run's checkpoint on its validation data (or an overridden file)."""
  exp, params = load_run(workdir, overrides, step)
  jit_eval = jax.jit(functools.partial(eval_step, model=exp.model))
  results, _ = evaluate_tasks(exp, params, read_tokenized(exp, "validation"), jit_eval)
  log.info("eval of %s: %s", workdir, "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
  return results
