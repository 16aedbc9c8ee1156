"""Training-controls table on the demo recipe: what trains, optimizer bytes, speed, accuracy.

  python tools/controls_table.py                     # full, freeze-bottom-4, head-only, LoRA r=8
  python tools/controls_table.py --variants=full,bf16

Each variant is the `configs/demo.py` recipe (MiniLM, 8,000 SST-2 sentences, 2 epochs)
with a few keys changed; dev accuracy is on the full SST-2 dev set.
"""

import argparse
import importlib.util
import os
import tempfile

import jax

from flaxbert_cls.training import optimizer as optim
from flaxbert_cls.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "full": {},
    "freeze-bottom-4": {"freeze_bottom_layers": 4},
    "head-only": {"freeze": ("^bert/",)},
    "lora-r8": {"lora_rank": 8, "lora_alpha": 16.0, "learning_rate": 5e-4},
    "bf16": {"dtype": "bfloat16"},
    "full-3-epochs": {"num_train_epochs": 3.0},
}


def demo_config():
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs/demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variants", default="full,freeze-bottom-4,head-only,lora-r8")
  parser.add_argument("--steps", type=int, default=0, help="0 = the recipe's 2 epochs")
  args = parser.parse_args()
  rows = []
  for name in args.variants.split(","):
    config = demo_config()
    config.update(VARIANTS[name])
    if args.steps:
      config.num_train_steps = args.steps
    config.eval_every_steps = 0
    with tempfile.TemporaryDirectory() as workdir:
      result = train.train_and_evaluate(config, workdir)
    params, opt_state = result["state"].params, result["state"].opt_state
    frozen = optim.path_mask(params, optim.freeze_patterns(config))
    trainable = sum(x.size for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen))
                    if not f)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))
    examples = result["step"] * config.batch_size
    rows.append((name, trainable, opt_bytes, examples / result["seconds"],
                 result["eval"]["accuracy"]))
    print(f"{name}: {rows[-1]}", flush=True)
  print(f"\n| variant | trainable params | optimizer state bytes | examples/s (incl. compile"
        f" + evals) | SST-2 dev accuracy |\n|---|---|---|---|---|")
  for name, trainable, opt_bytes, rate, accuracy in rows:
    print(f"| {name} | {trainable:,} | {opt_bytes:,} | {rate:.1f} | {accuracy:.4f} |")


if __name__ == "__main__":
  main()
