"""What pays for macro F1 on skewed classes: each loss against plain cross-entropy and TF-IDF +
logistic regression (plain and balanced) on the same long-tailed rows; writes docs/imbalance.md.

  python benchmarks/imbalance.py --set=SET|all [--method=M,M,...] [--root=workdirs/imbalance]
  python benchmarks/imbalance.py --render   # the page again from its rows

SET: configs/skewed.py's sets (sms_spam, sst2_5pct, newsgroups_longtail), made here when
missing. METHODS: `ce` (plain softmax cross-entropy), `balanced` (class_weights=auto: inverse
frequency), `effective` (class_weights=effective: Cui et al. 2019's effective number of
samples, beta 0.999) and `logit_adjusted` (logit_adjustment=1: Menon et al. 2021's loss,
log class priors added to the logits in training only). Each run trains from scratch, one at a
time, and is scored on its last checkpoint by argmax: nothing is chosen on the held-out rows,
so each figure is one on rows the run never saw. A set whose config blends the run with its
bag of words (blend_baseline) is scored blended too, by `eval`: the weight chosen on one half
of the held-out rows and scored on the other. Beside `ce`: its own predictions decided by
Menon et al.'s post-hoc correction, argmax of log p - log prior (tau 1, nothing tuned). Its TF-IDF baseline is fitted on the same
rows with the run's class weights: the `ce` run's is the plain one, `balanced`'s the balanced.
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: the data folder)
import recipes  # noqa: E402  (benchmarks/recipes.py: the load sampler, the CLI runner)

REPO = recipes.REPO
PAGE = os.path.join(REPO, "docs", "imbalance.md")
SETS = ("sms_spam", "sst2_5pct", "newsgroups_longtail")
METHODS = {
    "ce": (),
    "balanced": ("--config.class_weights=auto",),
    "effective": ("--config.class_weights=effective",),
    "logit_adjusted": ("--config.logit_adjustment=1.0",),
}
ROWS = {
    "sms_spam": "SMS spam as it is: train 4,136 (13% spam) → held-out 1,035",
    "sst2_5pct": "SST-2 train sentences, 5% positive: train 6,000 → held-out 4,000",
    "newsgroups_longtail": "20 Newsgroups, 20 groups falling 40-fold (400 → 10 posts): "
                           "train 2,220 → the near-balanced held-out 1,132",
}
SKEWED_DIR = os.path.join(REPO, "workdirs", "data", "skewed")


def _sst2_5pct(seed: int = 0, train: tuple[int, int] = (5700, 300),
               heldout: tuple[int, int] = (3800, 200)) -> None:
  """Distinct SST-2 train sentences, shuffled by `seed`: (negatives, positives) per split."""
  out = os.path.join(SKEWED_DIR, "sst2_5pct")
  if os.path.isfile(os.path.join(out, "dev.tsv")):
    return
  path = os.path.join(common.data_dir(), "glue", "SST-2", "train.tsv")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  seen, by_label = set(), {0: [], 1: []}
  for r in rows:
    text = r["sentence"].strip()
    if text and text not in seen:  # a sentence in both splits would be seen, not unseen
      seen.add(text)
      by_label[int(r["label"])].append(text)
  rng = np.random.default_rng(seed)
  order = {y: [texts[i] for i in rng.permutation(len(texts))] for y, texts in by_label.items()}
  names = ("negative", "positive")
  os.makedirs(out, exist_ok=True)
  start = {0: 0, 1: 0}
  for split, counts in (("train", train), ("dev", heldout)):
    picked = []
    for y, n in enumerate(counts):
      picked += [(t, names[y]) for t in order[y][start[y]:start[y] + n]]
      start[y] += n
    picked = [picked[i] for i in rng.permutation(len(picked))]
    with open(os.path.join(out, f"{split}.tsv"), "w") as f:
      f.write("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in picked))


def _newsgroups_longtail(seed: int = 0, largest: int = 400, ratio: float = 40.0) -> None:
  """The held-out recipe's training posts, group g (in a seeded order) keeping
  largest * ratio^(-rank/19) of them: 400 down to 10."""
  recipes.newsgroups_split()
  out = os.path.join(SKEWED_DIR, "newsgroups_longtail")
  if os.path.isfile(os.path.join(out, "train.jsonl")):
    return
  rows = recipes.jsonl(os.path.join(REPO, "workdirs", "data", "newsgroups", "train.jsonl"))
  groups = sorted({r["label"] for r in rows})
  rng = np.random.default_rng(seed)
  ranked = [groups[i] for i in rng.permutation(len(groups))]
  keep = {g: int(round(largest * ratio ** (-k / (len(groups) - 1)))) for k, g in enumerate(ranked)}
  picked = []
  for g in ranked:
    mine = [r for r in rows if r["label"] == g]
    picked += [mine[i] for i in sorted(rng.permutation(len(mine))[:keep[g]])]
  picked = [picked[i] for i in rng.permutation(len(picked))]
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "train.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in picked))


PREPARE = {"sms_spam": recipes.sms_split, "sst2_5pct": _sst2_5pct,
           "newsgroups_longtail": _newsgroups_longtail}


def _train_labels(workdir: str) -> list[str]:
  """The run's training labels as names, read from its saved config's train_file."""
  path = json.load(open(os.path.join(workdir, "config.json")))["train_file"]
  if path.endswith(".jsonl"):
    return [str(r["label"]) for r in recipes.jsonl(path)]
  with open(path, newline="") as f:
    return [r["label"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def post_hoc_f1_macro(workdir: str) -> float:
  """Macro F1 of the run's eval predictions decided by argmax log p - log prior (Menon et al.'s
  post-hoc logit adjustment, tau 1), priors from its training labels."""
  rows = recipes.jsonl(os.path.join(workdir, "eval", "predictions.jsonl"))
  names = list(rows[0]["probabilities"])
  probs = np.array([[r["probabilities"][n] for n in names] for r in rows])
  gold = np.array([names.index(str(r["label"])) for r in rows])
  counts = collections.Counter(_train_labels(workdir))
  prior = np.array([counts[n] for n in names], np.float64) / sum(counts.values())
  decided = np.argmax(np.log(np.maximum(probs, 1e-12)) - np.log(prior), axis=1)
  return recipes.metrics_lib.compute_metrics(("f1_macro",), decided, gold)["f1_macro"]


def run(set_name: str, method: str, root: str) -> dict[str, Any]:
  PREPARE[set_name]()
  workdir = os.path.join(root, f"{set_name}-{method}")
  os.makedirs(workdir, exist_ok=True)
  log_path = workdir + ".log"
  sampler = recipes.LoadSampler()
  sampler.start()
  start = time.time()
  recipes.cli("train", f"--config={os.path.join(REPO, 'configs', 'skewed.py')}:{set_name}",
               f"--workdir={workdir}", "--config.resume=False", *METHODS[method],
               log_path=log_path)
  seconds = time.time() - start
  load = sampler.stop()
  final = [r for r in recipes.jsonl(os.path.join(workdir, "metrics.jsonl"))
           if "baseline/f1_macro" in r][-1]
  config = recipes.saved_config.load_saved(workdir)
  blend = {}
  if config.blend_baseline:  # the last checkpoint, as the columns beside it
    recipes.cli("eval", f"--workdir={workdir}", "--step=latest", log_path=log_path)
    blend = recipes.blend_scores(workdir, "f1_macro")
  return {
      "set": set_name, "method": method, "overrides": list(METHODS[method]),
      "epochs": config.num_train_epochs, **blend,
      "f1_macro": final["f1_macro"], "accuracy": final["accuracy"],
      **({"post_hoc_f1_macro": post_hoc_f1_macro(workdir)} if method == "ce" else {}),
      "baseline_f1_macro": final["baseline/f1_macro"],
      "baseline_accuracy": final["baseline/accuracy"],
      "train_minutes": seconds / 60, "load_mean": load["mean"], "load_max": load["max"],
      "machine": f"{os.cpu_count()} cores, {recipes.cpu_name()}",
      "date": datetime.date.today().isoformat(),
  }


def _epochs(row: dict[str, Any]) -> float:
  """Rows written before the field was recorded trained configs/skewed.py's 2 epochs."""
  return row.get("epochs", 2.0)


