r"""One-GPU check: numerics against the CPU, the CLI end to end, speed against PyTorch.

  bash tools/gpu_check.sh                     # on the GPU machine (how: tools/gpu_check.sh)
  python benchmarks/gpu_check.py [--smoke] [--sections=numerics,cli,bench] [--json=PATH]
  python benchmarks/gpu_check.py --sections=sweep  # opt-in (~1-2 min): N=8 MiniLM sweep vs 1 member

Sections, each in its own subprocess with its own timeout (numerics and cli side by
side, then bench alone); a failure is recorded in the JSON and the others still run:

  numerics  gpu_numerics.py: random-init BERT-base, bf16 (auto attention: cuDNN) on the
            GPU against float32 on the CPU: logits, gradients, loss after 50 train steps
  cli       `python -m flaxbert_cls.cli` train, eval and predict on a tiny random BERT
            (with the carried MiniLM tokenizer) and synthetic sentences, with
            --config.dtype=bfloat16 --config.attention_impl=cudnn --config.attention_dropout=0.0
  bench     benchmarks/bench.py's workers: BERT-base, seq 128, bf16 train step at batch 32 and
            larger ones while time is left, ours and PyTorch (bf16 autocast + SDPA): step
            time, the ratio, MFU, peak device memory, the card

  sweep     (not in the default list, which must stay near 5 minutes) benchmarks/bench_sweep.py:
            8 MiniLM members (random weights, the carried config) in one program against
            one member alone, bf16, batch 32 x 128: examples/s ratio (target >= 3), memory

--smoke: the same on a CPU machine with BERT-Tiny and 2-3 steps, without the cuDNN flag,
and PyTorch only where it has CUDA (or with --torch_on_cpu); it tests the plumbing, not
speed, so XLA compiles with most optimizations off (faster). The JSON goes to --json,
else $OUT/gpu_check.json where OUT is set, else gpu_check.json in the repository root.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable

import bench
import bench_torch
import common
import gpu_numerics

TOKENIZER_DIR = os.path.join(common.REPO, ".gpu_check", "tokenizer")  # gpu_check.sh --prepare
MODES = {
    "gpu": dict(
        numerics=dict(model="bert-base", batch=8, seq=32, steps=50),  # CPU: 0.13 TFLOP/step
        cli=dict(steps=60, hidden=128, heads=2, min_accuracy=0.75),  # head dim 64: cuDNN's
        bench=dict(model="bert-base", seq=128, batches=(32, 128, 256, 64), steps=20, warmup=3),
        # Worst case 150 + 120 + 35 s; with the wheels' install, about 5 minutes (H100, 2026-12-06:
        # cli 102 s of which eval 24 s, mostly its compiles, bench_jax 96 s, compile 41 s).
        timeouts=dict(numerics=105, cli=150, bench_jax=120, bench_torch=35, sweep=150),
        budget=310,
        sweep=dict(model=TOKENIZER_DIR, members=8, batch=32, seq=128, steps=10, warmup=2,
                   dtype="bfloat16", min_speedup=3.0)),
    "smoke": dict(
        numerics=dict(model="bert-tiny", batch=4, seq=16, steps=3),
        cli=dict(steps=3, hidden=32, heads=2, min_accuracy=0.0),
        bench=dict(model="bert-tiny", seq=32, batches=(8,), steps=2, warmup=1),  # 1 compile
        timeouts=dict(numerics=120, cli=300, bench_jax=120, bench_torch=90, sweep=300),
        budget=600,
        sweep=dict(model="bert-tiny", members=2, batch=8, seq=32, steps=2, warmup=1,
                   dtype="float32", min_speedup=0.0)),
}
# What flaxbert_cls imports for train/eval/predict (gpu_check.sh carries the missing ones).
IMPORTS = ("absl", "clu", "etils", "flax", "huggingface_hub", "jax", "ml_collections", "numpy",
           "optax", "orbax.checkpoint", "safetensors", "scipy", "sklearn", "tokenizers",
           "tqdm", "transformers", "wrapt", "yaml")
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "transformers", "torch", "ml-collections", "clu", "numpy")


def environment() -> dict[str, Any]:
  """Versions, missing imports and the card, without starting jax here (bench needs the GPU)."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  missing = []
  for module in IMPORTS:
    try:
      found = importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package
      found = False
    if not found:
      missing.append(module)
  try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=20, check=False).stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    gpu = ""
  return dict(python=sys.version.split()[0], cpu_count=os.cpu_count(), packages=versions,
              missing_modules=missing, nvidia_smi=gpu or None)


