r"""Step time with an MLflow tracker against none, in the same process and machine.

  python tools/bench_tracking.py [--steps=40] [--rounds=2] [--batch=16]

Starts a local `mlflow server` (sqlite store), then fine-tunes the packaged MiniLM on the
repo's SST-2 sample with report_to=('none',) and ('mlflow',), alternating, `--rounds` times
each (alternating spreads a loaded machine's drift over both). log_every_steps=1: a tracker
write every step, the worst case. Step time: the median of batch / examples-per-second over
the train log lines, without the first 3 steps (compiling). Prints each mode's median and
mlflow / none.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import common


def _server(root: str) -> tuple[subprocess.Popen, str]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                           f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
                           f"{root}/artifacts", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "1"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  uri = f"http://127.0.0.1:{port}"
  deadline = time.time() + 300
  while time.time() < deadline:
    try:
      if urllib.request.urlopen(f"{uri}/health", timeout=2).read() == b"OK":
        return proc, uri
    except OSError:
      time.sleep(1)
  proc.kill()
  raise SystemExit("mlflow server did not answer /health in 300 s")


def _step_seconds(workdir: str, batch: int) -> list[float]:
  with open(os.path.join(workdir, "train_log.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [batch / r["examples_per_sec"] for r in rows if r["step"] > 3]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--batch", type=int, default=16)
  args = parser.parse_args()
  from flaxbert_cls.training import train  # pylint: disable=g-import-not-at-top

  root = tempfile.mkdtemp(prefix="bench_tracking_")
  proc, uri = _server(root)
  dev = os.path.join(root, "dev.tsv")  # a small dev set: the end-of-run eval is not timed
  with open(os.path.join(common.DEMO_DATA, "dev.tsv")) as f:
    open(dev, "w").writelines(f.readlines()[:65])
  times: dict[str, list[float]] = {"none": [], "mlflow": []}
  try:
    for round_ in range(args.rounds):
      for mode in times:
        workdir = os.path.join(root, f"{mode}{round_}")
        config = common.short_run_config(
            args.steps, train_file=os.path.join(common.DEMO_DATA, "train.tsv"),
            validation_file=dev, batch_size=args.batch, eval_batch_size=64, log_every_steps=1,
            checkpoint_every_steps=10_000, seq_buckets=(64,), report_to=(mode,),
            mlflow_tracking_uri=uri, keep_best_checkpoints=0)
        train.train_and_evaluate(config, workdir)
        step = statistics.median(_step_seconds(workdir, args.batch))
        times[mode].append(step)
        print(f"round {round_} {mode:6s}: median step {1e3 * step:.1f} ms", flush=True)
  finally:
    proc.terminate()
  none, mlflow = statistics.median(times["none"]), statistics.median(times["mlflow"])
  print(json.dumps({"steps": args.steps, "rounds": args.rounds, "batch": args.batch,
                    "none_ms": round(1e3 * none, 1), "mlflow_ms": round(1e3 * mlflow, 1),
                    "mlflow_over_none": round(mlflow / none, 4)}))


if __name__ == "__main__":
  main()
