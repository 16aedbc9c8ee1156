"""What a config resolves to: tasks, labels, model, tokenizer, mesh, shardings, train state.

`build_experiment(config)` is everything a run is made of; `create_train_state` puts the
state on its shardings with the pre-trained weights; `load_run(workdir)` rebuilds a saved
run's experiment and parameters for eval, predict and export.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import tempfile
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxbert_cls import checkpoint as checkpoint_lib
from flaxbert_cls import config as config_lib
from flaxbert_cls import data as data_lib
from flaxbert_cls import hf
from flaxbert_cls import layers
from flaxbert_cls import model as model_lib
from flaxbert_cls import ops
from flaxbert_cls import optim
from flaxbert_cls import readers
from flaxbert_cls import sharding as sharding_lib
from flaxbert_cls import sweep as sweep_lib
from flaxbert_cls import tasks as tasks_lib
from flaxbert_cls import tokenization
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"  # HF config.json (with the label map) + tokenizer files


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass
class RunTask:
  """One task of a run: its head's name, task, label map, data config and mixing weight."""

  name: str
  task: tasks_lib.Task
  label_names: tuple[str, ...] | None
  config: ml_collections.ConfigDict  # the run's config with this task's keys on top
  weight: float = 1.0
  # Loss weights per class (multi-label: BCE pos_weight per label); () = none. Resolved
  # from config.class_weights and the training labels (class_weights.resolve_for_run).
  class_weights: tuple[float, ...] = ()

  @property
  def num_labels(self) -> int:
    return 1 if self.task.is_regression else len(self.label_names)


@dataclasses.dataclass
class Experiment:
  """A resolved config: its tasks (one or many), model, tokenizer, mesh and batch sharding."""

  config: ml_collections.ConfigDict
  tasks: tuple[RunTask, ...]
  hf_config: Any
  tokenizer: Any
  model: model_lib.BertForSequenceClassification
  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  # Set by load_run: the step restored and its checkpoint's metadata (its 'best' eval so far).
  checkpoint_step: int | None = None
  checkpoint_meta: dict[str, Any] | None = None
  # Set by create_train_state when it loads a start: where from (refinetune.STARTED_FROM_NAME).
  started_from: dict[str, Any] | None = None
  member: int | None = None  # set by load_run for a sweep: the member whose params it loaded

  @property
  def task(self) -> tasks_lib.Task:
    """The first (for a single-task run, the) task."""
    return self.tasks[0].task

  @property
  def label_names(self) -> tuple[str, ...] | None:
    return self.tasks[0].label_names

  @property
  def is_regression(self) -> bool | tuple[bool, ...]:
    """Per head for a multi-task run (the train step's loss picks each row's head)."""
    if self.multitask:
      return tuple(t.task.is_regression for t in self.tasks)
    return self.task.is_regression

  @property
  def head_losses(self) -> Any:
    """The train step's loss per head (train.HeadLoss; a tuple for a multi-task run)."""
    from flaxbert_cls.train import HeadLoss  # pylint: disable=g-import-not-at-top
    losses = tuple(HeadLoss(t.task.problem_type, tuple(t.class_weights)) for t in self.tasks)
    return losses if self.multitask else losses[0]

  @property
  def multitask(self) -> bool:
    """Several heads (config.tasks set): params bert/... and heads/<task>/..."""
    return bool(self.config.get("tasks"))

  def selection_key(self) -> str:
    """The eval metric that picks best checkpoints and stops early."""
    if not self.multitask:
      return self.task.main_metric
    if self.config.selection_metric == "average":
      return "average"
    task = {t.name: t for t in self.tasks}[self.config.selection_metric]
    return f"{task.name}/{task.task.main_metric}"

  def run_identity(self) -> tuple[str, Any]:
    """(task name, label map) as checkpoints record them (resume checks they match)."""
    if not self.multitask:
      return self.task.name, list(self.label_names) if self.label_names else None
    return ("+".join(t.name for t in self.tasks),
            {t.name: list(t.label_names) if t.label_names else None for t in self.tasks})

  def init_params(self, rng: jax.Array) -> Any:
    """Boxed (logically partitioned) random-init parameters."""
    dummy = jnp.ones((1, 8), jnp.int32)
    return self.model.init({"params": rng}, dummy, dummy, dummy)["params"]

  def abstract_params(self) -> tuple[Any, Any]:
    """(boxed abstract params, their NamedShardings), without allocating anything."""
    boxed = jax.eval_shape(self.init_params, jax.random.key(0))
    shardings = sharding_lib.logical_to_shardings(
        boxed, self.mesh, self.config.logical_axis_rules,
        self.config.get("min_size_to_shard_mb", 0.0))
    return boxed, shardings

  def tokenize(self, examples: Any) -> data_lib.TokenizedSplit:
    return tokenization.cached_tokenize(self.tokenizer, examples.texts, examples.labels,
                                    self.config.max_seq_length, self.config.cache_dir or None,
                                    tokenization.Layout.from_config(self.config))


