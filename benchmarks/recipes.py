"""The recipes' results table: train a recipe, score it and its baseline on rows it never chose
anything on, and write its row to docs/results.md (and the README's summary of it).

  python benchmarks/recipes.py --recipe=NAME|all [--root=workdirs/recipes]
  python benchmarks/recipes.py --render   # the pages again from docs/results.md's rows

NAME: goemotions, sms_spam, sms_spam_blend, newsgroups, newsgroups_windows,
newsgroups_windows_attention or sst2 (RECIPES).

Each recipe trains from scratch (`--config.resume=False`) in `ROOT/NAME`, one at a time, while
a thread samples the load average every 10 s: a figure trained at a mean load over
`QUIET_LOAD` is marked as such. Its final checkpoint is evaluated on the validation rows.

"Unseen" is what a user should expect on new rows: when the run tunes decision thresholds on
the validation rows, each half of them is cut at the thresholds tuned on the other half
(cross-fitted); when it tunes nothing (and evaluates its last checkpoint, choosing none), its
validation figure is already one on rows it never chose anything on. "Dev-tuned" is the figure
with thresholds tuned and scored on the same rows: optimistic, beside it for comparison.
The baseline (TF-IDF + logistic regression on the same training rows) is scored the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

import common  # benchmarks/common.py: the repository on sys.path, the data folder
from flaxbert_cls import saved_config  # pylint: disable=g-import-not-at-top
from flaxbert_cls.decisions import tuning  # pylint: disable=g-import-not-at-top

REPO = common.REPO
RESULTS = os.path.join(REPO, "docs", "results.md")
README = os.path.join(REPO, "README.md")
QUIET_LOAD = 2.5  # mean 1-minute load average on 2 cores above which a time is not a figure
BEGIN, END = "<!-- recipes:begin -->", "<!-- recipes:end -->"


def sms_split() -> None:
  """The SMS Spam Collection has no split: de-duplicated, stratified 80/20, seed 0."""
  out = os.path.join(REPO, "workdirs", "data", "sms_spam")
  if not os.path.isfile(os.path.join(out, "dev.tsv")):
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "dedup_split.py"),
                    f"--input={os.path.join(common.data_dir(), 'sms_spam', 'SMSSpamCollection')}",
                    "--columns=label,sentence", f"--output_dir={out}"], check=True)


@dataclasses.dataclass(frozen=True)
class Recipe:
  config: str  # configs/NAME.py
  main: str  # the main metric's name in metrics.jsonl
  rows: str  # what it trains on and is scored on, for the table
  overrides: tuple[str, ...] = ()
  prepare: Any = None


def newsgroups_split() -> None:
  """A stratified 10% of 20 Newsgroups bydate train held out, seed 0 (configs/newsgroups.py)."""
  out = os.path.join(REPO, "workdirs", "data", "newsgroups")
  if not os.path.isfile(os.path.join(out, "heldout.jsonl")):
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "newsgroups_split.py"),
                    "--heldout=0.1", f"--out_dir={out}"], check=True)


RECIPES = {
    "goemotions": Recipe("configs/goemotions.py", "f1_macro",
                         "GoEmotions train 43,410 → dev 5,426 (28 labels, multi-label)"),
    "sms_spam": Recipe("configs/sms_spam.py", "f1",
                       "SMS spam, de-duplicated: train 4,136 → held-out 1,035 (131 spam)",
                       prepare=sms_split),
    "sms_spam_blend": Recipe("configs/sms_spam.py", "f1",
                             "SMS spam as above, decided by the argmax of the run blended with "
                             "its bag of words (no threshold)",
                             ("--config.tune_thresholds=False", "--config.blend_baseline=True"),
                             prepare=sms_split),
    "newsgroups": Recipe("configs/newsgroups.py", "accuracy",
                         "20 Newsgroups bydate train: 10,182 posts → held-out 1,132 (20 groups), "
                         "the first 128 tokens of each post", prepare=newsgroups_split),
    "newsgroups_windows": Recipe("configs/newsgroups.py", "accuracy",
                                 "20 Newsgroups as above, 4 windows of 128 tokens per post (in "
                                 "training the first and one drawn from the rest per step)",
                                 ("--config.long_document=windows",), prepare=newsgroups_split),
    "newsgroups_windows_attention": Recipe(
        "configs/newsgroups.py", "accuracy",
        "20 Newsgroups as the windows row, the windows' [CLS] vectors combined by learned weights "
        "(`window_pooling=attention`)",
        ("--config.long_document=windows", "--config.window_pooling=attention"),
        prepare=newsgroups_split),
    "sst2": Recipe("configs/demo.py", "accuracy",
                   "SST-2 sample 8,000 → SST-2 dev 872 (`make demo`)"),
}


class LoadSampler(threading.Thread):
  """The 1-minute load average every `every` seconds while a training runs."""

  def __init__(self, every: float = 10.0):
    super().__init__(daemon=True)
    self.every, self.samples, self.done = every, [], threading.Event()

  def run(self) -> None:
    while not self.done.wait(self.every):
      self.samples.append(os.getloadavg()[0])

  def stop(self) -> dict[str, float]:
    self.done.set()
    self.join()
    s = self.samples or [os.getloadavg()[0]]
    return {"mean": float(np.mean(s)), "max": float(np.max(s))}


def cli(*args: str, log_path: str) -> None:
  binary = os.path.join(os.path.dirname(sys.executable), "flaxbert-cls")
  with open(log_path, "a") as log:
    subprocess.run([binary, *args], check=True, stdout=log, stderr=subprocess.STDOUT,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def prediction_arrays(predictions: list[dict[str, Any]]
                      ) -> tuple[list[str], np.ndarray, np.ndarray, bool]:
  """eval/predictions.jsonl rows as (label names, probabilities [N, C], gold [N] or [N, C],
  multi-label)."""
  names = list(predictions[0]["probabilities"])
  probs = np.array([[r["probabilities"][n] for n in names] for r in predictions])
  multi = isinstance(predictions[0]["label"], list)
  gold = (np.array([[n in r["label"] for n in names] for r in predictions], np.int64) if multi
          else np.array([names.index(str(r["label"])) for r in predictions]))
  return names, probs, gold, multi


def _cross_fitted(predictions: list[dict[str, Any]], main: str) -> float:
  """The main metric with thresholds cross-fitted on the rows: multi-label per label, binary
  on P(class 1)."""
  _, probs, gold, multi = prediction_arrays(predictions)
  return tuning.cross_fitted(probs, gold, main, multi)


def blend_scores(workdir: str, main: str) -> dict[str, Any]:
  """The run + baseline blend as `eval` scored it (decisions/blend.py: its weight chosen on
  all the validation rows, and cross-fitted); {} for runs without one (multi-label)."""
  metrics = json.load(open(os.path.join(workdir, "eval", "eval.json")))["metrics"]
  if f"blend/{main}" not in metrics:
    return {}
  return {"blend_unseen": metrics[f"blend/{main}"],
          "blend_dev_tuned": metrics[f"blend/{main}_tuned"],
          "blend_weight": metrics["blend/weight"]}


def run_recipe(name: str, root: str) -> dict[str, Any]:
  recipe = RECIPES[name]
  if recipe.prepare:
    recipe.prepare()
  workdir = os.path.join(root, name)
  os.makedirs(workdir, exist_ok=True)
  log_path = workdir + ".log"
  load_before = os.getloadavg()[0]
  sampler = LoadSampler()
  sampler.start()
  start = time.time()
  cli("train", f"--config={os.path.join(REPO, recipe.config)}", f"--workdir={workdir}",
       "--config.resume=False", *recipe.overrides, log_path=log_path)
  seconds = time.time() - start
  load = sampler.stop()
  # The last checkpoint (the run chooses none) on the validation rows: eval/predictions.jsonl.
  cli("eval", f"--workdir={workdir}", "--step=latest", log_path=log_path)
  config = saved_config.load_saved(workdir)
  final = [r for r in jsonl(os.path.join(workdir, "metrics.jsonl"))
           if "baseline/" + recipe.main in r][-1]
  train_log = jsonl(os.path.join(workdir, "train_log.jsonl"))
  speeds = [r["examples_per_sec"] for r in train_log[1:]] or [train_log[-1]["examples_per_sec"]]
  predictions = jsonl(os.path.join(workdir, "eval", "predictions.jsonl"))
  tuned_key = f"{recipe.main}_tuned"
  tunes = tuned_key in final
  baseline = json.load(open(os.path.join(workdir, "baseline.json")))["metrics"]
  row = {
      "recipe": name, "config": recipe.config, "rows": recipe.rows,
      "overrides": list(recipe.overrides), "main_metric": recipe.main,
      "unseen": _cross_fitted(predictions, recipe.main) if tunes else final[recipe.main],
      "unseen_how": "cross-fitted thresholds" if tunes else "last checkpoint, argmax",
      "baseline_unseen": (baseline.get(f"{recipe.main}_cross_fitted") if tunes
                          else baseline[recipe.main]),
      "dev_tuned": final.get(tuned_key), "baseline_dev_tuned": baseline.get(tuned_key),
      "train_minutes": seconds / 60, "examples_per_sec": float(np.median(speeds)),
      "epochs": config.num_train_epochs, "batch_size": config.batch_size,
      "load_before": load_before, "load_mean": load["mean"], "load_max": load["max"],
      "machine": f"{os.cpu_count()} cores, {cpu_name()}, {platform.system()}",
      "date": datetime.date.today().isoformat(),
      **blend_scores(workdir, recipe.main),
  }
  json.dump(row, open(os.path.join(workdir, "recipe_result.json"), "w"), indent=2)
  return row


def cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def fmt(value: float | None) -> str:
  return "—" if value is None else f"{value:.4f}"


COLUMNS = ("recipe", "rows", "metric", "fine-tune, unseen", "baseline, unseen", "gap",
           "blend with the baseline, unseen (dev-tuned; run's weight)",
           "fine-tune, dev-tuned (optimistic)", "baseline, dev-tuned", "training",
           "examples/s", "load mean / max", "machine, date")


def _recipe(r: dict[str, Any]) -> str:
  return " ".join([f"`{r['config']}`", *(f"`{o}`" for o in r.get("overrides", []))])


def table_row(r: dict[str, Any]) -> str:
  quiet = "" if r["load_mean"] <= QUIET_LOAD else " (loaded: not a timing)"
  return "| " + " | ".join([
      _recipe(r), r["rows"], f"{r['main_metric']} ({r['unseen_how']})",
      f"**{fmt(r['unseen'])}**", fmt(r["baseline_unseen"]),
      f"{r['unseen'] - r['baseline_unseen']:+.4f}",
      (f"{fmt(r['blend_unseen'])} ({fmt(r['blend_dev_tuned'])}; w={r['blend_weight']:.2f})"
       if "blend_unseen" in r else "—"),
      fmt(r["dev_tuned"]), fmt(r["baseline_dev_tuned"]),
      f"{r['train_minutes']:.1f} min, {r['epochs']:g} epochs of batch {r['batch_size']}",
      f"{r['examples_per_sec']:.0f}", f"{r['load_mean']:.2f} / {r['load_max']:.2f}{quiet}",
      f"{r['machine']}, {r['date']}"]) + " |"


def page_rows(path: str) -> list[dict[str, Any]]:
  """The rows a results page holds (its JSON block, rows_block's); [] without one."""
  if not os.path.isfile(path):
    return []
  found = re.search(r"```json\n(.*?)```", open(path).read(), re.S)
  return json.loads(found.group(1)) if found else []


def rows_block(rows: list[dict[str, Any]]) -> list[str]:
  """A results page's closing lines: its rows as the command wrote them, for --render."""
  return ["The rows as the command wrote them:", "", "```json", json.dumps(rows, indent=1),
          "```", ""]


def write(rows: dict[str, dict[str, Any]]) -> None:
  ordered = [rows[k] for k in RECIPES if k in rows]
  header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
  table = header + "\n" + "\n".join(table_row(r) for r in ordered)
  page = "\n".join([
      "# Results: each recipe against its baseline on rows it never saw",
      "",
      "Written by `python benchmarks/recipes.py --recipe=NAME` (module docstring: what it",
      "runs); do not edit by hand. Each row: the packaged all-MiniLM-L6-v2 fine-tuned by the",
      "recipe's config, one training at a time, its final checkpoint scored on the validation",
      "rows; TF-IDF + logistic regression (`docs/decisions.md`) fitted on the same training rows",
      "and scored on the same rows. **Unseen** is the estimate for new rows: thresholds",
      "cross-fitted (each half of the rows cut at the thresholds tuned on the other half) where",
      "the recipe tunes them, else the plain figure of a run that chose nothing on these rows.",
      "**Dev-tuned** tunes and scores on the same rows: optimistic. **Blend**: the run's and the",
      "baseline's class probabilities averaged with the run's weight w (`decisions/blend.py`),",
      "w chosen on one half of the rows and scored on the other (single-label runs).",
      "Training time is the `train`",
      "command's wall time (tokenizing, compiling, the baseline's thread and the final eval",
      "included) on the machine named, at the load average sampled every 10 s while it ran.",
      "",
      table,
      "",
      *rows_block(ordered)])
  with open(RESULTS, "w") as f:
    f.write(page)
  summary = "\n".join([
      BEGIN,
      "| recipe | rows | fine-tune on unseen rows | TF-IDF baseline, same rows | "
      "fine-tune + baseline blend | training (2-core CPU) |",
      "|---|---|---|---|---|---|",
      *(f"| {_recipe(r)} | {r['rows']} | {r['main_metric']} **{fmt(r['unseen'])}** | "
        f"{fmt(r['baseline_unseen'])} ({r['unseen'] - r['baseline_unseen']:+.4f}) | "
        f"{fmt(r.get('blend_unseen'))} | {r['train_minutes']:.0f} min |" for r in ordered),
      END])
  readme = open(README).read()
  if BEGIN in readme:
    readme = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: summary, readme,
                    flags=re.S)
    with open(README, "w") as f:
      f.write(readme)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", choices=[*RECIPES, "all"])
  parser.add_argument("--root", default=os.path.join(REPO, "workdirs", "recipes"))
  parser.add_argument("--render", action="store_true",
                      help="rewrite the pages from the rows docs/results.md holds; no training")
  args = parser.parse_args()
  rows = {r["recipe"]: r for r in page_rows(RESULTS)}
  if args.render:
    write(rows)
    return
  if not args.recipe:
    parser.error("--recipe is required (or --render)")
  names = list(RECIPES) if args.recipe == "all" else [args.recipe]
  for name in names:
    row = run_recipe(name, args.root)
    rows[name] = row
    write(rows)
    print(table_row(row), flush=True)


if __name__ == "__main__":
  main()
