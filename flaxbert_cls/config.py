"""The config schema: every key a run reads, with its default.

HF run_glue.py names where users know them. Files in configs/ start from
`default_config()` and change a few keys; any key can be overridden on the
command line (--config.learning_rate=3e-5). `validate` checks values early.
"""

import dataclasses
import importlib.util
import itertools
from typing import Any

import ml_collections

from flaxbert_cls.data import class_weights as class_weights_lib
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.data import tokenization
from flaxbert_cls.decisions import baseline as baseline_lib
from flaxbert_cls.errors import UserError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Model: a local HF checkpoint directory or a hub id (hub needs network).
  c.model_name_or_path = "bert-base-uncased"
  c.tokenizer_name = ""  # '' = the tokenizer saved with the model
  # Re-fine-tuning (model_name_or_path = a previous run's workdir or an exported directory;
  # training/starts.py): the workdir checkpoint to start from ('latest', 'best' or a step), and
  # whether labels of the start missing from this run may be dropped (else refused).
  c.start_step = "latest"
  c.drop_removed_labels = False
  c.dtype = "float32"  # compute dtype ('bfloat16' on TPU/GPU); parameters stay float32
  # '' = auto: cuDNN flash attention on a GPU with bfloat16 (head size <= 128, multiple of
  # 8), splash on a TPU with attention_dropout=0 and max_seq_length >= 512, XLA elsewhere;
  # 'xla', 'cudnn' or 'splash' (TPU, attention_dropout=0) force one.
  c.attention_impl = ""
  # < 0: the checkpoint's. 0 trains through fused kernels; > 0 needs the probabilities (attention.py).
  c.attention_dropout = -1.0
  c.classifier_dropout = -1.0  # < 0: the checkpoint's hidden_dropout_prob
  # What each encoder layer keeps for the backward pass: 'none' (all XLA keeps), 'full' (its
  # input only) or 'minimal' (the dense matmuls' outputs). Trades FLOPs for HBM; `plan` shows both.
  c.remat_policy = "none"

  # Task and data. task_name: a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli,
  # rte, wnli) or 'custom'. Data comes from train_file/validation_file, or a GLUE
  # data_dir, or HF datasets (dataset_name).
  c.task_name = "sst2"
  c.train_file = ""
  c.validation_file = ""
  c.data_dir = ""  # a GLUE directory with SST-2/train.tsv, ... (used if files are '')
  c.dataset_name = ""  # HF datasets name, e.g. 'nyu-mll/glue' (with dataset_config_name)
  c.dataset_config_name = ""
  c.tfds_name = ""  # TFDS dataset, e.g. 'glue/sst2' (read with tfds.data_source, no TF)
  c.tfds_data_dir = ""  # '' = TFDS's default data dir
  c.text_columns = ("sentence",)  # custom task: 1 or 2 text columns
  c.label_column = "label"  # custom task
  c.label_names = ()  # custom task: class names in id order; () = from the training data
  c.is_regression = False  # custom task; alias of problem_type='regression'
  # Custom task: 'single_label_classification' | 'multi_label_classification' | 'regression'
  # (HF's names); '' = from is_regression. Multi-label: sigmoid + binary cross-entropy.
  c.problem_type = ""
  # Multi-label TSV/CSV: the label column holds labels joined by this ('3,27', 'a|b');
  # JSONL rows may give a list instead. Labels are names, or ids in label_names order.
  c.label_delimiter = ","
  c.label_names_file = ""  # custom task: label names, one a line (id order), e.g. emotions.txt
  c.file_columns = ()  # custom task: column names of a header-less TSV/CSV (GoEmotions)
  # '' | 'auto' (inverse frequency) | 'effective[:BETA]' (inverse effective number of samples,
  # beta 0.999) | numbers in label order ('1,4.5'; a string: --config.class_weights=auto works).
  # Single-label: weighted softmax CE, weights scaled to mean 1 over the training examples.
  # Multi-label: BCE pos_weight per label, 'auto' = negatives/positives, clipped (below).
  c.class_weights = ""
  # Single-label: tau of the logit-adjusted loss (Menon et al. 2021): tau * log(class prior)
  # added to the logits in training only, so argmax favours no class for being frequent. 0 = off.
  c.logit_adjustment = 0.0
  c.max_pos_weight = 30.0  # multi-label 'auto': pos_weight clip (rare labels; see design.md)
  c.metrics = ()  # custom task: () = accuracy (classification) / pearson, spearmanr
  c.main_metric = ""  # custom task: '' = the first of metrics
  # Multi-task: a tuple of dicts, one per task, each with task_name and any of TASK_KEYS
  # (those not given come from the keys above, e.g. a shared GLUE data_dir). One shared
  # encoder, one head per task; () = the single task above. See configs/glue_multitask.py.
  c.tasks = ()
  c.mixing = "proportional"  # which task each step trains: proportional | temperature | equal
  c.mixing_temperature = 2.0  # 'temperature': p(task) ~ weight * size^(1/T)
  c.selection_metric = "average"  # best-k / early stopping: 'average' of main metrics or a task
  # Decisions (decisions/tuning.py), fitted on the validation set after each evaluation and saved
  # with the run and its export. calibrate: temperature scaling of the logits (min NLL).
  c.calibrate = False
  # Thresholds maximising F1 on validation: None = yes for multi-label (per label), no for
  # single-label; True on a binary single-label task tunes P(label id 1)'s threshold.
  c.tune_thresholds = ml_collections.FieldReference(None, field_type=bool)
  c.thresholds_file = ""  # a JSON list of thresholds (label order) used instead of tuning
  # Single-label: decide by w * P(run) + (1 - w) * P(TF-IDF baseline), w chosen on validation
  # (docs/decisions.md); predict and export carry the baseline with the run.
  c.blend_baseline = False
  c.max_seq_length = 128
  # Batches are padded to the smallest bucket that fits (bounded compiled shapes).
  c.seq_buckets = (32, 64, 128, 256, 512)
  # What the head reads: 'cls' (the family's [CLS] / pooler path) or 'mean' (the mean of the
  # last hidden state over non-padding tokens, as sentence-transformers models were trained).
  c.pooling = "cls"
  c.length_grouping_window = 0  # > 0: sort by length within windows of this many batches
  # Training rows of max_seq_length tokens holding several whole examples each (ModernBERT
  # encoders; batch_size then counts rows; eval and predict stay one example a row): no
  # padding to compute on long, uneven texts (data/packing.py, docs/long_documents.md).
  c.packing = False
  c.packing_max_examples = 16  # packing: examples a row holds at most
  # Texts over max_seq_length (single-text tasks; docs/long_documents.md): 'truncate' keeps the
  # first tokens, 'head_tail' the first head_tokens and the last (Sun et al. 2019), 'windows'
  # up to max_windows windows window_stride tokens apart, pooled (window_pooling) logits.
  c.long_document = "truncate"
  c.head_tokens = -1  # head_tail: tokens kept from the start; -1 = 128/510 of them (Sun et al.)
  c.window_stride = 64  # windows: tokens between window starts, in [1, max_seq_length - 2]
  c.max_windows = 8  # windows: at most this many per document (the rest is cut)
  # windows: 'mean' or 'max' of the windows' logits, or 'attention': the head reads a learned
  # softmax-weighted sum of the windows' [CLS] vectors (not exportable yet)
  c.window_pooling = "mean"
  c.train_windows = 0  # windows: > 0 trains on this many per document per step; eval reads all
  c.train_windows_first = False  # train_windows: each document's first window always among them
  c.cache_dir = ""  # '' = <workdir>/cache for tokenized data
  # XLA's persistent compilation cache: a second start of the same config skips compiling.
  c.compilation_cache_dir = "~/.cache/flaxbert_cls/xla"  # '' = off
  # A folder `plan --save_compiled` wrote for this run's devices: each step whose key matches
  # (versions, devices, the program itself) is loaded, not compiled (training/programs.py).
  c.compiled_programs = ""
  c.cpu_scheduler = "memory"  # CPU train step: 'memory' (lower peak, design.md) or 'concurrency'

  # Optimization (HF recipe: AdamW eps 1e-6, linear warmup then linear decay).
  c.batch_size = 32  # global batch, over all devices and processes
  c.eval_batch_size = 64
  c.learning_rate = 2e-5
  c.lr_schedule = "linear"  # linear | cosine | constant (after warmup)
  c.num_train_epochs = 3.0
  c.num_train_steps = -1  # > 0 overrides num_train_epochs
  c.warmup_ratio = 0.1
  c.warmup_steps = -1  # >= 0 overrides warmup_ratio
  c.weight_decay = 0.01
  # path regexes without decay: biases and norms (BERT's LayerNorm, ModernBERT's *norm)
  c.weight_decay_exclude = ("bias$", "LayerNorm/", "norm/scale$")
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-6
  c.max_grad_norm = 1.0
  c.freeze = ()  # path regexes of parameters that stay fixed (no optimizer state)
  c.freeze_bottom_layers = 0  # shortcut: embeddings + encoder layers 0..k-1
  c.lora_rank = 0  # > 0: LoRA adapters of this rank; only adapters and the head train
  c.lora_alpha = 16.0  # adapter scale alpha / rank
  c.lora_targets = ("query", "value")  # attention projections that get adapters
  c.layerwise_lr_decay = 1.0  # < 1: lr * decay^(L+1-depth); head 1, embeddings decay^(L+1)
  c.gradient_accumulation_steps = 1  # k micro-batches of batch_size/k per update
  c.seed = 42
  # Hyper-parameter sweep (training/members.py): a tuple of values per key; the grid of all keys'
  # values trains as one program, members stacked on a leading axis of the train state.
  # () = not swept (the key above holds). --config.sweep.learning_rate='(1e-5,2e-5)'.
  c.sweep = ml_collections.ConfigDict(
      {"learning_rate": (), "seed": (), "weight_decay": (), "warmup_ratio": ()})

  # Loop, evaluation, checkpoints, logging.
  c.log_every_steps = 50
  c.eval_every_steps = 0  # 0 = at the end only
  c.checkpoint_every_steps = 1000
  c.checkpoint_every_minutes = 0.0  # > 0: also save when this much time has passed
  c.max_checkpoints_to_keep = 2  # latest steps kept for resume
  c.keep_best_checkpoints = 1  # best steps by the task's main metric (0 = none)
  c.early_stopping_patience = 0  # stop after this many evals without improvement (0 = off)
  c.resume = True  # an existing checkpoint in the workdir is resumed; False = start over
  c.nonfinite_policy = "stop"  # NaN/inf loss or gradient: 'stop' or 'skip' the update

  # Parallelism: a mesh over all devices; -1 = the remaining devices. Parameters
  # carry logical axis names; these rules map them to mesh axes (lm1b style).
  c.mesh_axes = ("data", "fsdp", "tensor")
  # (-1, 1, 1): pure data parallelism. () = automatic: data parallel when parameters, gradients
  # and AdamW moments fit 35% of a device's memory, else FSDP over the fewest devices that fit.
  c.mesh_shape = (-1, 1, 1)
  # With fsdp > 1: tensors under this size stay whole on every device (gathering many
  # small tensors costs more than the memory they save); 0 = split every tensor.
  c.min_size_to_shard_mb = 0.0
  c.logical_axis_rules = (
      ("embed", "fsdp"),
      ("vocab", "tensor"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("classes", None),
  )

  # Experiment trackers (tracking/trackers.py, docs/report.md): process 0 also
  # logs there; metrics.jsonl stays the record. ('none',) = TensorBoard off too.
  c.report_to = ("tensorboard",)  # any of 'tensorboard', 'mlflow'; ('none',) for none
  c.mlflow_tracking_uri = ""  # '' = $MLFLOW_TRACKING_URI, else MLflow's default (a local store)
  c.tracker_experiment = ""  # the MLflow experiment; '' = the task name
  # Baseline (decisions/baseline.py): TF-IDF + logistic regression on the same training
  # rows, scored on the same validation rows, beside every eval ('baseline/<metric>').
  c.baseline = "tfidf"  # 'tfidf' or 'none'; multi-task runs have none
  c.baseline_max_rows = 200_000  # training rows it fits on at most (sampled with the seed)
  return c


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What a checked config resolves to; the layers below take these values, not the checks.

  `tasks`: (head name, mixing weight, that task's config) per task ('' for a single task).
  `members`: a sweep's swept values per member, in grid order; () for one run.
  `mesh_axes` / `mesh_shape`: the mesh the run asks for, a sweep's 'member' axis included
  (shape () = automatic). `layout`: how a text becomes model rows (long_document keys).
  """

  tasks: tuple[tuple[str, float, ml_collections.ConfigDict], ...]
  members: tuple[dict[str, Any], ...]
  mesh_axes: tuple[str, ...]
  mesh_shape: tuple[int, ...]
  layout: tokenization.Layout


def validate(config: ml_collections.ConfigDict) -> RunPlan:
  """Fails fast, naming the key, on values that would only break later; returns the plan."""

  def check(ok: bool, key: str, why: str):
    if not ok:
      raise UserError(f"config.{key}={getattr(config, key, None)!r}: {why}")

  check(bool(config.model_name_or_path), "model_name_or_path", "must name a checkpoint")
  start_step = str(config.start_step)
  check(start_step in ("latest", "best") or start_step.isdigit(), "start_step",
        "use 'latest', 'best' or a step number")
  check(isinstance(config.drop_removed_labels, bool), "drop_removed_labels",
        "must be True or False")
  for key in ("batch_size", "eval_batch_size", "max_seq_length"):
    check(int(config[key]) > 0, key, "must be > 0")
  check(config.learning_rate > 0, "learning_rate", "must be > 0")
  check(config.num_train_steps > 0 or config.num_train_epochs > 0, "num_train_epochs",
        "must be > 0 (or set num_train_steps > 0)")
  check(config.lr_schedule in LR_SCHEDULES, "lr_schedule", f"use one of {LR_SCHEDULES}")
  check(0 <= config.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
  check(config.weight_decay >= 0, "weight_decay", "must be >= 0")
  check(config.dtype != "float16", "dtype", "float16 needs loss scaling, which this trainer "
        "does not do; use 'bfloat16' (same speed on GPU/TPU, float32's range)")
  check(config.dtype in ("float32", "bfloat16"), "dtype", "use 'float32' or 'bfloat16'")
  impls = ("", "xla", "cudnn", "splash")
  check(config.attention_impl in impls, "attention_impl", "use '', 'xla', 'cudnn' or 'splash'")
  check(config.attention_impl != "splash" or config.attention_dropout == 0, "attention_impl",
        "splash attention has no attention dropout; set attention_dropout=0")
  check(config.attention_impl != "cudnn" or config.dtype == "bfloat16", "attention_impl",
        f"cuDNN flash attention has no {config.dtype} kernel; set dtype='bfloat16' (or "
        "attention_impl='' to pick by itself)")
  check(config.attention_dropout < 1, "attention_dropout", "must be < 1 (< 0: the checkpoint's)")
  check(config.remat_policy in REMAT_POLICIES, "remat_policy", f"use one of {REMAT_POLICIES}")
  check(config.cpu_scheduler in ("memory", "concurrency"), "cpu_scheduler",
        "use 'memory' or 'concurrency'")
  check(not config.mesh_shape or len(config.mesh_axes) == len(config.mesh_shape), "mesh_shape",
        f"needs one size per axis in mesh_axes={tuple(config.mesh_axes)}")
  check(1 <= len(config.text_columns) <= 2, "text_columns", "one or two column names")
  layout = tokenization.Layout(**{k: config[k] for k in tokenization.LONG_DOCUMENT_KEYS})
  tokenization.validate_layout(layout, int(config.max_seq_length), check)
  check(isinstance(config.packing, bool), "packing", "must be True or False")
  check(int(config.packing_max_examples) >= 1, "packing_max_examples", "must be >= 1")
  check(not config.packing or config.long_document != "windows", "packing",
        "packs whole examples into rows; long_document='windows' makes rows of windows: "
        "choose one")
  check(int(config.train_windows) >= 0, "train_windows",
        "must be >= 0 (0 = every window of a document in training)")
  check(config.window_pooling in ("mean", "max", "attention"), "window_pooling",
        "use 'mean', 'max' or 'attention'")
  check(config.nonfinite_policy in ("stop", "skip"), "nonfinite_policy", "use 'stop' or 'skip'")
  for key in ("checkpoint_every_steps", "log_every_steps", "max_checkpoints_to_keep"):
    check(int(config[key]) > 0, key, "must be > 0")
  check(config.min_size_to_shard_mb >= 0, "min_size_to_shard_mb", "must be >= 0")
  for key in ("eval_every_steps", "keep_best_checkpoints", "early_stopping_patience"):
    check(int(config[key]) >= 0, key, "must be >= 0")
  check(config.lora_rank >= 0, "lora_rank", "must be >= 0")
  check(set(config.lora_targets) <= {"query", "key", "value"}, "lora_targets",
        "choose from 'query', 'key', 'value'")
  check(config.mixing in MIXING, "mixing", f"use one of {MIXING}")
  check(config.mixing_temperature > 0, "mixing_temperature", "must be > 0")
  check(0 < config.layerwise_lr_decay <= 1, "layerwise_lr_decay", "must be in (0, 1]")
  check(config.pooling in ("cls", "mean"), "pooling", "use 'cls' or 'mean'")
  check(config.problem_type in ("", *PROBLEM_TYPES), "problem_type",
        f"use one of {PROBLEM_TYPES}")
  check(config.max_pos_weight >= 1, "max_pos_weight", "must be >= 1")
  weights = class_weights_lib.parse_class_weights(config.class_weights)
  check(weights is not None, "class_weights",
        "use '', 'auto', 'effective[:BETA]' or positive numbers in label order, e.g. '1,4.5'")
  check(config.logit_adjustment >= 0, "logit_adjustment", "must be >= 0 (0 = off)")
  check(not config.logit_adjustment or config.problem_type != "multi_label_classification",
        "logit_adjustment", "adjusts a softmax by class priors: single-label tasks only")
  check(config.tune_thresholds in (None, True, False), "tune_thresholds",
        "use True, False or None (None: tune for multi-label only)")
  check(not (config.thresholds_file and config.tune_thresholds),
        "thresholds_file", "and tune_thresholds=True both set the thresholds; choose one")
  check(not config.blend_baseline or config.baseline == "tfidf", "blend_baseline",
        "needs baseline='tfidf' (the baseline it blends with)")
  check(not (config.blend_baseline and (config.tune_thresholds or config.thresholds_file)),
        "blend_baseline", "and a threshold (tune_thresholds / thresholds_file) both decide; "
        "choose one")
  _validate_trackers(config)
  baseline_error = baseline_lib.check_config(config)
  if baseline_error:
    raise UserError(baseline_error)
  members = _validate_sweep(config)
  check(config.gradient_accumulation_steps >= 1 and
        config.batch_size % config.gradient_accumulation_steps == 0,
        "gradient_accumulation_steps", "must be >= 1 and divide batch_size")
  tasks = task_configs(config)
  names = [name for name, _, _ in tasks]
  check(not config.tasks or config.selection_metric in ("average", *names),
        "selection_metric", f"use 'average' or a task name {names}")
  return RunPlan(tasks, tuple(members), *mesh_request(config), layout)


def task_configs(config: ml_collections.ConfigDict
                 ) -> tuple[tuple[str, float, ml_collections.ConfigDict], ...]:
  """(head name, weight, that task's config: the run's with its entry's keys on top) per
  config.tasks entry; ('', 1.0, config) for a single task."""
  if not config.tasks:
    return (("", 1.0, config),)
  out = []
  for i, (name, weight, keys) in enumerate(tasks_lib.task_entries(config.tasks)):
    task_config = ml_collections.ConfigDict(config.to_dict())
    with task_config.unlocked():
      task_config.tasks = ()
      for key, value in keys.items():
        try:
          task_config[key] = value
        except (TypeError, ValueError) as e:
          raise UserError(f"config.tasks[{i}].{key}={value!r}: {e}") from None
    out.append((name, weight, task_config))
  return tuple(out)


def mesh_request(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(mesh axes, shape) the config asks for: a sweep without a 'member' axis gets one of size
  1 (every member on every device, vmapped). Shape () = automatic."""
  axes, shape = tuple(config.mesh_axes), tuple(config.mesh_shape)
  if grid(config) and MEMBER_AXIS not in axes:
    axes, shape = (MEMBER_AXIS, *axes), ((1, *shape) if shape else ())
  return axes, shape


TRACKERS = {"tensorboard": None, "mlflow": "mlflow"}  # name: its package
LR_SCHEDULES = ("linear", "cosine", "constant")


def _validate_trackers(config: ml_collections.ConfigDict) -> None:
  """Known names whose package is installed (found, not imported: mlflow loads slowly)."""
  names = tuple(config.report_to)
  for name in () if names == ("none",) else names:
    if name == "wandb":
      raise UserError(f"config.report_to={names!r}: the W&B writer is not built yet; use "
                      "'mlflow' (and 'tensorboard')")
    if name not in TRACKERS or (TRACKERS[name] and not importlib.util.find_spec(TRACKERS[name])):
      why = (f"{name} is not installed; pip install 'flaxbert-cls[{name}]'" if name in TRACKERS
             else f"unknown tracker {name!r}; use any of {tuple(TRACKERS)}, or ('none',)")
      raise UserError(f"config.report_to={names!r}: {why}")


# Values that only change numbers inside the train step (or the data order): anything
# that changes the program's shapes (batch size, LoRA rank, ...) cannot be a member axis.
SWEEP_KEYS = ("learning_rate", "seed", "weight_decay", "warmup_ratio")
MEMBER_AXIS = "member"  # mesh axis and logical axis of a sweep state's leading dimension


def grid(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The members' swept values, in the fixed grid order; [] when nothing is swept."""
  sweep = config.sweep or {}
  swept = [(key, tuple(sweep[key])) for key in SWEEP_KEYS if key in sweep and len(sweep[key])]
  if not swept:
    return []
  keys = [key for key, _ in swept]
  return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in swept))]


def member_config(config: ml_collections.ConfigDict, member: dict[str, Any]
                  ) -> ml_collections.ConfigDict:
  """The solo run's config of one member: its values set, no sweep, no 'member' mesh axis."""
  solo = ml_collections.ConfigDict(config.to_dict())
  with solo.unlocked():
    if MEMBER_AXIS in solo.mesh_axes:
      keep = [i for i, axis in enumerate(solo.mesh_axes) if axis != MEMBER_AXIS]
      solo.mesh_axes = tuple(solo.mesh_axes[i] for i in keep)
      solo.mesh_shape = tuple(solo.mesh_shape[i] for i in keep)
    for key, value in member.items():
      solo[key] = int(value) if key == "seed" else float(value)
    solo.sweep = ml_collections.ConfigDict({key: () for key in SWEEP_KEYS})
  return solo


def _validate_sweep(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Known keys, a tuple of distinct numbers each (integers for seed), valid members.

  Returns the members (grid order); each member's solo config is validated too."""
  sweep = config.sweep
  if not sweep:
    return []
  for key in sweep.keys():
    values = sweep[key]
    where = f"config.sweep.{key}={values!r}"
    if key not in SWEEP_KEYS:
      raise UserError(f"config.sweep.{key}: not a sweep key; use {', '.join(SWEEP_KEYS)}")
    if not isinstance(values, (tuple, list)):
      raise UserError(f"{where}: give a tuple of values, e.g. '(1e-5,2e-5)'")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
      raise UserError(f"{where}: values must be numbers")
    if key == "seed" and any(not float(v).is_integer() for v in values):
      raise UserError(f"{where}: seeds must be integers")
    if len(set(values)) != len(values):
      raise UserError(f"{where}: a value appears twice")
  if config.long_document == "windows" and grid(config):
    # Members draw documents with other window counts; stacking them is not built.
    raise UserError("config.sweep with long_document='windows': not supported; sweep with "
                    "'truncate' or 'head_tail', or run the window settings one at a time")
  members = grid(config)
  for member in members:
    try:
      validate(member_config(config, member))
    except UserError as e:
      raise UserError(f"config.sweep member {member}: {e}") from None
  return members


def validate_for_platform(config: ml_collections.ConfigDict, platform: str) -> None:
  """What the devices decide: cuDNN attention needs a GPU, splash a TPU."""
  for impl, needs in (("cudnn", "gpu"), ("splash", "tpu")):
    if config.attention_impl == impl and platform != needs:
      raise UserError(f"config.attention_impl='{impl}': needs a {needs.upper()}, this run's "
                      f"devices are {platform}; use attention_impl='' (auto) or 'xla'")


REMAT_POLICIES = ("none", "full", "minimal")  # model/encoder_config.py's REMAT_POLICIES
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
MIXING = ("proportional", "temperature", "equal")


def glue_config(task_name: str, **overrides) -> ml_collections.ConfigDict:
  """The BERT paper's GLUE recipe for one task (batch 32, lr 2e-5, 3 epochs, warmup 10%).

  Data: `data_dir` (GLUE TSVs: --config.data_dir=/path/to/glue_data) or, when empty,
  the HF hub dataset nyu-mll/glue.
  """
  c = default_config()
  c.task_name = task_name
  c.max_seq_length = 128
  # Fine buckets + length grouping: an SST-2 epoch pads to 17 tokens on average, not 128 (MiniLM
  # on CPU: 10.6 min, not 62; benchmarks/bench.py --lengths=sst2); compiles are cached.
  c.seq_buckets = (8, 12, 16, 24, 32, 48, 64, 96, 128)
  c.length_grouping_window = 50
  c.eval_every_steps = 1000
  c.update(overrides)
  return c