def _run_tasks(config: ml_collections.ConfigDict, label_names: Any) -> tuple[RunTask, ...]:
  """The run's tasks; `label_names`: a tuple (single task) or {task: names} (multi-task)."""
  tasks = []
  multitask = bool(config.get("tasks"))
  for i, (name, weight, task_config) in enumerate(config_lib.task_configs(config)):
    where = f"config.tasks[{i}] ({name}): " if multitask else ""
    try:
      task = tasks_lib.get_task(task_config)
      names = (label_names or {}).get(name) if multitask else label_names
      if names is None and not task.is_regression:
        names = data_lib.label_names_for(task_config, task)
      if multitask and task.is_multilabel:
        raise UserError("problem_type='multi_label_classification' is not supported in "
                        "multi-task runs yet; train it as its own run")
    except UserError as e:
      raise UserError(f"{where}{e}") from None
    tasks.append(RunTask(name or task.name, task, tuple(names) if names else None, task_config,
                         weight))
  if multitask and config.selection_metric not in ("average", *(t.name for t in tasks)):
    raise UserError(f"config.selection_metric={config.selection_metric!r}: use 'average' or a "
                    f"task name {[t.name for t in tasks]}")
  return tuple(tasks)


def _check_batch_splits(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Every batch (train, micro, eval) splits evenly over the mesh's data shards."""
  shards = sharding_lib.data_parallel_size(mesh)
  micro_batch = config.batch_size // config.gradient_accumulation_steps
  for key, size, what in (("batch_size", config.batch_size, "is not divisible by"),
                          ("gradient_accumulation_steps", micro_batch,
                           f"gives micro-batches of {micro_batch}, which do not split over"),
                          ("eval_batch_size", config.eval_batch_size, "is not divisible by")):
    if size % shards:
      raise UserError(f"config.{key}={config[key]} {what} the {shards} data shards of the mesh")


def build_experiment(config: ml_collections.ConfigDict, model_dir: str | None = None,
                     label_names: Any = None,
                     devices: list[jax.Device] | None = None) -> Experiment:
  """Resolves the checkpoint (or a run's saved `model_dir`), task(s), labels and mesh.

  `label_names`: a tuple (single task) or {task: names} (multi-task); None = from the data.
  """
  config_lib.validate(config)
  axes, shape = sweep_lib.mesh_axes(config)
  if not config.mesh_shape:  # automatic: data parallel first, sized from the model below
    shape = tuple(-1 if a == "data" else 1 for a in axes)
  mesh = sharding_lib.create_mesh(axes, shape, devices)
  sweep_lib.check_mesh(config, mesh)
  platform = mesh.devices.flat[0].platform
  config_lib.validate_for_platform(config, platform)
  tasks = _run_tasks(config, label_names)
  # A previous run's workdir starts from its model/ (re-fine-tuning, refinetune.py).
  from flaxbert_cls import refinetune  # pylint: disable=g-import-not-at-top  (imports this)
  source = model_dir or refinetune.model_source(hf.resolve(config.model_name_or_path))
  hf_config = hf.load_config(source)
  tokenizer_source = model_dir or (hf.resolve(config.tokenizer_name) if config.tokenizer_name
                                   else source)
  tokenizer = hf.load_tokenizer(tokenizer_source, vocab_size=hf_config.vocab_size)
  overrides = {}
  if config.classifier_dropout >= 0:
    overrides["classifier_dropout"] = config.classifier_dropout
  if config.get("attention_dropout", -1.0) >= 0:
    overrides["attention_probs_dropout_prob"] = config.attention_dropout
  bert_config = hf.model_config(  # any supported family (hf.FAMILIES)
      hf_config, dtype=config.dtype, mesh=mesh,
      activation_rules=sharding_lib.activation_rules(config.logical_axis_rules, mesh),
      lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
      lora_targets=tuple(config.lora_targets), pooling=config.get("pooling", "cls"), **overrides)
  bert_config = dataclasses.replace(bert_config, attention_impl=ops.attention_implementation(
      config.attention_impl, platform, config.dtype, bert_config.head_dim))
  # Positions past the table would be gathered out of range: NaN embeddings, not an error.
  positions = bert_config.max_position_embeddings - bert_config.position_offset
  if config.max_seq_length > positions:
    raise UserError(f"config.max_seq_length={config.max_seq_length} is above the {positions} "
                    f"positions of {source} (max_position_embeddings="
                    f"{bert_config.max_position_embeddings}); use max_seq_length <= {positions}")
  sharding_lib.check_heads(config.logical_axis_rules, mesh, bert_config.num_attention_heads)
  _check_batch_splits(config, mesh)
  if config.get("tasks"):
    model = model_lib.BertForSequenceClassification(
        bert_config, tuple(t.num_labels for t in tasks), tuple(t.name for t in tasks))
  else:
    model = model_lib.BertForSequenceClassification(bert_config, tasks[0].num_labels)
  if not config.mesh_shape:  # automatic: sized from the model, then built again on that mesh
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh_shape = sharding_lib.auto_mesh_shape(
        config.mesh_axes, _train_state_bytes(model), list(mesh.devices.flat))
    return build_experiment(config, model_dir, label_names, devices)
  return Experiment(config, tasks, hf_config, tokenizer, model, mesh,
                    sharding_lib.batch_sharding(mesh))


def _train_state_bytes(model: model_lib.BertForSequenceClassification) -> int:
  """float32 parameters, gradients and two AdamW moments, every parameter counted as trained."""
  dummy = jnp.ones((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, dummy, dummy, dummy))
  return 16 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def read_tokenized(exp: Experiment, split: str) -> list[data_lib.TokenizedSplit]:
  """Each task's `split` ('train' / 'validation'), read and tokenized (cached on disk)."""
  return [tokenized for _, tokenized in read_examples_tokenized(exp, split)]


def read_examples_tokenized(exp: Experiment, split: str
                            ) -> list[tuple[readers.Examples, data_lib.TokenizedSplit]]:
  """Each task's `split` as (examples with their texts, tokenized), in task order."""
  out = []
  for run_task in exp.tasks:
    examples = data_lib.read_split(run_task.config, run_task.task, split, run_task.label_names)
    tokenized = exp.tokenize(examples)
    log.info("%s: %d examples from %s, mean length %.1f tokens, %d truncated to %d%s",
             run_task.name, len(tokenized), examples.source, tokenized.lengths.mean(),
             tokenized.num_truncated, exp.config.max_seq_length,
             "" if tokenized.documents is None else
             f" (long_document=windows: {tokenized.window_counts.mean():.2f} windows per example)")
    out.append((examples, tokenized))
  return out


def _init_state(exp: Experiment, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  params = exp.init_params(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(exp: Experiment, tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """(boxed abstract TrainState, its NamedShardings from the config's logical axis rules)."""
  abstract = jax.eval_shape(functools.partial(_init_state, exp, tx), jax.random.key(0))
  return abstract, sharding_lib.logical_to_shardings(
      abstract, exp.mesh, exp.config.logical_axis_rules,
      exp.config.get("min_size_to_shard_mb", 0.0))


def create_train_state(exp: Experiment, total_steps: int, pretrained_dir: str | None
                       ) -> tuple[TrainState, Any, optax.GradientTransformation, optax.Schedule]:
  """The train state, created directly on its shardings; pre-trained weights loaded onto them."""
  boxed, param_shardings = exp.abstract_params()
  tx, schedule = optim.create_optimizer(exp.config, nn.unbox(boxed), total_steps)

  _, state_shardings = abstract_train_state(exp, tx)
  rng = jax.random.key(exp.config.seed)
  state = jax.jit(lambda r: nn.unbox(_init_state(exp, tx, r)), out_shardings=state_shardings)(rng)
  if pretrained_dir is not None:
    # refinetune.py imports this module: a previous run's weights load through load_run.
    from flaxbert_cls import refinetune  # pylint: disable=g-import-not-at-top
    state = state.replace(params=refinetune.load_start(exp, pretrained_dir, boxed, state.params,
                                                       param_shardings))
  return state, state_shardings, tx, schedule


def load_pretrained(exp: Experiment, pretrained_dir: str, params: Any) -> Any:
  """The checkpoint's weights (NumPy) in the tree of `params`; ShapeDtypeStruct leaves where
  the checkpoint has no value (newly initialised)."""
  loaded, new, unused = hf.params_from_state_dict(hf.load_state_dict(pretrained_dir), params,
                                                  exp.hf_config.model_type)
  log.info("Loaded %s. Newly initialised: %s. Unused from the checkpoint: %s",
           pretrained_dir, ", ".join(new) or "none", ", ".join(unused) or "none")
  return loaded


def abstract_sweep_state(exp: Experiment, tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """(boxed abstract stacked TrainState, its NamedShardings): trained params and the optimizer
  state get a leading [members] axis named 'member' (sweep.py); frozen params stay single."""
  abstract, _ = abstract_train_state(exp, tx)
  params, opt_state = sweep_lib.stack_abstract(
      abstract.params, abstract.opt_state, sweep_lib.frozen_mask(exp.config, abstract.params),
      len(sweep_lib.grid(exp.config)))
  stacked = abstract.replace(params=params, opt_state=opt_state)
  return stacked, sharding_lib.logical_to_shardings(
      stacked, exp.mesh, sweep_lib.logical_axis_rules(exp.config),
      exp.config.get("min_size_to_shard_mb", 0.0))


def create_sweep_state(exp: Experiment, total_steps: int, pretrained_dir: str | None
                       ) -> tuple[TrainState, Any, optax.GradientTransformation]:
  """The stacked train state of a sweep (sweep.py), on its shardings.

  Each member's random init comes from its own seed, as in its solo run; the pre-trained
  weights are read once and broadcast (a host view: each device copies its slice). A frozen
  parameter is stored once: if the checkpoint lacks it, the first member's init is shared.
  """
  config = exp.config
  from flaxbert_cls import refinetune  # pylint: disable=g-import-not-at-top  (imports this module)
  if pretrained_dir is not None and refinetune.is_workdir(pretrained_dir):
    # Re-fine-tuning (head by label name, started_from) is built for one run, not members.
    raise UserError(f"model_name_or_path={pretrained_dir}: a sweep cannot start from a previous "
                    "run's workdir; export it (flaxbert-cls export --output=OUT) and sweep from OUT")
  boxed, _ = exp.abstract_params()
  params_template = nn.unbox(boxed)
  tx, _ = sweep_lib.optimizer(config, params_template, total_steps)
  _, shardings = abstract_sweep_state(exp, tx)
  frozen = sweep_lib.frozen_mask(config, params_template)
  members = len(sweep_lib.grid(config))

  def init(seeds: jax.Array) -> TrainState:
    keys = jax.vmap(jax.random.key)(seeds)
    stacked = jax.vmap(lambda k: nn.unbox(_init_state(exp, tx, k)))(keys)
    first = nn.unbox(exp.init_params(keys[0]))
    params = jax.tree.map(lambda f, s, one: one if f else s, frozen, stacked.params, first)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=stacked.opt_state)

  seeds = jnp.asarray(sweep_lib.member_seeds(config), jnp.int32)
  state = jax.jit(init, out_shardings=shardings)(seeds)
  if pretrained_dir is not None:
    loaded = load_pretrained(exp, pretrained_dir, params_template)

    def place(current, pre, sharding, is_frozen):
      if isinstance(pre, jax.ShapeDtypeStruct):
        return current
      full = pre if is_frozen else np.broadcast_to(pre, (members, *pre.shape))
      return jax.make_array_from_callback(full.shape, sharding, lambda idx: full[idx])

    state = state.replace(params=jax.tree.map(place, state.params, loaded, shardings.params,
                                              frozen))
  return state, shardings, tx


def save_model_dir(exp: Experiment, workdir: str) -> None:
  """workdir/model: HF config with the label map + tokenizer, so eval/export need no hub."""
  if jax.process_index() != 0:
    return
  hf_config = exp.hf_config
  if not exp.multitask:  # a multi-task run saves the shared encoder's; export writes one per task
    names = exp.label_names
    hf_config.num_labels = 1 if names is None else len(names)
    if names is not None:
      hf_config.id2label = dict(enumerate(names))
      hf_config.label2id = {n: i for i, n in enumerate(names)}
    hf_config.problem_type = exp.task.problem_type
  with tempfile.TemporaryDirectory() as staging:  # save_pretrained writes local files only
    hf_config.save_pretrained(staging)
    exp.tokenizer.save_pretrained(staging)
    workdir_lib.upload_dir(staging, workdir_lib.join(workdir, MODEL_SUBDIR))


def load_run(workdir: str, overrides: ml_collections.ConfigDict | None = None,
             step: int | str | None = None, devices: list[jax.Device] | None = None,
             member: int | str | None = None) -> tuple[Experiment, Any]:
  """A finished (or checkpointed) run: its experiment and restored parameters.

  `step`: None = the latest, 'best' = the best by the task's main metric, or a number.
  A sweep's `member`: None / 'best' (the best member) or an index; its own best step.
  LoRA adapters come back folded into the base kernels: eval, predict and export only
  ever see a plain BERT.
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
  members = sweep_lib.grid(config)
  if members:
    member = sweep_lib.member_index(member, members, ckpt.read_meta()[0], ckpt.directory)
  elif member not in (None, "best"):
    raise UserError(f"--member={member}: {workdir} is not a sweep (config.sweep is empty)")
  if step == "best":
    step = ckpt.best_step(member if members else None)
    if step is None:
      raise UserError(f"{ckpt.directory}: no checkpoint was saved with eval metrics")
  meta, _ = ckpt.read_meta(step)
  label_names = meta["label_names"]  # {task: names} for a multi-task run
  if isinstance(label_names, list):
    label_names = tuple(label_names)
  exp = build_experiment(config, label_names=label_names, devices=devices,
                         model_dir=workdir_lib.local_dir(workdir_lib.join(workdir, MODEL_SUBDIR)))
  boxed, param_shardings = exp.abstract_params()
  if members:
    tx, _ = sweep_lib.optimizer(config, nn.unbox(boxed), meta["total_steps"])
    abstract_state, state_shardings = abstract_sweep_state(exp, tx)
  else:
    tx, _ = optim.create_optimizer(config, nn.unbox(boxed), meta["total_steps"])
    abstract_state, state_shardings = abstract_train_state(exp, tx)
  state, exp.checkpoint_meta, exp.checkpoint_step = ckpt.restore(
      checkpoint_lib.abstract_with_shardings(nn.unbox(abstract_state), state_shardings), step)
  ckpt.close()
  params = state.params
  if members:
    exp.member = member
    frozen = sweep_lib.frozen_mask(config, nn.unbox(boxed))
    params = jax.jit(lambda p: sweep_lib.unstack(p, frozen, member),
                     out_shardings=param_shardings)(params)
  if exp.model.config.lora_rank:
    params = jax.jit(functools.partial(layers.merge_lora, lora_alpha=config.lora_alpha))(params)
    exp.model = exp.model.clone(config=dataclasses.replace(exp.model.config, lora_rank=0))
  return exp, params
