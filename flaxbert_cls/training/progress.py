"""What a run reports: progress bars or log lines, TensorBoard scalars, metrics files.

On a terminal (stderr is a TTY) process 0 draws live tqdm bars for training, evaluation
and predict, and log lines print above them; in a log file or a pipe the same figures
come as periodic log lines. Only process 0 writes files: train_log.jsonl (every train
log line) and metrics.jsonl (every evaluation). TensorBoard scalars go through
TensorBoard's own event writer on its TensorFlow stub (clu's writer, or TensorBoard's with
TensorFlow installed, imports TensorFlow: ~5 s and ~0.7 GB in every run); without the
tensorboard package, nowhere, said once.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import tempfile
import time
import types
from typing import Any, Sequence

import jax
import tqdm

from flaxbert_cls import workdir as workdir_lib

log = logging.getLogger(__name__)



def live_bars() -> bool:
  """Bars on a terminal, drawn by process 0 only; elsewhere (files, pipes, CI) log lines."""
  return jax.process_index() == 0 and sys.stderr.isatty()


class _AboveBars(logging.Handler):
  """Wraps a console log handler: its lines print above the live bars, not through them."""

  def __init__(self, inner: logging.Handler):
    super().__init__(inner.level)
    self.inner = inner

  def emit(self, record: logging.LogRecord) -> None:
    with tqdm.tqdm.external_write_mode(file=sys.stderr):
      self.inner.handle(record)


_open_bars: list[tqdm.tqdm] = []
_saved_handlers: list[logging.Handler] = []


def _open_bar(**kwargs: Any) -> tqdm.tqdm:
  """A tqdm bar on stderr; while any is open, the root logger's lines print above them."""
  if not _open_bars:
    root = logging.getLogger()
    _saved_handlers[:] = root.handlers
    root.handlers = [_AboveBars(h) for h in root.handlers]
  bar = tqdm.tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)
  _open_bars.append(bar)
  return bar


def _close_bar(bar: tqdm.tqdm) -> None:
  if bar not in _open_bars:
    return
  bar.close()
  _open_bars.remove(bar)
  if not _open_bars:
    logging.getLogger().handlers = list(_saved_handlers)


