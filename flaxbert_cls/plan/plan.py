"""`flaxbert-cls plan`: compile the run's own train and eval steps for a TPU topology, here.

No TPU, weights or data are needed: the experiment is built from the checkpoint's
config.json (`build_experiment(shapes_only=True)`) on the topology's compile-only devices
(topologies.py) with the run's mesh rules, and the run's jitted programs (step.py's train
step, a sweep's stacked one, evaluate.py's eval step) are lowered from sharded
jax.ShapeDtypeStructs and compiled for every sequence bucket. What each program needs per
chip is the compiler's (program_stats.py); step times are roofline estimates from it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.data import packing
from flaxbert_cls.data import tokenization
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.model import topologies
from flaxbert_cls.plan import program_stats
from flaxbert_cls.training import batches as batches_lib
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import evaluate as evaluate_lib
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import layouts
from flaxbert_cls.training import members as members_lib
from flaxbert_cls.training import programs as programs_lib
from flaxbert_cls.training import state as state_lib
from flaxbert_cls.training import step as step_lib

log = logging.getLogger(__name__)

NOT_FITTING_EXIT_CODE = 3
_PLACEHOLDER_STEPS = 1000  # the schedule's length changes no shape (num_train_steps=0: from data)


@dataclasses.dataclass
class Program:
  """One compiled program: a train or eval step at one sequence length."""

  kind: str  # 'train' | 'eval'
  seq_len: int
  examples: int  # per step, all chips (a sweep: every member's)
  analytic_flops: float  # per chip: 6·N·T + attention (train), 2·N·T + attention (eval)
  # (plan._step_flops: N the encoder's matrices, T the tokens they see)
  expected_argument_bytes: int  # per chip, from the sharded shapes
  compile_seconds: float = 0.0
  stats: program_stats.ProgramStats | None = None
  refused: str = ""  # the compiler's RESOURCE_EXHAUSTED, one line

  @property
  def name(self) -> str:
    return f"{self.kind} seq {self.seq_len}"

  @property
  def tokens(self) -> int:
    return self.examples * self.seq_len


@dataclasses.dataclass
class Plan:
  topology: str
  num_slices: int
  chip: topologies.Chip
  num_chips: int
  mesh: dict[str, int]
  choices: dict[str, str]
  num_params: int
  programs: list[Program]
  accumulation_steps: int = 1
  # When a train program does not fit: the first stronger remat_policy under which the longest
  # train program fits ('' if none does); None when not searched.
  remat_fits: str | None = None

  @property
  def fits(self) -> bool:
    return all(not p.refused for p in self.programs)

  def bounds(self, program: Program) -> dict[str, float]:
    """Roofline estimates of one step (seconds) and what follows; never a measured time."""
    stats = program.stats
    compute = program.analytic_flops / self.chip.bf16_flops
    memory = stats.bytes_accessed / self.chip.hbm_bandwidth
    step = max(compute, memory, stats.flops / self.chip.bf16_flops)
    return {"compute_bound_s": compute, "xla_compute_bound_s": stats.flops / self.chip.bf16_flops,
            "memory_bound_s": memory, "step_bound_s": step,
            "tokens_per_s_ceiling": program.tokens / step, "mfu_ceiling": compute / step}


def make_plan(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
              largest_only: bool = False, save_compiled: str | None = None,
              kinds: tuple[str, ...] = ("train", "eval"), remat_search: bool = True) -> Plan:
  """Builds the run abstractly on `topology` and compiles its programs (every bucket's);
  `save_compiled`: a folder to save each program in for a run to load
  (config.compiled_programs, training/programs.py). When a train program does not fit,
  `remat_search` compiles the longest one again under each stronger remat_policy."""
  devices = topologies.topology_devices(topology, num_slices)
  chip = topologies.chip_for(devices[0])
  memory_bytes, memory_source = sharding_lib.device_memory(devices[0])
  automatic_mesh = not tuple(config.mesh_shape)
  exp = experiment_lib.build_experiment(config, devices=devices, shapes_only=True)
  config = exp.config
  if config.long_document == "windows":
    raise UserError("config.long_document='windows': plan does not cover window batches yet "
                    "(their window count comes from the data); plan with 'truncate'")
  boxed, param_shardings = exp.abstract_params()
  params = nn.unbox(boxed)
  total_steps = config.num_train_steps if config.num_train_steps > 0 else _PLACEHOLDER_STEPS
  tx, schedule = state_lib.optimizer(exp, params, total_steps)
  abstract, state_shardings = state_lib.abstract_state(exp, tx)
  state = checkpoint_lib.abstract_with_shardings(nn.unbox(abstract), state_shardings)
  param_shapes = checkpoint_lib.abstract_with_shardings(params, param_shardings)
  train_step, extra = _train_program(exp, state, state_shardings, tx, schedule, total_steps)
  eval_step = evaluate_lib.jit_eval_step(exp.model, param_shardings, exp.batch_sharding,
                                         config.window_pooling)
  members = max(len(exp.members), 1)
  lengths = sorted({b for b in config.seq_buckets if b <= config.max_seq_length}
                   | {config.max_seq_length})
  if largest_only:
    lengths = lengths[-1:]
  cfg = exp.model.config
  programs = []
  save_to = None
  if save_compiled:
    if exp.members:
      raise UserError("plan --save_compiled: a sweep's steps are not saved yet; plan it "
                      "without --save_compiled")
    save_to = (workdir_lib.prepare(save_compiled), list(exp.mesh.devices.flat))
    programs_lib.save_config(save_to[0], config)
  # Packed training rows always hold max_seq_length tokens: one train program.
  for seq_len in (lengths[-1:] if config.packing else lengths) if "train" in kinds else ():
    batch = _batch_shapes(exp, config.batch_size, seq_len, stacked=bool(exp.members),
                          packed=config.packing)
    flops = members * _step_flops(3, cfg, config.batch_size, seq_len)
    programs.append(_compile(
        Program("train", seq_len, members * config.batch_size, flops / len(devices),
                program_stats.shard_bytes((state, batch, extra))),
        train_step, (state, batch, *extra), save_to))
  for seq_len in lengths if "eval" in kinds else ():
    batch = _batch_shapes(exp, config.eval_batch_size, seq_len, stacked=False)
    flops = _step_flops(1, cfg, config.eval_batch_size, seq_len)
    programs.append(_compile(
        Program("eval", seq_len, config.eval_batch_size, flops / len(devices),
                program_stats.shard_bytes((param_shapes, batch))),
        eval_step, (param_shapes, batch), save_to))
  for program in programs:  # a GPU compiler does not refuse a program over the memory: we do
    if memory_bytes and program.stats and program.stats.total_bytes > memory_bytes:
      program.refused = (f"RESOURCE_EXHAUSTED: memory for arguments, outputs and temporaries "
                         f"({program.stats.total_bytes / 2**30:.2f}G) exceeds available HBM "
                         f"({memory_bytes / 2**30:.2f}G): {memory_source}")
  options = step_lib.train_step_compiler_options(exp.mesh, config.cpu_scheduler)
  choices = {
      "platform": exp.mesh.devices.flat[0].platform,
      "attention_impl": cfg.attention_impl,
      "remat_policy": cfg.remat_policy,
      "dtype": config.dtype,
      "compiler_options": str(options or "none (XLA's defaults for this platform)"),
      "device_memory": (f"{memory_bytes / 2**30:.2f} GiB ({memory_source})" if memory_bytes
                        else memory_source),
      "mesh_shape": f"{tuple(exp.config.mesh_shape)} "
                    f"({'automatic, from the device memory' if automatic_mesh else 'config'})",
  }
  plan = Plan(topology, num_slices, chip, len(devices), dict(exp.mesh.shape), choices,
              sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)), programs,
              config.gradient_accumulation_steps)
  if remat_search and any(p.refused for p in programs if p.kind == "train"):
    plan.remat_fits = _remat_that_fits(config, topology, num_slices)
  return plan


REMAT_ORDER = ("none", "minimal", "full")  # less kept (more recomputed) to the right


def _remat_that_fits(config: ml_collections.ConfigDict, topology: str, num_slices: int) -> str:
  """The first remat_policy stronger than the config's under which the longest train program
  fits ('' if none): what the one line of a refused plan names."""
  for policy in REMAT_ORDER[REMAT_ORDER.index(config.remat_policy) + 1:]:
    trial = config.copy_and_resolve_references()
    trial.remat_policy = policy
    log.info("The train step does not fit; compiling it again with remat_policy='%s'.", policy)
    if make_plan(trial, topology, num_slices, largest_only=True, kinds=("train",),
                 remat_search=False).fits:
      return policy
  return ""


def _train_program(exp: experiment_lib.Experiment, state: Any, shardings: Any, tx: Any,
                   schedule: Any, total_steps: int) -> tuple[Any, tuple[Any, ...]]:
  """The run's jitted train step and the abstract arguments it takes after (state, batch)."""
  if not exp.members:
    return layouts.SingleRun(exp).jit_step(state, shardings, tx, schedule, total_steps), ()
  step, hyper = step_lib.stacked_step_program(exp, shardings, total_steps)
  replicated = sharding_lib.replicated(exp.mesh)
  return step, (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=replicated), hyper),)


