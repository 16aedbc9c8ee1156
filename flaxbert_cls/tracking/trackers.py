"""Experiment trackers beside TensorBoard (config.report_to): MLflow as a scalar writer.

Process 0 opens one `TrackerWriter` per tracker; TrainLog's ScalarWriter hands them every
scalar it writes to TensorBoard, so the loop writes scalars as before. A writer only puts the
scalars in a bounded queue; a background thread sends them to the tracker (a backend:
mlflow_tracker.py), so a slow tracker never slows a step. A tracker that is unreachable or
refuses gives one warning line and is dropped: the run goes on. train_log.jsonl and
metrics.jsonl stay the record: `upload` (`flaxbert-cls track`) sends a finished or
interrupted run from them afterwards. A backend skips every (metric, step) its run already
holds, so a resumed run or `track` twice logs no step twice. tracking.json in the workdir
keeps each tracker's run ids (a resumed run continues its run) and the live run's tags.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import os
import queue
import threading
from typing import Any, Mapping

import jax
import ml_collections

from flaxbert_cls import config as config_lib
from flaxbert_cls import saved_config
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.decisions import tuning as decisions_lib
from flaxbert_cls.errors import UserError
from flaxbert_cls.tracking import mlflow_tracker

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
QUEUE_SIZE = 10_000  # scalar writes waiting for the tracker; beyond it they wait for `track`
CLOSE_TIMEOUT_S = 120.0  # at the end: how long the run waits for a tracker still sending
_URI_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def report_to(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The trackers a run logs to ('tensorboard' among them)."""
  names = tuple(config.report_to)
  return () if names == ("none",) else names


def mlflow_tracking_uri(config: ml_collections.ConfigDict) -> str:
  """config.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI; '' = MLflow's default."""
  return config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def check(config: ml_collections.ConfigDict) -> None:
  """A tracking URI MLflow cannot use is refused in one line before anything is read (the
  environment's: config.validate checks the keys)."""
  uri = mlflow_tracking_uri(config)
  if "mlflow" not in report_to(config) or not uri:
    return
  where = ("config.mlflow_tracking_uri" if config.mlflow_tracking_uri
           else "$MLFLOW_TRACKING_URI")
  scheme, sep, rest = uri.partition("://")
  if (sep and scheme.split("+")[0] not in _URI_SCHEMES) or (not sep and ":" in uri) or (
      scheme in ("http", "https") and not rest.split("/")[0]):
    raise UserError(f"{where}={uri!r}: not a tracking URI; use http(s)://HOST:PORT, "
                    "file:///DIR, sqlite:///FILE.db or a local directory")


@dataclasses.dataclass
class RunInfo:
  """What a tracker is told about a run, from its config: the same live and for `track`."""

  workdir: str
  name: str  # the workdir's base name
  experiment: str  # config.tracker_experiment, else the task name
  params: dict[str, str]  # the resolved config, flattened
  members: list[dict[str, Any]]  # a sweep's swept values per member; [] for one run
  member_params: list[dict[str, str]]
  tags: dict[str, str]


def flatten_config(config: ml_collections.ConfigDict | Mapping[str, Any], prefix: str = ""
                   ) -> dict[str, str]:
  """'key.sub' -> the value as text; sequences and None as JSON (config.json reads back the
  same text, so a run and its later `track` log equal params)."""
  flat = {}
  items = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  for key, value in items.items():
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    elif isinstance(value, (list, tuple)) or value is None:
      flat[f"{prefix}{key}"] = json.dumps(value)
    else:
      flat[f"{prefix}{key}"] = str(value)
  return flat


def package_version() -> str:
  try:
    return importlib.metadata.version("flaxbert-cls")
  except importlib.metadata.PackageNotFoundError:
    return "source"


def run_tags(mesh: jax.sharding.Mesh) -> dict[str, str]:
  """Package and jax versions, device kind and count, mesh shape."""
  devices = list(mesh.devices.flat)
  return {"flaxbert_cls.version": package_version(), "jax.version": jax.__version__,
          "device.kind": devices[0].device_kind, "device.count": str(len(devices)),
          "mesh.shape": json.dumps(dict(mesh.shape))}


def run_info(config: ml_collections.ConfigDict, workdir: str, tags: dict[str, str]) -> RunInfo:
  members = config_lib.grid(config)
  return RunInfo(
      workdir=workdir, name=os.path.basename(workdir.rstrip("/")) or workdir,
      experiment=config.tracker_experiment or config.task_name,
      params=flatten_config(config), members=members,
      member_params=[flatten_config(config_lib.member_config(config, m)) for m in members],
      tags=tags)


