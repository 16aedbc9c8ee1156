"""Fine-tuning: create the sharded state -> one jitted train step -> the loop.

Reads like Flax's lm1b: `train_and_evaluate(config, workdir)` is the whole run. The
experiment (model, tasks, mesh) is `experiment.py`'s, the state `starts.py`'s, the step
`step.py`'s, the batches `batches.py`'s, resuming and saving `resume.py`'s; a sweep is the
same loop over a stacked layout (`layouts.py`).
"""

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import ml_collections

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.decisions import baseline as baseline_lib
from flaxbert_cls.decisions import tuning as decisions_lib
from flaxbert_cls.training import selection
from flaxbert_cls.training import batches as batches_lib
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import evaluate as evaluate_lib
from flaxbert_cls.training import experiment as experiment_lib
from flaxbert_cls.training import layouts
from flaxbert_cls.training import programs
from flaxbert_cls.training import progress as progress_lib
from flaxbert_cls.training import resume
from flaxbert_cls.tracking import trackers as tracking

log = logging.getLogger(__name__)


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache (every program, however fast to compile)."""
  if not directory:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class Run:
  """What the loop starts from: the experiment, its layout, data, state and programs."""

  exp: experiment_lib.Experiment
  layout: layouts.SingleRun
  train_splits: list[data_lib.TokenizedSplit]
  eval_data: list[tuple[Any, data_lib.TokenizedSplit]]
  mixture: data_lib.TaskMixture
  total_steps: int
  ckpt: checkpoint_lib.Checkpoints
  run_meta: dict[str, Any]
  best: selection.Bests
  state: Any
  jit_train: Callable
  jit_eval: Callable
  baseline: baseline_lib.Pending = dataclasses.field(default_factory=baseline_lib.Pending)


def setup(config: ml_collections.ConfigDict, workdir: str,
          devices: list[jax.Device] | None = None) -> Run:
  """Experiment -> data -> state (restored, or fresh with the start's weights) -> programs."""
  enable_compilation_cache(config.compilation_cache_dir)
  exp = experiment_lib.build_experiment(config, devices=devices)
  decisions_lib.check_run(exp)
  train_data = experiment_lib.read_examples_tokenized(exp, "train")
  train_splits = [split for _, split in train_data]
  experiment_lib.resolve_class_balance(exp, [split.labels for split in train_splits])
  selection.choose_selection_metrics(exp, [split.labels for split in train_splits])
  eval_data = experiment_lib.read_examples_tokenized(exp, "validation")
  # In a thread from here: it overlaps the state's creation and the first compile.
  baseline = baseline_lib.start(exp, workdir, train_data[0][0], eval_data[0][0],
                                jax.process_index())
  layout = layouts.for_experiment(exp)
  mixture = batches_lib.task_mixture(exp, train_splits)
  total_steps = batches_lib.total_steps(config, mixture)
  ckpt = checkpoint_lib.Checkpoints(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                    keep_best=config.keep_best_checkpoints,
                                    members=len(exp.members))
  run_meta = resume.run_meta(exp, total_steps, train_splits)
  best = layout.tracker()
  state, state_shardings, tx, schedule = resume.restore_or_init(exp, ckpt, run_meta, best)
  jit_train = programs.preloaded(layout.jit_step(state, state_shardings, tx, schedule,
                                                 total_steps), "train", exp.config, exp.mesh)
  jit_eval = programs.preloaded(evaluate_lib.jit_eval_step(
      exp.model, exp.abstract_params()[1], exp.batch_sharding, config.window_pooling), "eval",
      exp.config, exp.mesh)
  resume.write_run_files(exp, workdir)
  return Run(exp, layout, train_splits, eval_data, mixture, total_steps, ckpt, run_meta, best,
             state, jit_train, jit_eval, baseline)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Fine-tunes per `config` in `workdir`, resuming its latest checkpoint (unless resume=False);
  returns {'step', 'eval', 'train_log', 'state', 'best', 'seconds'} (a sweep: and 'sweep')."""
  workdir = workdir_lib.prepare(workdir)
  tracking.check(config)  # a malformed tracking URI: refused before any data is read
  run = setup(resume.with_cache_dir(config, workdir), workdir, devices)
  config, state, best, ckpt, total_steps = (run.exp.config, run.state, run.best, run.ckpt,
                                            run.total_steps)
  start_step = int(state.step)
  batches = run.layout.batches(run.train_splits, run.mixture, range(start_step, total_steps))
  trackers = tracking.open_writers(config, run.exp.mesh, workdir, start_step)
  train_log = progress_lib.TrainLog(
      workdir, total_steps, start_step, config.log_every_steps, trackers,
      "tensorboard" in tracking.report_to(config))
  finite = resume.FiniteGuard(config.nonfinite_policy, ckpt)
  preemption = resume.PreemptionWatcher(config.log_every_steps)
  save_timer = resume.SaveTimer(config.checkpoint_every_minutes, config.log_every_steps)
  log.info("Training steps %d..%d (%d per epoch) of %d %s on a %s mesh.", start_step + 1,
           total_steps, run.mixture.steps_per_epoch, config.batch_size,
           f"packed rows of {config.max_seq_length} tokens" if config.packing else "examples",
           dict(run.exp.mesh.shape))
  eval_metrics, finished = {}, False
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, step_metrics, step_finite = run.jit_train(state, next(batches))
      finite.check_later(step, step_finite)
      train_log.record(step, step_metrics)
      if train_log.due(step):
        finite.check_now()
        train_log.write_train(step)
      evaluated = resume.eval_due(config, step, total_steps)
      if evaluated:
        eval_metrics = _evaluate(run, state.params, step, train_log, workdir)
      preempted = preemption.reached(step)
      # After every eval too: best-k checkpoints need the evaluated step on disk.
      if preempted or evaluated or resume.checkpoint_due(config, step, total_steps, save_timer):
        resume.save(ckpt, step, state, {**run.run_meta, **best.state()},
                    best.checkpoint_metric() if evaluated else None)
      if preempted:
        resume.exit_preempted(ckpt, step)
      if best.should_stop:
        break
    result = _finish(run.layout, state, eval_metrics, train_log, best, workdir)
    finished = True
  finally:
    preemption.close()
    ckpt.close()
    train_log.close()
    tracking.finish_writers(trackers, workdir, finished)  # after the sweep table is written
  return result


def _evaluate(run: Run, params: Any, step: int, train_log: progress_lib.TrainLog,
              workdir: str) -> dict[str, float]:
  """Every member's dev metrics (every task's), logged and tracked; a new best also writes
  workdir/eval/ (predictions and errors: the report page reads them without evaluating)."""
  exp, layout, eval_data, best = run.exp, run.layout, run.eval_data, run.best
  splits = [split for _, split in eval_data]
  flat, member_metrics, member_logits = {}, [], []
  baseline = run.baseline.metrics()  # the same rows' TF-IDF scores, beside each member's
  for member, member_params in layout.each_member(params):
    metrics, records, logits = evaluate_lib.evaluate_tasks(exp, member_params, splits, run.jit_eval)
    fitted = layout.decide(workdir, step, logits[0], splits[0].labels)
    metrics.update(fitted)
    records[0].update(fitted)
    named, records = layout.named(member, metrics, records)
    named = {**named, **baseline}
    records = [{**records[0], **baseline}, *records[1:]]
    train_log.write_eval(step, named, records)
    flat.update(named)
    member_metrics.append(metrics)
    member_logits.append(logits)
  best.update(step, member_metrics)
  if best.best and best.best["step"] == step and jax.process_index() == 0:
    member = best.best_member()
    evaluate_lib.write_eval_files(workdir, exp, [examples for examples, _ in eval_data],
                                  member_logits[member], {**member_metrics[member], **baseline},
                                  step, step)
  return flat


def _finish(layout: layouts.SingleRun, state: Any, eval_metrics: dict[str, float],
            train_log: progress_lib.TrainLog, best: selection.Bests, workdir: str
            ) -> dict[str, Any]:
  if best.best:
    log.info("Best %s %.4f at step %d%s: %s", best.key, best.best["metrics"][best.key],
             best.best["step"], f" (member {best.best['member']})" if "member" in best.best
             else "", evaluate_lib.format_metrics(best.best["metrics"]))
  seconds = time.time() - train_log.t_start
  log.info("Done in %s.", progress_lib.format_duration(seconds))
  result = {"step": int(state.step), "eval": eval_metrics, "train_log": train_log.history,
            "state": state, "best": best.best, "seconds": seconds}
  sweep = layout.results(best, workdir)
  if sweep:
    log.info("Sweep (%d members), %s per setting over seeds:\n%s", len(layout.exp.members),
             best.key, sweep.pop("sweep_markdown"))
    result.update(sweep)
  return result