def _batch_shapes(exp: experiment_lib.Experiment, batch_size: int, seq_len: int, stacked: bool,
                  packed: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch the run feeds at `seq_len`: data.pad_rows' arrays of one synthetic row (packed:
  packing.pad_packed's rows of config.packing_max_examples slots)."""
  first = exp.tasks[0]
  if exp.multitask or first.task.is_regression:
    labels = np.zeros(1, batches_lib.labels_dtype(exp))
  elif first.task.is_multilabel:
    labels = np.zeros((1, first.num_labels), np.float32)
  else:
    labels = np.zeros(1, np.int32)
  split = tokenization.TokenizedSplit(np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int8),
                                      np.asarray([0, seq_len]), labels)
  if packed:
    host = packing.pad_packed(split, np.zeros((batch_size, exp.config.packing_max_examples),
                                              np.int64), seq_len)
  else:
    host = data_lib.pad_rows(split, np.zeros(batch_size, np.int64), seq_len)
  if exp.multitask:
    host["task_ids"] = np.zeros(host["weights"].shape, np.int32)
  sharding = exp.batch_sharding
  if stacked:
    host = members_lib.stack_batches([host] * len(exp.members))
    sharding = members_lib.stacked_batch_sharding(exp.mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in host.items()}


def _step_flops(passes: int, cfg: Any, batch: int, seq_len: int) -> float:
  """Matmul FLOPs of `passes` passes (forward 1, training 3: backward is 2) over a batch:
  2·(matrix parameters·tokens + attention), the last layer on [CLS] only as the model runs it
  (first_token_only: its queries, attention output and MLP see one token per example)."""
  h, layers = cfg.hidden_size, cfg.num_hidden_layers
  tokens = batch * seq_len
  last = 1 if cfg.pooling != "mean" else 0  # layers computed for [CLS] only
  if cfg.encoder == "modernbert":
    # Wqkv (3h²) on every token; Wo (h²) and GeGLU's Wi (h -> 2i) + Wo (i -> h) on every
    # token but the last layer's under [CLS] pooling; a local layer's query needs its
    # 2·(local_attention // 2) + 1 keys only, as splash computes them.
    band = 2 * (cfg.local_attention // 2) + 1
    keys = [seq_len if kind == "full_attention" else min(seq_len, band)
            for kind in cfg.layer_types]
    queries = [tokens] * (layers - last) + [batch] * last
    matmuls = layers * 3 * h * h * tokens + sum(queries) * (h * h + 3 * h * cfg.intermediate_size)
    attention = 2 * h * sum(q * k for q, k in zip(queries, keys))
    return float(2 * passes * (matmuls + attention + h * h * batch))
  full = layers - last
  keys_values, rest = 2 * h * h, 2 * h * h + 2 * h * cfg.intermediate_size
  matmuls = full * (keys_values + rest) * tokens + last * (keys_values * tokens + rest * batch)
  attention = 2 * h * batch * seq_len * (full * seq_len + last)  # QK^T and PV
  return float(2 * passes * (matmuls + attention + h * h * batch))  # + the pooler


def _compile(program: Program, jitted: Any, args: tuple[Any, ...],
             save_to: tuple[str, list[Any]] | None = None) -> Program:
  start = time.perf_counter()
  try:
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA's JaxRuntimeError)
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    program.refused = " ".join(str(e).split())[:400]
  else:
    program.stats = program_stats.from_compiled(compiled)
    if save_to is not None:
      programs_lib.save(save_to[0], programs_lib.program_name(program.kind, args), lowered,
                        compiled, save_to[1])
  program.compile_seconds = time.perf_counter() - start
  log.info("Compiled %s in %.1f s%s.", program.name, program.compile_seconds,
           " (refused: out of memory)" if program.refused else "")
  return program