def read_state(workdir: str) -> dict[str, Any]:
  path = workdir_lib.join(workdir, TRACKING_FILE)
  if not workdir_lib.exists(path):
    return {}
  try:
    return json.loads(workdir_lib.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not JSON ({e}); delete it to start new tracker runs") from None


_state_lock = threading.Lock()


def update_state(workdir: str, tracker: str, key: str, value: Any) -> None:
  """Sets tracking.json's [tracker][key] (a run id per tracking URI, ...)."""
  with _state_lock:
    state = read_state(workdir)
    state.setdefault(tracker, {})[key] = value
    workdir_lib.write_text(workdir_lib.join(workdir, TRACKING_FILE), json.dumps(state, indent=2))


def artifact_paths(workdir: str, export_dir: str | None = None) -> list[tuple[str, str]]:
  """(local path, artifact folder) of what the run has written: the report page, decisions,
  eval predictions, the sweep table, an export folder."""
  candidates = [
      (workdir_lib.join(workdir, "report"), "report"),
      (workdir_lib.join(workdir, decisions_lib.DECISIONS_FILE), ""),
      (workdir_lib.join(workdir, workdir_lib.EVAL_DIR, workdir_lib.PREDICTIONS_FILE),
       workdir_lib.EVAL_DIR),
      (workdir_lib.join(workdir, workdir_lib.EVAL_DIR, workdir_lib.SUMMARY_FILE),
       workdir_lib.EVAL_DIR),
      (workdir_lib.join(workdir, workdir_lib.SWEEP_RESULTS_JSON), ""),
      (workdir_lib.join(workdir, workdir_lib.SWEEP_RESULTS_MARKDOWN), ""),
  ]
  if export_dir:
    candidates.append((export_dir, "export"))
  return [(path, folder) for path, folder in candidates
          if not workdir_lib.is_remote(path) and os.path.exists(path)]


def is_tracked(key: str) -> bool:
  """Only what the run's files hold (train_log.jsonl, metrics.jsonl) goes to a tracker."""
  return key.startswith(("train_", "eval_"))


class TrackerWriter:
  """A scalar writer (progress.ScalarWriter's interface) whose writes a background thread
  sends to one tracker's backend.

  The backend's methods (start, log, artifacts, end) run on that thread only, in order;
  the first one that raises gives one warning and the tracker is dropped for the run.
  """

  def __init__(self, name: str, backend: Any, workdir: str):
    self.name, self.backend, self.workdir = name, backend, workdir
    self.failed = False
    self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
    self._full_said = False
    self._thread = threading.Thread(target=self._work, name=f"tracker-{name}", daemon=True)
    self._thread.start()
    self._put("start")

  def _put(self, op: str, *args: Any) -> None:
    if self.failed:
      return
    try:
      self._queue.put_nowait((op, args))
    except queue.Full:
      if not self._full_said:
        self._full_said = True
        log.warning("%s is slower than training: later metrics wait for `flaxbert-cls track "
                    "--workdir=%s --report_to=%s` (%s has them)", self.name, self.workdir,
                    self.name, workdir_lib.METRICS_FILE)

  def _work(self) -> None:
    while True:
      op, args = self._queue.get()
      if op == "stop":
        return
      if op == "flush":
        args[0].set()
        continue
      if self.failed:
        continue
      try:
        getattr(self.backend, op)(*args)
      except Exception as e:  # pylint: disable=broad-except  (any tracker error: drop it, go on)
        self.failed = True
        detail = " ".join(str(e).split())[:300]
        log.warning("%s: %s failed (%s: %s); training goes on without it. %s has every "
                    "metric: `flaxbert-cls track --workdir=%s --report_to=%s` uploads the run "
                    "later", self.name, op, type(e).__name__, detail,
                    workdir_lib.METRICS_FILE, self.workdir, self.name)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    tracked = {k: float(v) for k, v in scalars.items() if is_tracked(k)}
    if tracked:
      self._put("log", int(step), tracked)

  def backfill(self, scalars_by_step: Mapping[int, Mapping[str, float]]) -> None:
    """Earlier steps read back from the run's files; the backend sends those it lacks."""
    self._put("log_steps", {step: {k: v for k, v in scalars.items() if is_tracked(k)}
                            for step, scalars in scalars_by_step.items()})

  def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Waits (at most `timeout`) until what was written so far has been sent."""
    done = threading.Event()
    self._put("flush", done)
    if not self.failed and not done.wait(timeout):
      self.failed = True  # a hung tracker: no more waiting at the run's end
      log.warning("%s: still sending after %.0f s; the run stops waiting for it. %s has every "
                  "metric: `flaxbert-cls track --workdir=%s --report_to=%s` uploads the rest",
                  self.name, timeout, workdir_lib.METRICS_FILE, self.workdir, self.name)

  def finish(self, artifacts: list[tuple[str, str]], status: str) -> None:
    """Uploads the artifacts, ends the tracker's run with `status`, stops the thread."""
    if artifacts:
      self._put("artifacts", artifacts)
    self._put("end", status)
    self.close()

  def close(self) -> None:
    self.flush()
    try:
      self._queue.put_nowait(("stop", ()))
    except queue.Full:  # a hung tracker's full queue: its daemon thread ends with the process
      return
    self._thread.join(timeout=5)


def _backend(name: str, info: RunInfo, uri: str) -> Any:
  """The tracker's backend; its run ids live in tracking.json under its name."""
  state = read_state(info.workdir).get(name, {})
  save = functools.partial(update_state, info.workdir, name)
  if name == "mlflow":
    return mlflow_tracker.MlflowBackend(info, uri, state, save)
  raise UserError(f"report_to {name!r}: no tracker backend")


TRACKER_NAMES = ("mlflow",)  # the trackers with a backend ('tensorboard' is TrainLog's own)


def open_writers(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str,
                 start_step: int = 0) -> list[TrackerWriter]:
  """Process 0: a writer per tracker in config.report_to (TensorBoard aside).

  A resumed run (`start_step` > 0) first sends what its files hold up to that step and the
  tracker lacks: a kill can stop the sending thread before the queue drained.
  """
  names = [n for n in report_to(config) if n in TRACKER_NAMES]
  if jax.process_index() != 0 or not names:
    return []
  tags = run_tags(mesh)
  update_state(workdir, "run", "tags", tags)  # `track` tags the runs it creates the same
  info = run_info(config, workdir, tags)
  writers = [TrackerWriter(n, _backend(n, info, mlflow_tracking_uri(config)), workdir)
             for n in names]
  earlier = {step: scalars for step, scalars in logged_scalars(workdir).items()
             if step <= start_step}
  for writer in writers if earlier else ():
    writer.backfill(earlier)
  return writers


def finish_writers(writers: list[TrackerWriter], workdir: str, finished: bool) -> None:
  """At the run's end: artifacts (a finished run's) and the runs' status."""
  for writer in writers:
    writer.finish(artifact_paths(workdir) if finished else [],
                  "FINISHED" if finished else "KILLED")


_NOT_METRICS = ("step", "member", "task", "split", *config_lib.SWEEP_KEYS)


def logged_scalars(workdir: str) -> dict[int, dict[str, float]]:
  """{step: scalars} as the run wrote them to its writers, read back from train_log.jsonl
  and metrics.jsonl (a step written twice, around a resume: its last values)."""
  by_step: dict[int, dict[str, float]] = {}

  def add(step: int, key: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      by_step.setdefault(int(step), {})[key] = float(value)

  for row in workdir_lib.read_jsonl(workdir_lib.join(workdir, workdir_lib.TRAIN_LOG_FILE)):
    for key, value in row.items():
      if key != "step":
        add(row["step"], f"train_{key}", value)
  for row in workdir_lib.read_jsonl(workdir_lib.join(workdir, workdir_lib.METRICS_FILE)):
    # The names TrainLog.write_eval gave: eval_[member<i>/][<task>/]<metric>; a multi-task
    # run's 'average' record holds its 'score'.
    prefix = "eval_" + "".join(f"{p}/" for p in (
        f"member{row['member']}" if "member" in row else "",
        row.get("task", "") if row.get("task") != "average" else "") if p)
    if row.get("task") == "average":
      add(row["step"], prefix + "average", row.get("score"))
      continue
    for key, value in row.items():
      if key not in _NOT_METRICS:
        add(row["step"], prefix + key, value)
  return dict(sorted(by_step.items()))


def upload(workdir: str, names: tuple[str, ...] | None = None, export_dir: str | None = None
           ) -> dict[str, dict[str, Any]]:
  """`flaxbert-cls track`: sends a run's params, every metric of its files and its artifacts
  to each tracker (default: its config's report_to); returns {tracker: what was sent}."""
  workdir = workdir_lib.resolve(workdir)
  config = saved_config.load_saved(workdir)
  names = tuple(names or [n for n in report_to(config) if n in TRACKER_NAMES])
  for name in names:
    if name not in TRACKER_NAMES:
      raise UserError(f"--report_to={name}: use one of {TRACKER_NAMES}")
  if not names:
    raise UserError(f"{workdir}: its config reports to no tracker; give --report_to=mlflow")
  checked = ml_collections.ConfigDict(config.to_dict())  # params stay the run's values
  with checked.unlocked():
    checked.report_to = names
  config_lib.validate(checked)  # an uninstalled tracker, in one line
  check(checked)
  info = run_info(config, workdir, read_state(workdir).get("run", {}).get("tags", {}))
  scalars = logged_scalars(workdir)
  sent = {}
  for name in names:
    backend = _backend(name, info, mlflow_tracking_uri(config))
    backend.start()
    backend.log_steps(scalars)
    backend.artifacts(artifact_paths(workdir, export_dir))
    backend.end("FINISHED")
    sent[name] = {"run_id": backend.run_id, "new_values": backend.new_values}
  return sent
