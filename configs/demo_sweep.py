"""Demo sweep: configs/demo.py's MiniLM on the SST-2 sample, 3 learning rates x 2 seeds.

All 6 fine-tunes train as one program (members stacked on the state's 'member' axis);
the end prints and writes workdir/sweep_results.{json,md}: mean ± std over seeds per
learning rate, the best one, and the best member. `make demo-sweep` runs it:

  flaxbert-cls train --config=configs/demo_sweep.py --workdir=workdirs/demo_sweep

Short (num_train_steps=80 of batch 32: a third of an epoch) so that it finishes in minutes
on a CPU; --config.num_train_steps=-1 trains demo.py's 2 epochs.
"""

import importlib.util
import os

import ml_collections

# configs/ is not a package (config files load by path): demo.py beside this file.
_spec = importlib.util.spec_from_file_location(
    "demo", os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  c.num_train_steps = 80
  c.eval_every_steps = 0  # at the end
  c.log_every_steps = 20
  c.sweep.learning_rate = (5e-5, 1e-4, 2e-4)
  c.sweep.seed = (0, 1)
  return c