class BatchProgress:
  """`on_batch(done, total)` for `evaluate.gather_logits`: a bar on a terminal; elsewhere
  a log line every tenth of the batches (`log_lines`), or nothing."""

  def __init__(self, desc: str, log_lines: bool = False):
    self.desc, self.log_lines = desc, log_lines
    self._bar = None

  def __call__(self, done: int, total: int) -> None:
    if live_bars():
      if self._bar is None:
        # leave=False: an eval bar under the training bar disappears when it is done.
        self._bar = _open_bar(total=total, desc=self.desc, unit="batch", leave=False)
      self._bar.update(done - self._bar.n)
      if done == total:
        _close_bar(self._bar)
        self._bar = None
    elif self.log_lines and (done % max(1, total // 10) == 0 or done == total):
      log.info("%s: batch %d/%d", self.desc, done, total)


class ScalarWriter:
  """Scalars to TensorBoard event files in the workdir (process 0, unless `tensorboard` is
  off) and to `trackers` (tracking.py's writers). A remote workdir's events are written to a
  local directory and copied to the workdir at each flush."""

  def __init__(self, workdir: str, trackers: Sequence[Any] = (), tensorboard: bool = True):
    self._events, self._trackers = None, list(trackers)
    self._local, self._remote = workdir, None
    if jax.process_index() != 0 or not tensorboard:
      return
    # The events go to a local directory only (a remote workdir gets copies at each flush),
    # which TensorBoard's stub writes: its `notf` switch keeps TensorFlow out of the run.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    try:
      # pylint: disable=g-import-not-at-top
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
      log.info("tensorboard is not installed: no TensorBoard scalars (the log and %s have the "
               "metrics)", workdir_lib.METRICS_FILE)
      return
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    if workdir_lib.is_remote(workdir):
      self._local, self._remote = tempfile.mkdtemp(prefix="flaxbert_cls_events_"), workdir
    self._events = EventFileWriter(self._local)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._events is not None:
      values = [self._summary_pb2.Summary.Value(tag=name, simple_value=float(value))
                for name, value in scalars.items()]
      self._events.add_event(self._event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=self._summary_pb2.Summary(value=values)))
    for tracker in self._trackers:
      tracker.write_scalars(step, scalars)

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()
      if self._remote:
        for path in glob.glob(os.path.join(self._local, "events.out.tfevents.*")):
          with open(path, "rb") as f:
            workdir_lib.write_bytes(workdir_lib.join(self._remote, os.path.basename(path)),
                                    f.read())
    for tracker in self._trackers:
      tracker.flush()


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
         f"{seconds // 60}m{seconds % 60:02d}s"


class TrainLog:
  """Train metrics every `log_every` steps and every eval: bar or log line, scalars, files.

  On a terminal the bar (step/total, examples/s, loss, ETA) replaces the periodic train
  line, which goes to DEBUG; eval lines print above the bar.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int, log_every: int,
               trackers: Sequence[Any] = (), tensorboard: bool = True):
    """`trackers`: more writers (tracking.py's MLflow, ...) beside TensorBoard;
    `tensorboard=False` (config.report_to without it): the scalars go to the log only."""
    self.workdir = workdir
    self.total_steps, self.start_step = total_steps, start_step
    self.log_every = log_every
    self.history: list[tuple[int, float]] = []  # (step, mean train loss since the last line)
    self._metrics = None
    self.writer = ScalarWriter(workdir, trackers, tensorboard)
    self.t_start = self._t_last = time.time()
    self._last_logged = start_step
    self._bar = (_open_bar(total=total_steps, initial=start_step, desc="train", unit="step")
                 if live_bars() else None)

  def due(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total_steps

  def record(self, step: int, metrics: Any) -> None:
    """Accumulates one step's metrics (device arrays: no host sync until a log line)."""
    self._metrics = metrics if self._metrics is None else self._metrics.merge(metrics)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def write_train(self, step: int) -> None:
    now = time.time()
    summary = {k: float(v) for k, v in self._metrics.compute().items()}
    # The loss's count is the real examples trained on: packed steps hold varying numbers.
    summary["examples_per_sec"] = float(self._metrics.loss.count) / (now - self._t_last)
    self.history.append((step, summary["loss"]))
    eta = (self.total_steps - step) * (now - self.t_start) / (step - self.start_step)
    if self._bar is not None:
      self._bar.set_postfix_str(f"loss {summary['loss']:.4f}  acc {summary['accuracy']:.4f}  "
                                f"{summary['examples_per_sec']:.1f} examples/s")
    log.log(logging.DEBUG if self._bar is not None else logging.INFO,
            "step %d/%d  loss %.4f  acc %.4f  %.1f examples/s  ETA %s", step, self.total_steps,
            summary["loss"], summary["accuracy"], summary["examples_per_sec"],
            format_duration(eta))
    self.writer.write_scalars(step, {f"train_{k}": v for k, v in summary.items()})
    self._append(workdir_lib.TRAIN_LOG_FILE, {"step": step, **summary})
    self._metrics, self._t_last, self._last_logged = None, now, step

  def write_eval(self, step: int, metrics: dict[str, float], records: list[dict[str, Any]]
                 ) -> None:
    log.info("eval at step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    self.writer.write_scalars(step, {f"eval_{k}": v for k, v in metrics.items()})
    for record in records:
      self._append(workdir_lib.METRICS_FILE, {"step": step, **record})

  def _append(self, name: str, record: dict[str, Any]) -> None:
    if jax.process_index() == 0:
      workdir_lib.append_line(workdir_lib.join(self.workdir, name), json.dumps(record))

  def close(self) -> None:
    if self._bar is not None:
      _close_bar(self._bar)
      self._bar = None
    self.writer.flush()


class RowProgress:
  """Examples done of an expected total (e.g. a file's lines): on a terminal a tqdm bar with
  rate and ETA; elsewhere a log line every tenth of the total, with examples/s and ETA."""

  def __init__(self, desc: str, total: int):
    self.desc, self.total = desc, max(1, total)
    self._start = time.time()
    self._next_line = self.total // 10
    self._bar = _open_bar(total=self.total, desc=desc, unit="ex") if live_bars() else None

  def update(self, done: int) -> None:
    if self._bar is not None:
      self._bar.update(done - self._bar.n)
    elif jax.process_index() == 0 and done >= self._next_line:
      rate = done / max(time.time() - self._start, 1e-9)
      log.info("%s: %d/%d examples  %.1f examples/s  ETA %s", self.desc, done, self.total,
               rate, format_duration(max(0, self.total - done) / max(rate, 1e-9)))
      self._next_line = done + self.total // 10

  def close(self) -> None:
    if self._bar is not None:
      _close_bar(self._bar)
      self._bar = None
