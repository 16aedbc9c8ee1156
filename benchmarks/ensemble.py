"""Does averaging seeds pay? Runs of one recipe that differ only in the seed, each scored alone
and all averaged (decisions/ensemble.py), on the same held-out rows; writes docs/ensembles.md.

  python benchmarks/ensemble.py --recipe=goemotions --seeds=0,1 [--root=workdirs/ensemble]
  python benchmarks/ensemble.py --render   # the page again from its rows

Each seed trains the recipe (benchmarks/recipes.py's RECIPES) from scratch in ROOT/NAME_seedS,
one at a time, with `--config.seed=S` (parameter init of the head, dropout and data order),
and `eval --step=latest` scores its last checkpoint; a seed whose workdir already holds that
eval (eval/eval.json at its last step) is read, not trained again. These are the members a
`config.sweep.seed` sweep trains in one program (docs/sweeps.md). The figure is the recipe's:
thresholds cross-fitted on the held-out rows (each half cut at the other half's), for each
member alone and for the mean of their probabilities; argmax where the recipe tunes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recipes  # noqa: E402  (benchmarks/recipes.py: the recipes, load sampler, CLI runner)
from flaxbert_cls.decisions import metrics as metrics_lib  # noqa: E402
from flaxbert_cls.decisions import tuning  # noqa: E402

PAGE = os.path.join(recipes.REPO, "docs", "ensembles.md")
BEGIN, END = "<!-- rows:begin", "rows:end -->"


def _member(name: str, seed: int, root: str) -> dict[str, Any]:
  """Train (unless done) and eval one seed; its workdir, minutes and load."""
  recipe = recipes.RECIPES[name]
  if recipe.prepare:
    recipe.prepare()
  workdir = os.path.join(root, f"{name}_seed{seed}")
  done = os.path.join(workdir, "eval", "eval.json")
  log_path = workdir + ".log"
  if os.path.isfile(done):
    last = recipes.jsonl(os.path.join(workdir, "train_log.jsonl"))[-1]["step"]
    if json.load(open(done))["step"] == last:
      print(f"{workdir}: trained and evaluated at its last step {last}; read, not trained")
      return {"seed": seed, "workdir": workdir, **json.load(open(workdir + ".timing.json"))}
  os.makedirs(workdir, exist_ok=True)
  sampler, start = recipes.LoadSampler(), time.time()
  sampler.start()
  recipes.cli("train", f"--config={os.path.join(recipes.REPO, recipe.config)}",
              f"--workdir={workdir}", "--config.resume=False", f"--config.seed={seed}",
              *recipe.overrides, log_path=log_path)
  timing = {"train_minutes": (time.time() - start) / 60, **sampler.stop()}
  recipes.cli("eval", f"--workdir={workdir}", "--step=latest", log_path=log_path)
  json.dump(timing, open(workdir + ".timing.json", "w"))
  return {"seed": seed, "workdir": workdir, **timing}


def _score(probs: np.ndarray, gold: np.ndarray, multi: bool, main: str, tunes: bool) -> float:
  if multi or tunes:
    return tuning.cross_fitted(probs, gold, main, multi)
  return metrics_lib.compute_metrics((main,), probs.argmax(-1), gold)[main]


def measure(name: str, seeds: list[int], root: str) -> dict[str, Any]:
  recipe = recipes.RECIPES[name]
  members = [_member(name, s, root) for s in seeds]
  read = [recipes.prediction_arrays(recipes.jsonl(os.path.join(m["workdir"], "eval",
                                                                "predictions.jsonl")))
          for m in members]
  names, _, gold, multi = read[0]
  for m, (n, _, g, _) in zip(members, read):
    if n != names or not np.array_equal(g, gold):
      raise SystemExit(f"{m['workdir']}: scored on other rows or labels than {members[0]}")
  metrics = json.load(open(os.path.join(members[0]["workdir"], "eval", "eval.json")))["metrics"]
  tunes = multi or f"{recipe.main}_tuned" in metrics
  mean = np.mean([p for _, p, _, _ in read], axis=0)  # what eval --member=mean scores
  for m, (_, p, _, _) in zip(members, read):
    m["unseen"] = _score(p, gold, multi, recipe.main, tunes)
  return {"recipe": name, "config": recipe.config, "rows": recipe.rows, "metric": recipe.main,
          "how": "cross-fitted thresholds" if tunes else "last checkpoint, argmax",
          "members": [{k: v for k, v in m.items() if k != "workdir"} for m in members],
          "ensemble_unseen": _score(mean, gold, multi, recipe.main, tunes),
          "machine": f"{os.cpu_count()} cores, {recipes.cpu_name()}",
          "date": datetime.date.today().isoformat()}


def _rows() -> list[dict[str, Any]]:
  if not os.path.isfile(PAGE):
    return []
  text = open(PAGE).read()
  return json.loads(text[text.index(BEGIN) + len(BEGIN):text.index(END)])


def render(rows: list[dict[str, Any]]) -> None:
  lines = [
      "# Ensembles: seeds averaged against one member", "",
      "Written by `python benchmarks/ensemble.py` (its docstring says what it runs); do not edit",
      "by hand. Each member is the recipe trained with one seed (what a `config.sweep.seed`",
      "sweep's member is, docs/sweeps.md), scored on its last checkpoint; the ensemble is the",
      "mean of the members' probabilities (`flaxbert_cls/decisions/ensemble.py`), scored the",
      "same way. Figures are on the recipe's held-out rows, with thresholds cross-fitted where",
      "the recipe tunes them: estimates for rows the runs never saw.", "",
      "| recipe | rows | metric | members (seed: unseen, training) | mean member | ensemble, "
      "unseen | gain over the mean member | cost | machine, date |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ms = r["members"]
    each = "; ".join(f"{m['seed']}: {m['unseen']:.4f}, {m['train_minutes']:.1f} min at load "
                     f"{m['mean']:.2f}" for m in ms)
    mean_member = float(np.mean([m["unseen"] for m in ms]))
    lines.append(
        f"| `{r['config']}` | {r['rows']} | {r['metric']} ({r['how']}) | {each} | "
        f"{mean_member:.4f} | **{r['ensemble_unseen']:.4f}** | "
        f"{r['ensemble_unseen'] - mean_member:+.4f} | {len(ms)}x training and inference | "
        f"{r['machine']}, {r['date']} |")
  lines += ["", BEGIN, json.dumps(rows, indent=1), END, ""]
  open(PAGE, "w").write("\n".join(lines))
  print(f"wrote {PAGE}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", choices=sorted(recipes.RECIPES))
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--root", default=os.path.join(recipes.REPO, "workdirs", "ensemble"))
  parser.add_argument("--render", action="store_true")
  args = parser.parse_args()
  rows = {r["recipe"]: r for r in _rows()}
  if not args.render:
    if not args.recipe:
      parser.error("--recipe is required (or --render)")
    rows[args.recipe] = measure(args.recipe, [int(s) for s in args.seeds.split(",")],
                                args.root)
  render(list(rows.values()))


if __name__ == "__main__":
  main()
