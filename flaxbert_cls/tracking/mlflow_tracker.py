"""MLflow as a tracker backend (tracking.py runs it on its writer's thread, or for `track`).

One MLflow run per workdir, named after it, in the experiment config.tracker_experiment
(default: the task name). A sweep is a parent run with one nested run per member (the
member's own config as params, its eval metrics, 'eval_member<i>/x' logged as 'eval_x').
The run ids are kept in tracking.json per tracking URI: a resumed run, or `track` after it,
continues the same runs. Before logging, the backend reads which (metric, step) the runs
already hold and sends only the others: no step is logged twice.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

_BATCH = 1000  # MLflow's limit of metrics per log_batch (100 params)
_MEMBER_KEY = re.compile(r"^(train|eval)_member(\d+)/(.+)$")


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
  return [items[i:i + size] for i in range(0, len(items), size)]


class MlflowBackend:
  """start -> log ... -> artifacts -> end, on one thread. `info`: tracking.RunInfo; `state`
  and `save(key, value)`: this tracker's part of tracking.json."""

  def __init__(self, info: Any, uri: str, state: dict[str, Any],
               save: Callable[[str, Any], None]):
    # Fail within seconds, not minutes, on a server that is down (MLflow retries 7 times
    # with exponential backoff by default); a user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    self.info, self.uri, self.state, self.save = info, uri, state, save
    self.run_id = ""
    self.member_ids: list[str] = []
    self.new_values = 0  # metric values sent by this backend (0: `track` had nothing new)
    self._seen: set[tuple[str, str, int]] = set()
    self._client = None

  def start(self) -> None:
    """Connects, creates the runs (or continues those in tracking.json), logs params/tags."""
    import mlflow  # pylint: disable=g-import-not-at-top  (slow import: only when tracking)
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
    client = self._client = MlflowClient(tracking_uri=self.uri or None)
    where = mlflow.get_tracking_uri() if not self.uri else self.uri
    saved = self.state.get("runs", {}).get(self.uri or "default", {})
    experiment = client.get_experiment_by_name(self.info.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(self.info.experiment))
    self.run_id = self._continue_or_create(saved.get("run_id"), experiment_id, self.info.name,
                                           {**self.info.tags, "workdir": self.info.workdir})
    self.member_ids = []
    for i, values in enumerate(self.info.members):
      old = saved.get("members", [])
      self.member_ids.append(self._continue_or_create(
          old[i] if i < len(old) else None, experiment_id, f"{self.info.name}/member{i}",
          {**self.info.tags, "mlflow.parentRunId": self.run_id, "member": str(i),
           **{k: str(v) for k, v in values.items()}}))
    runs = dict(self.state.get("runs", {}))
    runs[self.uri or "default"] = {"run_id": self.run_id, "members": self.member_ids,
                                   "experiment_id": experiment_id}
    self.save("runs", runs)
    self._log_params(self.run_id, self.info.params)
    for run_id, params in zip(self.member_ids, self.info.member_params):
      self._log_params(run_id, params)
    log.info("mlflow: run %s in experiment %r at %s", self.run_id, self.info.experiment, where)

  def _continue_or_create(self, run_id: str | None, experiment_id: str, name: str,
                          tags: dict[str, str]) -> str:
    """The saved run set RUNNING again with the steps it holds read; else a new run."""
    from mlflow.entities import RunStatus  # pylint: disable=g-import-not-at-top
    from mlflow.exceptions import MlflowException  # pylint: disable=g-import-not-at-top
    client = self._client
    if run_id:
      try:
        run = client.get_run(run_id)
      except MlflowException:  # deleted on the server, or another server: a new run
        run = None
      if run is not None and run.info.lifecycle_stage == "active":
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        for key in run.data.metrics:
          self._seen.update((run_id, key, m.step) for m in client.get_metric_history(run_id, key))
        return run_id
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

  def _log_params(self, run_id: str, params: dict[str, str]) -> None:
    """Params not on the run yet (MLflow's params cannot change: a resumed run whose config
    changed a value keeps the first one, said once)."""
    from mlflow.entities import Param  # pylint: disable=g-import-not-at-top
    existing = self._client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
      log.warning("mlflow: run %s keeps its first values of %s (the config changed them)",
                  run_id, ", ".join(changed))
    # MLflow caps a param value's length (6000 characters); longer ones are cut, marked.
    new = [Param(k, v if len(v) <= 6000 else v[:5990] + " ...[cut]")
           for k, v in params.items() if k not in existing]
    for chunk in _chunks(new, 100):
      self._client.log_batch(run_id, params=chunk)

  def _route(self, key: str) -> tuple[str, str]:
    """(run id, metric name): a sweep member's metrics go to its nested run."""
    match = _MEMBER_KEY.match(key)
    if match and int(match.group(2)) < len(self.member_ids):
      return self.member_ids[int(match.group(2))], f"{match.group(1)}_{match.group(3)}"
    return self.run_id, key

  def log(self, step: int, scalars: dict[str, float]) -> None:
    self.log_steps({step: scalars})

  def log_steps(self, scalars_by_step: dict[int, dict[str, float]]) -> None:
    """Every (metric, step) the runs do not hold yet, in batches."""
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top
    now = int(time.time() * 1000)
    by_run: dict[str, list[Any]] = {}
    for step, scalars in scalars_by_step.items():
      for key, value in scalars.items():
        run_id, name = self._route(key)
        if (run_id, name, step) not in self._seen:
          self._seen.add((run_id, name, step))
          by_run.setdefault(run_id, []).append(Metric(name, value, now, step))
    for run_id, metrics in by_run.items():
      for chunk in _chunks(metrics, _BATCH):
        self._client.log_batch(run_id, metrics=chunk)
        self.new_values += len(chunk)

  def artifacts(self, paths: list[tuple[str, str]]) -> None:
    """(local file or folder, artifact folder) to the parent run; a same-named one is
    replaced, so uploading again changes nothing."""
    for path, folder in paths:
      if os.path.isdir(path):
        self._client.log_artifacts(self.run_id, path, artifact_path=folder or None)
      else:
        self._client.log_artifact(self.run_id, path, artifact_path=folder or None)

  def end(self, status: str) -> None:
    for run_id in [*self.member_ids, self.run_id]:
      self._client.set_terminated(run_id, status=status)
