"""What a config resolves to: tasks, labels, model, tokenizer, mesh, shardings, train state.

`build_experiment(config)` is everything a run is made of, checked once by
`config.validate` (its RunPlan gives the tasks, the sweep's members and the mesh). The
state is state.py's, a start's weights starts.py's, a saved run's restore runs.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import logging
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxbert_cls import config as config_lib
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.data import class_weights as class_weights_lib
from flaxbert_cls.data import sources as dataset_sources
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.data import tokenization
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.model import hf
from flaxbert_cls.model import modernbert
from flaxbert_cls.model import attention as attention_lib
from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.model.losses import HeadLoss
from flaxbert_cls.training import members as members_lib

log = logging.getLogger(__name__)

MODEL_SUBDIR = workdir_lib.MODEL_SUBDIR


@dataclasses.dataclass
class RunTask:
  """One task of a run: its head's name, task, label map, data config and mixing weight."""

  name: str
  task: tasks_lib.Task
  label_names: tuple[str, ...] | None
  config: ml_collections.ConfigDict  # the run's config with this task's keys on top
  weight: float = 1.0
  # Loss weights per class (multi-label: BCE pos_weight per label); () = none. Resolved
  # from config.class_weights and the training labels (resolve_class_balance).
  class_weights: tuple[float, ...] = ()
  # tau * log(class prior) per class, added to the logits in the loss (config.logit_adjustment);
  # () = none. Resolved with the class weights.
  logit_offsets: tuple[float, ...] = ()

  @property
  def num_labels(self) -> int:
    return 1 if self.task.is_regression else len(self.label_names)

  @property
  def source(self) -> dataset_sources.DataSource:
    """Where this task's splits are read from."""
    return source_of(self.config)


def source_of(config: ml_collections.ConfigDict) -> dataset_sources.DataSource:
  """A (task's) config's data keys."""
  return dataset_sources.DataSource(**{k: config[k] for k in dataset_sources.SOURCE_KEYS})


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
  # Set by create_train_state when it loads a start: where from (workdir.STARTED_FROM_NAME).
  started_from: dict[str, Any] | None = None
  member: int | None = None  # set by load_run for a sweep: the member whose params it loaded
  # A sweep's members (config.grid order: each one's swept values); () for one run.
  members: tuple[dict[str, Any], ...] = ()
  layout: tokenization.Layout = tokenization.Layout()  # config.validate's, from its keys

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
    """The train step's loss per head (losses.HeadLoss; a tuple for a multi-task run)."""
    losses = tuple(HeadLoss(t.task.problem_type, tuple(t.class_weights),
                            tuple(t.logit_offsets)) for t in self.tasks)
    return losses if self.multitask else losses[0]

  @property
  def multitask(self) -> bool:
    """Several heads (config.tasks set): params bert/... and heads/<task>/..."""
    return bool(self.config.tasks)

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
        self.config.min_size_to_shard_mb)
    return boxed, shardings

  def tokenize(self, examples: Any) -> data_lib.TokenizedSplit:
    return tokenization.cached_tokenize(self.tokenizer, examples.texts, examples.labels,
                                    self.config.max_seq_length, self.config.cache_dir or None,
                                    self.layout)


