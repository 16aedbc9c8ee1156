"""Training: a validated config becomes an experiment, a sharded state and the loop.

Owns the experiment (`experiment`: tasks, labels, model, tokenizer, mesh), the train state
(`state`), the fresh state with a start's weights (`starts`: HF checkpoint, export or
previous workdir), a saved run read back (`runs`), the optimizer and its masks
(`optimizer`), the jitted step (`step`), the members of a sweep as a leading state axis
(`members`) and the one place a sweep and a run differ (`layouts`), batches per step
(`batches`), checkpoints and resume (`checkpoints`, `resume`), evaluation during and after
training (`evaluate`), progress and metrics files (`progress`) and the loop (`train`). It
imports config, data, model and decisions; nothing from plan, report, serving or cli.
"""
