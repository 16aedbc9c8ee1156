"""Planning a run for hardware it is not on: `flaxbert-cls plan`.

`plan` builds the run from shapes on a TPU topology (libtpu compiles without a TPU), compiles
its train and eval steps per sequence bucket and says what each needs per chip;
`program_stats` reads those figures from a compiled program (XLA's memory and cost analysis,
its collectives). Above training (it builds training's state and steps), below report.
"""