def _run_tasks(config: ml_collections.ConfigDict, plan: config_lib.RunPlan, label_names: Any
               ) -> tuple[RunTask, ...]:
  """The run's tasks; `label_names`: a tuple (single task) or {task: names} (multi-task)."""
  tasks = []
  multitask = bool(config.tasks)
  for i, (name, weight, task_config) in enumerate(plan.tasks):
    where = f"config.tasks[{i}] ({name}): " if multitask else ""
    try:
      task = tasks_lib.get_task(task_config.to_dict())
      names = (label_names or {}).get(name) if multitask else label_names
      if names is None and not task.is_regression:
        names = dataset_sources.label_names_for(source_of(task_config), task)
    except UserError as e:
      raise UserError(f"{where}{e}") from None
    tasks.append(RunTask(name or task.name, task, tuple(names) if names else None, task_config,
                         weight))
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
                     devices: list[jax.Device] | None = None,
                     shapes_only: bool = False) -> Experiment:
  """Resolves the checkpoint (or a run's saved `model_dir`), task(s), labels and mesh.

  `label_names`: a tuple (single task) or {task: names} (multi-task); None = from the data.
  `shapes_only`: the checkpoint's config.json is all that is read, no tokenizer (its
  `tokenizer` is None): what `plan` compiles from.
  """
  plan = config_lib.validate(config)
  axes, shape = plan.mesh_axes, plan.mesh_shape
  if not shape:  # automatic: data parallel first, sized from the model below
    shape = tuple(-1 if a == "data" else 1 for a in axes)
  mesh = sharding_lib.create_mesh(axes, shape, devices)
  members_lib.check_mesh(plan.members, mesh)
  platform = mesh.devices.flat[0].platform
  config_lib.validate_for_platform(config, platform)
  tasks = _run_tasks(config, plan, label_names)
  # A previous run's workdir starts from its model/ (re-fine-tuning, starts.py).
  source = model_dir or workdir_lib.model_source(
      hf.resolve(config.model_name_or_path, config_only=shapes_only))
  hf_config = hf.load_config(source)
  if getattr(hf_config, "ensemble_members", 0):
    raise UserError(f"config.model_name_or_path={config.model_name_or_path!r}: an ensemble's "
                    f"export ({hf_config.ensemble_members} members averaged) cannot start a "
                    "run; start from one member: flaxbert-cls export --member=I")
  tokenizer = None
  if not shapes_only:
    tokenizer_source = model_dir or (hf.resolve(config.tokenizer_name) if config.tokenizer_name
                                     else source)
    tokenizer = hf.load_tokenizer(tokenizer_source, vocab_size=hf_config.vocab_size)
  overrides = {}
  if config.classifier_dropout >= 0:
    overrides["classifier_dropout"] = config.classifier_dropout
  if config.attention_dropout >= 0:
    overrides["attention_probs_dropout_prob"] = config.attention_dropout
  bert_config = hf.model_config(  # any supported family (hf.FAMILIES)
      hf_config, dtype=config.dtype, mesh=mesh,
      activation_rules=sharding_lib.activation_rules(config.logical_axis_rules, mesh),
      lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
      lora_targets=tuple(config.lora_targets), pooling=config.pooling,
      remat_policy=config.remat_policy,
      window_attention=config.long_document == "windows" and config.window_pooling == "attention",
      **overrides)
  bert_config = dataclasses.replace(
      bert_config, attention_impl=attention_lib.attention_implementation(
          config.attention_impl, platform, config.dtype, bert_config.head_dim,
          bert_config.attention_probs_dropout_prob, config.max_seq_length))
  if bert_config.encoder == "modernbert" and config.lora_rank and not set(
      config.lora_targets) & set(modernbert.LORA_TARGETS):
    raise UserError(f"config.lora_targets={tuple(config.lora_targets)}: ModernBERT's layers are "
                    f"named {', '.join(modernbert.LORA_TARGETS)}; use e.g. lora_targets=('Wqkv',)")
  if config.packing and bert_config.encoder != "modernbert":
    raise UserError(f"config.packing=True: packed rows run on ModernBERT encoders (rotary "
                    f"positions); {source} is a {hf_config.model_type!r} checkpoint")
  # Positions past the table would be gathered out of range: NaN embeddings, not an error.
  positions = bert_config.max_position_embeddings - bert_config.position_offset
  if config.max_seq_length > positions:
    raise UserError(f"config.max_seq_length={config.max_seq_length} is above the {positions} "
                    f"positions of {source} (max_position_embeddings="
                    f"{bert_config.max_position_embeddings}); use max_seq_length <= {positions}")
  sharding_lib.check_heads(config.logical_axis_rules, mesh, bert_config.num_attention_heads)
  _check_batch_splits(config, mesh)
  if config.tasks:
    model = model_lib.BertForSequenceClassification(
        bert_config, tuple(t.num_labels for t in tasks), tuple(t.name for t in tasks))
  else:
    model = model_lib.BertForSequenceClassification(bert_config, tasks[0].num_labels)
  if not config.mesh_shape:  # automatic: sized from the model, then built again on that mesh
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh_shape = sharding_lib.auto_mesh_shape(
        config.mesh_axes, _train_state_bytes(model), list(mesh.devices.flat))
    return build_experiment(config, model_dir, label_names, devices, shapes_only)
  return Experiment(config, tasks, hf_config, tokenizer, model, mesh,
                    sharding_lib.batch_sharding(mesh), members=plan.members,
                    layout=plan.layout)


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
    examples = dataset_sources.read_split(run_task.source, run_task.task, split,
                                          run_task.label_names)
    tokenized = exp.tokenize(examples)
    log.info("%s: %d examples from %s, mean length %.1f tokens, %d truncated to %d%s",
             run_task.name, len(tokenized), examples.source, tokenized.lengths.mean(),
             tokenized.num_truncated, exp.config.max_seq_length,
             "" if tokenized.documents is None else
             f" (long_document=windows: {tokenized.window_counts.mean():.2f} windows per example)")
    out.append((examples, tokenized))
  return out


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


def resolve_class_balance(exp: Experiment, train_labels: Sequence[np.ndarray | None]) -> None:
  """Sets each task's class_weights and logit offsets from its config and training labels,
  and logs them."""
  for run_task, labels in zip(exp.tasks, train_labels):
    cfg = run_task.config
    run_task.class_weights = class_weights_lib.resolve(
        cfg.class_weights, labels, run_task.label_names, run_task.task.problem_type,
        cfg.max_pos_weight)
    if run_task.class_weights:
      what = "pos_weight" if run_task.task.is_multilabel else "class weights"
      log.info("%s %s: %s", run_task.name, what, "  ".join(
          f"{n} {w:.2f}" for n, w in zip(run_task.label_names, run_task.class_weights)))
    run_task.logit_offsets = class_weights_lib.logit_offsets(
        cfg.logit_adjustment, labels, run_task.num_labels, run_task.task.problem_type)
    if run_task.logit_offsets:
      log.info("%s logit adjustment (tau * log prior, added in the loss): %s", run_task.name,
               "  ".join(f"{n} {o:+.2f}" for n, o in zip(run_task.label_names,
                                                         run_task.logit_offsets)))