def write(rows: list[dict[str, Any]]) -> None:
  f = recipes.fmt
  lines = ["| set | TF-IDF + LR | TF-IDF + LR, balanced | " +
           " | ".join(f"`{m}`" for m in METHODS) + " | `ce`, post-hoc adjusted | "
           "run + its TF-IDF blended, unseen (weight) | best: over balanced TF-IDF, over `ce` |",
           "|---|---|---|" + "---|" * len(METHODS) + "---|---|---|"]
  for s in SETS:
    mine = {r["method"]: r for r in rows if r["set"] == s}
    if not mine:
      continue
    plain = mine.get("ce", {}).get("baseline_f1_macro")
    balanced = mine.get("balanced", {}).get("baseline_f1_macro")
    scores = {m: r["f1_macro"] for m, r in mine.items()}
    if "post_hoc_f1_macro" in mine.get("ce", {}):
      scores["ce, post-hoc adjusted"] = mine["ce"]["post_hoc_f1_macro"]
    best = max(scores, key=scores.get)
    top = scores[best]
    cells = [f"{f(mine[m]['f1_macro'])} ({_epochs(mine[m]):g} ep, "
             f"{mine[m]['train_minutes']:.1f} min)" if m in mine else "—" for m in METHODS]
    blends = [f"`{m}` {f(r['blend_unseen'])} (w={r['blend_weight']:.2f})"
              for m, r in mine.items() if "blend_unseen" in r]
    if blends:
      scores.update({f"{m} + TF-IDF blend": r["blend_unseen"]
                     for m, r in mine.items() if "blend_unseen" in r})
      best = max(scores, key=scores.get)
      top = scores[best]
    gap = (f"`{best}`: " + (f"{top - balanced:+.4f}" if balanced is not None else "—") + ", " +
           (f"{top - mine['ce']['f1_macro']:+.4f}" if "ce" in mine else "—"))
    post_hoc = f(mine.get("ce", {}).get("post_hoc_f1_macro"))
    lines.append(f"| {ROWS[s]} | {f(plain)} | {f(balanced)} | " + " | ".join(cells) +
                 f" | {post_hoc} | {'; '.join(blends) or '—'} | {gap} |")
  loads = [r["load_mean"] for r in rows]
  page = "\n".join([
      "# Skewed classes: what pays for macro F1",
      "",
      "Written by `python benchmarks/imbalance.py` (its docstring says what it runs); do not "
      "edit by hand. Macro F1 on rows the run never saw (its last checkpoint, argmax), the "
      "packaged all-MiniLM-L6-v2, `configs/skewed.py:SET` with the method's setting; "
      "TF-IDF + logistic regression fitted on the same training rows, plain and balanced. "
      "Epochs and training minutes beside each (tokenizing, compiling, the baseline and the "
      "final eval included). The blend column: the run's and its baseline's probabilities "
      "averaged with the run's weight w (`decisions/blend.py`), w chosen on one half of the "
      "held-out rows and scored on the other (sets whose config blends).",
      "",
      *lines,
      "",
      (f"One training at a time on {rows[0]['machine']}, load average while training: mean "
       f"{min(loads):.2f}-{max(loads):.2f}." if rows else ""),
      "",
      *recipes.rows_block(rows)])
  with open(PAGE, "w") as fh:
    fh.write(page)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--set", choices=[*SETS, "all"])
  parser.add_argument("--method", default=",".join(METHODS))
  parser.add_argument("--root", default=os.path.join(REPO, "workdirs", "imbalance"))
  parser.add_argument("--render", action="store_true")
  parser.add_argument("--post_hoc", action="store_true",
                      help="with --render: score the `ce` rows' post-hoc correction again from "
                           "their workdirs under --root")
  args = parser.parse_args()
  rows = recipes.page_rows(PAGE)
  if args.render:
    for r in rows:
      workdir = os.path.join(args.root, f"{r['set']}-{r['method']}")
      if args.post_hoc and r["method"] == "ce" and os.path.isdir(workdir):
        r["post_hoc_f1_macro"] = post_hoc_f1_macro(workdir)
    write(rows)
    return
  if not args.set:
    parser.error("--set is required (or --render)")
  methods = args.method.split(",")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"--method: {unknown} unknown; choose from {', '.join(METHODS)}")
  for s in SETS if args.set == "all" else [args.set]:
    for m in methods:
      row = run(s, m, args.root)
      rows = [r for r in rows if (r["set"], r["method"]) != (s, m)] + [row]
      write(rows)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
