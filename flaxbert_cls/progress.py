"""What the training loop reports: log lines, TensorBoard scalars and metrics.jsonl.

Only process 0 writes files. TensorBoard scalars go through clu's writer, which needs
TensorFlow; without it (e.g. a GPU image with jax only) through tensorboardX when that
is installed, else nowhere, said once: eval records still land in metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax

from flaxbert_cls import workdir as workdir_lib

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class _TensorboardXWriter:
  """clu's MetricWriter subset the loop uses, on tensorboardX (no TensorFlow); or a no-op."""

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() != 0:
      return
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError:
      log.info("TensorFlow and tensorboardX are not installed: no TensorBoard scalars (the log "
               "and %s have the metrics)", METRICS_FILE)
      return
    log.info("TensorFlow is not installed: TensorBoard scalars through tensorboardX")
    self._writer = tensorboardX.SummaryWriter(workdir)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._writer is not None:
      for name, value in scalars.items():
        self._writer.add_scalar(name, value, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
         f"{seconds // 60}m{seconds % 60:02d}s"


class TrainLog:
  """Train metrics every `log_every` steps and every eval: log line, scalars, metrics.jsonl."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, batch_size: int,
               log_every: int):
    self.workdir = workdir
    self.total_steps, self.start_step = total_steps, start_step
    self.batch_size, self.log_every = batch_size, log_every
    self.history: list[tuple[int, float]] = []  # (step, mean train loss since the last line)
    self._metrics = None
    self._report = None
    try:
      # clu's writers import TensorFlow (~0.7 GB resident): only the loop needs them.
      from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.writer = _TensorboardXWriter(workdir)
    else:
      self.writer = metric_writers.create_default_writer(
          workdir, just_logging=jax.process_index() > 0, asynchronous=False)
      self._report = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                                     writer=self.writer)
    self.t_start = self._t_last = time.time()
    self._last_logged = start_step

  def due(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total_steps

  def record(self, step: int, metrics: Any) -> None:
    """Accumulates one step's metrics (device arrays: no host sync until a log line)."""
    self._metrics = metrics if self._metrics is None else self._metrics.merge(metrics)
    if self._report is not None:
      self._report(step)

  def write_train(self, step: int) -> None:
    now = time.time()
    summary = {k: float(v) for k, v in self._metrics.compute().items()}
    summary["examples_per_sec"] = (step - self._last_logged) * self.batch_size / (now - self._t_last)
    self.history.append((step, summary["loss"]))
    eta = (self.total_steps - step) * (now - self.t_start) / (step - self.start_step)
    log.info("step %d/%d  loss %.4f  acc %.4f  %.1f examples/s  ETA %s", step, self.total_steps,
             summary["loss"], summary["accuracy"], summary["examples_per_sec"],
             format_duration(eta))
    self.writer.write_scalars(step, {f"train_{k}": v for k, v in summary.items()})
    self._metrics, self._t_last, self._last_logged = None, now, step

  def write_eval(self, step: int, metrics: dict[str, float], records: list[dict[str, Any]]
                 ) -> None:
    log.info("eval at step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    self.writer.write_scalars(step, {f"eval_{k}": v for k, v in metrics.items()})
    if jax.process_index() == 0:
      for record in records:
        workdir_lib.append_line(workdir_lib.join(self.workdir, METRICS_FILE),
                                json.dumps({"step": step, **record}))

  def close(self) -> None:
    self.writer.flush()
