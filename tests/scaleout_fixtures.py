"""The same fine-tune on several meshes of 8 CPU devices, and what each device holds.

tests/test_scaleout.py asserts on these runs; benchmarks/scaleout_report.py prints them.
Each run uses training's own pieces (experiment, mesh, state on its shardings, the jitted
train step, training's global batches), so a mesh that trains differently shows here.
"""

from __future__ import annotations

import collections
import os
import resource
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from flaxbert_cls.config import default_config
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.data import sources as dataset_sources
from flaxbert_cls.model import hf
from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.training import evaluate as evaluate_lib
from flaxbert_cls.training import experiment as experiment_lib
from model_fixtures import DEMO_DATA

# (data, fsdp, tensor); (1, 1, 1) runs on the first device only and is the reference.
MESHES = ((1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (2, 1, 4))


def small_dev_file(directory: str, rows: int = 64) -> str:
  """The first `rows` SST-2 dev sentences: one eval batch keeps the runs short."""
  path = os.path.join(directory, f"dev{rows}.tsv")
  with open(os.path.join(DEMO_DATA, "dev.tsv")) as f:
    lines = f.read().splitlines()[:rows + 1]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def scaleout_config(mesh_shape: Sequence[int], validation_file: str, steps: int = 20,
                    checkpoint: str | None = None) -> ml_collections.ConfigDict:
  """`checkpoint` (default the packaged MiniLM) on the SST-2 sample, lr 1e-4, `steps` steps."""
  c = default_config()
  c.update(model_name_or_path=checkpoint or hf.packaged_minilm_dir(), task_name="sst2",
           train_file=os.path.join(DEMO_DATA, "train.tsv"), validation_file=validation_file,
           max_seq_length=16, seq_buckets=(16,),  # SST-2 sentences average 13 tokens
           batch_size=16, eval_batch_size=64, learning_rate=1e-4, num_train_steps=steps,
           warmup_steps=2, log_every_steps=max(1, steps // 4), mesh_shape=tuple(mesh_shape))
  return c


_TRAIN_SPLITS: dict[Any, Any] = {}  # tokenized once per process: the same for every mesh


def _train_split(exp: experiment_lib.Experiment) -> data_lib.TokenizedSplit:
  key = (exp.config.train_file, exp.config.max_seq_length)
  if key not in _TRAIN_SPLITS:
    _TRAIN_SPLITS[key] = exp.tokenize(
        dataset_sources.read_split(exp.tasks[0].source, exp.task, "train", exp.label_names))
  return _TRAIN_SPLITS[key]


def run_mesh(mesh_shape: Sequence[int], validation_file: str, steps: int = 20,
             evaluate: bool = False, checkpoint: str | None = None) -> dict[str, Any]:
  """`steps` training steps on `mesh_shape` (all 8 devices; (1, 1, 1): the first one).

  Uses training's pieces as its loop does: the experiment and mesh, the state created
  on its shardings with the pre-trained weights, train_step jitted with the same in/out
  shardings, and the global batches of data.train_batch (training's batching path).
  Returns the per-step
  losses, the final parameters (on the host), the per-device bytes of parameters +
  optimizer state, every state array's PartitionSpec, the wall and CPU time and, with
  `evaluate`, the dev metrics.
  """
  from flaxbert_cls.training import starts  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import step as step_lib  # pylint: disable=g-import-not-at-top
  start, start_cpu = time.time(), _cpu_seconds()
  config = scaleout_config(mesh_shape, validation_file, steps, checkpoint)
  devices = jax.devices()[:1] if int(np.prod(mesh_shape)) == 1 else None
  exp = experiment_lib.build_experiment(config, devices=devices)
  split = _train_split(exp)
  order = data_lib.TrainOrder(split.lengths, config.batch_size, config.seed,
                              config.length_grouping_window)
  mixture = data_lib.TaskMixture([order], np.ones(1), config.seed)
  state, shardings, tx, schedule = starts.create_train_state(
      exp, steps, hf.resolve(config.model_name_or_path))

  def step_fn(state, batch):
    out = step_lib.train_step(state, batch, model=exp.model, tx=tx, schedule=schedule,
                           head_loss=exp.head_losses, dropout_seed=config.seed)
    return out[0], out[1]  # (state, metrics)

  jit_step = jax.jit(step_fn, in_shardings=(shardings, exp.batch_sharding),
                     out_shardings=(shardings, sharding_lib.replicated(exp.mesh)),
                     donate_argnums=0)
  losses = []
  for step in range(steps):
    batch = data_lib.train_batch([split], mixture, step, config.seq_buckets, config.max_seq_length,
                                 sharding=exp.batch_sharding)
    state, metrics = jit_step(state, data_lib.to_global(batch, exp.batch_sharding))
    losses.append(float(metrics.compute()["loss"]))
  result = {"losses": np.array(losses), "params": jax.device_get(state.params),
            "state_bytes": max_bytes_per_device(state),
            "specs": {jax.tree_util.keystr(path): leaf.sharding.spec for path, leaf in
                      jax.tree_util.tree_flatten_with_path(
                          {"params": state.params, "opt_state": state.opt_state})[0]}}
  if evaluate:
    eval_split = exp.tokenize(dataset_sources.read_split(
        experiment_lib.source_of(config), exp.task, "validation", exp.label_names))
    jit_eval = evaluate_lib.jit_eval_step(exp.model, shardings.params, exp.batch_sharding)
    result["eval"], _ = evaluate_lib.evaluate(exp, state.params, eval_split, jit_eval)
  result["seconds"], result["cpu_seconds"] = time.time() - start, _cpu_seconds() - start_cpu
  return result


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def state_bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Bytes each device holds of the arrays in `tree`, summed over their addressable shards."""
  per_device: dict[jax.Device, int] = collections.defaultdict(int)
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  return dict(per_device)


def max_bytes_per_device(state: Any) -> int:  # a TrainState
  """The largest per-device footprint of parameters + optimizer state."""
  return max(state_bytes_per_device((state.params, state.opt_state)).values())


def initial_state_bytes(mesh_shape: Sequence[int], validation_file: str,
                        checkpoint: str | None = None) -> int:
  """Per-device bytes of the freshly created (pre-trained) state on `mesh_shape`."""
  from flaxbert_cls.training import starts  # pylint: disable=g-import-not-at-top
  config = scaleout_config(mesh_shape, validation_file, checkpoint=checkpoint)
  exp = experiment_lib.build_experiment(config)
  state, _, _, _ = starts.create_train_state(exp, config.num_train_steps,
                                            hf.resolve(config.model_name_or_path))
  return max_bytes_per_device(state)


def max_param_diff(params: Any, reference: Any) -> float:
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, reference)
  return max(jax.tree.leaves(diffs))


def max_rel_loss_diff(losses: np.ndarray, reference: np.ndarray) -> float:
  return float(np.max(np.abs(losses - reference) / np.abs(reference)))