# ------------------------------------------------------------------- sections


def section_numerics(settings: dict, args: argparse.Namespace) -> dict[str, Any]:
  """gpu_numerics.run with the attention training picks (cuDNN on a GPU in bf16)."""
  return gpu_numerics.run(**settings["numerics"])


WORDS = (("bad", "awful", "boring", "dull", "clumsy", "tedious"),  # label 0, as SST-2's
         ("good", "great", "wonderful", "moving", "superb", "charming"))
NOUNS = ("film", "story", "cast", "plot", "ending", "score", "script", "director")


def write_sentences(path: str, rows: int, seed: int) -> str:
  """An SST-2-style TSV (sentence, label): the label is the adjectives' sentiment."""
  rng = random.Random(seed)
  lines = ["sentence\tlabel"]
  for _ in range(rows):
    label = rng.randint(0, 1)
    words = rng.sample(WORDS[label], 2)
    lines.append(f"the {rng.choice(NOUNS)} is {words[0]} and the {rng.choice(NOUNS)} "
                 f"feels {words[1]}\t{label}")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def section_cli(settings: dict, args: argparse.Namespace) -> dict[str, Any]:
  """train / eval / predict through the CLI, each a subprocess; partial results saved."""
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(common.REPO, "tests"))
  from model_fixtures import make_tiny_checkpoint  # pylint: disable=g-import-not-at-top

  s = settings["cli"]
  tokenizer = TOKENIZER_DIR if os.path.isdir(TOKENIZER_DIR) else hf.packaged_minilm_dir()
  gpu = jax.devices()[0].platform == "gpu"
  work = tempfile.mkdtemp(prefix="flaxbert_gpu_check_")
  checkpoint = make_tiny_checkpoint(os.path.join(work, "tiny"), hidden=s["hidden"], layers=2,
                                    heads=s["heads"], source=tokenizer)
  train_tsv = write_sentences(os.path.join(work, "train.tsv"), 480, 0)
  dev_tsv = write_sentences(os.path.join(work, "dev.tsv"), 96, 1)
  workdir, predictions = os.path.join(work, "run"), os.path.join(work, "predictions.jsonl")
  overrides = dict(model_name_or_path=checkpoint, task_name="sst2", train_file=train_tsv,
                   validation_file=dev_tsv, max_seq_length=32, seq_buckets="(16,32)",
                   batch_size=32, eval_batch_size=32, num_train_steps=s["steps"],
                   warmup_steps=2, learning_rate=1e-3, log_every_steps=max(1, s["steps"] // 3),
                   compilation_cache_dir=os.path.join(work, "jax_cache"), dtype="bfloat16", attention_dropout=0.0,
                   **({"attention_impl": "cudnn"} if gpu else {}))
  commands = {
      "train": ["train", f"--workdir={workdir}", "--config=configs/default.py"]
               + [f"--config.{k}={v}" for k, v in overrides.items()],
      "eval": ["eval", f"--workdir={workdir}"],
      "predict": ["predict", f"--model={workdir}", f"--input={dev_tsv}", f"--output={predictions}"],
  }
  result = dict(device=str(jax.devices()[0]), flags=commands["train"][3:], commands={})
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [common.REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  for name, argv in commands.items():
    start = time.perf_counter()
    try:
      out = subprocess.run([sys.executable, "-m", "flaxbert_cls.cli", *argv], cwd=common.REPO,
                           env=env, capture_output=True, text=True, check=False,
                           timeout=max(5.0, args.deadline - time.time()))
    except subprocess.TimeoutExpired as e:  # the section's time is up: keep what ran
      text = [x.decode(errors="replace") if isinstance(x, bytes) else x or ""
              for x in (e.stdout, e.stderr)]  # bytes even with text=True
      out = subprocess.CompletedProcess(e.cmd, "timeout", *text)
    record = dict(exit_code=out.returncode, seconds=round(time.perf_counter() - start, 1))
    prefix = {"train": "dev:", "eval": "eval:", "predict": "predicted:"}[name]
    lines = [l for l in out.stdout.splitlines() if l.startswith(prefix)]
    if lines:
      record["output"] = lines[-1]
      metrics = {k: float(v) for k, v in re.findall(r"(\S+)=([-\d.e]+)", lines[-1])}
      if metrics:
        record["metrics"] = metrics
    if out.returncode:
      record["stderr_tail"] = out.stderr[-2000:]
    result["commands"][name] = record
    args.save(result)
    if out.returncode:
      break
  accuracy = result["commands"].get("eval", {}).get("metrics", {}).get("accuracy")
  rows = result["commands"].get("predict", {}).get("output", "")
  result["passed"] = (len(result["commands"]) == 3
                      and all(c["exit_code"] == 0 for c in result["commands"].values())
                      and accuracy is not None and accuracy >= s["min_accuracy"]
                      and rows.startswith("predicted: 96 rows"))
  if result["passed"]:
    shutil.rmtree(work, ignore_errors=True)
  else:
    result["work_dir"] = work  # checkpoint, data and run, to look at
  return result


def _bench_args(settings: dict, batches: str = "") -> argparse.Namespace:
  b = settings["bench"]
  args = bench.build_parser().parse_args(
      [f"--model={b['model']}", f"--seq={b['seq']}", "--dtype=bfloat16",
       f"--steps={b['steps']}", f"--warmup={b['warmup']}"])
  args.batches = [int(x) for x in batches.split(",") if x] or list(b["batches"])
  return args


def section_bench_jax(settings: dict, args: argparse.Namespace) -> dict[str, Any]:
  bench_args = _bench_args(settings)
  def progress(results: list) -> None:
    print(json.dumps(results[-1]), flush=True)  # the log shows each batch as it ends
    args.save(dict(results=results))
  return dict(results=bench.run_jax_batches(bench_args, bench_args.batches, args.deadline,
                                            progress))


def section_bench_torch(settings: dict, args: argparse.Namespace) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  if not torch.cuda.is_available() and not args.torch_on_cpu:
    return dict(status="skipped", reason=f"torch {torch.__version__} has no CUDA")
  bench_args = _bench_args(settings, args.batches)
  return dict(results=bench_torch.run_torch_batches(bench_args, bench_args.batches,
                                                    args.deadline,
                                                    lambda r: args.save(dict(results=r))))


def section_sweep(settings: dict, args: argparse.Namespace) -> dict[str, Any]:
  """N members in one program against one member alone (benchmarks/bench_sweep.py's workers)."""
  import bench_sweep  # pylint: disable=g-import-not-at-top
  s = settings["sweep"]
  result = bench_sweep.compare(argparse.Namespace(lora_rank=0, **{
      k: v for k, v in s.items() if k != "min_speedup"}))
  result["passed"] = result["speedup_vs_sequential_solo"] >= s["min_speedup"]
  return result


SECTIONS: dict[str, Callable[[dict, Any], dict]] = {
    "numerics": section_numerics, "cli": section_cli,
    "bench_jax": section_bench_jax, "bench_torch": section_bench_torch,
    "sweep": section_sweep}


# ---------------------------------------------------------------- the parent


class Child:
  """One section in a subprocess (its own process group), its result file and log."""

  def __init__(self, section: str, args: argparse.Namespace, timeout: float,
               extra: tuple[str, ...] = (), env: dict[str, str] | None = None):
    self.section, self.timeout, self.start = section, timeout, time.time()
    self.folder = tempfile.mkdtemp(prefix=f"gpu_check_{section}_")
    self.result_path, self.log_path = (os.path.join(self.folder, "result.json"),
                                       os.path.join(self.folder, "log.txt"))
    cmd = [sys.executable, os.path.abspath(__file__), f"--section={section}",
           f"--result={self.result_path}", f"--deadline={self.start + timeout - 5}", *extra]
    if args.smoke:
      cmd.append("--smoke")
      env = dict(env or {}, JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compiles ~35% faster
    with open(self.log_path, "w") as log:
      self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, **(env or {})), start_new_session=True)

  def finish(self) -> dict[str, Any]:
    """The section's JSON: its result plus status, exit code, seconds and, on failure, the log."""
    timed_out = False
    try:
      code = self.proc.wait(timeout=max(1.0, self.start + self.timeout - time.time()))
    except subprocess.TimeoutExpired:
      timed_out = True
      os.killpg(self.proc.pid, signal.SIGKILL)  # the section and the CLI runs it started
      code = self.proc.wait()
    result = {}
    if os.path.exists(self.result_path):
      with open(self.result_path) as f:
        result = json.load(f)
    status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
    result = dict(result, status=result.get("status", status) if not timed_out else status,
                  exit_code=code, seconds=round(time.time() - self.start, 1),
                  timeout_s=self.timeout)
    if code:
      with open(self.log_path, errors="replace") as f:
        result["log_tail"] = f.read()[-3000:]
    shutil.rmtree(self.folder, ignore_errors=True)
    return result


def run_bench(args: argparse.Namespace, settings: dict, budget_end: float) -> dict[str, Any]:
  """Both workers in turn (each owns the GPU), then the per-batch comparison."""
  timeouts = settings["timeouts"]
  jax_part = Child("bench_jax", args, min(timeouts["bench_jax"], budget_end - time.time())).finish()
  done = [r["batch"] for r in jax_part.get("results", []) if "error" not in r]
  torch_part = {"status": "skipped", "reason": "no jax result to compare with"}
  left = budget_end - time.time()
  if done and left > 10:
    torch_part = Child("bench_torch", args, min(timeouts["bench_torch"], left),
                       (f"--batches={','.join(map(str, done))}",)
                       + (("--torch_on_cpu",) if args.torch_on_cpu else ())).finish()
  out = dict(status=jax_part["status"], jax=_without(jax_part, "results"),
             torch=_without(torch_part, "results"))
  out.update(compare(settings, jax_part.get("results", []), torch_part.get("results", [])))
  # Batch 32 (the first) measured by both is a pass, also when a larger one ran out of
  # time; a smoke run may skip torch (no CUDA).
  first = settings["bench"]["batches"][0]
  torch_done = [r["batch"] for r in torch_part.get("results", []) if "error" not in r]
  out["passed"] = first in done and (first in torch_done or (
      args.smoke and torch_part["status"] == "skipped"))
  return out


def _without(d: dict, key: str) -> dict:
  return {k: v for k, v in d.items() if k != key}


BRIEF = ("framework", "device", "step_s", "compile_s", "examples_per_s", "tokens_per_s", "mfu",
         "peak_device_bytes", "peak_host_bytes", "error")


def compare(settings: dict, ours: list[dict], theirs: list[dict]) -> dict[str, Any]:
  """Per batch size: both frameworks' figures and torch's step time over ours (> 1: faster)."""
  b = settings["bench"]
  torch_by_batch = {r["batch"]: r for r in theirs if "error" not in r}
  rows, largest = {}, 0
  for r in ours:
    row = rows.setdefault(str(r["batch"]), {"ours": None})
    if "error" not in r:
      pair = [r] + ([torch_by_batch[r["batch"]]] if r["batch"] in torch_by_batch else [])
      bench.summarize(types.SimpleNamespace(model=b["model"], batch=r["batch"], seq=b["seq"],
                                            dtype="bfloat16"), pair)
      print(bench.format_table(pair), flush=True)
      if r["batch"] < largest:  # jax's peak is the process's: a larger batch came first
        r["peak_device_bytes"] = None
      largest = max(largest, r["batch"])
      if len(pair) > 1:
        row["torch"] = {k: pair[1].get(k) for k in BRIEF if k in pair[1]}
        row["torch_step_over_ours"] = r["speedup_vs_torch"]
    row["ours"] = {k: r.get(k) for k in BRIEF if k in r}
  fine = [int(k) for k, v in rows.items() if "error" not in v["ours"]]
  best = max(fine, key=lambda k: rows[str(k)]["ours"]["examples_per_s"]) if fine else None
  card = next((r["device"] for r in ours + theirs if "device" in r), None)
  first = b["batches"][0]  # 32 on the GPU: the README's figures
  return dict(model=b["model"], seq=b["seq"], dtype="bfloat16", card=card, batches=rows,
              best_batch=best, at_best=rows.get(str(best)), **{f"at_{first}": rows.get(str(first))})


def output_path(args: argparse.Namespace) -> str:
  if args.json:
    return args.json
  return os.path.join(os.environ.get("OUT") or common.REPO, "gpu_check.json")


def run_all(args: argparse.Namespace) -> int:
  mode = "smoke" if args.smoke else "gpu"
  settings, wanted = MODES[mode], args.sections.split(",")
  start = time.time()
  budget_end = start + settings["budget"]
  report = dict(mode=mode, started=datetime.datetime.now().isoformat(timespec="seconds"),
                sections=wanted, environment=environment())
  path = output_path(args)

  def save() -> None:  # after every section: a killed run still leaves its JSON
    report["total_s"] = round(time.time() - start, 1)
    with open(path, "w") as f:
      json.dump(report, f, indent=1)
  save()
  # numerics and cli share the GPU: no preallocation, so each takes what it uses.
  quiet = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  children = [Child(s, args, settings["timeouts"][s], env=quiet)
              for s in ("numerics", "cli") if s in wanted]
  for child in children:
    report[child.section] = child.finish()
    save()
  if "bench" in wanted:
    report["bench"] = run_bench(args, settings, budget_end)
  if "sweep" in wanted:  # opt-in: after the others, in what is left of its own timeout
    report["sweep"] = Child("sweep", args, settings["timeouts"]["sweep"]).finish()
  report["passed"] = all(bool(report[s].get("passed")) for s in wanted)
  save()
  for s in wanted:
    print(f"{s}: {report[s].get('status', 'ok')}, passed={report[s].get('passed')}", flush=True)
  print(f"wrote {path} ({report['total_s']} s): passed={report['passed']}", flush=True)
  return 0 if report["passed"] else 1


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="CPU, BERT-Tiny, 2-3 steps")
  parser.add_argument("--sections", default="numerics,cli,bench")
  parser.add_argument("--json", default="", help="output (default $OUT/ or the repo root)")
  parser.add_argument("--torch_on_cpu", action="store_true",
                      help="--smoke: time PyTorch on the CPU too")
  parser.add_argument("--section", default="", choices=["", *SECTIONS], help=argparse.SUPPRESS)
  parser.add_argument("--result", default="", help=argparse.SUPPRESS)
  parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
  parser.add_argument("--batches", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.section:
    return run_all(args)

  def save(result: dict) -> None:
    with open(args.result, "w") as f:
      json.dump(result, f, indent=1)
  args.save = save
  # A section about to be killed at its timeout first writes where it is to its log.
  if args.deadline:
    faulthandler.dump_traceback_later(max(1.0, args.deadline + 3 - time.time()), exit=False)
  save(SECTIONS[args.section](MODES["smoke" if args.smoke else "gpu"], args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
